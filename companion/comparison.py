"""Optimizers compared on several tasks and initialisations from their runs (notebook 09): the rounds of runs,
the score a method is ranked by, the failures (diverged, stalled, collapsed, a step size that does not grow),
and the tables and figures that put the methods side by side.

A :class:`Comparison` holds one :class:`~companion.train.Experiment` per (task, initialisation) and the results
of every round, each a run dict (:meth:`companion.train.Experiment.run`) tagged with its ``task``, ``init``,
``method`` (the row it is shown in), ``family`` (``"LOSSGRAD"``, ``"peer"`` or ``"reference"``), ``remedy``
(whether it reruns a failure) and ``forwards`` (forward passes per step). What is compared, with which options
and seeds, which remedy a failure gets and which metric ranks a task stay in the notebook; this module holds the
bookkeeping.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from . import data as _data
from . import report, runner
from .train import Experiment, evaluate


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a comparison: its data set, model and loss, the test metric its runs are ranked by
    (``rank``: ``"test_loss"`` or ``"test_acc"``; ``higher``: whether higher is better), its epochs and names."""

    data: str
    model: Callable
    task: object
    rank: str
    higher: bool
    epochs: int
    title: str
    short: str

    @property
    def metrics(self) -> list:
        """The metrics a final table shows: the loss, and the accuracy of a classifier."""
        return ["loss"] if self.rank == "test_loss" else ["loss", "acc"]


def load_split(name: str, profile: str, n_train: Optional[int], n_test: Optional[int]) -> tuple:
    """(train, test) of a data set, cut to ``n_train`` and ``n_test`` (CIFAR-10 standardised per channel)."""
    if name == "cifar10":
        return _data.cifar10_normalized(profile, n_train, n_test)
    loaded = _data.load(name, profile)
    return _data.take(loaded["train"], n_train), _data.take(loaded["test"], n_test)


def trivial_score(train_data: tuple, test_data: tuple, rank: str) -> float:
    """What a model that ignores its input scores on the test split: the training mean image's MSE (``rank``
    ``test_loss``, an autoencoder), or the share of the most frequent test class (``test_acc``)."""
    if rank == "test_loss":
        return float(((test_data[0] - train_data[0].mean(0, keepdim=True)) ** 2).mean())
    return float(torch.bincount(test_data[1]).max()) / len(test_data[1])


class FinalEvaluation:
    """``on_finish`` of every run: the train metrics after the last epoch, and, where the optimizer evaluates
    an average of its iterates (DoG's averager), the last iterate's train and test metrics beside them."""

    def __init__(self, task, train_data: tuple, test_data: tuple, device):
        self.task, self.train_data, self.test_data, self.device = task, train_data, test_data, device

    def __call__(self, model) -> dict:
        from .baselines import last_iterate

        extra = {"train": evaluate(model, self.task, self.train_data, self.device)}
        with last_iterate(model) as found:
            if found:
                extra["last_iterate"] = {"train": evaluate(model, self.task, self.train_data, self.device),
                                         "test": evaluate(model, self.task, self.test_data, self.device)}
        return extra


# the lines of the figures: LOSSGRAD solid, the peers dashed, the references dotted
LINE = {"LOSSGRAD": dict(ls="-", lw=2.0), "peer": dict(ls="--", lw=1.3), "reference": dict(ls=":", lw=1.8)}
X_LABEL = {"epoch": "epoch", "seconds": "training time (s)", "forwards": "forward passes"}


def rate_beyond_edge(grid: Sequence[float], best: float, factor: float) -> Optional[float]:
    """The rate a tuned baseline's grid needs next: ``best`` times ``factor`` when it is the grid's largest rate,
    divided by ``factor`` when it is the smallest, None when it lies inside the grid (a grid of one rate widens
    upwards). A rate that diverged scores worst, so it is the best only when every rate diverged (then the grid
    widens downwards); a grid whose edge rate diverged while another trained is done."""
    if not factor > 1:
        raise ValueError(f"factor must be > 1 (the ratio between the edge rate and the next one out), got {factor!r}")
    rates = sorted(grid)
    if best not in rates:
        raise ValueError(f"the best rate {best!r} is not in the grid {rates}")
    if best == rates[-1]:
        return best * factor
    if best == rates[0]:
        return best / factor
    return None


def widen_grids(grids: dict, best_of: Callable, run_rates: Callable, factor: float, times: int) -> dict:
    """Tuned baselines' grids widened until each best rate lies inside its grid: the best rate of every grid.

    ``grids``: key -> its rates (a widened grid is put back in ``grids`` as a new sorted list); ``best_of(key)``:
    the best rate of ``grids[key]`` as the runs so far score it; ``run_rates({key: rate})``: trains those new
    rates (one per key, with the selection seeds) so that ``best_of`` sees them. Each round adds the next rate
    out (:func:`rate_beyond_edge`) to every grid whose best is on its edge, at most ``times`` rounds; a best
    rate still on an edge then is a bound, which the caller reports."""
    if times < 0:
        raise ValueError(f"times must be >= 0 (the most rounds of widening), got {times!r}")
    best = {key: best_of(key) for key in grids}
    for _ in range(times):
        wider = {key: rate_beyond_edge(grids[key], best[key], factor) for key in grids}
        wider = {key: rate for key, rate in wider.items() if rate is not None}
        if not wider:
            break
        for key, rate in wider.items():
            grids[key] = sorted([*grids[key], rate])
        run_rates(wider)
        best = {key: best_of(key) for key in grids}
    return best


class Comparison:
    """The experiments of a comparison, one per (task, initialisation), and what is read from their runs.

    ``tasks``: name -> :class:`Task` (those in ``names`` run); ``inits``: name -> the model options that give
    that initialisation (None: the model's own); ``forwards``: optimizer -> forward passes per step (1 when
    absent); ``stall_margin``: how near what a model that ignores its input scores (``trivial[name]``,
    :func:`trivial_score`) a final metric is a stall (:meth:`stalled_at`). Data sets are loaded once each
    (``loader``: :func:`load_split`)."""

    def __init__(self, notebook: str, profile: str, tasks: dict, names: Sequence[str], inits: dict, *,
                 batch_size: int, device, n_train: Optional[int] = None, n_test: Optional[int] = None,
                 overrides: Optional[dict] = None, jobs: Optional[int] = None, forwards: Optional[dict] = None,
                 stall_margin: float = 0.01, loader: Callable = load_split):
        self.tasks, self.batch_size, self.jobs, self.stall_margin = tasks, batch_size, jobs, stall_margin
        self.forwards = dict(forwards or {})
        self.data, self.experiments, self.trivial = {}, {}, {}
        for name in names:
            spec = tasks[name]
            if spec.data not in self.data:
                self.data[spec.data] = loader(spec.data, profile, n_train, n_test)
            train_data, test_data = self.data[spec.data]
            self.trivial[name] = trivial_score(train_data, test_data, spec.rank)
            for init, model_options in inits.items():
                self.experiments[name, init] = Experiment(
                    notebook, profile, train_data, test_data, spec.task, spec.model, epochs=spec.epochs,
                    batch_size=batch_size, device=device, overrides=overrides, jobs=jobs, eval_train=False,
                    on_finish=FinalEvaluation(spec.task, train_data, test_data, device), model_options=model_options)

    # ------------------------------------------------------------------ runs
    def steps_per_epoch(self, key: tuple) -> int:
        return math.ceil(len(self.experiments[key].train_data[0]) / self.batch_size)

    @staticmethod
    def label(name: str, init: str, method: str) -> str:
        return f"{method} [{name}, {init} init]"  # unique in the run store; tables show `method`

    def run_round(self, plan: list, remedy: bool = False) -> list:
        """``plan``: ``[((task, init), [(method, family, optimizer, options)], seeds)]``, every run in one pool of
        workers (:func:`companion.runner.run_together`); the results tagged, methods outer and seeds inner."""
        plan = [(key, methods, seeds) for key, methods, seeds in plan if methods and len(seeds)]
        batches = [(self.experiments[key], [(self.label(*key, m), opt, o) for m, _, opt, o in methods], seeds)
                   for key, methods, seeds in plan]
        found = runner.run_together(batches, jobs=self.jobs) if batches else []
        results = []
        for (key, methods, seeds), runs in zip(plan, found):
            for r, (method, family, optimizer, options) in zip(runs, [m for m in methods for _ in seeds]):
                r.update(task=key[0], init=key[1], method=method, family=family, remedy=remedy,
                         forwards=self.forwards.get(optimizer, 1))
                results.append(r)
        return results

    @staticmethod
    def of(results: Sequence[dict], key: tuple, method: Optional[str] = None) -> list:
        """The runs of one (task, initialisation), of one method when given."""
        return [r for r in results if (r["task"], r["init"]) == tuple(key) and (method is None or r["method"] == method)]

    @staticmethod
    def rows(runs: Sequence[dict]) -> list:
        """``[(method, its runs)]`` in the order the methods first appear."""
        order = list(dict.fromkeys(r["method"] for r in runs))
        return [(m, [r for r in runs if r["method"] == m]) for m in order]

    # --------------------------------------------------------------- scores
    def final(self, r: dict, metric: Optional[str] = None) -> float:
        """A run's final ``metric`` (default: its task's ranking metric); NaN when it diverged."""
        return report.final(r, metric or self.tasks[r["task"]].rank)

    def score(self, runs: Sequence[dict], name: str) -> float:
        """The mean ranking metric of ``runs`` of task ``name``, oriented so that lower is better; +inf when there
        is no run or any is not finite (a diverged run is worst)."""
        sign = -1.0 if self.tasks[name].higher else 1.0
        values = [sign * self.final(r) for r in runs]
        return math.inf if not values or not all(math.isfinite(v) for v in values) else float(np.mean(values))

    def option_score(self, runs: Sequence[dict], key: tuple, **options) -> float:
        """:meth:`score` of the runs of ``key`` made with these options (e.g. ``lr=0.1``)."""
        return self.score([r for r in self.of(runs, key) if all(r["options"][k] == v for k, v in options.items())],
                          key[0])

    def mean_metric(self, results: Sequence[dict], key: tuple, method: str) -> float:
        """A method's mean final ranking metric on ``key``: +inf when a seed diverged, NaN when it did not run."""
        runs = self.of(results, key, method)
        s = self.score(runs, key[0]) if runs else math.nan
        return abs(s) if math.isfinite(s) else (math.inf if runs else math.nan)

    # ------------------------------------------------------------- failures
    def stalled_at(self, value: float, start: float, name: str) -> bool:
        """No better than before training, or within ``stall_margin`` (relative for a loss, absolute for an
        accuracy) of what a model that ignores its input scores (:attr:`trivial`), or worse."""
        higher, margin = self.tasks[name].higher, self.stall_margin
        trivial = self.trivial[name] + margin if higher else (1 - margin) * self.trivial[name]
        return (value <= start) == higher or value == start or (value <= trivial) == higher

    def best_epoch_index(self, r: dict) -> Optional[int]:
        """The epoch (after training began) with the best finite ranking metric, or None."""
        spec = self.tasks[r["task"]]
        values = [e[spec.rank] for e in r["epochs"]]
        finite = [k for k in range(1, len(values)) if math.isfinite(values[k])]
        return (max if spec.higher else min)(finite, key=lambda k: values[k]) if finite else None

    def best_epoch(self, r: dict) -> float:
        k = self.best_epoch_index(r)
        return math.nan if k is None else r["epochs"][k][self.tasks[r["task"]].rank]

    @staticmethod
    def not_growing(r: dict, steps: int) -> bool:
        """The step size after ``steps`` steps at most twice the first step's."""
        lr = r["steps"]["lr"]
        n = min(steps, len(lr) - 1)
        return n > 0 and bool(torch.isfinite(lr[[0, n]]).all()) and float(lr[n]) <= 2 * float(lr[0])

    def failure_of(self, runs: Sequence[dict], name: str, growth: Optional[int] = None) -> Optional[str]:
        """``"diverged"`` (a seed's loss went non-finite), ``"collapsed"`` (every stalled seed had trained first:
        its best epoch was no stall), ``"stalled"`` (:meth:`stalled_at` after the last epoch),
        ``"step size not growing"`` (``growth`` given and :meth:`not_growing` over that many steps), or None."""
        if any(r["diverged"] for r in runs):
            return "diverged"
        rank = self.tasks[name].rank
        stalled = [r for r in runs if self.stalled_at(self.final(r), r["epochs"][0][rank], name)]
        if stalled:
            trained = all(math.isfinite(b := self.best_epoch(r)) and not self.stalled_at(b, r["epochs"][0][rank], name)
                          for r in stalled)
            return "collapsed" if trained else "stalled"
        if growth is not None and any(self.not_growing(r, growth) for r in runs):
            return "step size not growing"
        return None

    def failures(self, main: Sequence[dict], plan: dict, remedy: Optional[Callable], growth: Callable[[str], Optional[int]],
                 seeds: Callable[[str], Sequence[int]]) -> tuple:
        """Every peer or LOSSGRAD row of ``plan`` (key -> ``[(method, family, optimizer, options)]``) whose runs in
        ``main`` fail (:meth:`failure_of`; ``growth(method)``: the steps of its growth check, or None), and the plan
        of the reruns: ``remedy(method, options, failure)`` gives ``(what the documentation says, options or
        None)`` or None (``remedy`` None: remedies are off). Returns ``(failures, remedy plan)``."""
        failures, remedy_plan = [], []
        for key, methods in plan.items():
            for method, family, optimizer, options in methods:
                if family == "reference":
                    continue
                runs = self.of(main, key, method)
                failure = self.failure_of(runs, key[0], growth(method))
                if failure is None:
                    continue
                fix = remedy(method, options, failure) if remedy is not None else None
                failing = sum(self.failure_of([r], key[0], growth(method)) is not None for r in runs)
                failures.append(dict(task=key[0], init=key[1], method=method, failure=failure,
                                     seeds=f"{failing}/{len(runs)}",
                                     remedy=fix[0] if fix else "none documented" if remedy is not None
                                     else "not tried (remedies=False)"))
                if fix and fix[1] is not None:
                    remedy_plan.append((key, [(f"{method} ({fix[0]})", family, optimizer, fix[1])], seeds(key[1])))
        return failures, remedy_plan

    # --------------------------------------------------------------- tables
    def final_table(self, runs: Sequence[dict], base: str) -> pd.DataFrame:
        """One row per method: seeds, diverged seeds, the final train and test metrics (mean ± std), the median
        over seeds of the seconds per training epoch, that against method ``base``'s, forward passes per step."""
        name = runs[0]["task"]
        seconds_of = lambda r: r["seconds"] / max(len(r["epochs"]) - 1, 1)  # noqa: E731
        base_seconds = np.median([seconds_of(r) for r in runs if r["method"] == base])
        rows = []
        for method, group in self.rows(runs):
            row = {"method": method, "seeds": len(group), "diverged": sum(r["diverged"] for r in group)}
            for m in self.tasks[name].metrics:
                row[f"train {m}"] = report.mean_std([self.final(r, f"train_{m}") for r in group], 4)
                row[f"test {m}"] = report.mean_std([self.final(r, f"test_{m}") for r in group], 4)
            seconds = float(np.median([seconds_of(r) for r in group]))
            row.update({"s / epoch": round(seconds, 2), "vs SGD": round(seconds / base_seconds, 2),
                        "forwards / step": group[0]["forwards"]})
            rows.append(row)
        return pd.DataFrame(rows)

    def column(self, key: tuple) -> str:
        return f"{self.tasks[key[0]].short} {key[1]}"

    def ranking(self, results: Sequence[dict]) -> tuple:
        """Each method's rank per (task, initialisation) column by :meth:`score` (ties share the mean of their
        places), its place (rank − 1)/(n − 1), its mean place over the columns and how many it ranked on, and the
        mean metric itself; a column without runs is left out. Returns ``(table sorted by mean place, {column:
        methods ranked})``."""
        keys = [key for key in self.experiments if self.of(results, key)]
        columns = [self.column(key) for key in keys]
        ranking, fields = {}, {}
        for (name, init), column in zip(keys, columns):
            scores = {m: self.score(group, name) for m, group in self.rows(self.of(results, (name, init)))}
            ranks = pd.Series(scores).rank(method="average")  # ties (every diverged method: +inf) share their places
            fields[column] = len(scores)
            for m, s in scores.items():
                ranking.setdefault(m, {})[column] = float(ranks[m])
                ranking[m][f"{column} place"] = (ranks[m] - 1) / max(len(scores) - 1, 1)
                ranking[m][f"{column} {self.tasks[name].rank.removeprefix('test_')}"] = abs(s) if math.isfinite(s) else math.nan
        table = pd.DataFrame([{"method": m, **v} for m, v in ranking.items()])
        table["mean place"] = table[[f"{c} place" for c in columns]].mean(axis=1)
        table["ranked on"] = table[columns].notna().sum(axis=1)
        table = table.sort_values(["mean place", "method"]).reset_index(drop=True)
        return table[["method", "mean place", "ranked on"] + columns + [c for c in table if c.endswith((" loss", " acc"))]], fields

    def versus(self, results: Sequence[dict], prefix: str = "LOSSGRAD") -> pd.DataFrame:
        """Each method named ``prefix ...`` against every other (remedies left out), per column: the relative
        difference of the mean test loss, or the difference of the mean accuracy in points; "diverged" where either
        has a diverged seed, "–" where either did not run."""
        compared = list(dict.fromkeys(r["method"] for r in results if not r["remedy"]))
        rows = []
        for form in [m for m in compared if m.startswith(prefix)]:
            for other in [m for m in compared if not m.startswith(prefix)]:
                row = {prefix: form.removeprefix(prefix + " "), "against": other}
                for key in self.experiments:
                    ours, theirs = self.mean_metric(results, key, form), self.mean_metric(results, key, other)
                    if math.isnan(ours) or math.isnan(theirs):
                        row[self.column(key)] = "–"
                    elif math.isinf(ours) or math.isinf(theirs):
                        row[self.column(key)] = "diverged"
                    elif self.tasks[key[0]].higher:
                        row[self.column(key)] = f"{100 * (ours - theirs):+.2f} pts"
                    else:
                        row[self.column(key)] = f"{ours / theirs - 1:+.1%}"
                rows.append(row)
        return pd.DataFrame(rows)

    def curve(self, runs: Sequence[dict], metric: str) -> Optional[dict]:
        """Per epoch, over the runs that did not diverge: mean seconds, forward passes, mean and std of ``metric``."""
        runs = [r for r in runs if not r["diverged"]]
        if not runs:
            return None
        n = min(len(r["epochs"]) for r in runs)
        steps = self.steps_per_epoch((runs[0]["task"], runs[0]["init"]))
        values = np.array([[e[metric] for e in r["epochs"][:n]] for r in runs])
        return dict(epoch=np.arange(n), seconds=np.mean([[e["seconds"] for e in r["epochs"][:n]] for r in runs], axis=0),
                    forwards=np.arange(n) * steps * runs[0]["forwards"], mean=values.mean(0), std=values.std(0))

    def reach(self, results: Sequence[dict], target_method: str, target_name: str = "SGD") -> pd.DataFrame:
        """Per (task, initialisation) and method: the epochs, forward passes and seconds its mean curve needed to
        first reach the mean final ranking metric of ``target_method`` (``target_name`` in the column; "–": never)."""
        rows = []
        for key in [key for key in self.experiments if self.of(results, key)]:
            spec = self.tasks[key[0]]
            target = np.mean([self.final(r) for r in self.of(results, key, target_method)])
            for method, runs in self.rows(self.of(results, key)):
                c = self.curve(runs, spec.rank)
                hit = None if c is None or not math.isfinite(target) else next(
                    (k for k, v in enumerate(c["mean"]) if (v >= target if spec.higher else v <= target)), None)
                rows.append({"task": key[0], "init": key[1], "method": method,
                             f"target ({target_name}'s final)": round(float(target), 4),
                             "epochs": hit if hit is not None else "–",
                             "forward passes": int(c["forwards"][hit]) if hit is not None else "–",
                             "seconds": round(float(c["seconds"][hit]), 1) if hit is not None else "–"})
        return pd.DataFrame(rows)

    def step_sizes(self, results: Sequence[dict], seed: int = 0) -> pd.DataFrame:
        """Per (task, initialisation) and method, the run of ``seed``: its median step size over the last epoch and
        its largest step size."""
        rows = []
        for key in self.experiments:
            steps = self.steps_per_epoch(key)
            for method, runs in self.rows([r for r in self.of(results, key) if r["seed"] == seed]):
                lr = runs[0]["steps"]["lr"][-steps:]
                rows.append({"task": key[0], "init": key[1], "method": method,
                             "median step size, last epoch": float(lr.median()) if len(lr) else math.nan,
                             "largest step size": float(runs[0]["steps"]["lr"].max()) if len(lr) else math.nan})
        return pd.DataFrame(rows)

    def iterates(self, results: Sequence[dict]) -> pd.DataFrame:
        """For the runs that evaluated an average of their iterates (DoG's averager): the final train and test
        metrics of the average (the one evaluated) and of the last iterate, mean ± std over seeds."""
        last = lambda r, split, m: math.nan if r["diverged"] else r["extra"]["last_iterate"][split][m]  # noqa: E731
        rows = []
        for key in self.experiments:
            averaged = [r for r in self.of(results, key) if "last_iterate" in r["extra"]]
            for method, runs in self.rows(averaged):
                for m in self.tasks[key[0]].metrics:
                    rows.append({"task": key[0], "init": key[1], "method": method, "metric": m,
                                 "train, averaged": report.mean_std([self.final(r, f"train_{m}") for r in runs], 4),
                                 "train, last": report.mean_std([last(r, "train", m) for r in runs], 4),
                                 "test, averaged": report.mean_std([self.final(r, f"test_{m}") for r in runs], 4),
                                 "test, last": report.mean_std([last(r, "test", m) for r in runs], 4)})
        return pd.DataFrame(rows)

    def step_size_at(self, r: dict, epoch: int) -> float:
        """A run's median step size over one training epoch (1 = the first)."""
        lr = report.epoch_window(r, epoch, "lr", steps=self.steps_per_epoch((r["task"], r["init"])))
        return float(lr.median()) if len(lr) else math.nan

    def failure_table(self, failures: Sequence[dict], main: Sequence[dict], remedied: Sequence[dict]) -> pd.DataFrame:
        """One row per failure: its metric before training, after the last epoch and at the best epoch (mean ± std
        over seeds), seed 0's median step size over its best and its last epoch, and how the remedy did (its
        failures, judged on the metric only, its final metric and its best epoch)."""
        rows = []
        for f in failures:
            key, rank = (f["task"], f["init"]), self.tasks[f["task"]].rank
            runs = self.of(main, key, f["method"])
            fixed = [r for r in self.of(remedied, key) if r["method"].startswith(f["method"] + " (")]
            seed0 = next(r for r in runs if r["seed"] == 0)
            k = self.best_epoch_index(seed0)
            rows.append(dict(f, **{"metric": rank, "start": report.mean_std([r["epochs"][0][rank] for r in runs], 4),
                                   "before": report.mean_std([self.final(r) for r in runs], 4),
                                   "best epoch": report.mean_std([self.best_epoch(r) for r in runs], 4),
                                   "seed 0: step size at its best epoch, last": "–" if k is None else
                                   f"{self.step_size_at(seed0, k):.3g} (epoch {k}), "
                                   f"{self.step_size_at(seed0, len(seed0['epochs']) - 1):.3g}",
                                   "remedy's failures": "–" if not fixed else
                                   f"{sum(self.failure_of([r], f['task']) is not None for r in fixed)}/{len(fixed)}",
                                   "with the remedy": "–" if not fixed else report.mean_std([self.final(r) for r in fixed], 4),
                                   "its best epoch": "–" if not fixed else report.mean_std([self.best_epoch(r) for r in fixed], 4)}))
        return pd.DataFrame(rows, columns=["task", "init", "method", "failure", "seeds", "metric", "start", "before",
                                           "best epoch", "seed 0: step size at its best epoch, last", "remedy",
                                           "remedy's failures", "with the remedy", "its best epoch"])

    def collapse(self, runs: Sequence[dict]) -> tuple:
        """The first seed (in seed order) of ``runs`` that stalled, epoch by epoch until one epoch after its metric
        first fell to a stall after its best epoch: the metric, then over the epoch's steps the median and largest
        step size, the mean and largest batch loss, the mean batch accuracy, the median of LOSSGRAD's ratio r where
        it is defined and the share of steps where it is not. Returns ``(run, best epoch, epoch of the fall,
        table)``."""
        runs = sorted(runs, key=lambda r: r["seed"])
        name = runs[0]["task"]
        rank = self.tasks[name].rank
        r = next(r for r in runs if self.stalled_at(self.final(r), r["epochs"][0][rank], name))
        start, best = r["epochs"][0][rank], self.best_epoch_index(r)
        fell = next(k for k in range(best, len(r["epochs"])) if self.stalled_at(r["epochs"][k][rank], start, name))
        steps = self.steps_per_epoch((r["task"], r["init"]))
        window = lambda k, series, finite=True: report.epoch_window(r, k, series, steps=steps, finite=finite)  # noqa: E731
        summary = lambda values, how: float(getattr(values, how)()) if len(values) else math.nan  # noqa: E731
        rows = []
        for k in range(1, min(fell + 2, len(r["epochs"]))):
            ratio = window(k, "ratio", finite=False)
            rows.append({"epoch": k, rank: r["epochs"][k][rank],
                         "median h": summary(window(k, "lr"), "median"), "largest h": summary(window(k, "lr"), "max"),
                         "batch loss, mean": summary(window(k, "loss"), "mean"),
                         "batch loss, largest": summary(window(k, "loss"), "max"),
                         "batch acc, mean": summary(window(k, "acc"), "mean"),
                         "median r": summary(ratio[torch.isfinite(ratio)], "median"),
                         "r undefined": float((~torch.isfinite(ratio)).float().mean()) if len(ratio) else math.nan})
        return r, best, fell, pd.DataFrame(rows)

    # -------------------------------------------------------------- figures
    def colours(self, methods: Sequence[str]) -> dict:
        import seaborn as sns

        return dict(zip(methods, sns.color_palette("tab20" if len(methods) <= 20 else "husl", len(methods))))

    def draw(self, ax, runs: Sequence[dict], metric: str, colours: dict, x: str = "epoch", title: str = ""):
        """Each method's mean curve of ``metric`` against ``x`` (epoch, seconds or forwards), a ±1 std band against
        epochs when it has several seeds; a loss on a log axis, an accuracy from near the lowest final values."""
        import matplotlib.pyplot as plt

        for method, group in self.rows(runs):
            c = self.curve(group, metric)
            if c is None:
                continue
            ax.plot(c[x], c["mean"], color=colours[method], label=method, **LINE[group[0]["family"]])
            if x == "epoch" and len(group) > 1:
                ax.fill_between(c[x], c["mean"] - c["std"], c["mean"] + c["std"], color=colours[method], alpha=0.12, lw=0)
        ax.set_xlabel(X_LABEL[x])
        if x == "epoch":
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(title)
        if metric == "test_loss":
            ax.set_yscale("log")
            report.plain_log_ticks(ax)
        else:
            finals = [self.final(r, metric) for r in runs if not r["diverged"]]
            if finals:
                ax.set_ylim(max(0.0, float(np.percentile(finals, 10)) - 0.1), 1.0)

    def plot_metric(self, results: Sequence[dict], colours: dict, inits: Optional[Sequence[str]] = None,
                    xs: Optional[Sequence[str]] = None):
        """One panel per task and initialisation (``xs`` None: against epochs), or per task and x of ``xs``
        (``inits``: the one initialisation shown); the ranking metric of every method. Returns the figure."""
        import matplotlib.pyplot as plt

        names = list(dict.fromkeys(name for name, _ in self.experiments))
        inits = list(inits or dict.fromkeys(init for _, init in self.experiments))
        panels = [(init, x) for init in inits for x in (xs or ["epoch"])]
        fig, axes = plt.subplots(len(names), len(panels), figsize=(7 * len(panels), 4.6 * len(names)), squeeze=False)
        for i, name in enumerate(names):
            for j, (init, x) in enumerate(panels):
                self.draw(axes[i, j], self.of(results, (name, init)), self.tasks[name].rank, colours, x=x,
                          title=f"{self.tasks[name].title}, {init} init")
        fig.tight_layout()
        handles = {}
        for ax in axes.flat:
            handles.update(zip(ax.get_legend_handles_labels()[1], ax.get_legend_handles_labels()[0]))
        fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        return fig

    def plot_step_sizes(self, results: Sequence[dict], init: str, colours: dict, families: dict, seed: int = 0,
                        points: int = 3000):
        """Per task, one panel per family of ``families`` (title -> which methods belong): the step size of every
        step of seed ``seed`` (thinned to at most ``points`` points), methods without a positive finite step size
        left out (and tasks without runs). The noisier a method's step size (the sd of ln h over its steps), the further back it is drawn
        and the fainter, so that a smooth line is not hidden under a jumping one. Returns the figure."""
        import matplotlib.pyplot as plt

        names = [name for name in dict.fromkeys(name for name, _ in self.experiments) if self.of(results, (name, init))]
        fig, axes = plt.subplots(len(names), len(families), figsize=(7.5 * len(families), 4.6 * len(names)), squeeze=False)
        for i, name in enumerate(names):
            runs = [r for r in self.of(results, (name, init)) if r["seed"] == seed]
            every = max(1, len(runs[0]["steps"]["lr"]) // points)
            for ax, (title, belongs) in zip(axes[i], families.items()):
                shown = [r for r in runs if belongs(r["method"]) and len(r["steps"]["lr"])
                         and torch.isfinite(r["steps"]["lr"]).any() and (r["steps"]["lr"] > 0).any()]
                noise = {r["method"]: step_noise(r["steps"]["lr"]) for r in shown}
                order = sorted(noise, key=lambda m: -noise[m])  # noisiest first: at the back
                for z, r in enumerate(sorted(shown, key=lambda r: order.index(r["method"]))):
                    lr = r["steps"]["lr"]
                    noisy = noise[r["method"]] > NOISY
                    ax.plot(np.arange(0, len(lr), every), lr[::every].numpy(), lw=0.6 if noisy else 1.0,
                            alpha=0.45 if noisy else 1.0, zorder=2 + z, color=colours.get(r["method"]), label=r["method"])
                ax.set_yscale("log")
                ax.set_xlabel("step")
                ax.set_ylabel("step size h")
                ax.set_title(f"{self.tasks[name].title}, {init} init: {title} (seed {seed})")
                handles, labels = ax.get_legend_handles_labels()
                order_in_legend = sorted(range(len(labels)), key=lambda k: [r["method"] for r in runs].index(labels[k]))
                legend = ax.legend([handles[k] for k in order_in_legend], [labels[k] for k in order_in_legend],
                                   fontsize=6, ncol=2)
                for line in legend.get_lines():
                    line.set_alpha(1.0)
                    line.set_linewidth(1.5)
        fig.tight_layout()
        return fig


NOISY = 0.5  # a step size whose ln moves by more than this (sd over the steps taken) is drawn faint and behind


def step_noise(lr: torch.Tensor) -> float:
    """The standard deviation of ln h from one step to the next over the positive finite step sizes: 0 for a constant
    or smoothly moving step size, about ln c for LOSSGRAD's, large for one that jumps (L4's)."""
    lr = torch.as_tensor(lr, dtype=torch.float64)
    lr = lr[torch.isfinite(lr) & (lr > 0)]
    return float(lr.log().diff().std()) if len(lr) > 2 else 0.0
