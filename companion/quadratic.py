"""The paper's Section 3 in code: gradient methods on f(x) = ½ xᵀAx (notebook 00).

Everything is float64 and small. ``run_batched`` runs many quadratics at once with the rule of
``lossgrad`` (``next_step_size_tensor``); the one-problem loops (``run_lossgrad`` through the real
``lossgrad.LossGrad``, ``run_exact_line_search``, ``run_fixed_step``) are the oracles the tests
check it against.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from lossgrad import LossGrad, next_step_size_tensor

DTYPE = torch.float64


def random_quadratic(kappa: float, generator: torch.Generator) -> Tensor:
    """A random 2-D SPD matrix with eigenvalues 1 and 1/kappa in a random orthonormal basis."""
    if not kappa >= 1:
        raise ValueError(f"the condition number kappa must be >= 1, got {kappa!r}")
    angle = torch.rand((), generator=generator, dtype=DTYPE) * math.pi
    q = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    return q @ torch.diag(torch.tensor([1.0, 1.0 / kappa], dtype=DTYPE)) @ q.T


def random_start(generator: torch.Generator) -> Tensor:
    """A random point on the unit circle (the analysis is invariant to the scale of x)."""
    angle = torch.rand((), generator=generator, dtype=DTYPE) * 2 * math.pi
    return torch.stack([angle.cos(), angle.sin()])


def value(a: Tensor, x: Tensor) -> Tensor:
    return 0.5 * x @ a @ x


def exact_step(a: Tensor, x: Tensor) -> Tensor:
    """h* = gᵀg / gᵀAg, the minimiser of f(x − h g) (= Σλᵢ²xᵢ² / Σλᵢ³xᵢ² in the eigenbasis)."""
    g = a @ x
    return (g @ g) / (g @ a @ g)


def decrease_bound(a: Tensor) -> float:
    """Estimate (4): the worst-case factor ((λ₁ − λ₂)/(λ₁ + λ₂))² of one exact line-search step."""
    lo, hi = torch.linalg.eigvalsh(a).tolist()
    return ((hi - lo) / (hi + lo)) ** 2


def best_fixed_step(a: Tensor) -> float:
    """2/(λ₁ + λ₂): the fixed step whose worst-case factor per step is the smallest (it equals (4))."""
    lo, hi = torch.linalg.eigvalsh(a).tolist()
    return 2.0 / (hi + lo)


def run_exact_line_search(a: Tensor, x0: Tensor, steps: int) -> dict:
    return _run(a, x0, steps, lambda x, k: exact_step(a, x))


def run_fixed_step(a: Tensor, x0: Tensor, steps: int, h: float) -> dict:
    return _run(a, x0, steps, lambda x, k: torch.tensor(h, dtype=DTYPE))


def run_lossgrad(a: Tensor, x0: Tensor, steps: int, h0: float, c: float, **options) -> dict:
    """LOSSGRAD (the real optimizer) on the quadratic; ``h`` is the step each iteration used."""
    x = x0.clone().requires_grad_(True)
    opt = LossGrad([x], lr=h0, c=c, **options)
    fs, hs, h_stars = [value(a, x0).item()], [], []
    for _ in range(steps):
        if fs[-1] < 1e-250:  # converged to the bottom of float64
            break
        h_stars.append(exact_step(a, x.detach()).item())
        hs.append(float(opt.param_groups[0]["lr"]))
        opt.zero_grad()
        opt.step(lambda: value(a, x))
        fs.append(value(a, x.detach()).item())
    return {"f": torch.tensor(fs, dtype=DTYPE), "h": torch.tensor(hs, dtype=DTYPE),
            "h_star": torch.tensor(h_stars, dtype=DTYPE)}


def _run(a: Tensor, x0: Tensor, steps: int, step_size: Callable) -> dict:
    x, fs, hs, h_stars = x0.clone(), [value(a, x0).item()], [], []
    for k in range(steps):
        if fs[-1] < 1e-250:
            break
        h = step_size(x, k)
        h_stars.append(exact_step(a, x).item())
        hs.append(float(h))
        x = x - h * (a @ x)
        fs.append(value(a, x).item())
    return {"f": torch.tensor(fs, dtype=DTYPE), "h": torch.tensor(hs, dtype=DTYPE),
            "h_star": torch.tensor(h_stars, dtype=DTYPE)}


def per_step_factors(f: Tensor) -> Tensor:
    """f(x_{k+1}) / f(x_k) for every step."""
    return f[1:] / f[:-1]


def asymptotic_factor(f: Tensor, skip: int) -> float:
    """Geometric mean of the per-step factor after the first ``skip`` steps (NaN if too short)."""
    f = f[skip:]
    if len(f) < 2 or not (f > 0).all():
        return math.nan
    return math.exp((f[-1].log() - f[0].log()).item() / (len(f) - 1))


def slice_along_gradient(closure: Callable[[], Tensor], params: Sequence[Tensor], ts: Tensor) -> dict:
    """The loss along −g from the current point: φ(t) = f(x − t g) for each t, with f(x) and ||g||².

    Parameters are restored afterwards. Evaluations run under no_grad with the model as it is."""
    params = list(params)
    for p in params:
        p.grad = None
    with torch.enable_grad():
        loss = closure()
        loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    sq_norm = sum((g.double() ** 2).sum() for g in grads).item()
    start = [p.detach().clone() for p in params]
    values = []
    with torch.no_grad():
        for t in ts.tolist():
            for p, x, g in zip(params, start, grads):
                p.copy_(x - t * g)
            values.append(closure().item())
        for p, x in zip(params, start):
            p.copy_(x)
    for p in params:
        p.grad = None
    return {"t": ts.double(), "phi": torch.tensor(values, dtype=DTYPE), "f0": loss.item(), "sq_norm": sq_norm}


def ratio_along(slice_: dict) -> Tensor:
    """LOSSGRAD's ratio (φ(t) − φ(0) + t||g||²) / (t||g||²) at every t > 0 of a slice."""
    t = slice_["t"]
    lred = t * slice_["sq_norm"]
    return (slice_["phi"] - slice_["f0"] + lred) / lred


def parabola(slice_: dict, h: float) -> Callable[[Tensor], Tensor]:
    """q(t) with q(0) = f(x), q'(0) = −||g||² and q(h) = φ(h) (φ(h) interpolated from the slice)."""
    phi_h = float(np.interp(h, slice_["t"].numpy(), slice_["phi"].numpy()))
    f0, s = slice_["f0"], slice_["sq_norm"]
    curvature = (phi_h - f0 + h * s) / h ** 2
    return lambda t: f0 - s * t + curvature * t ** 2


def first_overshoot(run: dict) -> int:
    """The first step whose h exceeded h*(x_k): where LOSSGRAD's h has caught up with the exact step.

    The number of steps if it never did."""
    above = torch.nonzero(run["h"] > run["h_star"])
    return int(above[0]) if len(above) else len(run["h"])


# ------------------------------------------------- many quadratics at once
def random_problems(n: int, kappa_max: float, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` random quadratics (condition numbers log-uniform in [1, kappa_max]) and starts: (kappa, A, x0)."""
    kappa = torch.exp(torch.rand(n, generator=generator, dtype=DTYPE) * math.log(kappa_max))
    a = torch.stack([random_quadratic(float(k), generator) for k in kappa])
    x0 = torch.stack([random_start(generator) for _ in range(n)])
    return kappa, a, x0


def run_batched(a: Tensor, x0: Tensor, steps: int, method: str, h0: float = 1e-4, c: float = 1.05) -> dict:
    """Exact line search, the best fixed step, or LOSSGRAD (Algorithm 1) on many quadratics at once.

    ``method``: ``'exact'``, ``'fixed'`` or ``'lossgrad'``. Returns f (n, steps+1), h and h* (n, steps); entries after a
    run reached the bottom of float64 (f < 1e-250) are NaN. The per-problem loop is
    :func:`run_lossgrad` with the real optimizer; a test checks that both agree."""
    if method not in ("exact", "fixed", "lossgrad"):
        raise ValueError(f"method must be 'exact', 'fixed' or 'lossgrad', got {method!r}")
    quad = lambda x: 0.5 * torch.einsum("ni,nij,nj->n", x, a, x)
    eig = torch.linalg.eigvalsh(a)
    fixed = 2.0 / (eig[:, 0] + eig[:, 1])
    x, h = x0.clone(), torch.full((len(a),), h0, dtype=DTYPE)
    fs, hs, h_stars = [quad(x)], [], []
    for _ in range(steps):
        g = torch.einsum("nij,nj->ni", a, x)
        gg = (g * g).sum(1)
        h_star = gg / torch.einsum("ni,nij,nj->n", g, a, g)
        step = {"exact": h_star, "fixed": fixed, "lossgrad": h}[method]
        x_new = x - step[:, None] * g
        f_new = quad(x_new)
        if method == "lossgrad":  # Algorithm 1: no guard, no rollback
            h = next_step_size_tensor(h, gg, fs[-1], f_new, c=c, rollback=None, resolution=0.0,
                                      min_lr=0.0, max_lr=math.inf)[0]
        alive = fs[-1] >= 1e-250
        hs.append(torch.where(alive, step, math.nan))
        h_stars.append(torch.where(alive, h_star, math.nan))
        fs.append(torch.where(alive, f_new, math.nan))
        x = x_new
    return {"f": torch.stack(fs, 1), "h": torch.stack(hs, 1), "h_star": torch.stack(h_stars, 1)}
