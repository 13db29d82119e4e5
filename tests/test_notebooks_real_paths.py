"""Every notebook runs its quick and paper profiles end to end on original-format files (no real data needed).

The real loaders read tests/original_format.py's files through the md5 seam ($LOSSGRAD_CHECKSUMS); the real
models (ResNet-56, the 40M-parameter WAE, GloVe 100-d), optimizers, schedules and analysis cells run. The
overrides only shrink the budget (epochs, examples, seeds, batch size); where the paper's schedule would not fit
in the shrunk epochs, it is scaled down with them, and so is an analysis window longer than the shrunk run
(marked below). What this does not check: the numbers.
Overridden runs write to runs/custom/ under a temporary $LOSSGRAD_RUNS, never to figures/.
"""
from pathlib import Path

import papermill
import pytest
from notebook_checks import reproducible_env

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))

SHRINK = {  # per notebook: (quick overrides, paper overrides)
    "00": (dict(n_quadratics=6, steps=300), dict(n_quadratics=6, steps=300)),
    "01": (dict(n_train=20, n_test=10), dict(epochs=2, n_train=20, n_test=10)),
    "02": (dict(n_train=20, n_test=10), dict(epochs=2, seeds=1, n_train=20, n_test=10)),
    "03": (dict(n_train=16, n_test=8, batch_size=4, spike_window=1),  # the spike analysis needs more steps than its window
           dict(epochs=2, seeds=1, n_train=16, n_test=8, batch_size=4, spike_window=1)),
    "04": (dict(n_train=16, n_test=8),
           dict(epochs=2, seeds=1, init_check_seeds=1, n_train=16, n_test=8,
                steplr_every=1, trapezoid_warmup=1, trapezoid_flat=1)),  # schedule scaled to 2 epochs
    "05": (dict(n_train=8, n_test=8),
           dict(epochs=2, n_train=8, n_test=8, start_epochs=2, multistep_milestones=[1])),  # scaled
    "06": (dict(n_train=8, n_test=8), dict(epochs=2, seeds=1, n_train=8, n_test=8, scheduled_every=1)),  # scaled
    "07": (dict(n_train=4, n_test=4, batch_size=4),
           dict(epochs=2, n_train=4, n_test=4, batch_size=4, adam_milestones=[1], adam_factors=[0.5])),  # scaled
    "08": (dict(n_train=16, n_test=8, batch_size=4, spike_window=1),
           dict(epochs=2, seeds=1, n_train=16, n_test=8, batch_size=4, spike_window=1, tail_epochs=1)),  # window scaled
    "09": (dict(n_train=16, n_test=8), dict(epochs=2, seeds=1, n_train=16, n_test=8)),
    "10": (dict(n_train=16, n_test=8, n_full=16),
           dict(epochs=2, seeds=1, n_train=16, n_test=8, n_full=16, trace_seeds=1, trace_points=3)),
    "11": (dict(n_train=16, n_test=8, diagnosis_every=1, power_iterations=2),
           dict(epochs=2, seeds=1, diagnosis_epochs=1, diagnosis_every=1, power_iterations=2, n_train=16, n_test=8)),
}


def test_every_notebook_has_budget_overrides():
    missing = [nb.name for nb in NOTEBOOKS if nb.name[:2] not in SHRINK]
    assert not missing, f"add quick and paper budget overrides for {missing} to SHRINK in {Path(__file__).name}"


@pytest.mark.slow  # every notebook at quick and paper scale: ./run_tests.sh --all
@pytest.mark.parametrize("profile", ["quick", "paper"])
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_its_real_profile_on_original_format_files(notebook, profile, original_format_data, tmp_path,
                                                                 monkeypatch):
    if notebook.name[:2] not in SHRINK:
        pytest.fail(f"{notebook.name} has no budget overrides in SHRINK")
    root, checksums = original_format_data
    monkeypatch.setenv("LOSSGRAD_DATA", str(root))
    monkeypatch.setenv("LOSSGRAD_CHECKSUMS", str(checksums))
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "runs"))
    for name, value in reproducible_env().items():  # the kernel inherits them: the same numbers on any machine
        monkeypatch.setenv(name, value)
    overrides = SHRINK[notebook.name[:2]][profile == "paper"]
    before = {p: p.stat().st_mtime_ns for p in (REPO / "figures").rglob("*") if p.is_file()}
    papermill.execute_notebook(str(notebook), str(tmp_path / notebook.name),
                               parameters={"profile": profile, "overrides": overrides},
                               cwd=str(notebook.parent), kernel_name="python3", progress_bar=False)
    assert list((tmp_path / "runs" / "custom" / "figures").iterdir()), "the notebook wrote no figure or table"
    after = {p: p.stat().st_mtime_ns for p in (REPO / "figures").rglob("*") if p.is_file()}
    assert after == before, "a test run touched figures/"
