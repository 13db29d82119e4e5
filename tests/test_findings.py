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
                       r"\s+\d+(?:\s*(?:,|and|–)\s*\d+)*|\(\d\)", re.IGNORECASE)
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
