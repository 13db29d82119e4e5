"""Every measured number in a notebook's Findings is printed by an output above them.

For each notebook in notebooks/ with committed outputs, every number in its "## Findings" cell must
appear, to the digits quoted, in an output of a code cell above that cell (a quoted 0.0130 is backed by a
printed 0.01304 or 0.013; a quoted 371 by 370.8). Settings such as epochs and seeds pass because the
settings cell prints them. References (Table 3, Figures 1 and 2, notebook 01, estimate (4)) and list
markers are not numbers of the findings and are skipped.
"""

import html
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))

QUOTED = re.compile(r"(?<![\w.])[−-]?\d+(?:\.\d+)?(?:e[−+-]?\d+)?(?![\w])", re.IGNORECASE)
PRINTED = re.compile(r"[−-]?\d+(?:\.\d+)?(?:e[−+-]?\d+)?", re.IGNORECASE)
REFERENCE = re.compile(r"\b(?:Tables?|Tab\.|Figures?|Fig\.|Sections?|Remarks?|Algorithm|Appendix|notebooks?|items?)"
                       r"\s+\d+(?:\s*(?:,|and|–)\s*\d+)*|\(\d\)"
                       r"|\b(?:ICLR|ICML|NeurIPS|COLT|AISTATS|JMLR|arXiv)\s+(?:19|20)\d\d\b", re.IGNORECASE)  # a citation's year
LIST_MARKER = re.compile(r"^\s*\d+\.\s", re.MULTILINE)


def load(path):
    return json.loads(Path(path).read_text())


def has_outputs(nb) -> bool:
    return any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")


def findings_index(nb) -> int:
    hits = [i for i, c in enumerate(nb["cells"])
            if c["cell_type"] == "markdown" and "".join(c["source"]).lstrip().startswith("## Findings")]
    assert len(hits) == 1, f"expected one '## Findings' cell, found {len(hits)}"
    return hits[0]


def output_text(cells) -> str:
    parts = []
    for cell in cells:
        for out in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            parts.append("".join(out.get("text", "")))
            data = out.get("data", {})
            parts.append("".join(data.get("text/plain", "")))
            parts.append(html.unescape(re.sub(r"<[^>]+>", " ", "".join(data.get("text/html", "")))))
    return "\n".join(parts)


def value_and_tolerance(token: str) -> tuple[float, float]:
    """The number a token states and half a unit of its last quoted digit."""
    token = token.replace("−", "-")
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    scale = 10.0 ** int(exponent) if exponent else 1.0
    return float(mantissa) * scale, 0.5 * 10.0 ** -decimals * scale


def quoted_numbers(text: str) -> list[str]:
    text = LIST_MARKER.sub(" ", REFERENCE.sub(" ", text))
    return QUOTED.findall(text)


def backed(token: str, printed: list[float]) -> bool:
    x, tol = value_and_tolerance(token)
    return any(abs(y - x) <= tol * (1 + 1e-9) + 1e-300 for y in printed)


def unbacked_numbers(nb) -> list[str]:
    i = findings_index(nb)
    printed = [value_and_tolerance(t)[0] for t in PRINTED.findall(output_text(nb["cells"][:i]))]
    return [t for t in quoted_numbers("".join(nb["cells"][i]["source"])) if not backed(t, printed)]


WITH_OUTPUTS = [p for p in NOTEBOOKS if has_outputs(load(p))]


def test_some_notebooks_carry_committed_outputs():
    assert WITH_OUTPUTS, "no notebook in notebooks/ has committed outputs: this check would check nothing"


@pytest.mark.parametrize("notebook", WITH_OUTPUTS, ids=[p.stem for p in WITH_OUTPUTS])
def test_every_number_in_the_findings_is_printed_above_them(notebook):
    missing = unbacked_numbers(load(notebook))
    assert not missing, f"{notebook.name}: Findings quote numbers no output above prints: {missing}"


@pytest.mark.parametrize("notebook", WITH_OUTPUTS, ids=[p.stem for p in WITH_OUTPUTS])
def test_the_check_catches_a_changed_number_in_the_findings(notebook):
    nb = load(notebook)
    i = findings_index(nb)
    text = "".join(nb["cells"][i]["source"])
    printed = [value_and_tolerance(t)[0] for t in PRINTED.findall(output_text(nb["cells"][:i]))]
    decimal = next(t for t in quoted_numbers(text) if re.fullmatch(r"[−-]?\d+\.\d{2,}", t))
    x, tol = value_and_tolerance(decimal)
    places = len(decimal.split(".")[1])
    changed = next(f"{x + k * 2 * tol:.{places}f}" for k in range(1, 1000)
                   if not backed(f"{x + k * 2 * tol:.{places}f}", printed))
    nb["cells"][i]["source"] = [text.replace(decimal, changed, 1)]
    assert changed in unbacked_numbers(nb)


def test_references_and_list_markers_are_not_read_as_numbers():
    text = "1. **Table 3** and Figures 1 and 2 of notebook 01 and estimate (4): test MSE 0.0244.\n2. next"
    assert quoted_numbers(text) == ["0.0244"]


def test_a_citations_year_is_not_read_as_a_number_but_a_bare_year_is():
    text = 'Wu et al., "Understanding Short-Horizon Bias", ICLR 2018: h 0.5374; in 2018 it was 2019'
    assert quoted_numbers(text) == ["0.5374", "2018", "2019"]


# ---------------------------------------------------------------- the answer at the top of every notebook
# Right under its question (the first markdown cell) each notebook answers it in a few plain sentences, names the
# figure that decides it and links to its Findings. With committed outputs, every number of the answer is printed
# by an output of the notebook; without, the answer says what the notebook will answer and what a reader needs to
# run it, and quotes no number its own cells do not hold.
IN_PROGRESS: set = set()  # notebooks whose answer is not written yet
ANSWERED = [p for p in NOTEBOOKS if p.stem not in IN_PROGRESS]
CODE_SPAN = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")


def answer_text(nb) -> str:
    cell = nb["cells"][1]
    text = "".join(cell["source"])
    assert cell["cell_type"] == "markdown" and text.startswith("## Answer"), \
        "the second cell is not the answer (a markdown cell under the question, starting '## Answer')"
    return text


def answer_numbers(text: str) -> list[str]:
    """The numbers an answer states: not those in code (commands, file names) or in link targets."""
    return quoted_numbers(LINK_TARGET.sub("]", CODE_SPAN.sub(" ", text.split("\n", 1)[1])))


def unbacked_answer_numbers(nb) -> list[str]:
    text = answer_text(nb)
    if has_outputs(nb):
        printed = [value_and_tolerance(t)[0] for t in PRINTED.findall(output_text(nb["cells"]))]
        return [t for t in answer_numbers(text) if not backed(t, printed)]
    own = " ".join("".join(c["source"]) for i, c in enumerate(nb["cells"]) if i != 1)
    return [t for t in answer_numbers(text) if t not in QUOTED.findall(own)]


def slug(heading: str) -> str:
    """The heading's anchor as GitHub and the book (myst-parser's github_slugify) make it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("notebook", ANSWERED, ids=[p.stem for p in ANSWERED])
def test_the_answer_stands_under_the_question(notebook):
    nb = load(notebook)
    text = answer_text(nb)
    assert nb["cells"][0]["cell_type"] == "markdown" and "".join(nb["cells"][0]["source"]).startswith("# ")
    first = text.split("\n", 1)[1].split("\n\n")[0]
    sentences = len(re.findall(r"[.!?](?=\s|$)", CODE_SPAN.sub("code", first)))
    assert 2 <= sentences <= 4, f"the answer's paragraph has {sentences} sentences, not two to four"
    headings = {slug(line.lstrip("#")) for c in nb["cells"] if c["cell_type"] == "markdown"
                for line in "".join(c["source"]).splitlines() if line.startswith("#")}
    anchors = re.findall(r"\]\(#([^)]+)\)", text)
    assert slug(findings_heading(nb)) in anchors, "the answer does not link to the Findings"
    assert not set(anchors) - headings, f"links to no heading of the notebook: {set(anchors) - headings}"
    assert "Key figure" in text, "the answer names no key figure"
    if has_outputs(nb):
        figures = re.findall(r"`(figures/[\w.]+\.png)`", text)
        assert figures and all((REPO / f).is_file() for f in figures), f"key figure not committed: {figures}"
    else:
        assert text.startswith("## Answer — pending") and f"./run_all.sh --profile paper {notebook.stem[:2]}" in text


def findings_heading(nb) -> str:
    return "".join(nb["cells"][findings_index(nb)]["source"]).lstrip().splitlines()[0].lstrip("#")


@pytest.mark.parametrize("notebook", ANSWERED, ids=[p.stem for p in ANSWERED])
def test_every_number_in_the_answer_is_printed_by_the_notebook(notebook):
    missing = unbacked_answer_numbers(load(notebook))
    assert not missing, f"{notebook.name}: the answer quotes numbers no output prints " \
                        f"(or, without outputs, no cell of the notebook holds): {missing}"


@pytest.mark.parametrize("notebook", ANSWERED, ids=[p.stem for p in ANSWERED])
def test_the_check_catches_a_changed_number_in_the_answer(notebook):
    nb = load(notebook)
    text = answer_text(nb)
    numbers = answer_numbers(text)
    if not numbers:  # a pending answer may quote none; then one added is caught
        nb["cells"][1]["source"] = [text + "\nIt needs 123.4 hours."]
        assert "123.4" in unbacked_answer_numbers(nb)
        return
    token = max((t for t in numbers if re.fullmatch(r"[−-]?\d+\.\d+", t)), key=len, default=max(numbers, key=len))
    x, tol = value_and_tolerance(token)
    places = len(token.split(".")[1]) if "." in token else 0
    printed = [value_and_tolerance(t)[0] for t in PRINTED.findall(output_text(nb["cells"]))]
    own = QUOTED.findall(" ".join("".join(c["source"]) for i, c in enumerate(nb["cells"]) if i != 1))
    changed = next(c for c in (f"{x + k * 2 * tol:.{places}f}" for k in range(1, 1000))
                   if not backed(c, printed) and c not in own)
    nb["cells"][1]["source"] = [text.replace(token, changed, 1)]
    assert changed in unbacked_answer_numbers(nb)
