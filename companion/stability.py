"""Why a LOSSGRAD form collapses: sharpness against the stability limit, and where the step's loss is lowest (notebook 11).

At chosen steps of a run (:class:`StabilityExperiment`, built on :func:`companion.linesearch.trace_fit`), before the
step is taken and without changing the run (parameters restored bitwise, no ``.grad`` or optimizer state touched, a
forked random state), :func:`measure_stability` records at the point x, the step's batch B and another batch B′ drawn
from the training set (data the step is not computed on):

* ``sharpness``: the largest eigenvalue of the batch Hessian H of f_B, or for Adam's direction of the preconditioned
  P^{-1/2} H P^{-1/2} (the eigenvalues of P⁻¹H), P = diag(√v̂ + ε) with v̂ the bias-corrected second moment the step
  will use; by power iteration with Hessian-vector products (``power_iterations`` of them, a seeded start).
* ``limit``: the step size above which gradient descent with that direction is unstable on a quadratic of that
  sharpness: 2/λ for SGD, 2(1 + μ)/λ for heavy ball, (2 + 2β₁)/((1 − β₁)λ) for Adam (Cohen et al., "Adaptive Gradient
  Methods at the Edge of Stability", 2022); ``h_over_limit`` is the step size in use over it.
* ``t_same`` and ``t_other``: the exact minimisers over t of f_B(x − t·d) and f_B′(x − t·d) along the direction d the
  step takes (:func:`companion.linesearch.minimise_log`): what the rule's same-batch probe aims at, and what a probe
  on unseen data would aim at.
* ``weight_norm`` ‖x‖ and ``output_norm``: the mean over B′ of each example's output norm (the logits' norm for a
  classifier).

The direction d is the one the optimizer's next step takes, computed from its state without updating it: the
gradient (SGD), μv + G (heavy ball: v ← μv + G, d = v), or Adam's bias-corrected m̂/(√v̂ + ε) after the update with
G, for LossGrad and for ``torch.optim.Adam`` alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lossgrad import LossGrad

from .linesearch import TraceExperiment, _dot, along, mean_loss, minimise_log, trace_fit, trained_parameters
from .store import tensors_digest

__all__ = ["direction_of", "top_eigenvalue", "stability_limit", "measure_stability", "StabilityExperiment"]


def _kind(optimizer) -> tuple:
    """(direction, its settings) of a LossGrad or torch optimizer: ('sgd', {}), ('momentum', mu), ('adam', betas, eps)."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, LossGrad):
        direction = group["direction"]
        if direction == "momentum":
            return "momentum", dict(momentum=group["momentum"], nesterov=group["nesterov"])
        if direction == "adam":
            return "adam", dict(betas=group["betas"], eps=group["eps"])
        return "sgd", {}
    if isinstance(optimizer, torch.optim.Adam):
        return "adam", dict(betas=group["betas"], eps=group["eps"])
    if isinstance(optimizer, torch.optim.SGD) and group.get("momentum", 0):
        return "momentum", dict(momentum=group["momentum"], nesterov=group["nesterov"])
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd", {}
    raise ValueError(f"measure_stability knows LossGrad, torch.optim.SGD and torch.optim.Adam, not "
                     f"{type(optimizer).__name__}")


def direction_of(optimizer, params: list, grads: list) -> tuple:
    """(d, preconditioner scale s or None) of the optimizer's next step for gradients ``grads``, from its state, which
    is left as it is. For Adam s = 1/(√v̂ + ε) per coordinate (d = s·m̂)."""
    kind, o = _kind(optimizer)
    if kind == "sgd":
        return [g.clone() for g in grads], None
    states = [optimizer.state.get(p, {}) for p in params]
    if kind == "momentum":
        mu = o["momentum"]
        v = [st["momentum_buffer"] * mu + g if "momentum_buffer" in st else g.clone() for st, g in zip(states, grads)]
        return ([g + mu * b for g, b in zip(grads, v)] if o["nesterov"] else v), None
    (beta1, beta2), eps = o["betas"], o["eps"]
    d, s = [], []
    for st, g in zip(states, grads):
        m = st["exp_avg"] * beta1 + (1 - beta1) * g if "exp_avg" in st else (1 - beta1) * g
        v = st["exp_avg_sq"] * beta2 + (1 - beta2) * g * g if "exp_avg_sq" in st else (1 - beta2) * g * g
        t = float(st["step"]) + 1 if "step" in st else 1.0
        scale = 1.0 / ((v / (1 - beta2 ** t)).sqrt() + eps)
        d.append(m / (1 - beta1 ** t) * scale)
        s.append(scale)
    return d, s


def top_eigenvalue(model: nn.Module, task, batch, scale=None, iterations: int = 20, seed: int = 0) -> float:
    """The largest (most positive) eigenvalue of the batch Hessian H (train mode, as the step sees the loss), or with
    ``scale`` s of diag(s)^{1/2} H diag(s)^{1/2}: power iteration with Hessian-vector products from a seeded random
    start, the last Rayleigh quotient (it approaches the eigenvalue from below); when the eigenvalue of largest
    magnitude is negative, the power iteration runs again on the matrix shifted by it."""
    params = trained_parameters(model)
    root = [si.sqrt() for si in scale] if scale is not None else None
    with torch.enable_grad():
        grads = torch.autograd.grad(task.loss(model, batch), params, create_graph=True)

        def product(v):  # M v, M = diag(s)^{1/2} H diag(s)^{1/2}
            u = [x * r for x, r in zip(v, root)] if root is not None else v
            hv = torch.autograd.grad(grads, params, grad_outputs=u, retain_graph=True)
            return [(x * r if root is not None else x).detach() for x, r in zip(hv, root or hv)]

        def power(shift):  # the eigenvalue of M - shift I of largest magnitude, plus shift
            generator = torch.Generator().manual_seed(seed)
            v = [torch.randn(p.shape, generator=generator).to(p) for p in params]
            value = math.nan
            for _ in range(iterations):
                norm = math.sqrt(_dot(v, v))
                if not norm > 0 or not math.isfinite(norm):
                    return math.nan
                v = [x / norm for x in v]
                w = [a - shift * b for a, b in zip(product(v), v)] if shift else product(v)
                value = _dot(v, w)
                v = w
            return value + shift

        largest = power(0.0)
        # the largest-magnitude eigenvalue may be negative: then the top one is that of M - largest I, shifted back
        return power(largest) if largest < 0 else largest


def stability_limit(optimizer, sharpness: float) -> float:
    """The step size at which the optimizer's direction becomes unstable on a quadratic whose (preconditioned)
    sharpness is ``sharpness``: 2/λ (SGD), 2(1 + μ)/λ (heavy ball), (2 + 2β₁)/((1 − β₁)λ) (Adam, Cohen et al. 2022)."""
    if not sharpness > 0:
        return math.inf
    kind, o = _kind(optimizer)
    if kind == "momentum":
        return 2 * (1 + o["momentum"]) / sharpness
    if kind == "adam":
        beta1 = o["betas"][0]
        return (2 + 2 * beta1) / ((1 - beta1) * sharpness)
    return 2 / sharpness


@dataclass
class StabilityMeasure:
    """:func:`measure_stability` as a picklable callable for :func:`companion.linesearch.trace_fit`: another batch
    from ``pool`` (a seeded draw per call), the search and power-iteration settings."""

    task: object
    pool: tuple
    batch_size: int
    search: dict
    power_iterations: int = 20
    seed: int = 0

    def __post_init__(self):
        self._generator = torch.Generator().manual_seed(self.seed)
        self._calls = 0

    def __call__(self, model, optimizer, batch) -> dict:
        index = torch.randperm(len(self.pool[0]), generator=self._generator)[:self.batch_size]
        other = tuple(t[index].to(batch[0].device) for t in self.pool)
        self._calls += 1
        return measure_stability(model, optimizer, self.task, batch, other, self.search, self.power_iterations,
                                 seed=self.seed + self._calls)


def measure_stability(model: nn.Module, optimizer, task, batch, other, search: dict, power_iterations: int = 20,
                      seed: int = 0) -> dict:
    """See the module docstring. The parameters end as they began, bitwise; no ``.grad`` and no optimizer state is
    touched."""
    params = trained_parameters(model)
    with torch.enable_grad():
        grads = [g if g is not None else torch.zeros_like(p) for g, p in
                 zip(torch.autograd.grad(task.loss(model, batch), params, allow_unused=True), params)]
    d, scale = direction_of(optimizer, params, grads)
    h = float(optimizer.param_groups[0]["lr"])
    sharpness = top_eigenvalue(model, task, batch, scale, power_iterations, seed)
    limit = stability_limit(optimizer, sharpness)
    row = dict(sharpness=sharpness, limit=limit, h_over_limit=h / limit if math.isfinite(limit) else 0.0,
               slope=_dot(grads, d), weight_norm=math.sqrt(_dot([p.detach() for p in params], [p.detach() for p in params])))
    with torch.no_grad():
        outputs = model(other[0])
        outputs = outputs[0] if isinstance(outputs, tuple) else outputs
        row["output_norm"] = float(outputs.flatten(1).double().norm(dim=1).mean())
    training = model.training
    for name, data in (("same", batch), ("other", other)):
        with along(params, d) as go:
            def f(t, data=data):
                go(t)
                return mean_loss(model, task, data, len(data[0]), training=training)
            found = minimise_log(f, **search)
        row[f"t_{name}"], row[f"edge_{name}"] = found["t"], found["at_edge"]
    return row


@dataclass
class StabilityExperiment(TraceExperiment):
    """A :class:`~companion.linesearch.TraceExperiment` whose checkpoints run :func:`measure_stability` (any of
    LossGrad, SGD, Adam); ``full_data`` is the pool the other batch B′ is drawn from. The settings are part of every
    run's identity."""

    power_iterations: int = 20

    def __post_init__(self):
        self.profiles = False
        super().__post_init__()
        self.config["trace"].update(kind="stability.measure_stability", power_iterations=self.power_iterations,
                                    pool=tensors_digest(self.full_data))

    def check(self, optimizer: str, options: dict) -> None:
        if optimizer not in ("lossgrad", "sgd", "adam_steps") or options.get("milestones"):
            raise ValueError(f"a stability trace measures LossGrad, SGD or Adam at a constant rate, got {optimizer!r} "
                             f"with {options!r}")
        super(TraceExperiment, self).check(optimizer, options)

    def train(self, model, optimizer, scheduler, train_data, test_data, *, seed, checkpoint, report, desc) -> dict:
        measure = StabilityMeasure(self.task, self.full_data, self.batch_size, self.search, self.power_iterations,
                                   seed=seed)
        return trace_fit(model, optimizer, self.task, train_data, test_data, self.full_data, epochs=self.epochs,
                         batch_size=self.batch_size, device=self.device, seed=seed, at=self.at, search=self.search,
                         eval_batch_size=self.eval_batch_size, profiles=False, report=report, measure_fn=measure)
