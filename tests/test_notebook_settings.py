"""Each notebook's quick and paper settings, resolved as the notebook resolves them, fit its schedules and analysis.

The class of bug 04's quick profile once had (a trapezoid longer than the shrunk run): found here without
training, by executing only the notebook's settings cell (the one calling ``C.profiles.resolve``).
"""
import json
import os
from pathlib import Path

import pytest
import torch

from companion.baselines import make_optimizer

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def resolved_settings(notebook: Path, profile: str):
    cells = ["".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    settings = [s for s in cells if "profiles.resolve(" in s]
    assert len(settings) == 1, f"{notebook.name}: expected one cell calling C.profiles.resolve, found {len(settings)}"
    namespace = {"profile": profile, "overrides": {}}
    cwd = os.getcwd()
    os.chdir(notebook.parent)  # the cell puts the repository root on sys.path relative to notebooks/
    try:
        exec(compile(settings[0], notebook.name, "exec"), namespace)
    finally:
        os.chdir(cwd)
    return vars(namespace["S"])


def schedule_problems(S: dict) -> list:
    """What in the settings cannot work with the epochs they run (empty when all fits)."""
    problems, epochs = [], S.get("epochs")
    for key, value in S.items():
        if key in ("seeds", "init_check_seeds", "epochs", "batch_size") or key.endswith("window") \
                or key in ("trace_steps", "start_epochs", "n_shown", "n_quadratics", "steps"):
            if not (isinstance(value, int) and value >= 1):
                problems.append(f"{key} = {value!r} must be an integer >= 1")
        if key in ("n_train", "n_test") and value is not None and not (isinstance(value, int) and value >= 1):
            problems.append(f"{key} = {value!r} must be None or >= 1")
    if epochs is None:
        return problems
    params = [torch.zeros(1, requires_grad=True)]
    checks = []  # the notebook's schedules, built by the code the runs use
    if "multistep_milestones" in S:
        checks.append(("sgd_multistep", dict(lr=0.1, milestones=S["multistep_milestones"])))
    if "adam_milestones" in S:
        checks.append(("adam_steps", dict(lr=1e-3, milestones=S["adam_milestones"], factors=S["adam_factors"])))
    for every in ("steplr_every", "scheduled_every"):
        if every in S:
            checks.append(("sgd_steplr", dict(lr=0.1, step_size=S[every])))
    if "trapezoid_warmup" in S:
        checks.append(("sgd_trapezoid", dict(lr=0.1, warmup_epochs=S["trapezoid_warmup"],
                                             flat_until=S["trapezoid_flat"], start_factor=S["trapezoid_start"])))
    for name, options in checks:
        try:
            make_optimizer(name, params, epochs=epochs, **options)
        except (ValueError, TypeError) as err:
            problems.append(f"{name}: {err}")
    if S.get("start_epochs", 1) > epochs:
        problems.append(f"start_epochs {S['start_epochs']} > epochs {epochs}")
    return problems


@pytest.mark.parametrize("profile", ["quick", "paper"])
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_profile_settings_fit_the_schedules_and_analysis(notebook, profile, tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path))
    problems = schedule_problems(resolved_settings(notebook, profile))
    assert not problems, f"{notebook.name} ({profile}): " + "; ".join(problems)


def test_the_check_finds_schedules_that_do_not_fit():
    good = dict(epochs=5, seeds=1, spike_window=3, steplr_every=3, trapezoid_warmup=2, trapezoid_flat=3,
                trapezoid_start=0.1, multistep_milestones=[1, 2], adam_milestones=[2], adam_factors=[0.5])
    assert schedule_problems(good) == []
    for bad in (dict(trapezoid_warmup=10, trapezoid_flat=15), dict(steplr_every=20), dict(seeds=0),
                dict(multistep_milestones=[100, 150]), dict(adam_milestones=[30, 50], adam_factors=[0.5, 0.2]),
                dict(spike_window=0), dict(start_epochs=6)):
        assert schedule_problems(dict(good, **bad)), f"{bad} was not caught"
