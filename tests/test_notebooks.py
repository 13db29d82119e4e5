"""Every numbered notebook runs in the smoke profile through papermill, as run_all.sh runs it."""

from pathlib import Path

import papermill
import pytest

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
    before = {p: p.stat().st_mtime_ns for p in (REPO / "figures").rglob("*") if p.is_file()}
    papermill.execute_notebook(str(notebook), str(tmp_path / notebook.name), parameters=PARAMETERS,
                               cwd=str(notebook.parent), kernel_name="python3", progress_bar=False)
    outputs = list((tmp_path / "runs" / "smoke" / "figures").iterdir())
    assert outputs, "the notebook wrote no figure or table"
    after = {p: p.stat().st_mtime_ns for p in (REPO / "figures").rglob("*") if p.is_file()}
    assert after == before, "a smoke run touched figures/"
