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

    colours = sns.color_palette("tab10" if len(labels) <= 10 else "husl", n_colors=max(len(labels), 1))
    return dict(zip(labels, colours))


def save_figure(fig, out_dir: Path, name: str, caption: str = "") -> Path:
    """Writes ``<out_dir>/<name>.png``; ``caption`` (the conditions) goes under the figure."""
    if caption:
        fig.text(0.01, -0.02, caption, ha="left", va="top", fontsize=8, color="0.35", wrap=True)
    path = Path(out_dir) / f"{name}.png"
    fig.savefig(path)
    return path


# ------------------------------------------------------------------ tables
def mean_std(values: Iterable[float], digits: int = 4, not_finite: str = "diverged") -> str:
    """'m ± s' over seeds ('m' alone for one seed); ``not_finite`` ('diverged') when any seed is not finite:
    pass ``not_finite="n/a"`` where a NaN means that nothing was measured rather than that a run diverged."""
    values = [float(v) for v in values]
    if not values:
        return ""
    if not all(math.isfinite(v) for v in values):
        return not_finite
    m = float(np.mean(values))
    if len(values) == 1:
        return f"{m:.{digits}g}"
    return f"{m:.{digits}g} ± {float(np.std(values, ddof=1)):.2g}"


def nan_median(values) -> float:
    """The median of the values that are not NaN, as ``np.nanmedian`` of the flattened values, but NaN without
    a RuntimeWarning when none is a number (a group whose every run diverged or every line search missed), and
    NaN without one when the two middle values are -inf and inf: in a smoke run which groups those are depends
    on the machine's rounding, and a warning would show in the notebook there."""
    array = np.asarray(values, dtype=float).ravel()
    array = array[~np.isnan(array)]
    if not array.size:
        return math.nan
    with np.errstate(invalid="ignore"):  # (-inf + inf) / 2
        return float(np.median(array))


def final_metrics(result: dict) -> dict:
    """The last epoch's metrics of a run (NaN for every metric if it diverged)."""
    last = result["epochs"][-1]
    if result.get("diverged"):
        return {k: (math.nan if k.startswith(("train_", "test_")) else v) for k, v in last.items()}
    return last


def finite_mean(values: Iterable[float]) -> float:
    """The mean of the finite values (a diverged run's NaN left out); NaN when there is none."""
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


# ------------------------------------------------------- reading one run
def final(result: dict, metric: str = "test_loss") -> float:
    """A run's ``metric`` after its last epoch, NaN when it diverged. ``train_*`` metrics come from the
    evaluation after the last epoch (``result["extra"]["train"]``, written by an ``on_finish`` such as
    ``linesearch.FinalTrainMetrics``) when the run has one, else from its last epoch."""
    if result.get("diverged"):
        return math.nan
    train = result.get("extra", {}).get("train")
    if metric.startswith("train_") and train is not None:
        return train[metric[len("train_"):]]
    return final_metrics(result)[metric]


def steps_per_epoch(result: dict) -> int:
    """The steps of one epoch of a run, from its per-step log and its epochs (at least 1)."""
    return max(1, len(result["steps"]["lr"]) // max(1, len(result["epochs"]) - 1))


def epoch_window(result: dict, epoch: int, series: str = "lr", steps: Optional[int] = None,
                 finite: bool = False) -> torch.Tensor:
    """A per-step series over the steps of one training epoch (1 = the first; ``steps``: steps per epoch, by
    default :func:`steps_per_epoch`); an absent series is empty. ``finite=True`` keeps its finite values only."""
    steps = steps or steps_per_epoch(result)
    values = result["steps"].get(series, torch.empty(0))[(epoch - 1) * steps: epoch * steps]
    return values[torch.isfinite(values)] if finite else values


def last_epoch(result: dict, series: str = "lr") -> torch.Tensor:
    """A per-step series over the run's last :func:`steps_per_epoch` steps."""
    return result["steps"][series][-steps_per_epoch(result):]


def settled_h(result: dict) -> float:
    """The median step size over the last epoch; NaN for a diverged run (its h froze when the loss went
    non-finite)."""
    return math.nan if result.get("diverged") else float(last_epoch(result, "lr").median())


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
            values = [final_metrics(r).get(metric) for r in runs]
            row[f"{metric} (ours)"] = "–" if None in values else mean_std(values, digits)
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


def show_table(table: pd.DataFrame, out_dir: Path, name: str, conditions: str = "", float_format: Optional[str] = None,
               empty: Optional[str] = None) -> None:
    """Prints ``table`` whole (every row and column, no index; floats as ``float_format``, e.g. ``"{:.4g}"``) and
    writes it with :func:`write_table`; ``empty``: what to print instead of a table without rows."""
    write_table(table, out_dir, name, conditions)
    if empty is not None and not len(table):
        print(empty)
        return
    with pd.option_context("display.float_format", None if float_format is None else float_format.format):
        print(table.to_string(index=False))


def conditions(profile: str, results: Sequence[dict], synthetic: Optional[bool] = None) -> str:
    """One line stating how the results were made: profile, data, device, seeds, time, versions."""
    if synthetic is None:
        synthetic = profile == "smoke"
    devices = sorted({r.get("device", "?") for r in results})
    seeds = sorted({r.get("seed") for r in results if r.get("seed") is not None})
    minutes = sum(r.get("seconds", 0.0) for r in results) / 60
    data = "SYNTHETIC stand-in data: not a result" if synthetic else "real data"
    parts = [f"Profile `{profile}` ({data})"]
    if results:
        parts += [f"device: {', '.join(devices)}", f"seeds: {seeds}", f"training time {minutes:.1f} min in total"]
        flushed = sum(r.get("denormals") == "flushed" for r in results)  # recorded by runs since denormals flush
        if flushed:
            parts.insert(2, "denormals flushed" + ("" if flushed == len(results) else
                                                   f" in {flushed} of {len(results)} runs"))
    parts += [f"torch {torch.__version__}", f"made {_dt.date.today().isoformat()}."]
    return "; ".join(parts)


# ----------------------------------------------------------- curve helpers
def epoch_frame(results: Sequence[dict]) -> pd.DataFrame:
    """Long table of per-epoch metrics: one row per (label, seed, epoch)."""
    rows = []
    for r in results:
        for e in r["epochs"]:
            rows.append({"label": r["label"], "seed": r["seed"], **e})
    return pd.DataFrame(rows)


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
        plain_log_ticks(ax)
    ax.set_title(title or metric.replace("_", " "))
    ax.legend(fontsize=8)
    return ax


def plot_epoch_metric_per_seed(results: Sequence[dict], metric: str, ax=None, colours: Optional[dict] = None,
                               title: str = "", styles: Sequence[str] = ("-", "--", ":", "-.")):
    """A per-epoch metric for every run: one line per seed, in its label's colour (seeds told apart by
    ``styles``, in seed order), one legend entry per label. No mean and no band: where seeds split (one stalls,
    two train) a mean draws a curve no run followed, and a ±std band can leave the metric's range."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    labels = list(dict.fromkeys(r["label"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    for label in labels:
        for r in sorted((r for r in results if r["label"] == label), key=lambda r: r["seed"]):
            ax.plot([e["epoch"] for e in r["epochs"]], [e[metric] for e in r["epochs"]], lw=1.3, alpha=0.85,
                    ls=styles[seeds.index(r["seed"]) % len(styles)], color=None if colours is None else colours.get(label),
                    label=label if r["seed"] == min(x["seed"] for x in results if x["label"] == label) else None)
    if len(seeds) > 1:  # the line style of each seed, in grey
        for k, seed in enumerate(seeds):
            ax.plot([], [], color="0.45", lw=1.3, ls=styles[k % len(styles)], label=f"seed {seed}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric.replace("_", " "))
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


# ----------------------------------------------- step sizes: settling, per epoch
def step_size_settling(lr, window: int, factor: float = 2.0) -> dict:
    """Where a step-size series settles and how many steps it needs to get there (the paper's Figure 3).

    ``lr`` holds the step size of every step in order (``result["steps"]["lr"]``); ``window`` is how
    many final steps make up the settled value (one epoch in the notebooks: LOSSGRAD's h moves by a
    factor c every step, and a median over many steps is robust to that and to short spikes).
    Returns a dict:

    * ``settled``: the median of the last ``window`` step sizes;
    * ``reached``: the number of steps before the first step size within ``factor`` of
      ``settled`` (settled / factor <= h <= settled * factor), i.e. the batches it needed to get
      there; 0 when it started there;
    * ``stays``: the number of steps before the first one from which h stays in that band to the
      end (later than ``reached`` when h leaves the band again, e.g. in a spike); ``None`` when
      even the last step size is outside the band;
    * ``peak`` and ``peak_step``: the largest step size of the series and its step, for the spike of
      h the paper sees at the start of training (compare ``peak / settled``);
    * ``collapsed_step``: the first step whose h is 0 or infinite (exact Algorithm 1 can shrink a tiny
      h until it underflows to 0.0, or grow it without bound), else ``None``. Such steps count as
      outside the band; when ``settled`` itself is 0 or infinite there is no band, and ``reached``
      and ``stays`` are ``None``.

    Raises ValueError for an empty or non-1-D series, a window outside 1..len(lr), a factor <= 1,
    or a step size that is negative or NaN (no step rule produces those: a logging error).
    """
    lr = torch.as_tensor(lr, dtype=torch.float64)
    if lr.dim() != 1 or len(lr) == 0:
        raise ValueError(f"lr must be a non-empty 1-D series of step sizes, got shape {tuple(lr.shape)}")
    if not 1 <= int(window) <= len(lr):
        raise ValueError(f"window must be between 1 and len(lr) = {len(lr)}, got {window}")
    if not factor > 1:
        raise ValueError(f"factor must be > 1 (the band is settled/factor .. settled*factor), got {factor}")
    if torch.isnan(lr).any() or (lr < 0).any():
        raise ValueError("every step size must be >= 0 and not NaN; "
                         f"got min {float(lr.min())}, max {float(lr.max())}, NaN: {bool(torch.isnan(lr).any())}")
    settled = float(lr[-int(window):].median())
    collapsed = torch.nonzero((lr == 0) | torch.isinf(lr)).flatten()
    reached = stays = None
    if 0 < settled < math.inf:
        inside = (lr >= settled / factor) & (lr <= settled * factor)
        reached = int(torch.nonzero(inside)[0]) if inside.any() else None
        outside = torch.nonzero(~inside).flatten()
        if len(outside) == 0:
            stays = 0
        elif int(outside[-1]) < len(lr) - 1:
            stays = int(outside[-1]) + 1
    peak_step = int(lr.argmax())
    return {"settled": settled, "reached": reached, "stays": stays, "peak": float(lr[peak_step]),
            "peak_step": peak_step, "collapsed_step": int(collapsed[0]) if len(collapsed) else None}


_EPOCH_REDUCTIONS = {
    "mean": lambda t: float(t.mean()),
    "geomean": lambda t: float(t.log().mean().exp()),
    "median": lambda t: float(t.nanmedian()),  # a zero-gradient step (ratio NaN) must not blank an epoch
    "max": lambda t: float(t.max()),
    "min": lambda t: float(t.min()),
}


def step_series_per_epoch(result: dict, key: str = "lr", how: str = "mean") -> np.ndarray:
    """A run's per-step series (``lr``, ``loss`` or ``ratio``) reduced to one value per training epoch.

    ``how``: ``mean`` (the step size averaged over the epoch), ``geomean``, ``median``, ``max`` or
    ``min``. Value i belongs to epoch i + 1 (epoch 0 of ``result["epochs"]`` is the evaluation
    before training). Steps of an epoch are found by splitting the series into as many equal parts
    as the run has training epochs; a series that does not split evenly is a ValueError."""
    if how not in _EPOCH_REDUCTIONS:
        raise ValueError(f"how must be one of {sorted(_EPOCH_REDUCTIONS)}, got {how!r}")
    series = torch.as_tensor(result["steps"].get(key, []), dtype=torch.float64)
    n_epochs = len(result["epochs"]) - 1
    if len(series) == 0 or n_epochs < 1:
        return np.empty(0)
    if len(series) % n_epochs:
        raise ValueError(f"{len(series)} steps of {key!r} do not split into {n_epochs} equal epochs; "
                         "was the series cut or the epoch list changed?")
    return np.array([_EPOCH_REDUCTIONS[how](part) for part in series.view(n_epochs, -1)])


def plot_step_series_per_epoch(results: Sequence[dict], key: str = "lr", how: str = "mean", ax=None,
                               logy: bool = True, colours: Optional[dict] = None, title: str = ""):
    """A per-step series reduced per epoch (:func:`step_series_per_epoch`) for every label: mean over
    seeds, with a ±1 std band when there are several (like :func:`plot_epoch_metric`)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    ax = ax or plt.gca()
    rows = [{"label": r["label"], "seed": r["seed"], "epoch": i + 1, key: v}
            for r in results for i, v in enumerate(step_series_per_epoch(r, key, how))]
    frame = pd.DataFrame(rows, columns=["label", "seed", "epoch", key])
    sns.lineplot(frame, x="epoch", y=key, hue="label", errorbar="sd", ax=ax, palette=colours)
    if logy:
        ax.set_yscale("log")
        plain_log_ticks(ax)
    name = {"lr": "step size h", "loss": "batch loss"}.get(key, key)
    ax.set_ylabel(name)
    ax.set_title(title or f"{name} ({how} per epoch)")
    ax.legend(fontsize=8)
    return ax


# ------------------------------------------- LOSSGRAD's ratio: what its log says
def lossgrad_ratio_summary(result: dict, window: int) -> dict:
    """What a LOSSGRAD run's log says about the step size it settled on, over its last ``window`` steps.

    Algorithm 1 fits a parabola along −g: for a batch loss that is quadratic along g, its ratio is
    r = h·κ/2 with κ = gᵀHg / ||g||², the curvature of the batch loss in the direction of the
    gradient. So 2·r/h estimates κ at every step, and 1/κ is the step an exact line search along −g
    would take; the rule (grow h while r ≤ 1/2) steers h towards it. Pairs (h, r) are taken from
    ``steps["lr"]`` (h before the step) and ``steps["ratio"]`` (that step's ratio). Returns

    * ``settled_h``: median h; ``median_ratio``: median r; ``shrink_share``: share of steps with
      r > 1/2 (h was divided by c); about 1/2 when h hovers at the rule's equilibrium;
    * ``curvature``: median of 2·r/h (κ, in 1/step-size units); ``line_search_h``: 1/curvature;
    * ``ratio_one_share``: share of steps with r exactly 1, i.e. a probe loss exactly equal to the
      loss: the decrease was below the loss's floating-point resolution, so r said nothing about
      curvature and h shrank anyway (the drift the exact Algorithm 1 has without a resolution guard).

    ValueError when the run has no ratio log (not a LOSSGRAD run) or ``window`` is out of range.
    """
    lr = torch.as_tensor(result["steps"].get("lr", []), dtype=torch.float64)
    ratio = torch.as_tensor(result["steps"].get("ratio", []), dtype=torch.float64)
    if len(ratio) == 0 or len(ratio) != len(lr):
        raise ValueError(f"{result.get('label', 'this run')} has no ratio log matching its step sizes "
                         f"({len(ratio)} ratios, {len(lr)} step sizes): is it a LOSSGRAD run?")
    if not 1 <= int(window) <= len(lr):
        raise ValueError(f"window must be between 1 and {len(lr)}, got {window}")
    h, r = lr[-int(window):], ratio[-int(window):]
    keep = torch.isfinite(r) & (h > 0)
    curvature = float((2 * r[keep] / h[keep]).median()) if keep.any() else math.nan
    return {"settled_h": float(h.median()), "median_ratio": float(r[keep].median()) if keep.any() else math.nan,
            "shrink_share": float((r[keep] > 0.5).double().mean()) if keep.any() else math.nan,
            "curvature": curvature, "line_search_h": 1 / curvature if curvature > 0 else math.nan,
            "ratio_one_share": float((r == 1.0).double().mean())}


def plot_loss_and_step_size(result: dict, ax=None, first: Optional[int] = None, window: int = 50,
                            factor: float = 3.0, title: str = ""):
    """One run's batch loss (left axis) and step size h (right axis) at every step, loss spikes
    (:func:`spikes` with ``window`` and ``factor``) marked by red vertical lines: shows whether the
    loss spikes follow peaks of h, as the paper saw on MNIST. ``first`` limits the plot to the
    first steps (e.g. the spike of h at the start). Returns the two axes (loss, step size)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    loss = torch.as_tensor(result["steps"]["loss"], dtype=torch.float64)
    lr = torch.as_tensor(result["steps"]["lr"], dtype=torch.float64)
    n = len(loss) if first is None else min(int(first), len(loss))
    steps = np.arange(n)
    ax.plot(steps, loss[:n].numpy(), lw=0.5, color="0.5", label="batch loss")
    onsets = [int(s) for s in spikes(loss, window, factor) if s < n]
    for i, s in enumerate(onsets):
        ax.axvline(s, color="tab:red", lw=0.7, alpha=0.7, label=f"loss spike ({len(onsets)})" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("batch loss")
    twin = ax.twinx()
    twin.plot(steps, lr[:n].numpy(), lw=0.8, color="tab:blue", label="step size h")
    twin.set_yscale("log")
    twin.set_ylabel("step size h", color="tab:blue")
    twin.grid(False)
    plain_log_ticks(ax)
    plain_log_ticks(twin)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.set_title(title or str(result.get("label", "")))
    return ax, twin


def plain_log_ticks(ax, axis: str = "y"):
    """Label the in-between ticks of a log axis with plain numbers (2.3, 2.31) instead of 2.3×10⁰:
    readable when a metric spans less than a decade (a test loss from 2.3 to 1.1), where only those
    ticks carry labels. Decades keep their 10ⁿ labels; matplotlib still decides which ticks get a
    label, and each label gets the fewest significant digits that keep neighbours apart. Returns ``ax``."""
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))
    return ax


class _PlainLogFormatter(matplotlib.ticker.LogFormatter):
    """LogFormatter's choice of labelled ticks, written as '%.<k>g' with k just large enough."""

    digits = 2

    def set_locs(self, locs=None):
        super().set_locs(locs)
        low, high = sorted(self.axis.get_view_interval())
        shown = [v for v in (locs if locs is not None else []) if low <= v <= high]
        self.digits = next((k for k in range(2, 8) if len({f"{v:.{k}g}" for v in shown}) == len(shown)), 8)

    def __call__(self, x, pos=None):
        return f"{x:.{self.digits}g}" if super().__call__(x, pos) else ""


def step_size_at_spikes(lr: torch.Tensor, spike_steps: torch.Tensor, window: int = 200,
                        generator: Optional[torch.Generator] = None) -> dict:
    """How high the step size was when the loss spiked, against how high it is at random steps.

    For each step k the score is h[k] / median(h[k-window:k]) (> 1: h is above its recent level).
    Returns the scores at the spikes and at as many random steps, for comparison."""
    lr = torch.as_tensor(lr, dtype=torch.float64)
    spike_steps = torch.as_tensor(spike_steps, dtype=torch.long)

    def score(steps):
        return torch.stack([lr[k] / lr[k - window:k].median() for k in steps.tolist()]) if len(steps) else torch.empty(0)

    valid = spike_steps[spike_steps >= window]
    random_steps = torch.randint(window, len(lr), (max(len(valid), 1) * 20,),
                                 generator=generator or torch.Generator().manual_seed(0))
    return {"at_spikes": score(valid), "at_random_steps": score(random_steps)}


def plot_lossgrad_ratio(lossgrad_runs: Sequence[dict], sgd_lrs: Sequence[float] = (), colours: Optional[dict] = None):
    """Why LOSSGRAD's step size ends where it does: its ratio per epoch (left), and its step size against the
    line-search step 1/κ that the ratio implies on a locally quadratic loss (ratio = h·κ/2), with the SGD rates
    (right). Returns the figure; epochs whose median curvature is not positive get no line-search step."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    plot_step_series_per_epoch(lossgrad_runs, "ratio", how="median", ax=axes[0], logy=False, colours=colours,
                               title="LOSSGRAD: median ratio per epoch")
    axes[0].axhline(0.5, ls="--", lw=1, color="0.4")
    plot_step_series_per_epoch(lossgrad_runs, "lr", how="median", ax=axes[1], colours=colours,
                               title="LOSSGRAD: step size vs line-search step")
    for r in lossgrad_runs:
        per_step = {"epochs": r["epochs"], "steps": {"curvature": 2 * r["steps"]["ratio"] / r["steps"]["lr"]}}
        curvature = step_series_per_epoch(per_step, "curvature", "median")
        with np.errstate(divide="ignore"):
            line_search = np.where(curvature > 0, 1 / curvature, np.nan)
        axes[1].plot(np.arange(1, len(curvature) + 1), line_search, ":",
                     color="0.3", label="1/κ (line-search step)" if r["seed"] == 0 else None)
    for lr in sgd_lrs:
        label = f"SGD lr={lr:g}"
        axes[1].axhline(lr, ls="--", lw=1, color=None if colours is None else colours.get(label), label=label)
    axes[1].legend(fontsize=8)
    return fig
