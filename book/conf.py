"""Sphinx configuration of the companion's book: tools/build_book.sh builds it (`./tools/build_book.sh --help`).

The source folder is the repository itself, so that the README and the notebooks are read where they are and their
relative links (notebooks/…, figures/…, ../README.md#…) resolve as they do on the repository's web page. Only the
README (the landing page, included as it is), data/README.md, the numbered notebooks and the tables in figures/ are
pages; the notebooks are rendered with their committed outputs and never executed. Math is MathJax 3, served from
the book's own _static/ (sphinx-mathjax-offline ships the release files), so a book opened offline renders it.
"""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))

project = "LOSSGRAD companion"
author = "the LOSSGRAD companion's authors"
copyright = "the LOSSGRAD companion's authors (MIT); LOSSGRAD: Wójcik, Maziarka, Tabor (2018)"

extensions = ["myst_nb", "sphinx.ext.mathjax"]

root_doc = "README"  # the landing page is the README as it is (index.html, from _extra/, sends the reader there)
# figures/*.md: the tables the notebooks write, pages a link may lead to (as a link to a figure or a .csv leads to
# the file itself), outside the table of contents; not figures/claims.md, whose links are written for the README,
# which includes it
include_patterns = ["README.md", "data/README.md", "figures/*.md", "notebooks/[0-9][0-9]_*.ipynb"]
# folders Sphinx would otherwise walk through looking for sources
exclude_patterns = [".git", ".venv", "build", "runs", "data/*/**", "**/.ipynb_checkpoints", "**/__pycache__",
                    "figures/claims.md"]

# ---- the notebooks: stored outputs, never executed
nb_execution_mode = "off"
nb_output_stderr = "show"  # progress bars and the like print to stderr; they are outputs like any other
nb_merge_streams = True  # a cell's stdout chunks read as one block, as in JupyterLab
nb_ipywidgets_js = {}  # no notebook stores widget state; never load widget scripts from a CDN

# ---- Markdown (MyST)
myst_enable_extensions = ["dollarmath", "amsmath"]  # $…$ and $$…$$ as the notebooks write the paper's notation
myst_dmath_double_inline = True  # $$…$$ that goes on from a paragraph ("… gives\n$$h^* = …$$"): display math
myst_heading_anchors = 6  # GitHub's anchors (#profiles, …) resolve, within a page and across pages
# The README and the notebooks are written for GitHub and JupyterLab, where a page may go from a title (#) to a
# subsection (###) or carry several titles: not an error there, nor in the book.
suppress_warnings = ["myst.header"]

# ---- math: MathJax 3.2.2 from the book's _static/mathjax/, SVG output (no web fonts, so file:// pages render too)
_mathjax = importlib.util.find_spec("sphinx-mathjax-offline")
if _mathjax is None or _mathjax.origin is None:
    raise RuntimeError("sphinx-mathjax-offline is not installed: run tools/build_book.sh (it installs "
                       "book/requirements.txt)")
html_static_path = [str(Path(_mathjax.origin).parent / "static")]  # its mathjax/ folder lands in _static/mathjax/
mathjax_path = "mathjax/tex-svg.js"
mathjax3_config = {"svg": {"fontCache": "global"}}

# ---- the page
html_theme = "sphinx_book_theme"
html_title = "LOSSGRAD: a paper companion"
html_extra_path = ["_extra"]  # index.html: a redirect to README.html, the landing page
html_last_updated_fmt = None
html_copy_source = False
html_show_sourcelink = False
html_context = {"default_mode": "auto"}  # light or dark as the reader's system is (unset, the theme logs an error)
html_theme_options = {
    "home_page_in_toc": True,
    "show_navbar_depth": 1,
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
}


def _add_table_of_contents(app, docname, source):
    """The notebooks' table of contents, added to the landing page as Sphinx reads it (README.md is not changed);
    the tables of figures/ are pages outside it ("orphan")."""
    if docname.startswith("figures/"):
        source[0] = "---\norphan: true\n---\n" + source[0]
    if docname == root_doc:
        notebooks = "\n".join(f"notebooks/{name}" for name in NOTEBOOKS)
        source[0] += (f"\n\n```{{toctree}}\n:hidden:\n:caption: Notebooks\n\n{notebooks}\n```\n\n"
                      "```{toctree}\n:hidden:\n:caption: Reference\n\ndata/README\n```\n")


def setup(app):
    app.connect("source-read", _add_table_of_contents)
