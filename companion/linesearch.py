"""Exact step sizes along a direction, and a LOSSGRAD run measured against them at chosen steps (notebook 10).

LOSSGRAD grows h while r ≤ ½, i.e. it steers h towards the minimum of the parabola it fits to the *batch* loss
along −g_B. Whether that is the step that trains best is a question about three different minimisers, measured at
the same point x and the same batch B:

* ``t_batch``: the exact minimiser of the batch loss f_B(x − t·g_B) (what the rule targets);
* ``t_full_gB``: the exact minimiser of the training loss F(x − t·g_B) along the same batch gradient;
* ``t_full_gF``: the exact minimiser of F(x − t·g_F) along the gradient g_F of F itself.

F, "the full training loss", is the mean loss over a fixed subset of the training set (``full_data``; on a CPU
10 000 images, not 60 000: every point of a line search is a forward pass over it), evaluated in eval mode.

The pieces:

* :func:`minimise_log`: a 1-D minimiser over t > 0 on a log scale: the loss on a log grid (``per_decade`` points
  per decade from ``lo`` to ``hi``), then golden-section search in ln t between the grid neighbours of the grid's
  lowest point, down to a relative width ``rtol``. Global over the grid (a profile with several dips keeps its
  lowest), exact to ``rtol`` within it; a minimiser on the grid's first or last point is flagged ``at_edge``
  (the true one may lie outside). Tested on quadratics whose minimiser is known in closed form.
* :func:`along`: the parameters moved to x − t·d for any t, and put back bitwise afterwards.
* :func:`mean_loss`, :func:`mean_gradient`: a task's mean loss and its gradient over a data set in chunks (the
  gradient through ``torch.autograd.grad``: no ``.grad`` is touched).
* :func:`measure`: the three minimisers and the losses' profiles at one point and batch.
* :func:`trace_fit`: trains a model with LOSSGRAD exactly as :func:`companion.train.fit` does (same batches, same
  steps: the step sizes are bitwise those of ``fit`` with the same seed on the CPU; tested) and calls
  :func:`measure` before the chosen steps, with the step size h that step then takes and the ratio r it then
  measures (so h / (2r), the minimiser of LOSSGRAD's own parabola, sits beside the exact ones). Measuring
  restores the parameters bitwise, touches no gradient and no optimizer state, and runs under a forked random
  state, so the run is the run it would have been without it.
* :class:`TraceExperiment`: an :class:`~companion.train.Experiment` whose runs are such traces: stored in the run
  store under an identity that also holds the measurement settings and the subset, and run by
  ``exp.run_all(methods, seeds)`` like any other (in worker processes too). A trace is not checkpointed: a killed
  one starts again.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lossgrad import LossGrad

from .store import tensors_digest
from .train import REPORT_SECONDS, Batch, Experiment, batches, evaluate, step_size, train_step

__all__ = ["log_grid", "minimise_log", "along", "trained_parameters", "mean_loss", "mean_gradient", "measure",
           "trace_fit", "trace_steps", "TraceExperiment", "FinalTrainMetrics", "PROFILES"]

#: The loss profiles :func:`measure` records, each on the search grid: the batch loss along −g_B, the full loss
#: along −g_B, the full loss along −g_F.
PROFILES = ("batch", "full_gB", "full_gF")


# ------------------------------------------------------------------ 1-D minimisation over t > 0
def log_grid(lo: float, hi: float, per_decade: float) -> list:
    """Points from ``lo`` to ``hi`` (both included) evenly spaced in log t, ``per_decade`` (or slightly more) per
    decade."""
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"need 0 < lo < hi < inf, got lo={lo!r}, hi={hi!r}")
    if not per_decade > 0:
        raise ValueError(f"per_decade must be > 0, got {per_decade!r}")
    n = max(2, math.ceil(math.log10(hi / lo) * per_decade - 1e-9) + 1)
    return [float(t) for t in np.geomspace(lo, hi, n)]


_GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618...


def minimise_log(f: Callable[[float], float], lo: float = 1e-3, hi: float = 1e3, per_decade: float = 3,
                 rtol: float = 0.01) -> dict:
    """The t in [lo, hi] where ``f`` is lowest: a log grid, then golden-section search in ln t around its best point.

    ``f(t)`` returns a number; a non-finite value counts as +inf. The golden-section search runs between the grid
    neighbours of the grid's lowest point until that bracket is narrower than a factor ``1 + rtol``; the returned
    ``t`` is the lowest point evaluated (so ``value <= min(grid_f)``). Returns ``dict(t, value, at_edge,
    evaluations, grid_t, grid_f)``; ``at_edge`` is True when ``t`` lies within a factor ``1 + rtol`` of ``lo`` or
    ``hi`` (the minimiser may lie outside [lo, hi]); ``t`` and ``value`` are NaN when no value is finite."""
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0, got {rtol!r}")
    ts = log_grid(lo, hi, per_decade)

    def value(t):
        v = float(f(t))
        return v if math.isfinite(v) else math.inf

    fs = [value(t) for t in ts]
    evaluations = len(fs)
    i = int(np.argmin(fs))
    result = dict(grid_t=ts, grid_f=[v if math.isfinite(v) else math.nan for v in fs])
    if not math.isfinite(fs[i]):
        return dict(result, t=math.nan, value=math.nan, at_edge=False, evaluations=evaluations)
    best_t, best_f = ts[i], fs[i]
    a, b = math.log(ts[max(i - 1, 0)]), math.log(ts[min(i + 1, len(ts) - 1)])
    u1, u2 = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    f1, f2 = value(math.exp(u1)), value(math.exp(u2))
    evaluations += 2
    while b - a > math.log1p(rtol):
        if f1 <= f2:
            b, u2, f2 = u2, u1, f1
            u1 = b - _GOLDEN * (b - a)
            f1 = value(math.exp(u1))
        else:
            a, u1, f1 = u1, u2, f2
            u2 = a + _GOLDEN * (b - a)
            f2 = value(math.exp(u2))
        evaluations += 1
        for u, v in ((u1, f1), (u2, f2)):
            if v < best_f:
                best_t, best_f = math.exp(u), v
    for u, v in ((u1, f1), (u2, f2)):
        if v < best_f:
            best_t, best_f = math.exp(u), v
    at_edge = best_t <= lo * (1 + rtol) or best_t >= hi / (1 + rtol)
    return dict(result, t=best_t, value=best_f, at_edge=at_edge, evaluations=evaluations)


# ------------------------------------------------------------------ losses and gradients along a direction
def trained_parameters(model: nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def along(params: Sequence[Tensor], direction: Sequence[Tensor]):
    """Inside: ``go(t)`` sets the parameters to x − t·d (x: their values on entry, d: ``direction``; ``go(0)`` is
    x). On exit the parameters are x again, bitwise, whatever happened inside."""
    params, direction = list(params), list(direction)
    if len(params) != len(direction) or any(p.shape != d.shape for p, d in zip(params, direction)):
        raise ValueError("direction must hold one tensor of each parameter's shape")
    with torch.no_grad():
        start = [p.detach().clone() for p in params]

    def go(t: float) -> None:
        with torch.no_grad():
            for p, x, d in zip(params, start, direction):
                p.copy_(x)
                if t != 0:
                    p.add_(d, alpha=-float(t))

    try:
        yield go
    finally:
        with torch.no_grad():
            for p, x in zip(params, start):
                p.copy_(x)


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, was in modes:
            module.training = was


def mean_loss(model: nn.Module, task, data: Batch, batch_size: int = 1000, training: bool = False) -> float:
    """The mean of ``task.loss`` over ``data`` (chunks of ``batch_size``, weighted by their sizes, summed in float64),
    with the model in eval mode (``training=False``) or train mode, under ``no_grad``."""
    n = len(data[0])
    total = 0.0
    with torch.no_grad(), _mode(model, training):
        for chunk in batches(data, batch_size):
            total += float(task.loss(model, chunk).double()) * len(chunk[0])
    return total / n


def mean_gradient(model: nn.Module, task, data: Batch, batch_size: int = 1000, training: bool = False) -> list:
    """The gradient of :func:`mean_loss` with respect to the trained parameters (``torch.autograd.grad``: the
    parameters' ``.grad`` are left alone)."""
    params = trained_parameters(model)
    n = len(data[0])
    total = [torch.zeros_like(p) for p in params]
    with torch.enable_grad(), _mode(model, training):
        for chunk in batches(data, batch_size):
            grads = torch.autograd.grad(task.loss(model, chunk) * (len(chunk[0]) / n), params, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc.add_(g)
    return total


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _to(batch: Batch, device) -> Batch:
    return tuple(t.to(device) for t in batch)


def measure(model: nn.Module, task, batch: Batch, full_data: Batch, search: dict, eval_batch_size: int = 1000,
            profiles: bool = True) -> dict:
    """At the model's current point x and ``batch``: the exact minimisers of the batch loss along −g_B, of the full
    loss (``full_data``, eval mode) along −g_B and along −g_F (``search``: the keyword arguments of
    :func:`minimise_log`), with the losses at x, ‖g_B‖², ‖g_F‖² and cos(g_B, g_F). The batch loss is taken as the
    training step takes it (train mode, the whole batch at once). With ``profiles``, also each loss on the search
    grid (``grid_t`` and ``profile_<name>`` for the names in :data:`PROFILES`). The parameters end as they began,
    bitwise; no ``.grad`` is touched."""
    params = trained_parameters(model)
    training = model.training
    with torch.enable_grad():
        g_batch = [g if g is not None else torch.zeros_like(p) for g, p in
                   zip(torch.autograd.grad(task.loss(model, batch), params, allow_unused=True), params)]
    g_full = mean_gradient(model, task, full_data, eval_batch_size, training=False)
    row = dict(batch_loss=mean_loss(model, task, batch, len(batch[0]), training=training),
               full_loss=mean_loss(model, task, full_data, eval_batch_size))
    sq_b, sq_f = _dot(g_batch, g_batch), _dot(g_full, g_full)
    row.update(sq_grad_batch=sq_b, sq_grad_full=sq_f,
               cos_batch_full=_dot(g_batch, g_full) / math.sqrt(sq_b * sq_f) if sq_b > 0 and sq_f > 0 else math.nan)
    searches = {
        "batch": (g_batch, lambda: mean_loss(model, task, batch, len(batch[0]), training=training)),
        "full_gB": (g_batch, lambda: mean_loss(model, task, full_data, eval_batch_size)),
        "full_gF": (g_full, lambda: mean_loss(model, task, full_data, eval_batch_size)),
    }
    for name, (direction, loss) in searches.items():
        with along(params, direction) as go:
            def f(t):
                go(t)
                return loss()
            found = minimise_log(f, **search)
        row[f"t_{name}"] = found["t"]
        row[f"min_{name}"] = found["value"]
        row[f"edge_{name}"] = found["at_edge"]
        row[f"evaluations_{name}"] = found["evaluations"]
        if profiles:
            row["grid_t"] = found["grid_t"]
            row[f"profile_{name}"] = found["grid_f"]
    return row


# ------------------------------------------------------------------ a LOSSGRAD run, measured at chosen steps
def trace_steps(total_steps: int, first: int, points: int) -> list:
    """``points`` step indices from ``first`` to the last step (``total_steps - 1``), evenly spaced in log(step),
    rounded, without repeats (fewer when the range has fewer integers)."""
    if total_steps < 1 or points < 1:
        raise ValueError(f"need total_steps >= 1 and points >= 1, got {total_steps}, {points}")
    last = total_steps - 1
    first = min(max(int(first), 1), max(last, 1))
    if last < 1:
        return [0]
    return sorted({int(round(s)) for s in np.geomspace(first, last, points)})


def trace_fit(model: nn.Module, optimizer, task, train_data: Batch, test_data: Batch, full_data: Batch, *,
              epochs: int, batch_size: int, device: torch.device, seed: int, at: Sequence[int], search: dict,
              eval_batch_size: int = 1000, profiles: bool = True,
              report: Optional[Callable[[dict], None]] = None,
              measure_fn: Optional[Callable[[nn.Module, object, Batch], dict]] = None) -> dict:
    """Trains as :func:`companion.train.fit` does (``eval_train=False``; the same batch order from ``seed``, the same
    steps through :func:`companion.train.train_step`) and, before each step whose index is in ``at``, calls
    :func:`measure` on that step's batch. Returns fit's history (``epochs``, ``steps``, ``diverged``, ``seconds``)
    plus ``trace``: one row per measured step with ``step``, ``epoch``, ``h`` (the step size that step takes),
    ``ratio`` (the r it measures), ``parabola`` (h / (2r): the minimiser of LOSSGRAD's fitted parabola) and
    :func:`measure`'s entries; ``measure_seconds`` is the time the measurements took (not in ``seconds``).
    ``measure_fn(model, optimizer, batch)``, if given, measures in place of :func:`measure` (its dict's entries
    go into the row); the optimizer need not be LossGrad then (``ratio`` is NaN for others)."""
    from .train import _epoch_metrics  # the same per-epoch row as fit's

    at = set(int(s) for s in at)
    full_data = _to(full_data, device)  # once: the measurements run on the model's device
    generator = torch.Generator().manual_seed(seed)
    history = {"epochs": [], "steps": {"loss": [], "lr": [], "ratio": []}, "diverged": False, "seconds": 0.0,
               "trace": [], "measure_seconds": 0.0}
    history["epochs"].append(_epoch_metrics(0, model, task, train_data, test_data, device, False, eval_batch_size,
                                            history))
    n_batches = math.ceil(len(train_data[0]) / batch_size)
    total, step = epochs * n_batches, 0
    last_report = time.monotonic()

    def tell(epoch):
        if report is not None:
            latest = {k: v for k, v in history["epochs"][-1].items() if k.startswith("test_")}
            report(dict(epoch=epoch, epochs=epochs, step=step, steps=total, start_step=0, metrics=latest))

    tell(0)
    model.train()
    for epoch in range(1, epochs + 1):
        if history["diverged"]:
            break
        tic, measuring = time.perf_counter(), 0.0
        losses, lrs, ratios = [], [], []
        for batch in batches(train_data, batch_size, generator):
            batch = _to(batch, device)
            before = step_size(optimizer)
            row = None
            if step in at:
                m0 = time.perf_counter()
                devices = [device] if torch.device(device).type == "cuda" else []
                with torch.random.fork_rng(devices=devices):  # dropout in the measurements draws nothing from the run
                    found = (measure_fn(model, optimizer, batch) if measure_fn is not None else
                             measure(model, task, batch, full_data, search, eval_batch_size, profiles))
                    row = dict(step=step, epoch=epoch, h=float(before), **found)
                measuring += time.perf_counter() - m0
            metrics = {} if getattr(task, "step_metrics", ()) and hasattr(task, "loss_and_step_metrics") else None
            losses.append(train_step(model, optimizer, task, batch, metrics))
            lrs.append(before)
            ratios.append(optimizer.last["ratio"] if isinstance(optimizer, LossGrad) else torch.tensor(math.nan))
            if row is not None:
                r = float(ratios[-1])
                row.update(ratio=r, parabola=row["h"] / (2 * r) if r > 0 else math.nan)
                history["trace"].append(row)
            step += 1
            if time.monotonic() - last_report > REPORT_SECONDS:
                tell(epoch - 1)
                last_report = time.monotonic()
        epoch_losses = torch.stack(losses).float().cpu()
        history["steps"]["loss"].append(epoch_losses)
        history["steps"]["lr"].append(torch.tensor([float(h) for h in lrs], dtype=torch.float64))
        history["steps"]["ratio"].append(torch.stack(ratios).double().cpu())
        history["seconds"] += time.perf_counter() - tic - measuring  # training time only, comparable with fit's
        history["measure_seconds"] += measuring
        if not torch.isfinite(epoch_losses).all():
            history["diverged"] = True
        history["epochs"].append(_epoch_metrics(epoch, model, task, train_data, test_data, device, False,
                                                eval_batch_size, history))
        tell(epoch)
    history["steps"] = {k: torch.cat(v) if v else torch.empty(0) for k, v in history["steps"].items()}
    return history


@dataclass
class TraceExperiment(Experiment):
    """An :class:`~companion.train.Experiment` whose runs are LOSSGRAD runs measured by :func:`trace_fit`.

    ``full_data``: the subset whose mean loss is "the full training loss"; ``at``: the steps measured; ``search``:
    :func:`minimise_log`'s keyword arguments. All three are part of every run's identity (the subset by a digest),
    besides everything :meth:`Experiment.identity` holds. ``eval_train`` is off (test metrics after every epoch, as
    the notebook's other runs). Results are those of :meth:`Experiment.run` plus ``trace`` and ``measure_seconds``.
    Only ``'lossgrad'`` runs can be traced."""

    full_data: Batch = ()
    at: tuple = ()
    search: dict = field(default_factory=lambda: dict(lo=1e-3, hi=1e3, per_decade=3, rtol=0.01))
    profiles: bool = True

    def __post_init__(self):
        if not self.full_data:
            raise ValueError("TraceExperiment needs full_data: the subset of the training set whose mean loss is F")
        self.eval_train = False
        self.at = tuple(int(s) for s in self.at)
        self.config = dict(self.config or {}, trace=dict(
            at=list(self.at), search=dict(sorted(self.search.items())), profiles=self.profiles,
            n_full=len(self.full_data[0]), full_data=tensors_digest(self.full_data), kind="linesearch.trace_fit"))
        super().__post_init__()

    def check(self, optimizer: str, options: dict) -> None:
        if optimizer != "lossgrad":
            raise ValueError(f"a trace measures LOSSGRAD's step sizes: optimizer must be 'lossgrad', got {optimizer!r}")
        super().check(optimizer, options)

    def train(self, model, optimizer, scheduler, train_data, test_data, *, seed, checkpoint, report, desc) -> dict:
        # Experiment.train with trace_fit in place of fit: the store, identity and executors stay Experiment's
        if scheduler is not None:
            raise ValueError("a measured run takes no learning-rate schedule (trace_fit steps no scheduler)")
        return trace_fit(model, optimizer, self.task, train_data, test_data, self.full_data, epochs=self.epochs,
                         batch_size=self.batch_size, device=self.device, seed=seed, at=self.at, search=self.search,
                         eval_batch_size=self.eval_batch_size, profiles=self.profiles, report=report)


class FinalTrainMetrics:
    """``on_finish`` for an Experiment with ``eval_train=False``: the train metrics once, after the last epoch
    (eval mode, every training example), under ``extra['train']``. A class, not a lambda, so that it pickles for
    worker processes by reference to this module."""

    def __init__(self, task, data: Batch, device, batch_size: int = 1000):
        self.task, self.data, self.device, self.batch_size = task, data, device, batch_size

    def __call__(self, model: nn.Module) -> dict:
        return {"train": evaluate(model, self.task, self.data, torch.device(self.device), self.batch_size)}
