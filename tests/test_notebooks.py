"""Every numbered notebook runs in the smoke profile through papermill, as run_all.sh runs it: no error, no
warning and no stderr text other than progress in its outputs, under the threads and code paths that make a
smoke run's numbers the same on any machine (tests/notebook_checks.py)."""

from pathlib import Path

import nbformat
import papermill
import pytest
from notebook_checks import output_problems, reproducible_env

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PARAMETERS = {"profile": "smoke", "overrides": {}}


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_the_smoke_profile(notebook, tmp_path, monkeypatch):
    declared = papermill.inspect_notebook(str(notebook))
    missing = set(PARAMETERS) - set(declared)
    assert not missing, f"{notebook.name}: its parameters cell lacks {sorted(missing)}"
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "runs"))
    for name, value in reproducible_env().items():  # the kernel inherits them
        monkeypatch.setenv(name, value)
    before = {p: p.stat().st_mtime_ns for p in (REPO / "figures").rglob("*") if p.is_file()}
    executed = tmp_path / notebook.name
    papermill.execute_notebook(str(notebook), str(executed), parameters=PARAMETERS,
                               cwd=str(notebook.parent), kernel_name="python3", progress_bar=False)
    # progress shows as widgets here, as in JupyterLab (run_all.sh's text progress: tests/test_jupyterlab.py)
    problems = output_problems(nbformat.read(executed, as_version=4), widgets=True)
    assert not problems, f"{executed}:\n" + "\n".join(problems)
    outputs = list((tmp_path / "runs" / "smoke" / "figures").iterdir())
    assert outputs, "the notebook wrote no figure or table"
    after = {p: p.stat().st_mtime_ns for p in (REPO / "figures").rglob("*") if p.is_file()}
    assert after == before, "a smoke run touched figures/"
