"""The companion as a book: ``tools/build_book.sh`` builds it and headless Chromium reads it (the slow tier).

* The build: ``tools/build_book.sh --out <a temporary folder>``, as a reader runs it (its own set-up, Sphinx with
  warnings as errors): it must succeed, make a page of every numbered notebook and of the README (the landing
  page, which ``index.html`` leads to), show every figure a notebook's outputs hold, and load nothing from
  outside the book (no CDN: the book reads offline).
* A real browser: the landing page (opened as ``index.html``), notebook 00 (the paper's notation in math) and
  notebook 09 (figures), opened from disk (``file://``, as a reader opens the book) in headless Chromium driven by
  Selenium. On each: every ``<img>`` loaded (``naturalWidth > 0``), every math element rendered by MathJax and no
  raw TeX (``$…$``, ``\\(``, ``\\[``) left in the text, every link to a page or anchor of the book resolves (the file
  exists and holds the anchor), nothing was requested from the network and the browser's console shows no error.
  Screenshots of each page (its top, its first figure, its first displayed formula) and the build's log go to
  build/test-artifacts/book/ (``$LOSSGRAD_TEST_ARTIFACTS`` moves it). Without Chromium and chromedriver (Debian:
  ``apt-get install chromium chromium-driver``; .ci/run installs them when it can) or selenium, the browser tests
  skip and say why.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
from browser import headless_chromium

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
ARTIFACTS = Path(os.environ.get("LOSSGRAD_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "book"
# the pages the browser opens: (what to open, the page it must end on, whether it must show math)
PAGES = [("index.html", "README.html", False),
         ("notebooks/00_quadratic_theory.html", "notebooks/00_quadratic_theory.html", True),
         ("notebooks/09_modern_optimizers.html", "notebooks/09_modern_optimizers.html", False)]


def _png_outputs(notebook: Path) -> int:
    return sum("image/png" in output.get("data", {})
               for cell in nbformat.read(notebook, as_version=4).cells for output in cell.get("outputs", []))


class _Page(HTMLParser):
    """The ids (anchors) of an HTML page and the URLs of what it loads (scripts, style sheets, images)."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.loads: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if attrs.get(key):
                self.ids.add(attrs[key])
        if tag in ("script", "img", "iframe") and attrs.get("src"):
            self.loads.append(attrs["src"])
        rel = set((attrs.get("rel") or "").split())
        if tag == "link" and attrs.get("href") and rel & {"stylesheet", "preload", "icon"}:
            self.loads.append(attrs["href"])


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


# ---------------------------------------------------------------- the build
@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    """``tools/build_book.sh --out <tmp>``: the book as a reader builds it; its log goes to the artifacts."""
    out = tmp_path_factory.mktemp("book") / "html"
    started = time.monotonic()
    result = subprocess.run([str(REPO / "tools" / "build_book.sh"), "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=1800)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "build.log").write_text(f"exit status {result.returncode} after {time.monotonic() - started:.0f} s\n"
                                         f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    if result.returncode != 0:
        pytest.fail(f"tools/build_book.sh failed (exit status {result.returncode}; warnings are errors), log in "
                    f"{ARTIFACTS / 'build.log'}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return out


@pytest.mark.slow  # the book: ./run_tests.sh --all
def test_book_builds_with_warnings_as_errors_a_page_per_notebook_and_every_figure(book):
    assert (book / "index.html").is_file() and (book / "README.html").is_file()
    assert 'url=README.html' in (book / "index.html").read_text(), "index.html does not lead to the landing page"
    problems = []
    for notebook in NOTEBOOKS:
        page = book / "notebooks" / f"{notebook.stem}.html"
        if not page.is_file():
            problems.append(f"{notebook.name}: no page {page.relative_to(book)}")
            continue
        images = [src for src in _parse(page).loads if "/_images/" in src or src.startswith("_images/")]
        if len(images) != _png_outputs(notebook):
            problems.append(f"{notebook.name}: {_png_outputs(notebook)} figures in its outputs, {len(images)} on "
                            f"its page")
    # what any page loads comes from the book itself (a reader may be offline; the test machine is)
    for page in sorted(book.rglob("*.html")):
        remote = [url for url in _parse(page).loads if re.match(r"(https?:)?//", url)]
        if remote:
            problems.append(f"{page.relative_to(book)} loads from the network: {remote}")
    assert (book / "_static" / "mathjax" / "tex-svg.js").is_file(), "MathJax is not served from the book"
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- a real browser
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium under Selenium, its console log kept; skips, saying why, when it cannot run."""
    yield from headless_chromium("book browser test", "./run_tests.sh --all tests/test_book.py")


# Everything the checks need from the open page, once the page and MathJax (where the page loads it) are done.
PAGE_JS = """
const done = arguments[arguments.length - 1];
const ready = (window.MathJax && MathJax.startup && MathJax.startup.promise) || Promise.resolve();
ready.then(() => {
  const main = document.querySelector('main') || document.body;
  const text = main.cloneNode(true);  // the reader's text: without code, outputs and what MathJax drew
  text.querySelectorAll('pre, code, script, style, mjx-container, .output, .cell_output').forEach(e => e.remove());
  const math = Array.from(main.querySelectorAll('.math'));
  done({
    url: location.href,
    images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src, complete: i.complete,
                                                    width: i.naturalWidth})),
    math: math.length,
    unrendered: math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 120)),
    mathjax_errors: Array.from(main.querySelectorAll('mjx-merror, [data-mml-node="merror"]')).map(e => e.textContent),
    rendered: main.querySelectorAll('mjx-container').length,
    text: text.textContent,
    links: Array.from(document.querySelectorAll('a[href]')).map(a => ({href: a.href, raw: a.getAttribute('href')})),
    resources: performance.getEntriesByType('resource').map(r => r.name),
  });
}).catch(e => done({error: String(e)}));
"""
RAW_TEX = re.compile(r"\$[^$\s][^$\n]*\$|\$\$|\\\(|\\\)|\\\[|\\\]|\\(?:frac|lVert|tfrac|sum|lambda|nabla|top)\b")


def _local_link_problems(book: Path, page_url: str, links: list[dict], ids_here: set[str]) -> list[str]:
    """Links into the book (file:// URLs under it) whose file is missing or that name an id the page lacks."""
    problems, parsed = [], {}
    for link in links:
        url = urlsplit(link["href"])
        if url.scheme in ("http", "https", "mailto"):
            continue  # outside the book: not followed (no network here)
        if url.scheme != "file":
            problems.append(f"{link['raw']!r}: a {url.scheme!r} link")
            continue
        target = Path(unquote(url.path))
        if not target.is_relative_to(book):
            problems.append(f"{link['raw']!r} leads out of the book, to {target}")
            continue
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            problems.append(f"{link['raw']!r}: no file {target.relative_to(book)}")
            continue
        anchor = unquote(url.fragment)
        if not anchor:
            continue
        if link["href"].split("#")[0] == page_url.split("#")[0]:
            ids = ids_here  # this page, as the browser has it
        else:
            if target not in parsed:
                parsed[target] = _parse(target).ids if target.suffix == ".html" else set()
            ids = parsed[target]
        if anchor not in ids:
            problems.append(f"{link['raw']!r}: no anchor #{anchor} in {target.relative_to(book)}")
    return problems


@pytest.mark.slow  # the book in headless Chromium: ./run_tests.sh --all
@pytest.mark.parametrize("opened, page, has_math", PAGES, ids=[Path(p).stem for _, p, _ in PAGES])
def test_book_page_in_a_browser_shows_its_figures_and_math_and_its_links_resolve(book, browser, opened, page,
                                                                                  has_math):
    shot = ARTIFACTS / f"{Path(page).stem}.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.get_log("browser")  # drop what earlier pages logged
    try:
        browser.set_script_timeout(120)
        browser.get((book / opened).as_uri())
        deadline = time.monotonic() + 30  # index.html sends the reader on with a meta refresh
        while not browser.current_url.startswith((book / page).as_uri()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert browser.current_url.startswith((book / page).as_uri()), \
            f"opening {opened} ended on {browser.current_url}, not {page}"
        state = browser.execute_async_script(PAGE_JS)
        assert "error" not in state, f"the page's scripts failed: {state}"
        ids_here = set(browser.execute_script("return Array.from(document.querySelectorAll('[id], a[name]'))"
                                              ".map(e => e.id || e.getAttribute('name'))"))

        problems = []
        for image in state["images"]:
            if not (image["complete"] and image["width"] > 0):
                problems.append(f"an image did not load: {image['src']}")
        expected = _png_outputs(REPO / "notebooks" / f"{Path(page).stem}.ipynb") if page.startswith("notebooks/") else 0
        if len(state["images"]) < expected:
            problems.append(f"{len(state['images'])} images on the page, {expected} figures in the notebook's outputs")
        if has_math and not (state["math"] and state["rendered"] >= state["math"]):
            problems.append(f"math: {state['math']} math elements, {state['rendered']} drawn by MathJax")
        problems += [f"math not drawn by MathJax: {m!r}" for m in state["unrendered"]]
        problems += [f"MathJax error: {m!r}" for m in state["mathjax_errors"]]
        for match in RAW_TEX.finditer(state["text"]):
            problems.append(f"raw TeX in the text: {state['text'][max(0, match.start() - 60):match.end() + 60]!r}")
        problems += _local_link_problems(book, state["url"], state["links"], ids_here)
        remote = [r for r in state["resources"] if not r.startswith("file:")]
        problems += [f"requested from outside the book: {r}" for r in remote]
        errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        problems += [f"console error: {m}" for m in errors]
        more = f"\n… and {len(problems) - 30} more" if len(problems) > 30 else ""
        assert not problems, f"{page} in Chromium (screenshot {shot}):\n" + "\n".join(problems[:30]) + more
        print(f"{page}: {len(state['images'])} images loaded, {state['rendered']} formulas drawn, "
              f"{sum(urlsplit(l['href']).scheme == 'file' for l in state['links'])} links into the book resolve; "
              f"screenshot {shot}")
    finally:
        with contextlib.suppress(Exception):  # never hide the test's own failure
            browser.execute_script("window.scrollTo(0, 0)")
            browser.save_screenshot(str(shot))
            for what, selector in (("figure", "main img"), ("math", "main div.math")):  # the first of each
                if browser.execute_script("const e = document.querySelector(arguments[0]); if (!e) return false; "
                                          "e.scrollIntoView(); return true", selector):
                    browser.save_screenshot(str(ARTIFACTS / f"{Path(page).stem}_{what}.png"))
