"""Why LOSSGRAD's step size settles low (notebook 10): its tagged runs, and the rows and figures of its five
questions (batch noise, which line search h follows, the threshold, the guards, loss spikes).

:class:`Runs` trains (or loads) rows of runs and tags each result with what the tables select on (``kind``,
``task``, ``data``, ``b``, ``init``, ``method``, ``form``, ``tau``, ``lr``, ``h0``, ...); :meth:`Runs.pick` selects
by those tags. Which runs answer a question, which rate is best and which window is read stay in the notebook;
the functions here turn the runs it picks into table rows and figures.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from . import report, runner
from .linesearch import FinalTrainMetrics
from .report import finite_mean, final, settled_h, steps_per_epoch
from .train import Experiment

AUTHORS, TORCH = "authors", "torch"  # the initialisations: the authors' example code's, PyTorch's default


class Runs:
    """Every run of the notebook, tagged. ``models``: task -> (model function, the model options of the authors'
    example code's initialisation, loss); ``train_data``, ``test_data``: the default split."""

    def __init__(self, notebook: str, profile: str, models: dict, train_data: tuple, test_data: tuple, *,
                 batch_size: int, epochs: int, device, overrides: Optional[dict] = None, jobs: Optional[int] = None):
        self.notebook, self.profile, self.models = notebook, profile, models
        self.train_data, self.test_data = train_data, test_data
        self.batch_size, self.epochs, self.device, self.overrides, self.jobs = batch_size, epochs, device, overrides, jobs
        self.results: list = []

    def experiment(self, task: str, batch_size: Optional[int] = None, epochs: Optional[int] = None, init: str = AUTHORS,
                   split: Optional[tuple] = None, kind=Experiment, **extra) -> Experiment:
        """An Experiment (or ``kind``) of ``task`` from initialisation ``init`` (:data:`AUTHORS` or :data:`TORCH`)
        on ``split`` (default: the notebook's data), its train metrics evaluated once, after the last epoch."""
        model_fn, authors_init, loss = self.models[task]
        train, test = split or (self.train_data, self.test_data)
        return kind(self.notebook, self.profile, train, test, loss, model_fn, epochs=epochs or self.epochs,
                    batch_size=batch_size or self.batch_size, device=self.device, overrides=self.overrides,
                    jobs=self.jobs, eval_train=False,
                    model_options=authors_init if init == AUTHORS else dict(init_std=None),  # None: PyTorch's default
                    on_finish=FinalTrainMetrics(loss, train, self.device), **extra)

    def train(self, experiment, prefix: str, rows: Sequence[tuple], **meta) -> list:
        """``rows``: ``(row, optimizer, options, seeds, tags)``, all trained in one call to the runner (run names
        ``"<prefix> <row>"``); each result is tagged with ``meta``, its ``row`` and the row's tags, and kept."""
        specs = [(f"{prefix} {row}", name, seed, dict(options)) for row, name, options, seeds, _ in rows for seed in seeds]
        if not specs:
            return []
        done = runner.run_all(experiment, specs, jobs=experiment.jobs, executor=experiment.executor)
        for r, (row, tag) in zip(done, [(row, tag) for row, _, _, seeds, tag in rows for _ in seeds]):
            r.update(meta, row=row, **tag)
        self.results.extend(done)
        return done

    def pick(self, **tags) -> list:
        """The runs whose tags have these values."""
        return [r for r in self.results if all(r.get(k) == v for k, v in tags.items())]


def best_rate(grid: Sequence[dict]) -> float:
    """The rate (tag ``lr``) of the grid's runs with the lowest mean final test loss (a diverged run counts as
    +inf); ties go to the smaller rate."""
    score = lambda lr: np.mean([final(r) if math.isfinite(final(r)) else math.inf for r in grid if r["lr"] == lr])  # noqa: E731
    return min(sorted({r["lr"] for r in grid}), key=score)


def losses(runs: Sequence[dict], digits: int = 3) -> dict:
    """Seeds, final test loss (mean ± sd, "diverged" when one did) and diverged runs of a group of runs."""
    return {"seeds": len(runs), "test loss": report.mean_std([final(r) for r in runs], digits),
            "diverged": sum(r["diverged"] for r in runs)}


# ---------------------------------------------------------- 1. batch noise
def batch_noise_row(task: str, b: int, lossgrad: Sequence[dict], sgd: Sequence[dict], grid: Sequence[float],
                    spikes: Callable[[dict], int]) -> dict:
    """LOSSGRAD's settled h (mean and sd over the runs that did not diverge) and the step from which it stays in
    band, against SGD's best rate (``sgd``'s ``lr``; *edge* when it is the lowest or highest of ``grid``); their
    ratio; both final test losses (means over the runs that did not diverge) and their ratio; seeds, diverged runs and
    spikes per 1000 steps of each."""
    lr = sgd[0]["lr"]
    h = [x for x in map(settled_h, lossgrad) if math.isfinite(x)]  # diverged runs have no settled h
    steps = max(len(r["steps"]["lr"]) for r in lossgrad)  # a diverged run's series stops early
    bands = [report.step_size_settling(r["steps"]["lr"], steps_per_epoch(r))["stays"] for r in lossgrad if not r["diverged"]]
    per_1000 = lambda runs: 1000 * sum(map(spikes, runs)) / sum(len(r["steps"]["loss"]) for r in runs)  # noqa: E731
    return {"task": task, "batch": b, "steps": steps,
            "in band from step": max((steps if s is None else s for s in bands), default=math.nan),
            "settled h": finite_mean(h), "h sd": np.std(h, ddof=1) if len(h) > 1 else 0.0, "best SGD lr": lr,
            "edge": "lowest" if lr == grid[0] else ("highest" if lr == grid[-1] else ""),
            "best lr / settled h": lr / finite_mean(h),
            "LOSSGRAD test loss": finite_mean([final(r) for r in lossgrad]),
            "SGD test loss": finite_mean([final(r) for r in sgd]),
            "LOSSGRAD / SGD loss": finite_mean([final(r) for r in lossgrad]) / finite_mean([final(r) for r in sgd]),
            "seeds": f"{len(lossgrad)}/{len(sgd)}",
            "diverged": f"{sum(r['diverged'] for r in lossgrad)}/{sum(r['diverged'] for r in sgd)}",
            "spikes / 1000 steps LOSSGRAD": per_1000(lossgrad), "spikes / 1000 steps SGD": per_1000(sgd)}


def plot_batch_noise(q1: pd.DataFrame, tasks: Sequence[str], batch_sizes: Sequence[int], colours: dict):
    """Against the batch size: settled h (± sd) and SGD's best rate; their ratio; the final test losses' ratio."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.4))
    for task in tasks:
        q = q1[q1.task == task]
        axes[0].errorbar(q.batch, q["settled h"], yerr=[np.minimum(q["h sd"], 0.9 * q["settled h"]), q["h sd"]],
                         marker="o", color=colours[task], capsize=3, label=f"{task}: LOSSGRAD settled h")
        axes[0].plot(q.batch, q["best SGD lr"], marker="s", ls="--", color=colours[task], label=f"{task}: best SGD lr")
        axes[1].plot(q.batch, q["best lr / settled h"], marker="o", color=colours[task], label=task)
        axes[2].plot(q.batch, q["LOSSGRAD / SGD loss"], marker="o", color=colours[task], label=task)
    for ax, title, ylabel in zip(axes, ["step sizes", "best SGD lr / LOSSGRAD's settled h",
                                        "final test loss: LOSSGRAD / best SGD"], ["step size", "ratio", "ratio"]):
        ax.set_xscale("log")
        if ax is not axes[2]:  # the loss ratio stays within a factor of a few: a linear axis reads better
            ax.set_yscale("log")
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.minorticks_off()
        report.plain_log_ticks(ax)
        ax.set_xlabel("batch size (the same number of examples)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[1].axhline(1, ls=":", color="0.4", lw=1)
    axes[2].axhline(1, ls=":", color="0.4", lw=1)
    fig.tight_layout()
    return fig


# ------------------------------------------------- 2. which line search h follows
MINIMISERS = {"t_batch": "batch loss along -g_B (the rule's target)", "t_full_gB": "full loss along -g_B",
              "t_full_gF": "full loss along -g_F", "parabola": "LOSSGRAD's parabola h/(2r)"}
PROFILE_OF = {"t_batch": "batch", "t_full_gB": "full_gB", "t_full_gF": "full_gF"}


def change_at(row: dict, t: float, profile: str = "full_gB") -> float:
    """(F(x - t g_B) - F(x)) / F(x) from a checkpoint's measured profile, interpolated in log t (NaN outside it)."""
    grid, f = np.log(row["grid_t"]), np.asarray(row[f"profile_{profile}"], dtype=float)
    ok = np.isfinite(f)
    if not ok.any() or not grid[ok][0] <= math.log(t) <= grid[ok][-1]:
        return math.nan
    return float(np.interp(math.log(t), grid[ok], f[ok])) / row["full_loss"] - 1


def checkpoints(traces: Sequence[dict], best: dict) -> pd.DataFrame:
    """One row per checkpoint of the measured runs: h, the minimisers, whether each line search ended at the edge
    of its range, cos(g_B, g_F), LOSSGRAD's ratio, and the relative change of F after one step along -g_B of size h,
    of the full loss's minimiser and of ``best[task]`` (the best SGD rate)."""
    return pd.DataFrame([
        {"task": r["task"], "seed": r["seed"], "step": row["step"], "epoch": row["epoch"], "h": row["h"],
         **{t: row[t] for t in MINIMISERS}, **{f"edge {t}": row[f"edge_{p}"] for t, p in PROFILE_OF.items()},
         "cos(g_B, g_F)": row["cos_batch_full"], "ratio": row["ratio"],
         "dF at h": change_at(row, row["h"]), "dF at t_full_gB": row["min_full_gB"] / row["full_loss"] - 1,
         "dF at best SGD lr": change_at(row, best[r["task"]])}
        for r in traces for row in r["trace"]])


def line_search_rows(d: pd.DataFrame, task: str, best_lr: float) -> list:
    """Over the checkpoints ``d`` of one task, per minimiser: the median t, h / t (mean ± sd over the seeds'
    medians), the typical factor between h and t (exp of the median |ln(h/t)|) and the share at the edge of the
    search range; then the parabola's minimiser against the exact batch one, h itself and the best SGD rate."""
    rows = []
    for t, name in MINIMISERS.items():
        per_seed = [float(report.nan_median(g.h / g[t])) for _, g in d.groupby("seed")]
        # n/a: no checkpoint of a seed has this minimiser (every line search missed it; a smoke run's can)
        rows.append({"task": task, "minimiser": name, "median t": float(d[t].median()),
                     "h / t": report.mean_std(per_seed, 3, not_finite="n/a"),
                     "typical factor h vs t": float(np.exp(report.nan_median(np.abs(np.log(d.h / d[t]))))),
                     "at edge": float(d[f"edge {t}"].mean()) if f"edge {t}" in d else math.nan})
    vs_batch = np.log(d["parabola"] / d["t_batch"])
    rows.append({"task": task, "minimiser": "h/(2r) against t_batch", "median t": math.nan,
                 "h / t": report.mean_std([np.exp(report.nan_median(vs_batch))], 3, not_finite="n/a") + " (parabola / t_batch)",
                 "typical factor h vs t": float(np.exp(report.nan_median(np.abs(vs_batch))))})
    rows.append({"task": task, "minimiser": "h itself", "median t": float(d.h.median())})
    rows.append({"task": task, "minimiser": "best SGD lr (question 1)", "median t": best_lr})
    return rows


def plot_minimisers(traces: Sequence[dict], checkpoints: pd.DataFrame, tasks: Sequence[str], best: dict):
    """Per task: h at every step of the first measured run and the minimisers at every checkpoint of all."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 4.6), squeeze=False)
    markers = {"t_batch": "o", "t_full_gB": "^", "t_full_gF": "s", "parabola": "x"}
    for ax, task in zip(axes[0], tasks):
        first = [r for r in traces if r["task"] == task][0]
        steps = np.arange(1, len(first["steps"]["lr"]) + 1)
        ax.plot(steps, first["steps"]["lr"].numpy(), lw=0.6, color="0.45", label=f"h at every step (seed {first['seed']})")
        d = checkpoints[checkpoints.task == task]
        for t, name in MINIMISERS.items():
            ax.scatter(d.step + 1, d[t], marker=markers[t], s=22, alpha=0.8, label=name)
        ax.axhline(best[task], ls="--", color="tab:red", lw=1, label=f"best SGD lr {best[task]:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step + 1")
        ax.set_ylabel("step size")
        ax.set_title(f"{task}: h and the exact minimisers (all seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_profiles(traces: Sequence[dict], tasks: Sequence[str], best: dict):
    """Per task, at the last checkpoint of the first measured run: the batch loss along -g_B and the full loss along
    -g_B and -g_F, each over its value at x, with h and the best SGD rate marked."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 4.4), squeeze=False)
    names = {"batch": "batch loss along -g_B", "full_gB": "full loss along -g_B", "full_gF": "full loss along -g_F"}
    for ax, task in zip(axes[0], tasks):
        first = [r for r in traces if r["task"] == task][0]
        row = first["trace"][-1]
        for p, name in names.items():
            base = row["batch_loss"] if p == "batch" else row["full_loss"]
            ax.plot(row["grid_t"], np.asarray(row[f"profile_{p}"], dtype=float) / base, marker=".", label=name)
        ax.axvline(row["h"], color="0.3", ls=":", label=f"h = {row['h']:.3g}")
        ax.axvline(best[task], color="tab:red", ls="--", lw=1, label=f"best SGD lr {best[task]:g}")
        ax.axhline(1, color="0.6", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("t (step along the direction)")
        ax.set_ylabel("loss at x - t d  /  loss at x")
        ax.set_title(f"{task}: profiles at step {row['step']} (seed {first['seed']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------- 3. the threshold
def sd_ln_h(r: dict) -> float:
    """The standard deviation of ln h over the last epoch (NaN when an h is 0 or not finite)."""
    h = report.last_epoch(r, "lr")
    return float(h.log().std()) if len(h) > 1 and (h > 0).all() and torch.isfinite(h).all() else math.nan


def threshold_rows(task: str, by_tau: dict, sgd: Sequence[dict], best_lr: float, spikes: Callable[[dict], int]) -> list:
    """Per threshold τ (``by_tau``: τ -> its runs; τ = 0.5 among them): the settled h, against τ = 0.5's and the
    parabola's 2τ, the best SGD rate over it, the median r and sd of ln h over the last epoch, spikes, diverged runs,
    final train and test loss, and the test loss over that of ``sgd`` (the best SGD rate's runs)."""
    base_h = finite_mean([settled_h(r) for r in by_tau[0.5]])
    sgd_loss = finite_mean([final(r) for r in sgd])
    rows = []
    for tau, runs in by_tau.items():
        h = [settled_h(r) for r in runs]
        ratios = [report.last_epoch(r, "ratio") for r in runs]
        rows.append({"task": task, "tau": tau, "seeds": len(runs), "settled h": finite_mean(h),
                     "h / h(0.5)": finite_mean(h) / base_h, "predicted ratio": 2 * tau,
                     "best SGD lr / h": best_lr / finite_mean(h),
                     "median r": float(report.nan_median(torch.cat(ratios).numpy())),
                     "sd ln h": finite_mean(map(sd_ln_h, runs)),
                     "spikes": sum(map(spikes, runs)), "diverged": sum(r["diverged"] for r in runs),
                     "train loss": finite_mean([final(r, "train_loss") for r in runs]),
                     "test loss": report.mean_std([final(r) for r in runs], 3),
                     "test loss / best SGD's": finite_mean([final(r) for r in runs]) / sgd_loss})
    return rows


def seed_rows(task: str, by_tau: dict) -> list:
    """Per threshold and seed: settled h, final test loss and accuracy (classifier) and whether it diverged."""
    return [{"task": task, "tau": tau, "seed": r["seed"], "settled h": settled_h(r), "test loss": final(r),
             "test acc": final(r, "test_acc") if task == "classifier" else math.nan, "diverged": r["diverged"]}
            for tau, runs in by_tau.items() for r in runs]


def plot_threshold(q3: pd.DataFrame, seeds: pd.DataFrame, best: dict, sgd_loss: dict, colours: dict):
    """Against the threshold τ, per task: the settled h (mean over the seeds that did not diverge, each seed a
    small dot) with the parabola's prediction 2τ·h(½) and the best SGD rate; the final test loss over the best
    SGD rate's (``sgd_loss[task]``), per seed and its mean; the sd of ln h and the spikes per run. Each seed that
    diverged is an ✕ in a band above the data of the first two panels, and a τ where every seed diverged (no point)
    is named in their legends."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    tasks = list(dict.fromkeys(q3.task))
    for task in tasks:
        q, s = q3[q3.task == task], seeds[seeds.task == task]
        ok = s[~s.diverged.astype(bool)]
        c = colours[task]
        axes[0].plot(q.tau, q["settled h"], marker="o", color=c, label=f"{task}: settled h (mean)")
        axes[0].scatter(ok.tau, ok["settled h"], s=12, color=c, alpha=0.5, label=f"{task}: a seed")
        axes[0].plot(q.tau, q.loc[q.tau == 0.5, "settled h"].item() * 2 * q.tau, ls=":", color=c, label=f"{task}: 2τ·h(½)")
        axes[0].axhline(best[task], ls="--", lw=1, color=c, label=f"{task}: best SGD lr")
        axes[1].plot(q.tau, q["test loss / best SGD's"], marker="o", color=c, label=f"{task} (mean)")
        axes[1].scatter(ok.tau, ok["test loss"] / sgd_loss[task], s=12, color=c, alpha=0.5, label=f"{task}: a seed")
        axes[2].plot(q.tau, q["sd ln h"], marker="o", color=c, label=f"{task}: sd ln h (last epoch)")
        axes[2].plot(q.tau, q["spikes"] / q["seeds"], marker="s", ls="--", color=c, label=f"{task}: spikes per run")
    axes[0].set_yscale("log")
    report.plain_log_ticks(axes[0])
    axes[1].axhline(1, ls=":", color="0.4", lw=1)
    band = 0.08 * len(tasks)  # the top of the first two panels: one row of ✕ per task
    for ax in axes[:2]:
        lo, hi = ax.get_ylim()
        if ax.get_yscale() == "log":
            ax.set_ylim(lo, 10 ** (math.log10(hi) + band / (1 - band) * (math.log10(hi) - math.log10(lo))))
        else:
            ax.set_ylim(lo, hi + band / (1 - band) * (hi - lo))
        top = blended_transform_factory(ax.transData, ax.transAxes)
        notes = []
        for i, task in enumerate(tasks):
            s = seeds[seeds.task == task]
            label = f"{task}: a seed that diverged"
            for tau, group in s[s.diverged.astype(bool)].groupby("tau"):
                for k in range(len(group)):
                    ax.plot(tau + 0.006 * (k - (len(group) - 1) / 2), 1 - 0.04 - 0.07 * i, marker="x", ms=7, mew=1.8,
                            ls="none", color=colours[task], transform=top, label=label)
                    label = None
                if len(group) == len(s[s.tau == tau]):
                    notes.append(f"{task}, τ = {tau:g}: no point, {len(group)}/{len(group)} diverged")
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles + [Line2D([], [], ls="none")] * len(notes), labels + notes, fontsize=7)
    axes[2].legend(fontsize=7)
    for ax, title, ylabel in zip(axes, ["settled h against τ", "final test loss / best SGD's", "stability"],
                                 ["settled h (median over the last epoch)", "test loss / the best SGD rate's",
                                  "sd of ln h; spikes per run"]):
        ax.set_xlabel("threshold τ")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ 4. the guards
def guard_row(task: str, h0: float, form: str, runs: Sequence[dict], spikes: Callable[[dict], int]) -> dict:
    """Test loss before and after, the seeds that started (did not diverge and ended at least 5% below the initial
    test loss), settled and smallest h, the shares of steps with r = 1 and r > 1, spikes and diverged runs."""
    before = [r["epochs"][0]["test_loss"] for r in runs]
    after = [final(r) for r in runs]
    started = [not r["diverged"] and a < 0.95 * b for r, a, b in zip(runs, after, before)]
    ratio = [r["steps"]["ratio"] for r in runs]
    return {"task": task, "h0": h0, "form": form, "seeds": len(runs), "started": sum(started),
            "test loss before": np.mean(before), "test loss after": finite_mean(after),
            "settled h": finite_mean([settled_h(r) for r in runs]), "min h": min(float(r["steps"]["lr"].min()) for r in runs),
            "share r = 1": np.mean([float((x == 1).double().mean()) for x in ratio]),
            "share r > 1": np.mean([float((x > 1).double().mean()) for x in ratio]),
            "spikes": sum(map(spikes, runs)), "diverged": sum(r["diverged"] for r in runs)}


def start_failures(q4: pd.DataFrame) -> list:
    """Per task and form of the guards' table: the h₀ from which some seed did not start without diverging, and
    those from which some seed diverged, as sentences."""
    lines = []
    for task in dict.fromkeys(q4.task):
        for form in dict.fromkeys(q4.form):
            q = q4[(q4.task == task) & (q4.form == form)]
            stuck = [f"{h0:g}" for h0, started, diverged, seeds in zip(q.h0, q.started, q.diverged, q.seeds)
                     if started + diverged < seeds]
            blew = [f"{h0:g}" for h0, diverged in zip(q.h0, q.diverged) if diverged]
            lines.append(f"{task}, {form}: did not start (in some seed, without diverging) from h0 = "
                         f"{', '.join(stuck) or 'none'}; diverged from h0 = {', '.join(blew) or 'none'}")
    return lines


def plot_guards(pick: Callable[..., list], tasks: Sequence[str], forms: Sequence[str], h0s: Sequence[float]):
    """Per task and form, h at every step of seed 0 from every h₀ (``pick(task=, h0=, form=)``: the runs)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), len(forms), figsize=(6 * len(forms), 3.8 * len(tasks)), squeeze=False)
    h0_colours = report.palette([f"h0={h0:g}" for h0 in h0s])
    for i, task in enumerate(tasks):
        for j, form in enumerate(forms):
            ax = axes[i, j]
            for h0 in h0s:
                r = [r for r in pick(task=task, h0=h0, form=form) if r["seed"] == 0][0]
                h = r["steps"]["lr"].numpy()
                ax.plot(np.arange(len(h)), np.where(h > 0, h, np.nan), lw=0.9, color=h0_colours[f"h0={h0:g}"], label=f"h0={h0:g}")
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("step size h")
            ax.set_title(f"{task}, {form} (PyTorch init, seed 0)")
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------- 5. spikes
def spike_row(runs: Sequence[dict], spikes: Callable[[dict], int]) -> dict:
    """Spikes per run and in total, the largest h after the first epoch, settled h, final losses and accuracy."""
    per_epoch = steps_per_epoch(runs[0])
    return {"row": runs[0]["row"], "seeds": len(runs), "spikes per run": [spikes(r) for r in runs],
            "spikes": sum(map(spikes, runs)),
            "max h after epoch 1": max(float(r["steps"]["lr"][per_epoch:].max()) if len(r["steps"]["lr"]) > per_epoch
                                       else math.nan for r in runs),
            "settled h": finite_mean([settled_h(r) for r in runs]),
            "train loss": report.mean_std([final(r, "train_loss") for r in runs], 3),
            "test loss": report.mean_std([final(r) for r in runs], 3),
            "test acc": report.mean_std([final(r, "test_acc") for r in runs], 3),
            "diverged": sum(r["diverged"] for r in runs)}


def plot_spikes(runs: Sequence[dict], window: int, factor: float):
    """One panel per run: its batch loss and h, its spikes marked (:func:`companion.report.plot_loss_and_step_size`)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4), squeeze=False)
    for ax, r in zip(axes[0], runs):
        report.plot_loss_and_step_size(r, ax=ax, window=window, factor=factor, title=f"{r['row']} (seed {r['seed']})")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------- every row
def questions(r: dict, dataset: str, spike_data: str, batch_size: int) -> str:
    """Which of the five questions a run's row answers (``dataset``: the notebook's; ``spike_data``: question 5's)."""
    if r["kind"] == "guard":
        return "4"
    if r["kind"] == "trace":
        return "2"
    q = []
    exact_half = r["method"] == "LOSSGRAD" and r["form"] == "exact" and r["tau"] == 0.5
    if r["data"] == dataset and (r["method"] == "SGD" or exact_half):
        q.append("1")
    if r["data"] == dataset and r["method"] == "LOSSGRAD" and r["form"] == "exact" and r["b"] == batch_size:
        q.append("3")
    if r["data"] == spike_data and r["task"] == "classifier" and r["b"] == batch_size and r["method"] == "LOSSGRAD" \
            and r["tau"] == 0.5:
        q.append("5")
    return ", ".join(q)


def summary_row(label: str, runs: Sequence[dict], answers: str, spikes: Callable[[dict], int]) -> dict:
    """A row of the summary: seeds, settled h, final train and test loss, spikes per run and diverged runs."""
    return {"row": label, "questions": answers, "seeds": len(runs), "settled h": finite_mean([settled_h(x) for x in runs]),
            "train loss": report.mean_std([final(x, "train_loss") for x in runs], 3),
            "test loss": report.mean_std([final(x) for x in runs], 3),
            "spikes per run": np.mean([spikes(x) for x in runs]), "diverged": sum(x["diverged"] for x in runs)}
