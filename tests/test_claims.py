"""The README's claims table (tools/claims.py, figures/claims.md): generated, quoted exactly, numbers from their
sources, verdicts from their rules, links that resolve.

(a) the README's block is figures/claims.md, and that file is what tools/claims.py writes from the committed outputs;
(b) every quote occurs in the paper's text, whitespace normalised (the text lives outside the repository: the test
finds it through $LOSSGRAD_PAPER_TEXT or shared/paper/ beside or inside the checkout, and skips, saying so, without
it); (c) every number of the table is the value read from its source, and no other number is in its cells; (d) every
link target exists (README anchors included). Each check is a function that returns what it finds wrong, and each has
a test that feeds it a broken input and expects it to complain.
"""

import hashlib
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lossgrad_tools_claims", REPO / "tools" / "claims.py")
claims = sys.modules.setdefault("lossgrad_tools_claims", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(claims)

PAPER_NAME = "000_c762ff2082195591.txt"  # the extracted text of arXiv 1902.07656 the notes and notebooks quote
PAPER_SHA256 = "efd94c04b3b59ae90335a7a6b042f405efd2749809b1fdedc2e9a07cc8a85e59"
ITEMS = claims.CLAIMS + claims.QUESTIONS

# What a template may contain that looks like a number but is none of the table's: references, names, formulas.
NOT_NUMBERS = re.compile(
    r"\b(?:Tables?|Figures?|Sections?|Remarks?|Algorithm|notebooks?|question)\s+\d+(?:\s*(?:,|and|–)\s*\d+)*"
    r"|\(4\)|h/\(2h\*\)|2/\(λ₁ \+ λ₂\)|\bfloat32\b|\bL4\b|ResNet-56|CIFAR-10|\bseed 0\b|\br = 1\b")
NUMBER = re.compile(r"(?<![\w.])[−+-]?\d+(?:\.\d+)?(?:e[−+-]?\d+)?%?(?![\w])", re.IGNORECASE)


def normalised(text: str) -> str:
    return " ".join(text.split())


def paper_text() -> str:
    candidates = [os.environ.get("LOSSGRAD_PAPER_TEXT"), REPO / "shared" / "paper" / PAPER_NAME,
                  REPO.parent / "shared" / "paper" / PAPER_NAME]
    for path in filter(None, candidates):
        if Path(path).is_file():
            data = Path(path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == PAPER_SHA256, \
                f"{path} is not the paper text the quotes were checked against (sha256 {PAPER_SHA256})"
            return data.decode("utf-8")
    pytest.skip(f"the paper's text ({PAPER_NAME}) is not here: set $LOSSGRAD_PAPER_TEXT to check the quotes")


# ---------------------------------------------------------------- the checks
def misquoted(fragments, paper: str) -> list[str]:
    """Fragments not found verbatim (whitespace normalised) in the paper, in order after the previous one."""
    text, at, missing = normalised(paper), 0, []
    for fragment in fragments:
        found = text.find(normalised(fragment), at)
        if found < 0:
            missing.append(fragment)
        else:
            at = found + len(normalised(fragment))
    return missing


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the markdown tables in ``text``, split into cells (escaped pipes kept in their cell)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---") and not re.match(r"\| (section|question) \|", line):
            rows.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def number_cells(item, cells: list[str]) -> str:
    """The cells of a row that carry its numbers: verdict, the paper, ours (claims); the question and answer."""
    return " ".join(cells[2:5]) if isinstance(item, claims.Claim) else " ".join([cells[0], cells[2]])


def tokens(text: str) -> list[str]:
    return NUMBER.findall(NOT_NUMBERS.sub(" ", text))


def wrong_numbers(item, cells: list[str]) -> list[str]:
    """Numbers of the item whose value read now from its source is not in the row, and numbers in the row that are
    none of the item's."""
    text = number_cells(item, cells)
    fresh = {name: NUMBER.findall(num.text())[0] for name, num in item.numbers.items()}
    problems = [f"{name} = {value} (read from {item.numbers[name].source.cite()}) is not in the row"
                for name, value in fresh.items() if value not in tokens(text)]
    problems += [f"{token} is in the row but is no number of its spec" for token in tokens(text)
                 if token not in fresh.values()]
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (myst-parser's github_slugify, which the book uses too)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(text: str) -> list[str]:
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        path, _, anchor = target.partition("#")
        if not (REPO / path).exists():
            problems.append(f"{target}: no such file")
        elif anchor:
            headings = [slug(h) for h in re.findall(r"^#+ (.+)$", (REPO / path).read_text(encoding="utf-8"),
                                                    re.MULTILINE)]
            if anchor not in headings:
                problems.append(f"{target}: no heading with that anchor in {path}")
    return problems


def hand_typed(template: str) -> list[str]:
    return tokens(re.sub(r"\{\w+\}", " ", template))


# ---------------------------------------------------------------- (a) generated, and embedded as generated
def test_the_readme_embeds_figures_claims_md():
    block = claims.readme_block(claims.README.read_text(encoding="utf-8"))
    assert block == claims.OUT.read_text(encoding="utf-8"), \
        "the README's claims block differs from figures/claims.md: run .venv/bin/python tools/claims.py"


def test_figures_claims_md_is_what_the_committed_outputs_give():
    assert claims.OUT.read_text(encoding="utf-8") == claims.generate(), \
        "figures/claims.md is not what tools/claims.py writes from the committed outputs: run it " \
        "(.venv/bin/python tools/claims.py --check shows the difference)"


def test_the_readme_check_catches_an_edited_block():
    readme = claims.README.read_text(encoding="utf-8")
    edited = claims.with_block(readme, claims.generate().replace("**partly**", "**reproduced**", 1))
    assert claims.readme_block(edited) != claims.OUT.read_text(encoding="utf-8")


# ---------------------------------------------------------------- (b) the paper's words
def test_every_quote_is_the_papers_words():
    paper = paper_text()
    missing = {item.quote: misquoted(item.quote, paper) for item in ITEMS if item.quote}
    assert not any(missing.values()), {q: m for q, m in missing.items() if m}
    assert all(item.quote for item in claims.CLAIMS), "a claim without the paper's words"


def test_the_quote_check_catches_a_changed_word_and_a_wrong_order():
    paper = paper_text()
    quote = claims.CLAIMS[0].quote[0]
    assert misquoted([quote.replace("quadratic", "cubic")], paper)
    assert misquoted(["is an open problem.", "One can easily observe"], paper)  # both exist, in the other order
    assert not misquoted([" One  can\neasily observe "], paper)  # whitespace is not a difference


def test_the_papers_numbers_are_in_its_tables():
    """The numbers in the column 'the paper' come from the notebooks' transcriptions of the paper's tables:
    each is a value of a table row of the paper's text."""
    table_values = {float(t) for line in paper_text().splitlines() if line.startswith("|")
                    for t in re.findall(r"\d+(?:\.\d+)?", line)}
    used = [(name, num.text()) for item in claims.CLAIMS for name, num in item.numbers.items()
            if "{" + name + "}" in item.paper]
    assert used, "no number in the column 'the paper'"
    assert not [(n, t) for n, t in used if claims.number(t) not in table_values]


# ---------------------------------------------------------------- (c) numbers from their sources
def committed_rows():
    rows = table_rows(claims.OUT.read_text(encoding="utf-8"))
    assert len(rows) == len(ITEMS), f"figures/claims.md has {len(rows)} rows, the spec {len(ITEMS)} items"
    return rows


@pytest.mark.parametrize("index", range(len(ITEMS)), ids=[f"row{i + 1}" for i in range(len(ITEMS))])
def test_every_number_of_a_row_is_read_from_its_source(index):
    assert not wrong_numbers(ITEMS[index], committed_rows()[index])


def test_the_number_check_catches_a_changed_and_an_added_number():
    index = next(i for i, item in enumerate(ITEMS) if "{lg}" in getattr(item, "ours", ""))
    item, cells = ITEMS[index], list(committed_rows()[index])
    value = item.numbers["lg"].text()
    changed = list(cells)
    changed[4] = re.sub(rf"(?<![\w.]){re.escape(value)}(?![\w])", value + "1", changed[4], count=1)
    assert any(f"= {value} " in p for p in wrong_numbers(item, changed))
    added = list(cells)
    added[2] += " (about 12.5% worse)"
    assert "12.5% is in the row but is no number of its spec" in wrong_numbers(item, added)


def test_no_template_types_a_number():
    typed = {(type(item).__name__, i, field): hand_typed(getattr(item, field))
             for i, item in enumerate(ITEMS) for field in ("why", "paper", "ours", "question", "answer")
             if hasattr(item, field)}
    assert not {k: v for k, v in typed.items() if v}, "numbers typed into templates: read them from a source"
    assert hand_typed("ends 0.0244 above {x} (Table 3, notebook 04)") == ["0.0244"]


def test_every_source_reads_one_value():
    for item in ITEMS:
        for name, num in item.numbers.items():
            claims.number(num.text())  # raises when a row, a match or a number is missing


def test_every_verdict_follows_from_its_numbers():
    for item in claims.CLAIMS:
        assert item.verdict in claims.VERDICTS
        assert item.rule is not None
        got = item.rule({name: value for name, (_, value) in claims.values(item).items()})
        assert got == item.verdict, f"{item.quote[0][:60]}…: the rule now gives {got!r}, the table says " \
                                    f"{item.verdict!r}"


def test_a_claim_not_testable_here_turns_testable_when_its_notebook_has_outputs(monkeypatch):
    rule = claims.untestable("01_initial_lr")
    monkeypatch.setattr(claims, "has_outputs", lambda stem: False)
    assert rule({}) == "not testable here"
    monkeypatch.setattr(claims, "has_outputs", lambda stem: True)
    assert rule({}) != "not testable here"


# ---------------------------------------------------------------- (d) links
def test_every_link_target_exists():
    assert not broken_links(claims.OUT.read_text(encoding="utf-8"))


def test_the_link_check_catches_a_missing_file_and_a_missing_anchor():
    assert broken_links("[x](notebooks/99_missing.ipynb)")
    assert broken_links("[x](README.md#no-such-section)")
    assert not broken_links("[x](README.md#two-commands), [y](figures/04_curves.png)")
