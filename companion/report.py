"""Figures and tables: one seaborn style, the paper's numbers beside ours, mean ± std over seeds,
and the conditions of every result (profile, device, seeds, time, versions)."""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import matplotlib
import numpy as np
import pandas as pd
import torch

PAPER_COLUMN = "paper"


def style() -> None:
    """The one plotting style of every notebook."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    matplotlib.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
                                "axes.titleweight": "bold"})


def palette(labels: Sequence[str]) -> dict:
    """Stable colours: the same label gets the same colour in every figure of a notebook."""
    import seaborn as sns

    colours = sns.color_palette("colorblind", n_colors=max(len(labels), 1))
    return dict(zip(labels, colours))


def save_figure(fig, out_dir: Path, name: str, caption: str = "") -> Path:
    """Writes ``<out_dir>/<name>.png``; ``caption`` (the conditions) goes under the figure."""
    if caption:
        fig.text(0.01, -0.02, caption, ha="left", va="top", fontsize=8, color="0.35", wrap=True)
    path = Path(out_dir) / f"{name}.png"
    fig.savefig(path)
    return path


# ------------------------------------------------------------------ tables
def mean_std(values: Iterable[float], digits: int = 4) -> str:
    """'m ± s' over seeds ('m' alone for one seed; 'diverged' when any seed is not finite)."""
    values = [float(v) for v in values]
    if not values:
        return ""
    if not all(math.isfinite(v) for v in values):
        return "diverged"
    m = float(np.mean(values))
    if len(values) == 1:
        return f"{m:.{digits}g}"
    return f"{m:.{digits}g} ± {float(np.std(values, ddof=1)):.2g}"


def final_metrics(result: dict) -> dict:
    """The last epoch's metrics of a run (NaN for every metric if it diverged)."""
    last = result["epochs"][-1]
    if result.get("diverged"):
        return {k: (math.nan if k.startswith(("train_", "test_")) else v) for k, v in last.items()}
    return last


def summary_table(results: Sequence[dict], metrics: Sequence[str], paper: Optional[dict] = None,
                  digits: int = 4) -> pd.DataFrame:
    """One row per label: mean ± std over seeds of each final metric, with the paper's values beside.

    ``paper`` maps label -> {metric: value}; a metric the paper does not give shows '–'."""
    labels = list(dict.fromkeys(r["label"] for r in results))
    rows = []
    for label in labels:
        runs = [r for r in results if r["label"] == label]
        row = {"method": label, "seeds": len(runs)}
        for metric in metrics:
            row[f"{metric} (ours)"] = mean_std([final_metrics(r).get(metric, math.nan) for r in runs], digits)
            if paper is not None:
                value = paper.get(label, {}).get(metric)
                row[f"{metric} ({PAPER_COLUMN})"] = "–" if value is None else f"{value:g}"
        rows.append(row)
    return pd.DataFrame(rows)


def write_table(table: pd.DataFrame, out_dir: Path, name: str, conditions: str = "") -> Path:
    """Writes ``<name>.md`` (with the conditions under it) and ``<name>.csv``; returns the .md path."""
    out_dir = Path(out_dir)
    table.to_csv(out_dir / f"{name}.csv", index=False)
    md = table.to_markdown(index=False)
    if conditions:
        md += f"\n\n{conditions}\n"
    path = out_dir / f"{name}.md"
    path.write_text(md)
    return path


def conditions(profile: str, results: Sequence[dict], synthetic: Optional[bool] = None) -> str:
    """One line stating how the results were made: profile, data, device, seeds, time, versions."""
    if synthetic is None:
        synthetic = profile == "smoke"
    devices = sorted({r.get("device", "?") for r in results})
    seeds = sorted({r.get("seed") for r in results if r.get("seed") is not None})
    minutes = sum(r.get("seconds", 0.0) for r in results) / 60
    data = "SYNTHETIC stand-in data: not a result" if synthetic else "real data"
    return (f"Profile `{profile}` ({data}); device: {', '.join(devices)}; seeds: {seeds}; "
            f"training time {minutes:.1f} min in total; torch {torch.__version__}; "
            f"made {_dt.date.today().isoformat()}.")


# ----------------------------------------------------------- curve helpers
def epoch_frame(results: Sequence[dict]) -> pd.DataFrame:
    """Long table of per-epoch metrics: one row per (label, seed, epoch)."""
    rows = []
    for r in results:
        for e in r["epochs"]:
            rows.append({"label": r["label"], "seed": r["seed"], **e})
    return pd.DataFrame(rows)


def step_frame(results: Sequence[dict], key: str = "lr", every: int = 1) -> pd.DataFrame:
    """Long table of a per-step series (``loss``, ``lr`` or ``ratio``), thinned to every n-th step."""
    rows = []
    for r in results:
        series = r["steps"].get(key)
        if series is None or len(series) == 0:
            continue
        values = series[::every].numpy()
        rows.append(pd.DataFrame({"label": r["label"], "seed": r["seed"],
                                  "step": np.arange(0, len(series), every), key: values}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["label", "seed", "step", key])


def spikes(loss: torch.Tensor, window: int = 50, factor: float = 3.0) -> torch.Tensor:
    """Indices of loss spikes: steps whose loss exceeds ``factor`` times the median of the
    preceding ``window`` steps (onset only: a spike lasting several steps counts once)."""
    loss = torch.as_tensor(loss, dtype=torch.float64)
    if len(loss) <= window:
        return torch.empty(0, dtype=torch.long)
    windows = loss.unfold(0, window, 1)[:-1]  # windows[i] = loss[i : i + window]
    baseline = windows.median(dim=1).values
    above = loss[window:] > factor * baseline
    onset = above & ~torch.cat([torch.zeros(1, dtype=torch.bool), above[:-1]])
    return torch.nonzero(onset).flatten() + window


# ------------------------------------------------------------------- plots
def plot_epoch_metric(results: Sequence[dict], metric: str, ax=None, logy: bool = False, colours: Optional[dict] = None,
                      title: str = ""):
    """A per-epoch metric for every label: mean over seeds, with a ±1 std band when there are several."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    ax = ax or plt.gca()
    frame = epoch_frame(results)
    sns.lineplot(frame, x="epoch", y=metric, hue="label", errorbar="sd", ax=ax, palette=colours)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title or metric.replace("_", " "))
    ax.legend(fontsize=8)
    return ax


def plot_step_series(results: Sequence[dict], key: str = "lr", ax=None, logy: bool = True, every: int = 1,
                     colours: Optional[dict] = None, title: str = "", seed: Optional[int] = None):
    """A per-step series (step size ``lr``, ``loss`` or ``ratio``) for every label (one seed each)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    chosen = [r for r in results if seed is None or r["seed"] == seed]
    seen = set()
    for r in chosen:
        if r["label"] in seen or len(r["steps"].get(key, [])) == 0:
            continue
        seen.add(r["label"])
        y = r["steps"][key][::every].numpy()
        ax.plot(np.arange(0, len(r["steps"][key]), every), y, lw=0.8, label=r["label"],
                color=None if colours is None else colours.get(r["label"]))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel({"lr": "step size h", "loss": "batch loss"}.get(key, key))
    ax.set_title(title or ax.get_ylabel())
    ax.legend(fontsize=8)
    return ax


def image_grid(rows: dict, ax=None, title: str = ""):
    """Rows of images (label -> tensor (n, C, H, W) in [0, 1]) as one picture, labels on the left."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    labels = list(rows)
    tiles = [torch.cat(list(torch.as_tensor(rows[k]).float().clamp(0, 1)), dim=-1) for k in labels]
    grid = torch.cat(tiles, dim=-2)  # (C, rows*H, n*W)
    image = grid.permute(1, 2, 0).numpy()
    ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
    height = tiles[0].shape[-2]
    ax.set_yticks([height * (i + 0.5) for i in range(len(labels))], labels)
    ax.set_xticks([])
    ax.grid(False)
    ax.set_title(title)
    return ax
