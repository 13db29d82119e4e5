"""What the notebook tests share: the environment that makes a notebook run's numbers the same on any machine,
and what an executed notebook may not show in its outputs.

Why the environment: a smoke run trains for a few steps, and what its cells print (which group of runs
diverged, which line search missed) follows the last bits of its arithmetic, which depend on the machine:

* the torch thread count (a sum split over threads is summed in another order): companion.runner gives a
  run ``usable cores - busy cores`` threads unless ``$LOSSGRAD_THREADS`` says, so 1 or 2 on a 2-core machine
  depending on the load at that moment, 16 on a 16-core one; run_all.sh pins 1 for the smoke profile.
* the code path each library picks for the processor: ATen's vectorised kernels (AVX-512, AVX2 or none:
  notebook 10's smoke run printed other numbers for each, and under AVX2 a group of runs without a single
  finite value, the fresh-clone failure of issue 25), MKL's matrix products (``MKL_CBWR``; its COMPATIBLE
  branch gives the same results on every Intel and AMD processor, per Intel's documentation) and oneDNN's
  convolutions (``ONEDNN_MAX_CPU_ISA``).

:func:`reproducible_env` pins all of them, for the notebook runs of the tests only (the kernel, run_all.sh and
the worker processes inherit it). What it cannot pin: another torch or MKL version, and processors without
AVX2 or not x86-64 (ARM), where the numbers may still differ; the notebooks handle a group without numbers
themselves (companion.report.nan_median), the pins only make a passing run pass everywhere alike."""

from __future__ import annotations

import platform
import re

WARNING = re.compile("warning", re.IGNORECASE)
# one rendering of a tqdm bar: "desc:  40%|####      | 4/10 [00:01<00:02, 2.9it/s, postfix]" or, without a
# total, "desc: 4it [00:01, 2.9it/s]"
TQDM_BAR = re.compile(r"(\d+%\|[^|]*\| *[\d.]+[kMGTPEZY]?/[\d.]+[kMGTPEZY]? \[[^\]]*\]"
                      r"|[\d.]+[kMGTPEZY]?\w* \[\d[\d:]*, [^\]]*\])\s*$")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _x86_with_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:  # not Linux: leave the code paths to the libraries
        return False


def reproducible_env() -> dict:
    """Environment variables for a notebook run whose outputs a test reads (see the module docstring)."""
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LOSSGRAD_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
    if _x86_with_avx2():  # a value the processor lacks would make torch warn, or fault
        env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    return env


def not_progress(text: str) -> list[str]:
    """The pieces of stderr text (split at carriage returns and newlines) that are not progress-bar renderings."""
    return [piece for piece in re.split(r"[\r\n]+", text) if piece.strip() and not TQDM_BAR.search(piece)]


def where(index: int, cell) -> str:
    first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
    return f"cell {index} ({first[:60]!r})"


def output_problems(nb, widgets: bool = False) -> list[str]:
    """Errors, warnings, non-progress stderr text and progress widgets in the outputs of an executed notebook.

    ``widgets=True`` lets progress widgets pass: a notebook executed with papermill as JupyterLab runs it
    (run_all.sh runs it headless, with progress as text: there a widget is a problem)."""
    problems = []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            at = where(index, cell)
            kind = out.get("output_type")
            if kind == "error":
                problems.append(f"{at}: error output {out.get('ename')}: {out.get('evalue')}")
                continue
            texts = []
            if kind == "stream":
                text = out.get("text", "")
                if out.get("name") == "stderr":
                    rest = not_progress(text)
                    if rest:
                        problems.append(f"{at}: stderr text that is not a progress bar: {rest[:3]}")
                texts.append(text)
            else:
                data = out.get("data", {})
                if WIDGET_VIEW in data and not widgets:
                    problems.append(f"{at}: a widget ({data.get('text/plain', '')!r}); under papermill progress "
                                    f"must be text: papermill saves no widget state, so this bar stays frozen")
                texts += [data.get(mime, "") for mime in ("text/plain", "text/html", "text/markdown")]
            for text in texts:
                text = "".join(text) if isinstance(text, list) else text
                match = WARNING.search(text)
                if match:
                    problems.append(f"{at}: a warning in a {kind} output: "
                                    f"{text[max(0, match.start() - 120):match.end() + 200]!r}")
    return problems
