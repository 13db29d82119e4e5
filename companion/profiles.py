"""Profiles (smoke, quick, paper) and where each one's outputs go.

A notebook's tagged ``parameters`` cell holds ``profile`` and ``overrides``; the cell after it
states the paper's settings and what each other profile changes, and calls :func:`resolve`.

Outputs, so that nothing made from smoke or synthetic data lands where real results live:

======================  =====================================  ==============================
run                     figures and tables                     executed notebook (run_all.sh)
======================  =====================================  ==============================
paper                   ``figures/``                           ``notebooks/`` (in place)
quick                   ``figures/quick/``                     ``figures/quick/``
smoke                   ``runs/smoke/figures/``                ``runs/smoke/notebooks/``
any profile + overrides ``runs/custom/figures/``               ``runs/custom/notebooks/``
======================  =====================================  ==============================

Per-run results (``.pt``) and checkpoints live under ``runs/<profile>/<notebook>/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
PROFILES = ("smoke", "quick", "paper")
HEADLESS_ENV = "LOSSGRAD_PROGRESS_FILE"  # set by run_all.sh: progress as text lines appended to this file


def headless() -> bool:
    """Progress as text lines (``./run_all.sh``, or ``$LOSSGRAD_PROGRESS=text``), not as bars."""
    return bool(os.environ.get(HEADLESS_ENV)) or os.environ.get("LOSSGRAD_PROGRESS") == "text"


def runs_dir() -> Path:
    """Root of per-run results and checkpoints (env ``LOSSGRAD_RUNS`` moves it, as the tests do)."""
    return Path(os.environ.get("LOSSGRAD_RUNS", REPO / "runs"))


def figures_dir(profile: str, overrides: dict | None = None) -> Path:
    """Where a notebook run with this profile writes its figures and tables (see the module table)."""
    _check_profile(profile)
    if overrides:
        path = runs_dir() / "custom" / "figures"
    elif profile == "paper":
        path = REPO / "figures"
    elif profile == "quick":
        path = REPO / "figures" / "quick"
    else:
        path = runs_dir() / "smoke" / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_tag(profile: str, overrides: dict | None = None) -> str:
    """Folder name under runs/ for per-run results: the profile, or 'custom' when overridden."""
    _check_profile(profile)
    return "custom" if overrides else profile


class Settings(SimpleNamespace):
    """The resolved settings of a notebook run; ``changed`` lists what differs from the paper's."""

    def __repr__(self) -> str:
        rows = [f"  {k} = {v!r}" + ("   # changed from the paper's" if k in self.changed else "")
                for k, v in vars(self).items() if k not in ("changed", "profile", "overrides")]
        return f"Settings(profile={self.profile!r}, overrides={self.overrides!r})\n" + "\n".join(rows)


def resolve(profile: str, overrides: dict | None, *, paper: dict, quick: dict, smoke: dict,
            full_grid: dict | None = None) -> Settings:
    """The paper's settings, then the profile's changes, then ``overrides`` (which win); then, when the
    resolved setting ``full_grid`` is true, the values of ``full_grid`` (what a committed run cut) replace theirs.

    Every name in ``quick``, ``smoke``, ``overrides`` and ``full_grid`` must exist in ``paper``: a typo is an
    error, not a silently ignored setting."""
    _check_profile(profile)
    overrides = dict(overrides or {})
    for label, changes in (("quick", quick), ("smoke", smoke), ("overrides", overrides), ("full_grid", full_grid or {})):
        unknown = sorted(set(changes) - set(paper))
        if unknown:
            raise ValueError(f"{label} sets unknown setting(s) {unknown}; known settings: {sorted(paper)}")
    overrides = {k: _like(paper[k], v, k) for k, v in overrides.items()}
    values = dict(paper)
    values.update({"paper": {}, "quick": quick, "smoke": smoke}[profile])
    values.update(overrides)
    changed = {k for k in values if values[k] != paper[k]}
    if full_grid and values.get("full_grid"):
        changed |= {k for k, v in full_grid.items() if values[k] != v}
        values.update(full_grid)
    return Settings(profile=profile, overrides=overrides, changed=sorted(changed), **values)


def _like(reference, value, name: str):
    """``value`` as the type of the paper's ``reference`` where it came as text (YAML reads 1e-4 as a string)."""
    if isinstance(reference, list) and isinstance(value, list):
        return [_like(reference[0], v, name) if reference else v for v in value]
    if isinstance(value, str) and isinstance(reference, (int, float)) and not isinstance(reference, bool):
        try:
            return type(reference)(float(value)) if isinstance(reference, float) else int(value)
        except ValueError:
            raise ValueError(f"setting {name!r} needs a number like {reference!r}, got {value!r}") from None
    return value


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
