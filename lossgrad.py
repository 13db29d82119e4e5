r"""LOSSGRAD: SGD whose step size is set by one extra loss evaluation per step.

Reference
---------
Bartosz Wójcik, Łukasz Maziarka, Jacek Tabor. "LOSSGRAD: automatic learning rate in
gradient descent". Schedae Informaticae 27 (2018). arXiv:1902.07656.

The rule (Algorithm 1 of the paper)
-----------------------------------
For the objective :math:`F(x) = f_B(x) + \tfrac{\lambda}{2}\lVert x\rVert^2` on the
current batch :math:`B`, with gradient :math:`G = \nabla F(x)` and step size :math:`h`:

.. math::

    \begin{aligned}
    x'   &= x - h\,G                                   && \text{the SGD step, kept}\\
    \ell &= h\,\lVert G\rVert^2                        && \text{decrease predicted by the linearisation}\\
    r    &= \bigl(F(x') - F(x) + \ell\bigr) / \ell     && 0 \text{ on a straight line}\\
    h    &\leftarrow \begin{cases} c\,h & r \le \tau\\ h / c & \text{otherwise}\end{cases}
    \end{aligned}

with :math:`\tau = \tfrac12` in the paper (``threshold``, default 0.5). Why :math:`\tfrac12`: the parabola
:math:`q` with :math:`q(0)=F(x)`, :math:`q'(0)=-\lVert G\rVert^2`, :math:`q(h)=F(x')` has :math:`q'(h) < 0`
exactly when :math:`r < \tfrac12`, so the minimum of the fitted parabola along :math:`-G` lies beyond :math:`h`.
On a parabola of curvature :math:`\kappa` along :math:`G`, :math:`F(x - tG) = F(x) - t\lVert G\rVert^2 +
\tfrac12\kappa t^2\lVert G\rVert^2`, the ratio is :math:`r = \tfrac12\kappa h`, so :math:`r \le \tau` grows
:math:`h` up to :math:`2\tau/\kappa`, where the measured decrease is :math:`1 - \tau` of the predicted one:
:math:`\tau = \tfrac12` targets the minimiser :math:`1/\kappa`; a larger :math:`\tau` (any value in
:math:`(0, 1)` is allowed) accepts steps past the batch parabola's minimum, up to twice it as :math:`\tau \to 1`,
where the parabola has come back up to :math:`F(x)`.
The cost is one extra forward pass (:math:`F(x')` on the same batch) and one extra read of
the gradients (for :math:`\lVert G\rVert^2`). A NaN ratio (a NaN probe) fails ``r <= threshold`` and
shrinks :math:`h`; the paper's pseudocode is lost, and the authors' code grows :math:`h` there
(it tests ``r > 1/2``): both are readings of Algorithm 1, this one is ours.

``LossGrad(params, rollback=None, resolution_guard=False)`` is exactly Algorithm 1 (the
reproduction notebooks use it so): no copy of the weights is made, and a non-finite gradient or
probe is stepped into as the pseudocode says. A zero gradient (:math:`\ell = 0`) leaves :math:`h`
as it is.

Momentum and Adam directions (the authors' future work; ours)
-------------------------------------------------------------
The rule applies to any direction :math:`d` built from the gradients: :math:`x' = x - h\,d`, the
predicted decrease is :math:`\ell = h\,\langle G, d\rangle`, and :math:`r` and the update of
:math:`h` are as above (the parabola through :math:`F(x)`, slope :math:`-\langle G, d\rangle` and
:math:`F(x')` has its minimum beyond :math:`h` exactly when :math:`r < \tfrac12`; ``threshold`` applies
to every direction).
``direction='sgd'`` is :math:`d = G` (the paper's form, the default). ``direction='momentum'`` is
heavy ball, :math:`v \leftarrow \mu v + G`, :math:`d = v` (``nesterov=True``: :math:`d = G + \mu v`),
as ``torch.optim.SGD(momentum=mu, nesterov=...)`` with ``lr`` = :math:`h`. ``direction='adam'`` is
:math:`d = \hat m / (\sqrt{\hat v} + \epsilon)` with bias correction, as ``torch.optim.Adam(betas, eps)``
with ``lr`` = :math:`h`. Weight decay stays L2 in the objective (it enters :math:`G`, hence the buffers),
not AdamW's decoupled decay: the rule compares the objective's measured change with its predicted
change, so the decay must be part of that objective. When :math:`\langle G, d\rangle \le 0` (momentum
pointing uphill for this batch) :math:`r` means nothing: the step is taken, :math:`h` is kept, the guards'
rollbacks still apply, and ``last['non_descent']`` says so. The buffers are updated once per step from
:math:`G` (clipped when ``max_grad_norm`` is set), never from the probe. An undone step restores
:math:`x` and keeps its gradient in the buffers (it was measured at :math:`x`, where the weights are put
back), and so does a step whose probe raised: retrying the batch then counts its gradient twice. With
a rollback a non-finite gradient never enters the buffers; with ``rollback=None`` it does, and one NaN
gradient then poisons every later step. A step undone for raising the loss along a non-descent
direction keeps :math:`h` (the direction, not :math:`h`, was at fault); any other undone step shrinks it.
Complex parameters get Adam's moments per real and imaginary part, as ``torch.optim.Adam`` does.

A caution from the companion's notebook 09 (the paper's MNIST network on Fashion-MNIST): the heavy-ball
momentum and the Adam form trained for a few epochs, then fell to chance, in every seed (in seed 0 their
median :math:`h` rose in the epochs before the fall, and the Adam form's largest :math:`h` reached new
highs); with ``rollback='increase'`` they did not fall to chance, but ended at 0.71-0.77 test accuracy
against tuned SGD's 0.88-0.89. Notebook 11 measured what precedes the fall (the weights' norm grew about
tenfold, and the Adam form's step passed the stability limit of the preconditioned sharpness in most epochs,
as the paper's SGD form did without collapsing) and what the options below change. Treat these forms as
experimental; the paper's form trained there.

Other verdicts, smoothing, asymmetry and an averaged iterate (notebook 11; ours, off by default)
-----------------------------------------------------------------------------------------------
* ``probe='next'``: each step is judged by the *next* batch, on which it was not computed, instead of by
  :math:`F(x')` on its own. The step :math:`x \to x - h\,d` has start slope :math:`s_0 = \langle G, d\rangle` on
  its batch; the next step's gradient :math:`G'` (at :math:`x - h\,d`, on the next batch) gives the end slope
  :math:`s_1 = \langle G', d\rangle`. The parabola with those two slopes has
  :math:`r = (s_0 - s_1) / (2 s_0)` (on a quadratic the same :math:`r` as the paper's), and :math:`r \le \tfrac12`
  exactly when :math:`s_1 \ge 0`: :math:`h` grows while the unseen batch's loss still falls at the step's end,
  the sign of the hypergradient of Baydin et al. (ICLR 2018), applied multiplicatively. The verdict sets the
  step size of the step that computes :math:`G'`; no probe is evaluated (one forward pass per step, the
  training step's own; the paper's probe costs a second one), and :math:`d` is kept between steps (one
  parameter-sized buffer). The first step, a step after one not taken and a step with a parameter new since
  the last keep :math:`h`; a non-descent step (:math:`s_0 \le 0`) is not judged. ``rollback='increase'`` needs
  :math:`F(x')` and is refused with it; the resolution guard reads loss differences and does nothing here, nor
  does ``probe_grad``. A limit: no copy of :math:`x` outlives its step, so a step that lands where the loss is
  not finite, from a finite gradient, cannot be undone (the non-finite gradients that follow are skipped and
  :math:`h` shrinks); where a run must not blow up, keep ``probe='same'``. ``last['ratio']`` is the verdict on the
  last step; the other entries describe this one.
* ``smoothing`` :math:`\beta \in [0, 1)`: the rule decides on :math:`\bar N / \bar D`, exponential moving
  averages of the ratio's numerator and denominator (:math:`N = F(x') - F(x) + \ell`, :math:`D = \ell`; with
  ``probe='next'`` :math:`N = h (s_0 - s_1)/2`, :math:`D = h s_0`), updated on the steps the rule reads (not
  on undone, unresolved or non-finite ones). ``last['ratio']`` stays the step's own :math:`r`. The averages weigh a
  step by its :math:`\ell`, which falls with :math:`h`: while :math:`h` shrinks by :math:`\gamma` a step, a
  large ratio fades from them only by :math:`\beta\gamma` a step (0.99 with :math:`\beta` = 0.9 and
  :math:`\gamma = c^2`), so with ``shrink`` a few large ratios can send :math:`h` down by orders of magnitude.
* ``shrink`` :math:`\gamma > 1`: :math:`h \leftarrow h/\gamma` when :math:`r >` threshold (default :math:`c`,
  the paper). With :math:`\gamma = c^2` h settles where two verdicts in three grow it (Rprop's asymmetric factors,
  Riedmiller & Braun 1993). Undone and skipped steps still shrink by :math:`c`.
* ``average`` :math:`\gamma \ge 0`: keeps the polynomial-decay average of the iterates,
  :math:`\bar x_t = \bar x_{t-1} + \tfrac{1 + \gamma}{t + \gamma}(x_t - \bar x_{t-1})` (Shamir & Zhang 2013, as
  DoG's averager; 8 is its default). ``opt.eval()`` puts :math:`\bar x` into the parameters for evaluation,
  ``opt.train()`` (or the next ``step`` or ``zero_grad``) puts the training weights back, bitwise; a state dict
  saved between the two holds both. One more parameter-sized buffer.

What they did in notebook 11 (the Adam form on the paper's MNIST network and the Fashion-MNIST autoencoder, 30
epochs): ``probe='next'`` ended the collapse but let :math:`h` fall orders of magnitude below Adam's rate, so
its runs ended far behind (the short-horizon bias of greedy step-size choice); ``shrink=c**2`` kept every seed
above chance but ended below Adam at its default rate; with ``smoothing`` one classifier seed of four still
collapsed, and ``average`` did not stop the collapse; ``shrink=c**2`` with ``smoothing=0.9`` and ``average=8``
failed no seed but placed worse than ``shrink`` alone (:math:`h` dived by four to five orders of magnitude).
On notebook 11's held-out tasks ``shrink=c**2`` collapsed to chance on the classifier at batch 32 and placed
behind Adam on every task. None is a reason to prefer a LOSSGRAD form over Adam or the learning-rate-free
optimizers of notebook 09 (schedule-free AdamW, DoG); they are here to study the rule.

Two guards, on by default, change Algorithm 1 only where it fails
-----------------------------------------------------------------
* ``rollback``: ``'nonfinite'`` restores :math:`x` (bitwise, from a copy taken before the step)
  when :math:`F(x')`, :math:`F(x)` or :math:`\lVert G\rVert^2` is not finite, and shrinks
  :math:`h`; a step whose :math:`\lVert G\rVert^2` is not finite is not taken at all where that is
  known before stepping (the host path), and shrinks :math:`h` on both paths. ``'increase'`` also restores :math:`x` when
  :math:`F(x')` exceeds :math:`F(x)` by more than the loss's resolution (an acceptance test on
  the same batch). ``None`` never restores and keeps no copy.
* ``resolution_guard``: a step is *unresolved* when both :math:`\ell` and :math:`|F(x') - F(x)|`
  are below the loss's resolution :math:`\rho\,|F(x)|` (see :func:`loss_resolution`), or when
  :math:`F(x') = F(x)` exactly: the difference is rounding noise and :math:`r` says nothing. On an unresolved step :math:`h` grows
  by :math:`c`, but never beyond ``resolved_lr``, the step size the rule chose after the
  last resolved step it kept (infinite until the first one). So a too-small initial :math:`h` grows until the loss can see
  its steps, an :math:`h` pushed below the resolution later (by hand, by a run of rollbacks)
  climbs back, and a converged loss, where nothing is left to resolve, never pushes :math:`h`
  above a step size that was seen to work. Without the guard a small :math:`h` drifts down for
  ever, because a loss difference that rounds to zero reads as :math:`r = 1`. A probe exactly equal to
  :math:`F(x) \ne 0` although :math:`\ell \ge \rho_{16}|F(x)|` (:math:`\rho_{16}` = 1.6e-2, the resolution of
  a bfloat16 loss: the step should change any float loss visibly) is not unresolved: it reads as Algorithm 1
  reads it, :math:`r = 1`, and :math:`h` shrinks, so equal probes never grow :math:`h` beyond that point. On
  the host path, 20 equal probes in a row make ``step`` evaluate the closure once with autograd on and raise if its
  loss does not depend on the parameters (a closure over outputs computed before the step); a loss with
  surrogate gradients (straight-through estimators) passes.

Beyond the guards
-----------------
* ``max_grad_norm``: clip inside ``step``. The step is :math:`x' = x - h\,s\,G` with
  :math:`s = \min(1, \text{max\_grad\_norm}/\lVert G\rVert)` and the prediction is the matching
  :math:`\ell = h\,s\,\lVert G\rVert^2 = h\,\langle G, sG\rangle`. Clipping the gradients yourself
  between ``backward`` and ``step(closure, loss=loss)`` makes the prediction wrong (the step taken
  is along the clipped gradient, the loss changes along the true one); ``step`` warns once when a
  gradient was changed in place after backward (not under ``torch.distributed``).
* 16-bit parameters: the step :math:`h\,d` is computed in float32 and rounded once as it is added,
  and the direction's buffers (momentum, Adam's moments) are float32.
* LR schedulers do not apply: LOSSGRAD sets the step size itself, and a scheduler would silently
  fight it. ``step`` raises when a ``torch.optim.lr_scheduler.LRScheduler`` is attached. Writing
  ``param_groups[i]['lr']`` yourself (or through ``ReduceLROnPlateau``, which writes it the same
  way) sets :math:`h`; the rule adapts from the new value, with a warning.

Example
-------
>>> opt = LossGrad(model.parameters(), lr=1e-4, c=1.05)
>>> for x, y in loader:
...     opt.zero_grad()
...     loss = opt.step(lambda: loss_fn(model(x), y))   # closure: no backward inside
>>> float(opt.param_groups[0]["lr"])                     # the current step size h
"""

from __future__ import annotations

import math
import numbers
import threading
import warnings
import weakref
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.optim.optimizer import Optimizer
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["LossGrad", "RESOLUTION_ULPS", "loss_resolution", "judge_by_slopes_float", "judge_by_slopes_tensor"]

#: The loss difference must exceed this many machine epsilons of the accumulation dtype (float32 or
#: wider) times |F(x)| to be read. A batch-mean loss carries rounding errors of a few ulps (measured:
#: one or two on the regression MLP of benchmarks/insensitivity.py); 8 leaves a margin. 64, used before,
#: hid readable steps: the Adam form from h0 = 1e-6 never started there.
RESOLUTION_ULPS = 8.0
#: A 16-bit loss is rounded once to its own dtype after a float32 reduction: two of its ulps.
ROUNDING_ULPS = 2.0

_ROLLBACKS = (None, "nonfinite", "increase")
#: A probe exactly equal to F(x) != 0 although the step was predicted to change the loss by at least this fraction
#: of it (the resolution of a bfloat16 loss, the coarsest there is) is not below the loss's resolution: the guard
#: reads it as Algorithm 1 does (r = 1, h shrinks), so equal probes never grow h past that. After _BLIND_PROBES
#: equal probes in a row the host path checks that the closure's loss at x' depends on the parameters (one
#: forward and backward with autograd on) and raises if it does not (a closure over outputs from before the step).
BLIND_FRACTION = 2.0 * torch.finfo(torch.bfloat16).eps
_BLIND_PROBES = 20
_STALE_CLOSURE = (
    "the probe closure does not recompute the loss at the new parameters: it must run the forward pass again "
    "each time it is called, e.g. opt.step(lambda: loss_fn(model(x), y)), not opt.step(lambda: loss) nor a "
    "closure over outputs computed before step; recompute them inside the closure")
_PROBE_NEEDS_GRAD = (
    "the probe closure failed under torch.no_grad(). If your loss differentiates with respect to its inputs "
    "(autograd.grad inside the loss: physics-informed residuals, gradient penalties), build the optimizer with "
    "LossGrad(..., probe_grad=True), which evaluates the probe with autograd on. If the closure calls backward, "
    "remove that: it must only return the loss")
_BACKWARD_IN_CLOSURE = (
    "the closure called backward: it must only return the loss (LossGrad.step calls backward itself, and a "
    "second backward doubles the gradient or fails). Remove loss.backward() from the closure, or call "
    "backward yourself and pass the loss: opt.step(closure, loss=loss)")
# Options that are one value for the whole optimizer; groups may differ only in weight_decay.
_GLOBAL_OPTIONS = ("lr", "c", "threshold", "direction", "momentum", "nesterov", "betas", "eps", "rollback",
                   "resolution_guard", "max_grad_norm", "min_lr", "max_lr", "probe", "smoothing", "shrink", "average")
_DIRECTIONS = ("sgd", "momentum", "adam")
_PROBES = ("same", "next")
#: What the rule remembers between steps (in every param group, saved by ``state_dict``): the slope <G, d> of the
#: last step taken (probe='next'), and the smoothed numerator and denominator of r (smoothing > 0).
_MEMORY = dict(previous_slope=math.nan, smoothed_num=0.0, smoothed_den=0.0)
#: What an optimizer saved before these options existed was saved under the paper's rule.
_LEGACY = dict(threshold=0.5, probe="same", smoothing=0.0, shrink=None, average=None)


def _number(name: str, value) -> float:
    """``value`` as a float: Python and numpy real numbers (not bools); anything else is a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _flag(name: str, value, allow_none: bool = False) -> Optional[bool]:
    """A boolean option: True or False (or None where that means automatic). 'no' is not False."""
    if value is None and allow_none:
        return None
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        value = bool(value)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be {'True, False or None (automatic)' if allow_none else 'True or False'}, "
                         f"got {value!r}")
    return value


def _checked_options(group: dict, direction: str, read_device_lr: bool = True) -> dict:
    """The rule's options of one param group (defaults filled in), validated and normalised.

    One check for the constructor, ``add_param_group`` and groups given as dicts, made before a group joins.
    ``lr`` is checked only when it is a value the caller gave (not the shared h, which is left unread)."""
    if group["direction"] != direction:
        raise ValueError(f"direction={group['direction']!r} in a param group: the direction is one for the whole "
                         f"optimizer (here {direction!r}); pass it to LossGrad(..., direction=...)")
    out = {}
    c = _number("c", group["c"]) if not isinstance(group["c"], bool) else math.nan
    if not (math.isfinite(c) and c > 1):
        raise ValueError(f"c must be a finite number > 1 (h is multiplied or divided by it each step), got "
                         f"{group['c']!r}; 1.05 is the best value of the paper's c sweep")
    threshold = group["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < float(threshold) < 1:
        raise ValueError(f"threshold must be a finite number strictly between 0 and 1 (h grows when the ratio r <= "
                         f"threshold), got {threshold!r}; 0.5 is the paper's rule (the fitted parabola's minimum)")
    weight_decay = _number("weight_decay", group["weight_decay"])
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {group['weight_decay']!r}")
    if group["rollback"] not in _ROLLBACKS:
        raise ValueError(f"rollback must be one of {_ROLLBACKS}, got {group['rollback']!r}")
    min_lr, max_lr = _number("min_lr", group["min_lr"]), _number("max_lr", group["max_lr"])
    if not (0 <= min_lr < max_lr):
        raise ValueError(f"need 0 <= min_lr < max_lr, got min_lr={group['min_lr']!r}, max_lr={group['max_lr']!r}")
    max_grad_norm = group["max_grad_norm"]
    if max_grad_norm is not None:
        max_grad_norm = _number("max_grad_norm", max_grad_norm)
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {group['max_grad_norm']!r}")
    if group["probe"] not in _PROBES:
        raise ValueError(f"probe must be one of {_PROBES}, got {group['probe']!r}: 'same' evaluates F(x') on the "
                         "step's batch (the paper), 'next' judges each step by the next batch's gradient")
    if group["probe"] == "next" and group["rollback"] == "increase":
        raise ValueError("rollback='increase' needs F(x') on the step's batch, which probe='next' does not evaluate: "
                         "use rollback='nonfinite' (a non-finite gradient is still never stepped into) or probe='same'")
    smoothing = group["smoothing"]
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0 <= float(smoothing) < 1:
        raise ValueError(f"smoothing must be a number in [0, 1) (the weight of the past in the averaged decreases; "
                         f"0: none, the paper's rule), got {smoothing!r}")
    shrink = group["shrink"]
    if shrink is not None:
        shrink = _number("shrink", shrink)
        if not (math.isfinite(shrink) and shrink > 1):
            raise ValueError(f"shrink must be None (the paper: h / c) or a finite number > 1 by which h is divided "
                             f"when r > threshold, got {group['shrink']!r}")
    average = group["average"]
    if average is not None:
        average = _number("average", average)
        if not (math.isfinite(average) and average >= 0):
            raise ValueError(f"average must be None (no averaged iterate) or the polynomial-decay averaging's gamma "
                             f">= 0 (8 is DoG's default), got {group['average']!r}")
    out.update(c=c, threshold=float(threshold), weight_decay=weight_decay, min_lr=min_lr, max_lr=max_lr,
               max_grad_norm=max_grad_norm, rollback=group["rollback"],
               resolution_guard=_flag("resolution_guard", group["resolution_guard"]), probe=group["probe"],
               smoothing=float(smoothing), shrink=shrink, average=average)
    out.update(zip(("momentum", "nesterov", "betas", "eps"), _direction_options(
        direction, group["momentum"], group["nesterov"], group["betas"], group["eps"])))
    if not isinstance(group["lr"], Tensor):
        lr = _number("lr", group["lr"])
        out["lr"] = lr
    elif group["lr"].device.type == "cpu" or (read_device_lr and group["lr"].device.type != "meta"):
        lr = _scalar_value("lr", group["lr"])  # a device tensor is read only while the optimizer is built
    else:
        lr = None  # the shared h on the device: reading it would wait for the device (or fail on meta)
        if group["lr"].numel() != 1:
            raise ValueError(f"lr must be a number or a one-element tensor, got shape {tuple(group['lr'].shape)}")
    if lr is not None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr is the step size h and must be a finite number > 0, got {group['lr']!r}; "
                             "the authors' code starts from 1e-4")
        if not min_lr <= lr <= max_lr:
            raise ValueError(f"lr={lr!r} lies outside [min_lr, max_lr] = [{min_lr!r}, {max_lr!r}]")
    return out


def _direction_options(direction, momentum, nesterov, betas, eps):
    """Validated (momentum, nesterov, betas, eps) for ``direction``; an option of another direction is an error."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    given = {name: value for name, value in (("momentum", momentum), ("betas", betas), ("eps", eps))
             if value is not None}
    if nesterov is not False and not (type(nesterov).__module__ == "numpy" and not nesterov):
        given["nesterov"] = nesterov
    allowed = {"sgd": (), "momentum": ("momentum", "nesterov"), "adam": ("betas", "eps")}[direction]
    wrong = sorted(set(given) - set(allowed))
    if wrong:
        raise ValueError(f"{wrong} do(es) not apply to direction={direction!r}; "
                         f"direction='momentum' takes momentum and nesterov, direction='adam' takes betas and eps")
    if direction == "momentum":
        momentum = 0.9 if momentum is None else momentum
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        return float(momentum), _flag("nesterov", nesterov), None, None
    if direction == "adam":
        betas = (0.9, 0.999) if betas is None else betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
                not isinstance(b, bool) and isinstance(b, numbers.Real) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        eps = 1e-8 if eps is None else eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        return None, False, (float(betas[0]), float(betas[1])), float(eps)
    return None, False, None, None


def loss_resolution(dtype: torch.dtype) -> float:
    r"""Relative resolution :math:`\rho` of a loss of this dtype: changes below :math:`\rho|F|` are noise.

    ``RESOLUTION_ULPS`` epsilons of the accumulation dtype (float32 for 16-bit and float32 losses,
    float64 for float64), and at least ``ROUNDING_ULPS`` epsilons of the dtype itself: 9.5e-7 for
    float32, 2.0e-3 for float16, 1.6e-2 for bfloat16. ``LossGrad`` takes the coarsest of the loss's and
    the parameters' dtypes (a 16-bit model's outputs are rounded before a float32 loss sees them), and
    also counts a step that leaves the loss exactly unchanged as unresolved: under autocast a float32
    loss of a float32 model is computed from 16-bit activations, which no dtype check can see."""
    if dtype.is_complex:
        dtype = dtype.to_real()  # |z|^2 sums the real dtype's squares
    if not dtype.is_floating_point:
        dtype = torch.float32
    accumulate = _wide_dtype(dtype)
    return max(RESOLUTION_ULPS * torch.finfo(accumulate).eps, ROUNDING_ULPS * torch.finfo(dtype).eps)


class LossGrad(Optimizer):
    r"""SGD with the LOSSGRAD step-size rule (see the module docstring for the math).

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer. Groups may
            differ only in ``weight_decay``; the step size :math:`h` and the rule are shared by
            all parameters, because :math:`\lVert G\rVert^2` and the probe are taken over all of
            them. Parameters whose ``.grad`` is ``None`` are skipped. Real and complex dtypes
            (:math:`\lVert G\rVert^2 = \sum |g|^2`), any float width; sums of squares are made so that
            they cannot overflow where float64 can hold them.
        lr: initial step size :math:`h_0` (> 0). The rule forgets it within a few hundred
            steps. 1e-4 is the value of the authors' example code (the paper's text lost it).
        c: factor by which :math:`h` grows or shrinks each step (> 1). 1.05 is the best row of the
            paper's c sweep; 1.001 adapts too slowly, 1.2 is unstable there.
        threshold: :math:`\tau`, the ratio up to which :math:`h` grows (:math:`r \le \tau`), a number in
            :math:`(0, 1)`; default 0.5, the paper's rule, which targets the minimum of the parabola fitted
            along the step. A larger :math:`\tau` targets longer steps, :math:`2\tau` times that minimiser
            (see the module docstring). At 1 or above, a step that does not lower the loss at all would
            grow :math:`h`. Saved with the param groups; a state dict or pickle from before this option
            loads with 0.5, the rule it was saved under.
        probe: ``'same'`` (default: :math:`F(x')` on the step's batch, the paper) or ``'next'`` (the next
            batch's gradient at the step's end point; see the module docstring).
        smoothing: :math:`\beta \in [0, 1)`, the memory of the averaged decreases the rule decides on
            (default 0: none, the paper).
        shrink: the factor :math:`h` is divided by when :math:`r >` threshold (default ``None``: :math:`c`).
        average: ``None`` (default) or the :math:`\gamma` of a polynomial-decay averaged iterate, which
            ``opt.eval()`` puts into the parameters (see the module docstring).
        direction: ``'sgd'`` (default; the paper's algorithm), ``'momentum'`` or ``'adam'`` (see the
            module docstring).
        momentum, nesterov: for ``direction='momentum'`` only: :math:`\mu \in [0, 1)` (default 0.9)
            and Nesterov's form (default ``False``).
        betas, eps: for ``direction='adam'`` only: as in ``torch.optim.Adam`` (default (0.9, 0.999)
            and 1e-8).
        weight_decay: :math:`\lambda` of the regulariser :math:`\tfrac{\lambda}{2}\lVert x\rVert^2`,
            which is part of the objective: it enters the gradient, the prediction and the probe.
        rollback: ``'nonfinite'`` (default), ``'increase'`` or ``None``; see the module docstring.
            With a rollback, ``step`` keeps one copy of the parameters (one parameter-sized
            buffer, reused) to restore them bitwise.
        resolution_guard: treat steps below the loss's resolution as described in the module
            docstring (default ``True``). Leave it on.
        resolution_dtype: a dtype whose resolution the loss has at best, beyond the loss's and the
            parameters' own (see :func:`loss_resolution`). Under autocast pass its dtype
            (e.g. ``torch.bfloat16``): a float32 loss computed from 16-bit activations moves in
            16-bit steps, which no dtype LossGrad can see tells it.
        max_grad_norm: clip :math:`G` to this norm inside ``step``, with the prediction made
            along the clipped step (default ``None``: no clipping).
        min_lr, max_lr: optional bounds on :math:`h` (default 0 and infinity).
        foreach: use the multi-tensor ``torch._foreach_*`` kernels (default: when available).
            Both paths compute the same thing.
        sync_free: keep :math:`h`, :math:`\lVert G\rVert^2` and the ratio as device tensors and
            decide with ``torch.where``, so ``step`` never waits for the device. Default: on for
            parameters off the CPU, off on the CPU, where host numbers are faster.
        probe_grad: evaluate the probe with autograd enabled (the graph is dropped at once), so that
            modules that branch on grad mode compute the same function as at :math:`x`; e.g. an
            eval-mode ``TransformerEncoder`` with a padding mask takes its fast path under
            ``no_grad`` and computes another loss. Default ``False``: the probe runs under
            ``no_grad``, which is cheaper (measured on a 2-core CPU, one thread: the probe's forward
            costs 6% more with grad for the MNIST MLP and 30% more for the CIFAR-10 CNN) and gives the
            same loss for every model that does not branch on grad mode.
        distributed: ``None`` (default): when ``torch.distributed`` is initialised, average the
            pair :math:`(F(x), F(x'))` over ``process_group`` once per step so that every rank
            keeps the same :math:`h` (right for DDP, where gradients are already averaged; without
            it the ranks' step sizes drift apart). ``False``: never communicate, for a rank that
            steps on its own (a local model, evaluation code). ``True``: require an initialised
            process group. Sharded parameters (DTensor, FSDP's flat parameters) are refused:
            their :math:`\lVert G\rVert^2` would be per shard.
        process_group: the group to average over (default: the default group).

    ``step(closure)``: ``closure()`` returns the scalar loss on the current batch and does not
    call ``backward`` (``step`` raises if it does); zero the gradients before ``step`` as with
    any optimizer. ``step`` evaluates it with gradients, back-propagates, takes
    :math:`x' = x - hG`, evaluates ``closure()`` once more at :math:`x'` and updates :math:`h`.
    It returns the loss at :math:`x`. If the probe raises, the parameters are restored to
    :math:`x` (bitwise with a rollback, else by subtracting the step) before the error propagates.
    The closure must run the forward pass each time it is called: one that returns the loss tensor of
    :math:`x` is refused; one over outputs computed before the step is refused on the host path with
    the guard on, and elsewhere its equal probes shrink :math:`h` (see ``resolution_guard``). A loss
    that differentiates with respect to its inputs needs ``probe_grad=True``; the error says so.

    ``step(closure, loss=loss)``: you already ran forward and backward (to reuse the outputs);
    ``step`` then only probes. Gradients left over from the previous step (``backward`` forgotten)
    are refused; gradients you changed in place after ``backward`` (clipping, zeroing) cannot be
    seen: use ``max_grad_norm`` to clip.

    The probe is clean: norm layers in
    training mode normalise with the batch statistics, as at :math:`x`, but no running statistic
    changes (batch norms are switched off tracking; instance norms with tracking, and TorchScript, fx /
    ``torch.export`` graph modules and ``nn.DataParallel``, have their buffers restored); every module the
    probe calls in the optimizer's thread is covered, every step, and in other threads (a thread pool in the
    forward pass) the modules that own a parameter being optimised; a batch norm without parameters run in
    another thread is not covered. With ``step(closure)`` the
    probe replays the random state of the evaluation at :math:`x` (the same dropout masks) and
    the random stream continues as if the probe had not run. With ``loss=`` the forward pass
    happened before ``step``, so the probe's dropout masks differ: use the closure form for such
    models.

    The current :math:`h` is ``param_groups[0]['lr']`` (a float, or a 0-dim tensor when
    ``sync_free``; ``float()`` of either is the step size). ``param_groups[0]['resolved_lr']`` is
    the guard's memory. Both are saved by ``state_dict()``. ``last`` holds the latest step's
    ``loss``, ``probe_loss``, ``ratio``, ``sq_grad_norm`` (of :math:`G`, before clipping),
    ``clip_scale`` :math:`s`, ``slope`` :math:`\langle G, d\rangle`, ``non_descent`` (slope
    :math:`\le 0`), ``undone`` (the step was undone or not taken) and ``skipped`` (not taken:
    :math:`\lVert G\rVert^2` was not finite), each a 0-dim tensor on every path. A direction's buffers
    (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``, ``step``) are per-parameter state, saved by
    ``state_dict()``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-4,
        c: float = 1.05,
        *,
        threshold: float = 0.5,
        probe: str = "same",
        smoothing: float = 0.0,
        shrink: Optional[float] = None,
        average: Optional[float] = None,
        direction: str = "sgd",
        momentum: Optional[float] = None,
        nesterov: bool = False,
        betas: Optional[tuple] = None,
        eps: Optional[float] = None,
        weight_decay: float = 0.0,
        rollback: Optional[str] = "nonfinite",
        resolution_guard: bool = True,
        resolution_dtype: Optional[torch.dtype] = None,
        max_grad_norm: Optional[float] = None,
        min_lr: float = 0.0,
        max_lr: float = math.inf,
        foreach: Optional[bool] = None,
        sync_free: Optional[bool] = None,
        probe_grad: bool = False,
        distributed: Optional[bool] = None,
        process_group=None,
    ):
        if resolution_dtype is not None and not (isinstance(resolution_dtype, torch.dtype)
                                                  and resolution_dtype.is_floating_point):
            raise ValueError(f"resolution_dtype must be a floating-point torch.dtype or None, got {resolution_dtype!r}")
        defaults = dict(lr=lr, c=c, threshold=threshold, probe=probe, smoothing=smoothing, shrink=shrink,
                        average=average, direction=direction, momentum=momentum, nesterov=nesterov,
                        betas=betas, eps=eps, weight_decay=weight_decay, rollback=rollback,
                        resolution_guard=resolution_guard, max_grad_norm=max_grad_norm, min_lr=min_lr, max_lr=max_lr,
                        resolved_lr=math.inf, **_MEMORY)
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
        defaults.update(_checked_options(defaults, direction))  # the constructor's own values, before any group
        foreach, sync_free = _flag("foreach", foreach, allow_none=True), _flag("sync_free", sync_free, allow_none=True)
        self.probe_grad = _flag("probe_grad", probe_grad)
        self.distributed = _flag("distributed", distributed, allow_none=True)
        super().__init__(params, defaults)
        self.foreach = _foreach_available() if foreach is None else foreach
        self.sync_free = sync_free
        self.resolution_dtype = resolution_dtype
        self.process_group = process_group
        self._last: Optional[dict] = None
        self._backup = WeakTensorKeyDictionary()  # param -> its copy before the step, while a rollback is possible
        for group in self.param_groups[1:]:
            group["lr"] = self.param_groups[0]["lr"]  # one object: a value written later is seen as new
        self._note_h(self.param_groups[0]["lr"])
        self._grad_marks: Optional[list] = None  # the gradients the last step used (stale-gradient check)
        self._equal_probes = 0  # consecutive probes equal to F(x) though the step predicted the whole loss away
        self._constructed = True

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group after checking it: nothing is added when a check fails."""
        param_group = dict(param_group)
        if getattr(self, "_constructed", False):  # joins at the current h and guard memory, not h0
            for key in ("lr", "resolved_lr"):
                param_group.setdefault(key, self.param_groups[0][key])
        merged = {**self.defaults, **param_group}
        checked = _checked_options(merged, self.defaults["direction"],
                                   read_device_lr=not getattr(self, "_constructed", False))
        param_group.update({key: value for key, value in checked.items() if key in param_group})
        if self.param_groups:
            first = self.param_groups[0]
            checked = {**self.defaults, **param_group}
            for key in _GLOBAL_OPTIONS:
                if key == "lr":  # read only when given: the default is h itself
                    if checked["lr"] is first["lr"] or (
                            _scalar_value("lr", checked["lr"]) == _scalar_value("lr", first["lr"])):
                        param_group["lr"] = first["lr"]  # the same h as one object
                        continue
                elif checked[key] == first[key]:
                    continue
                raise ValueError(
                    f"param group {len(self.param_groups)} sets {key}={checked[key]!r} but group 0 has "
                    f"{first[key]!r}: LossGrad keeps one step size and one rule for all parameters; "
                    "only weight_decay may differ between groups")
        super().add_param_group(param_group)
        if not hasattr(self, "_after_backward"):
            self._after_backward = WeakTensorKeyDictionary()  # param -> (its gradient, version) after backward
            self._warned_changed_gradients = False
        self._watch_gradients(self.param_groups[-1]["params"])

    def load_state_dict(self, state_dict: dict) -> None:
        _refuse_a_foreign_state_dict(state_dict)
        saved = state_dict["param_groups"][0].get("direction", "sgd") if state_dict["param_groups"] else "sgd"
        if saved != self.defaults["direction"]:
            raise ValueError(f"this state dict was saved by LossGrad(direction={saved!r}) and this optimizer has "
                             f"direction={self.defaults['direction']!r}: build it with direction={saved!r} to resume")
        state_dict = dict(state_dict, state=dict(state_dict["state"]))
        legacy = state_dict["state"].pop("resolved", None)  # before resolved_lr: a flag in optimizer.state
        super().load_state_dict(state_dict)
        # torch casts the buffers to each parameter's dtype; a 16-bit parameter's are kept in float32
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key in _BUFFERS and isinstance(value, Tensor) and _state_dtype(p.dtype) != p.dtype:
                    self.state[p][key] = value.to(device=p.device, dtype=_state_dtype(p.dtype))
        for group in self.param_groups:
            if group["resolved_lr"] is None:  # a resolved run may grow back up to the h it was saved at
                group["resolved_lr"] = _scalar_value("lr", group["lr"]) if legacy else math.inf

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # defaults, state, param_groups: add the settings kept as attributes
        state.update(foreach=self.foreach, sync_free=self.sync_free, probe_grad=self.probe_grad,
                     resolution_dtype=self.resolution_dtype, distributed=self.distributed)
        return state  # the process group does not travel: a copy uses the default group

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for key, value in {**_LEGACY, **_MEMORY}.items():  # pickled before the option existed: the paper's rule
            self.defaults.setdefault(key, value)
        for group in self.param_groups:  # a state dict from an older version lacks newer options
            for key, value in {**_LEGACY, **_MEMORY}.items():  # saved under the paper's rule, whatever our defaults
                group.setdefault(key, value)
            for key, value in self.defaults.items():
                group.setdefault(key, None if key == "resolved_lr" else value)
            group["lr"] = self.param_groups[0]["lr"]  # one object, so that a later write is seen as new
        self._move_h_to_the_parameters()
        for name, value in (("foreach", _foreach_available()), ("sync_free", None), ("probe_grad", False),
                            ("resolution_dtype", None), ("distributed", None), ("process_group", None)):
            self.__dict__.setdefault(name, value)
        self._last, self._backup, self._grad_marks = None, WeakTensorKeyDictionary(), None
        self._equal_probes, self._after_backward, self._warned_changed_gradients = 0, WeakTensorKeyDictionary(), False
        self._watch_gradients([p for group in self.param_groups for p in group["params"]])
        self._note_h(self.param_groups[0]["lr"])
        self._constructed = True

    @property
    def last(self) -> dict:
        """The latest step: loss, probe_loss, ratio, sq_grad_norm, clip_scale, undone, skipped (0-dim tensors)."""
        if self._last is None:
            return {}
        return {k: v if isinstance(v, Tensor) else torch.tensor(v, dtype=torch.bool if isinstance(v, bool) else torch.float64)
                for k, v in self._last.items()}

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None, loss: Optional[Tensor] = None) -> Tensor:
        if closure is None or not callable(closure):
            raise TypeError(
                "LossGrad.step needs a closure that returns the loss on the current batch, without "
                "calling backward, e.g. opt.step(lambda: loss_fn(model(x), y)); got " + repr(closure))
        self._check_no_scheduler()
        if loss is not None and any("training_weights" in self.state.get(p, {})
                                    for group in self.param_groups for p in group["params"]):
            raise RuntimeError("step(closure, loss=loss) after opt.eval(): that loss and its gradients were computed at "
                               "the averaged weights, not at the training weights. Call opt.train() (or "
                               "opt.zero_grad()) before the forward pass")
        self.train()  # the training weights, if eval() put the averaged ones in
        self._adopt_external_lr()
        devices = self._devices()
        rng_at_x = None
        if loss is None:
            rng_at_x = _rng_state(devices)
            marks = _grad_marks(self.param_groups)
            with torch.enable_grad():
                loss_at_x = closure()
                loss = _check_loss(loss_at_x, "closure()")
                if _new_grads(self.param_groups, marks):
                    raise RuntimeError(_BACKWARD_IN_CLOSURE)
                try:
                    loss.backward()
                except RuntimeError as error:
                    if "second time" in str(error):
                        raise RuntimeError(_BACKWARD_IN_CLOSURE) from error
                    raise
        else:
            loss_at_x = loss
            loss = _check_loss(loss, "loss")
            if self._grad_marks is not None and _same_grads(self.param_groups, self._grad_marks):
                raise RuntimeError(
                    "step(closure, loss=loss) found the same gradients as the previous step: call "
                    "loss.backward() on this batch's loss before step (and zero the gradients before it)")
            self._warn_if_gradients_changed_after_backward()

        groups = self._gradient_groups()
        if not groups:
            raise RuntimeError(
                "no parameter has a gradient: with step(closure) the closure's loss must depend on the "
                "parameters; with step(closure, loss=loss) call loss.backward() first")
        options = self.param_groups[0]
        params = [p for group in groups for p in group[0]]
        sync_free = self.sync_free if self.sync_free is not None else any(d.type != "cpu" for d in devices)
        rollback = options["rollback"]
        h = self._current_h(sync_free, groups[0][0][0].device)
        resolved_lr = options["resolved_lr"]
        resolution = max(loss_resolution(dtype) for dtype in
                         {loss.dtype, self.resolution_dtype or loss.dtype} | {p.dtype for p in params})
        rule = dict(c=options["c"], threshold=options["threshold"], rollback=rollback,
                    resolution=resolution if options["resolution_guard"] else 0.0, min_lr=options["min_lr"],
                    max_lr=options["max_lr"], smoothing=options["smoothing"], shrink=options["shrink"])
        memory = {key: options[key] for key in _MEMORY}
        memory = {key: _as_h_tensor(value, h) if sync_free else float(value) for key, value in memory.items()}

        # F(x), G and ||G||^2, the clip scale s, the direction d (with its slope <G, d>), the step x' = x - h d
        f_x = loss.detach()
        sq_norm, reg_x, directions = _directions(groups, self.foreach, host=not sync_free)
        scale = _clip_scale(sq_norm, options["max_grad_norm"])
        gradients = [d for ds in directions for d in ds]
        if not sync_free and rollback is not None and not math.isfinite(sq_norm):
            return self._skip(loss, h, sq_norm, rule, params)  # a non-finite step is never taken
        next_probe = options["probe"] == "next"
        h_before = h
        if next_probe:  # the last step, judged by this batch's gradient at its end point, sets this step's h
            h, ratio, memory = self._judge_the_last_step(params, gradients, h, memory, sync_free, rule)
        if options["direction"] == "sgd":  # d = s G, kept as G with the scale in the step size
            steps, step_scale, slope = gradients, scale, sq_norm * scale
        else:
            finite = torch.isfinite(sq_norm) if sync_free and rollback is not None else None
            steps = self._update_direction(params, _times(gradients, scale, self.foreach), finite, sync_free)
            step_scale, slope = 1.0, _inner(gradients, steps, host=not sync_free)
            if finite is not None:  # G may have been zeroed in place: a non-finite G still reads as one
                slope = torch.where(finite, slope, math.nan)
        if next_probe:
            if not sync_free and rollback is not None and not math.isfinite(slope):
                return self._skip(loss, h_before, sq_norm, rule, params)  # a finite G, a non-finite direction
            return self._step_without_probe(loss, params, steps, step_scale, h, h_before, slope, sq_norm, scale,
                                            ratio, memory, sync_free)
        backup = self._save(params) if rollback is not None else None
        _add_scaled_(params, steps, -h * step_scale, self.foreach)
        if backup is not None:  # the copy restores x: nothing parameter-sized need live through the probe
            directions = gradients = steps = None

        try:
            f_xp = self._probe(closure, rng_at_x, devices, loss_at_x)
            reg_xp = _regulariser(groups, self.foreach, host=not sync_free)
            f_x, f_xp = self._all_reduce_mean(f_x, f_xp)
            if not sync_free and options["resolution_guard"]:
                self._refuse_a_blind_probe(h * slope, f_x.item() + reg_x, f_xp.item() + reg_xp,
                                           lambda: self._closure_reaches_the_parameters(closure, rng_at_x, devices))
        except BaseException:
            self._restore_after_error(params, backup, steps, h * step_scale)
            raise

        if sync_free:
            resolved_lr = _as_h_tensor(resolved_lr, h)
            h, undo, ratio, resolved_lr, memory = next_step_size_tensor(h, slope, f_x + reg_x, f_xp + reg_xp,
                                                                        resolved_lr, memory=memory, **rule)
            if backup is not None:
                for p, saved in zip(params, backup):  # where, not arithmetic: x' may be inf or NaN
                    torch.where(undo, saved, p, out=p)
            skipped = undo & ~torch.isfinite(sq_norm)
        else:
            new_h, undo, ratio, resolved_lr, memory = next_step_size_float(
                h, slope, f_x.item() + reg_x, f_xp.item() + reg_xp, resolved_lr, memory=memory, **rule)
            if undo:
                _copy_(params, backup, self.foreach)
            h, skipped = new_h, False
        self._set_h(h, resolved_lr, memory)
        self._update_average(params)
        self._last = dict(loss=f_x, probe_loss=f_xp, ratio=ratio, sq_grad_norm=sq_norm, clip_scale=scale,
                          slope=slope, non_descent=~(slope > 0) if sync_free else not slope > 0,
                          undone=undo, skipped=skipped)
        self._grad_marks = _grad_marks(self.param_groups)
        self._after_backward = WeakTensorKeyDictionary()  # the next step compares only its own backward's records
        return loss

    def _update_direction(self, params, gradients, finite, sync_free) -> list:
        """Updates the direction's buffers from the (clipped) gradient, once per step, and returns d.

        ``finite`` (sync-free path with a rollback): a 0-dim bool; where False the buffers are left as they
        were (a non-finite gradient never enters them), without a host sync."""
        options = self.param_groups[0]
        device = params[0].device
        gradients = [_at_least_32_bit(g) for g in gradients]  # the buffers' dtype: float32 for 16-bit parameters
        if finite is not None:  # zeroed in place where this step made G (weight decay, clipping, widening)
            users = {id(p.grad) for p in params}
            gradients = [torch.where(finite, g, 0.0) if id(g) in users else g.masked_fill_(~finite, 0.0)
                         for g in gradients]
            gate = lambda on, off: torch.where(finite, torch.full((), on, dtype=_h_dtype(device), device=device),
                                               off)  # torch.full: a fill kernel, not a host-to-device copy
        else:
            gate = lambda on, off: on
        states = [self.state[p] for p in params]
        if options["direction"] == "momentum":
            mu = options["momentum"]
            buffers = [_state_tensor(st, "momentum_buffer", p) for st, p in zip(states, params)]
            _mul_(buffers, gate(mu, 1.0), self.foreach)  # v <- mu v + G
            _add_(buffers, gradients, 1.0, self.foreach)
            if not options["nesterov"]:
                return buffers
            if self.foreach:  # d = G + mu v
                return torch._foreach_add(gradients, buffers, alpha=mu)
            return [g.add(b, alpha=mu) for g, b in zip(gradients, buffers)]
        beta1, beta2 = options["betas"]
        real = lambda t: torch.view_as_real(t) if t.is_complex() else t  # as torch's Adam: parts separately
        exp_avg = [real(_state_tensor(st, "exp_avg", p)) for st, p in zip(states, params)]
        exp_avg_sq = [real(_state_tensor(st, "exp_avg_sq", p)) for st, p in zip(states, params)]
        gradients = [real(g) for g in gradients]  # gated: zero where a rollback keeps a non-finite G out
        _mul_(exp_avg, gate(beta1, 1.0), self.foreach)  # m <- b1 m + (1 - b1) G, in place
        _add_(exp_avg, gradients, 1.0 - beta1, self.foreach)
        _mul_(exp_avg_sq, gate(beta2, 1.0), self.foreach)  # v <- b2 v + (1 - b2) G^2, in place
        if self.foreach:
            torch._foreach_addcmul_(exp_avg_sq, gradients, gradients, value=1.0 - beta2)
        else:
            for v, g in zip(exp_avg_sq, gradients):
                v.addcmul_(g, g, value=1.0 - beta2)
        d = []
        for st, p, m, v in zip(states, params, exp_avg, exp_avg_sq):  # per tensor: each has its own step count
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=device if sync_free else "cpu")
            st["step"] = st["step"] + (finite.to(st["step"].dtype) if finite is not None else 1.0)
            if sync_free:
                t = st["step"].to(_h_dtype(device))
                correction1, root_correction2 = 1 - beta1 ** t, (1 - beta2 ** t).sqrt()
            else:
                t = float(st["step"])
                correction1, root_correction2 = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
            step = v.sqrt().div_(_like(root_correction2, v)).add_(options["eps"])  # one new tensor: d
            torch.div(m, step, out=step).div_(_like(correction1, m))  # m^ / (sqrt(v^) + eps)
            d.append(torch.view_as_complex(step) if p.is_complex() else step)
        return d

    # --------------------------------------------------------------- helpers
    def _skip(self, loss, h, sq_norm, rule, params):
        """The step is not taken (its gradient is not finite): h shrinks as for a non-finite probe, and with
        probe='next' the last step is not judged by it (nor is this one, never taken). The averaged iterate takes
        in x once more, as on the sync-free path, where the step is taken and undone."""
        new_h = min(max(h / rule["c"], rule["min_lr"]), rule["max_lr"])
        self._set_h(new_h, self.param_groups[0]["resolved_lr"], dict(previous_slope=math.nan))
        self._update_average(params)
        self._last = dict(loss=loss.detach(), probe_loss=math.nan, ratio=math.nan, sq_grad_norm=sq_norm,
                          clip_scale=math.nan, slope=math.nan, non_descent=True, undone=True, skipped=True)
        self._grad_marks = _grad_marks(self.param_groups)
        return loss

    def _set_h(self, h, resolved_lr, memory: Optional[dict] = None) -> None:
        for group in self.param_groups:
            group["lr"] = h
            group["resolved_lr"] = resolved_lr
            group.update(memory or {})
        self._note_h(h)

    # ------------------------------------------------------ the averaged iterate
    def eval(self) -> None:
        """With ``average``: puts the averaged iterate into the parameters (keeping the training weights), for
        evaluation. ``train()``, the next ``step`` or ``zero_grad`` puts the training weights back. Without
        ``average`` it does nothing."""
        if self.param_groups[0]["average"] is None:
            return
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "average" in state and "training_weights" not in state:
                    state["training_weights"] = p.detach().clone()
                    with torch.no_grad():
                        p.copy_(state["average"])  # a 16-bit parameter's float32 average, rounded once

    def train(self) -> None:
        """Puts the training weights back after :meth:`eval` (bitwise); does nothing otherwise."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if "training_weights" in state:
                    with torch.no_grad():
                        p.copy_(state["training_weights"])
                    # a new dict: a state_dict() taken while evaluating keeps the training weights it holds
                    self.state[p] = {k: v for k, v in state.items() if k != "training_weights"}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.train()
        super().zero_grad(set_to_none=set_to_none)

    def _update_average(self, params) -> None:
        """x_bar <- x_bar + w (x - x_bar), w = (1 + gamma) / (t + gamma) at the t-th step (polynomial-decay averaging,
        Shamir & Zhang 2013, as DoG uses it); w is a host number, so no path waits for the device."""
        gamma = self.param_groups[0]["average"]
        if gamma is None:
            return
        t = self.param_groups[0].get("averaged_steps", 0) + 1
        for group in self.param_groups:
            group["averaged_steps"] = t
        weight = (1.0 + gamma) / (t + gamma)
        stepped = {id(p) for p in params}
        averages, points = [], []
        for group in self.param_groups:  # every averaged parameter, moved this step or not (its x_t is x_{t-1})
            for p in group["params"]:
                state = self.state[p]
                if id(p) in stepped and ("average" not in state or state["average"].shape != p.shape):
                    state["average"] = p.detach().to(_state_dtype(p.dtype), copy=True)  # its first step: x itself
                if "average" in state:
                    averages.append(state["average"])
                    points.append(_at_least_32_bit(p.detach()))
        if not averages:
            return
        if self.foreach:
            torch._foreach_lerp_(averages, points, weight)
        else:
            for a, x in zip(averages, points):
                a.lerp_(x, weight)

    def _judge_the_last_step(self, params, gradients, h, memory, sync_free, rule):
        """probe='next': the step size for this step, from the last step judged by this batch's gradient G at
        its end point (s1 = <G, d_last>) against its start slope s0 (see the module docstring). The first step,
        one after a step that was not taken, and a non-descent one keep h; a parameter that did not move in the last
        step (new, or without a gradient then) adds nothing to s1."""
        pairs = [(g, self.state[p]["previous_step"]) for g, p in zip(gradients, params)
                 if "previous_step" in self.state.get(p, {}) and self.state[p]["previous_step"].shape == p.shape]
        if not pairs:  # a parameter new since the last step did not move in it: it adds nothing to s1
            return h, (torch.full((), math.nan, dtype=h.dtype, device=h.device) if sync_free else math.nan), memory
        s1 = _inner([g for g, _ in pairs], [d for _, d in pairs], host=not sync_free)
        judge = judge_by_slopes_tensor if sync_free else judge_by_slopes_float
        return judge(h, memory["previous_slope"], s1, memory, c=rule["c"], threshold=rule["threshold"],
                     smoothing=rule["smoothing"], shrink=rule["shrink"], min_lr=rule["min_lr"], max_lr=rule["max_lr"])

    def _step_without_probe(self, loss, params, steps, step_scale, h, h_before, slope, sq_norm, scale, ratio, memory,
                            sync_free):
        """probe='next': x' = x - h d is taken without a probe; d and <G, d> are kept for the next step's verdict.
        A non-finite gradient is never stepped into with a rollback (the host path skipped it before; here the
        sync-free path puts x back from its copy), and its step is not judged later."""
        rollback = self.param_groups[0]["rollback"]
        backup = self._save(params) if rollback is not None and sync_free else None
        _add_scaled_(params, steps, -h * step_scale, self.foreach)
        kept = [_state_tensor(self.state[p], "previous_step", p) for p in params]
        _copy_(kept, _times(steps, step_scale, self.foreach), self.foreach)  # d, as this step took it
        stepped = {id(p) for p in params}
        for group in self.param_groups:  # a parameter without a gradient did not move: its d is 0
            for p in group["params"]:
                if id(p) not in stepped and "previous_step" in self.state.get(p, {}):
                    self.state[p]["previous_step"].zero_()
        if sync_free:
            finite = torch.isfinite(sq_norm) & torch.isfinite(slope)
            undo = ~finite if rollback is not None else torch.zeros_like(finite)
            if backup is not None:
                for p, saved in zip(params, backup):
                    torch.where(undo, saved, p, out=p)
                rule = self.param_groups[0]  # a step not taken shrinks h by c, whatever the verdict (as _skip)
                h = torch.where(undo, (h_before / rule["c"]).clamp(rule["min_lr"], rule["max_lr"]), h)
            memory = dict(memory, previous_slope=torch.where(finite, slope.to(h.dtype), math.nan))
            skipped = undo
        else:
            undo = skipped = False
            memory = dict(memory, previous_slope=slope if math.isfinite(slope) else math.nan)
        self._set_h(h, self.param_groups[0]["resolved_lr"], memory)
        self._update_average(params)
        nan = torch.full((), math.nan) if not sync_free else torch.full((), math.nan, device=h.device)
        self._last = dict(loss=loss.detach(), probe_loss=nan, ratio=ratio, sq_grad_norm=sq_norm, clip_scale=scale,
                          slope=slope, non_descent=~(slope > 0) if sync_free else not slope > 0,
                          undone=undo, skipped=skipped)
        self._grad_marks = _grad_marks(self.param_groups)
        self._after_backward = WeakTensorKeyDictionary()
        return loss

    def _check_no_scheduler(self) -> None:
        if any("initial_lr" in group for group in self.param_groups):
            raise RuntimeError(
                "an LR scheduler is attached to LossGrad (param_groups have 'initial_lr'): LOSSGRAD sets the "
                "step size itself each step, and a scheduler writing param_groups[i]['lr'] would fight the rule "
                "without a word. Remove the scheduler and its mark (for g in opt.param_groups: "
                "g.pop('initial_lr')); bound h with min_lr/max_lr, or set param_groups[i]['lr'] by hand to "
                "restart the rule from a chosen h")

    def _adopt_external_lr(self) -> None:
        """A value written into param_groups[i]['lr'] since the last step becomes h (with a warning)."""
        changed = list({id(g["lr"]): g["lr"] for g in self.param_groups if not self._is_h(g["lr"])}.values())
        if not changed:
            return
        options = self.param_groups[0]
        low, high = options["min_lr"], options["max_lr"]
        if all(isinstance(v, Tensor) and v.numel() == 1 and v.device.type != "cpu" for v in changed):
            # A device h written in place (ReduceLROnPlateau on the sync-free path), or device tensors written into
            # the groups (the first group's is taken): unread, because reading would wait for the device; a value
            # that is not a finite number > 0 keeps the last h.
            value = changed[0].reshape(())
            usable = torch.isfinite(value) & (value > 0)
            bounded = torch.where(usable, value.clamp(low, high).to(_h_dtype(value.device)),
                                  _as_h_tensor(self._h_before, value.device))
            warnings.warn("param_groups[i]['lr'] was changed outside LossGrad: it is the new step size h (held to "
                          "[min_lr, max_lr]; not read on the device, so a value that is not a finite number > 0 "
                          "keeps the previous h) and the rule adapts from it. A scheduler such as "
                          "ReduceLROnPlateau therefore only restarts h; LOSSGRAD picks the step size itself",
                          stacklevel=3)
        else:
            values = [_scalar_value("lr", v) for v in changed]
            bad = [v for v in values if not (math.isfinite(v) and v > 0)]
            if bad:
                raise ValueError(f"param_groups[i]['lr'] was set to {bad[0]!r}; h must be a finite number > 0")
            if len(set(values)) > 1:
                raise ValueError(f"param groups were given different step sizes {sorted(set(values))}: LossGrad "
                                 "keeps one h for all groups; write the same value into every param_groups[i]['lr']")
            value = values[0]
            bounded = min(max(value, low), high)
            warnings.warn(
                f"param_groups[i]['lr'] was changed outside LossGrad (to {value:.4g}"
                + (f", held to [min_lr, max_lr] as {bounded:.4g}" if bounded != value else "")
                + "): it is the new step size h and the rule adapts from it. A scheduler such as ReduceLROnPlateau "
                "therefore only restarts h; LOSSGRAD picks the step size itself", stacklevel=3)
        for group in self.param_groups:  # a float: the sync-free path turns it into its tensor at the step
            group["lr"] = bounded
        self._note_h(bounded)

    def _move_h_to_the_parameters(self) -> None:
        """A tensor h loaded onto another device (a checkpoint mapped to the CPU) goes where the parameters are."""
        params = [p for group in self.param_groups for p in group["params"]]
        if not params:
            return
        device = params[0].device
        for key in ("lr", "resolved_lr"):
            value = self.param_groups[0][key]
            if isinstance(value, Tensor) and value.device != device:
                moved = value.to(device=device, dtype=_h_dtype(device))
                for group in self.param_groups:
                    group[key] = moved

    def _note_h(self, h) -> None:
        """Remembers the h LossGrad wrote (the object, and a tensor's version), to see writes from outside."""
        self._h_written, self._h_version = h, h._version if isinstance(h, Tensor) else None
        self._h_before = h.detach().clone() if isinstance(h, Tensor) else h  # its value, if written in place

    def _is_h(self, value) -> bool:
        return value is self._h_written and (not isinstance(value, Tensor) or value._version == self._h_version)

    def _gradient_groups(self):
        """[(params, grads, weight_decay)] over the groups, parameters without a gradient left out."""
        out = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                if any(p.grad.is_sparse for p in params):
                    raise RuntimeError("LossGrad does not support sparse gradients; use dense embeddings")
                _refuse_sharded(params)
                out.append((params, [p.grad for p in params], group["weight_decay"]))
        return out

    def _devices(self):
        return sorted({p.device for g in self.param_groups for p in g["params"]}, key=str)

    def _current_h(self, sync_free: bool, device: torch.device):
        h = self.param_groups[0]["lr"]
        if not sync_free:
            return float(h)  # on the CPU this costs nothing
        return _as_h_tensor(h, device)

    def _save(self, params: list) -> list:
        """A copy of the parameters before the step, in buffers kept between steps."""
        kept, buffers = WeakTensorKeyDictionary(), []
        for p in params:  # only this step's parameters keep a buffer, and only while they live
            buf = self._backup.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = torch.empty_like(p, memory_format=torch.preserve_format)
            kept[p] = buf
            buffers.append(buf)
        self._backup = kept
        _copy_(buffers, params, self.foreach)
        return buffers

    def _restore_after_error(self, params, backup, steps, step_size) -> None:
        """x back from the copy, else by subtracting the step (recomputed: the same arithmetic as the step)."""
        if backup is not None:
            _copy_(params, backup, self.foreach)
        else:
            _add_scaled_(params, steps, step_size, self.foreach)

    def _probe(self, closure, rng_at_x, devices, loss_at_x) -> Tensor:
        """F_B(x') with the random state of the evaluation at x and no side effect on norm statistics."""
        rng_after = _rng_state(devices)
        if rng_at_x is not None:
            _set_rng_state(rng_at_x, devices)
        try:
            with _QuietNormLayers(self._param_ids()), torch.set_grad_enabled(self.probe_grad):
                probe = closure()
        except RuntimeError as error:
            if not self.probe_grad and "does not require grad" in str(error):
                raise RuntimeError(_PROBE_NEEDS_GRAD) from error
            raise
        finally:
            _set_rng_state(rng_after, devices)
        if _same_tensor_data(probe, loss_at_x):
            raise RuntimeError(_STALE_CLOSURE + " (it returned the loss tensor it returned at x, or one in the same "
                               "memory: a graph replayed with static outputs, as CUDA graphs do, must return a clone)")
        return _check_loss(probe, "closure()").detach()

    def _param_ids(self) -> set:
        return {id(p) for group in self.param_groups for p in group["params"]}

    def _refuse_a_blind_probe(self, predicted_decrease: float, f_x: float, f_xp: float, reaches) -> None:
        """Counts steps in a row whose probe equals F(x) != 0 exactly; at every ``_BLIND_PROBES``-th, raises unless
        ``reaches()`` finds that the closure's loss depends on the parameters (a loss below its float resolution, a
        piecewise-constant loss with surrogate gradients, or a step that lands on an equal loss does; a closure
        over outputs computed before the step does not). Costs one forward and backward per such run of steps."""
        equal = predicted_decrease > 0 and f_xp == f_x != 0
        self._equal_probes = self._equal_probes + 1 if equal else 0
        if self._equal_probes >= _BLIND_PROBES:
            self._equal_probes = 0
            if not reaches():
                raise RuntimeError(f"{_STALE_CLOSURE} (its loss at x' equalled F(x) = {f_x!r} exactly in "
                                   f"{_BLIND_PROBES} steps in a row, and it does not depend on the parameters)")

    def _closure_reaches_the_parameters(self, closure, rng_at_x, devices) -> bool:
        """Whether the closure, evaluated now (at x') with autograd on, returns a loss with a gradient with respect
        to some parameter; no side effect on norm statistics, the random stream or ``.grad``."""
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        rng_after = _rng_state(devices)
        if rng_at_x is not None:
            _set_rng_state(rng_at_x, devices)
        try:
            with _QuietNormLayers(self._param_ids()), torch.enable_grad():
                value = closure()
                if not (isinstance(value, Tensor) and value.requires_grad):
                    return False
                grads = torch.autograd.grad(value.sum(), params, allow_unused=True)
        except RuntimeError:  # e.g. 'backward through the graph a second time': outputs from before the step
            return False
        finally:
            _set_rng_state(rng_after, devices)
        return any(g is not None for g in grads)

    def _watch_gradients(self, params) -> None:
        """Notes each gradient's version when backward has written it, to see in-place changes made after it."""
        owner = weakref.ref(self)
        if "_hooks" not in self.__dict__:  # (ids of the parameters watched, their hooks' handles)
            self._hooks = (set(), [])
            weakref.finalize(self, _remove_hooks, self._hooks[1])  # no hook outlives its optimizer
        watched, handles = self._hooks
        for p in params:
            if isinstance(p, Tensor) and p.requires_grad and hasattr(p, "register_post_accumulate_grad_hook") \
                    and id(p) not in watched:  # ids, not weak references: torch.utils.swap_tensors stays possible
                def written(param, owner=owner):
                    optimizer = owner()
                    if optimizer is not None and param.grad is not None:
                        optimizer._after_backward[param] = (weakref.ref(param.grad), param.grad._version)
                watched.add(id(p))
                handles.append(p.register_post_accumulate_grad_hook(written))

    def _warn_if_gradients_changed_after_backward(self) -> None:
        """Warns once when a gradient was changed in place after backward (clipping, unscaling)."""
        dist = torch.distributed
        if self._warned_changed_gradients or (dist.is_available() and dist.is_initialized()):
            return  # DDP writes the averaged gradients after backward's hooks: not a change of the user's
        for group in self.param_groups:
            for p in group["params"]:
                mark = self._after_backward.get(p)
                if p.grad is not None and mark is not None and (mark[0]() is not p.grad or
                                                                p.grad._version != mark[1]):
                    self._warned_changed_gradients = True
                    warnings.warn(
                        "the gradients were changed in place after backward (clipped? unscaled?) and before "
                        "step(closure, loss=loss): the rule predicts the loss's change along the gradient of the "
                        "loss you passed, so a clipped gradient biases h. Clip inside step with "
                        "LossGrad(..., max_grad_norm=...). (Unscaling a GradScaler's gradients while passing the "
                        "unscaled loss is consistent: then ignore this.) Said once", stacklevel=3)
                    return

    def _all_reduce_mean(self, f_x: Tensor, f_xp: Tensor):
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        if self.distributed is False or (self.distributed is None and not initialised):
            return f_x, f_xp
        if not initialised:
            raise RuntimeError("LossGrad(distributed=True) needs torch.distributed to be initialised "
                               "(dist.init_process_group) before step")
        pair = torch.stack([f_x, f_xp]).to(_h_dtype(f_x.device))
        dist.all_reduce(pair, op=dist.ReduceOp.SUM, group=self.process_group)
        pair = pair / dist.get_world_size(self.process_group)
        return pair[0], pair[1]


# ------------------------------------------------------------------- the rule
def next_step_size_float(h, slope, f_x, f_xp, resolved_lr=math.inf, *, c, threshold=0.5, rollback, resolution, min_lr,
                         max_lr, smoothing=0.0, shrink=None, memory=None):
    """One decision of the rule on host numbers; ``slope`` is <G, d> (||G||^2 unclipped); h grows if ratio <= threshold
    (with ``smoothing``, the ratio of the averaged numerator and denominator in ``memory``), else shrinks by
    ``shrink`` (None: c).

    Returns (new h, undo the step?, ratio, resolved_lr: the h chosen after the last resolved step kept, memory)."""
    memory = dict(_MEMORY, **(memory or {}))
    lred = h * slope
    diff = f_xp - f_x
    noise = resolution * abs(f_x)
    finite = math.isfinite(f_xp) and math.isfinite(f_x) and math.isfinite(slope)
    if rollback == "increase":
        undo = not (diff <= noise and finite)
    elif rollback == "nonfinite":
        undo = not finite
    else:
        undo = False
    ratio = (diff + lred) / lred if lred > 0 else math.nan
    blind = resolution > 0 and lred > 0 and diff == 0 and f_x != 0 and lred >= BLIND_FRACTION * abs(f_x)
    # a blind probe is not 'unresolved': it is read as Algorithm 1 reads it (r = 1, h shrinks)
    unresolved = resolution > 0 and slope > 0 and not blind and ((lred < noise and abs(diff) <= noise) or diff == 0)
    if undo:  # too long a step; but a finite rise along a non-descent direction is the direction's doing
        new_h = h / c if lred > 0 or not (math.isfinite(f_xp) and math.isfinite(slope)) else h
    elif unresolved:
        new_h = max(h, min(h * c, resolved_lr))  # the probe cannot see this step: climb back, never past
    elif not lred > 0:
        new_h = h  # zero gradient: nothing to learn from
    else:
        decisive, memory = _smoothed_float(ratio, diff + lred, lred, memory, smoothing)
        new_h = h * c if decisive <= threshold else h / (shrink or c)
    new_h = min(max(new_h, min_lr), max_lr)
    if lred > 0 and not unresolved and not undo:
        resolved_lr = new_h
    return new_h, undo, ratio, resolved_lr, memory


def _smoothed_float(ratio, num, den, memory, smoothing):
    """The ratio the rule decides on: r itself, or with ``smoothing`` b the ratio of the exponential moving averages
    of its numerator and denominator (r_bar = N/D, N <- b N + (1 - b) num, D <- b D + (1 - b) den), and the memory."""
    if not smoothing:
        return ratio, memory
    if not (math.isfinite(num) and math.isfinite(den)):
        return ratio, memory  # a NaN ratio shrinks h and never enters the averages
    n = smoothing * memory["smoothed_num"] + (1 - smoothing) * num
    d = smoothing * memory["smoothed_den"] + (1 - smoothing) * den
    return n / d, dict(memory, smoothed_num=n, smoothed_den=d)


def judge_by_slopes_float(h, s0, s1, memory, *, c, threshold=0.5, smoothing=0.0, shrink=None, min_lr=0.0,
                          max_lr=math.inf):
    """probe='next' on host numbers: the last step x -> x - h d, whose start slope on its own batch was ``s0`` =
    <G_last, d>, judged by ``s1`` = <G, d>, the slope of the next batch's loss at its end point. On the parabola
    with those end slopes r = (s0 - s1) / (2 s0); h grows when r <= threshold (as on the paper's parabola).
    Returns (new h, r, memory); no step to judge (s0 NaN) or a non-descent one (s0 <= 0) keeps h, and a non-finite
    s1 shrinks it."""
    memory = dict(_MEMORY, **(memory or {}))
    if not (math.isfinite(s0) and s0 > 0):
        return h, math.nan, memory
    if not math.isfinite(s1):
        return min(max(h / c, min_lr), max_lr), math.nan, memory
    ratio = (s0 - s1) / (2 * s0)
    decisive, memory = _smoothed_float(ratio, h * (s0 - s1) / 2, h * s0, memory, smoothing)
    new_h = h * c if decisive <= threshold else h / (shrink or c)
    return min(max(new_h, min_lr), max_lr), ratio, memory


def judge_by_slopes_tensor(h, s0, s1, memory, *, c, threshold=0.5, smoothing=0.0, shrink=None, min_lr=0.0,
                           max_lr=math.inf):
    """:func:`judge_by_slopes_float` with tensor ops only (no host sync)."""
    dtype = h.dtype
    s0, s1 = s0.to(dtype), s1.to(dtype)
    judged = torch.isfinite(s0) & (s0 > 0)
    ratio = torch.where(judged & torch.isfinite(s1), (s0 - s1) / torch.where(judged, 2 * s0, torch.ones_like(s0)),
                        math.nan)
    decisive, memory = _smoothed_tensor(ratio, h * (s0 - s1) / 2, h * s0, memory, smoothing, judged)
    by_ratio = torch.where(decisive <= threshold, h * c, h / (shrink or c))
    new_h = torch.where(judged, torch.where(torch.isfinite(s1), by_ratio, h / c), h).clamp(min_lr, max_lr)
    return new_h, ratio, memory


def _smoothed_tensor(ratio, num, den, memory, smoothing, counted):
    """:func:`_smoothed_float` with tensor ops only; ``counted``: where this step may enter the averages."""
    if not smoothing:
        return ratio, memory
    counted = counted & torch.isfinite(num) & torch.isfinite(den)
    n = torch.where(counted, smoothing * memory["smoothed_num"] + (1 - smoothing) * num, memory["smoothed_num"])
    d = torch.where(counted, smoothing * memory["smoothed_den"] + (1 - smoothing) * den, memory["smoothed_den"])
    decisive = torch.where(counted, n / torch.where(counted, d, torch.ones_like(d)), ratio)
    return decisive, dict(memory, smoothed_num=n, smoothed_den=d)


def next_step_size_tensor(h, slope, f_x, f_xp, resolved_lr=None, *, c, threshold=0.5, rollback, resolution, min_lr,
                          max_lr, smoothing=0.0, shrink=None, memory=None):
    """The same decision as :func:`next_step_size_float` with tensor ops only (no host sync).

    Returns (new h, undo mask, ratio, resolved_lr, memory)."""
    memory = {key: torch.as_tensor(value, dtype=h.dtype, device=h.device) if not isinstance(value, Tensor) else value
              for key, value in dict(_MEMORY, **(memory or {})).items()}
    if resolved_lr is None:
        resolved_lr = torch.full_like(h, math.inf)
    dtype = h.dtype
    slope, f_x, f_xp = slope.to(dtype), f_x.to(dtype), f_xp.to(dtype)
    lred = h * slope
    diff = f_xp - f_x
    noise = resolution * f_x.abs()
    positive = lred > 0
    ratio = torch.where(positive, (diff + lred) / torch.where(positive, lred, torch.ones_like(lred)),
                        torch.full_like(lred, math.nan))
    finite = torch.isfinite(f_xp) & torch.isfinite(f_x) & torch.isfinite(slope)
    if rollback == "increase":
        undo = ~((diff <= noise) & finite)
    elif rollback == "nonfinite":
        undo = ~finite
    else:
        undo = torch.zeros_like(positive)
    if resolution > 0:
        blind = positive & (diff == 0) & (f_x != 0) & (lred >= BLIND_FRACTION * f_x.abs())  # read as r = 1
        unresolved = (slope > 0) & ~blind & (((lred < noise) & (diff.abs() <= noise)) | (diff == 0))
    else:
        blind = unresolved = torch.zeros_like(positive)
    decides = positive & ~unresolved & ~undo
    decisive, memory = _smoothed_tensor(ratio, diff + lred, lred, memory, smoothing, decides)
    by_ratio = torch.where(positive, torch.where(decisive <= threshold, h * c, h / (shrink or c)), h)
    climb = torch.maximum(h, torch.minimum(h * c, resolved_lr))
    shrunk = torch.where(positive | ~torch.isfinite(f_xp) | ~torch.isfinite(slope), h / c, h)
    kept = torch.where(unresolved, climb, by_ratio)
    new_h = torch.where(undo, shrunk, kept).clamp(min_lr, max_lr)
    resolved_lr = torch.where(decides, new_h, resolved_lr)
    return new_h, undo, ratio, resolved_lr, memory


# ------------------------------------------------------ multi-tensor / per-tensor
def _foreach_available() -> bool:
    return hasattr(torch, "_foreach_add_") and hasattr(torch, "_foreach_mul")


def _sq_sum(tensors: list, foreach: bool, host: bool = False):
    """sum_i ||t_i||^2 (|t|^2 for complex), never overflowing where float64 can hold it.

    ``host``: a Python float, summed in float32 (float64 for float64 tensors) and summed again in float64
    only if that overflowed (float64 sums cost three times as much on the CPU). Else a 0-dim tensor summed in
    float64 (float32 on MPS, which has no float64)."""
    device = tensors[0].device
    wide = _h_dtype(device)
    if not host:
        return torch.stack([p.to(device) for p in _powsums(tensors, foreach, wide)]).sum()
    for accumulate in (None, wide):
        parts = _powsums(tensors, foreach, accumulate)
        if device.type == "cpu":
            total = _host_sum(parts)
        else:
            total = torch.stack([p.to(device=device, dtype=wide) for p in parts]).sum().item()
        if math.isfinite(total):
            break
    return total


def _host_sum(parts: list) -> float:
    """Sum of 0-dim CPU tensors as a Python float: exactly rounded (fsum) when finite, else inf or NaN."""
    values = [p.item() for p in parts]
    return math.fsum(values) if all(math.isfinite(v) for v in values) else sum(values)


def _powsums(tensors: list, foreach: bool, dtype: Optional[torch.dtype]) -> list:
    """||t||^2 of each tensor, accumulated in ``dtype`` (None: float32, or float64 for 64-bit tensors)."""
    def accumulate(t):
        return dtype or _wide_dtype(t.dtype)

    parts = []
    for acc in {accumulate(t) for t in tensors}:
        bucket = [t for t in tensors if accumulate(t) == acc]
        if not (foreach and hasattr(torch, "_foreach_powsum")):
            parts += [_chunked_dot(t, t, acc) for t in bucket]
            continue
        native = [t for t in bucket if _real_dtype(t.dtype) == acc]  # summed where they lie, no copy
        if native:
            parts += torch._foreach_powsum(native, 2, dtype=acc)
        widened = [t for t in bucket if _real_dtype(t.dtype) != acc]  # widened a bounded number at a time
        parts += [_chunked_dot(t, t, acc) for t in widened if t.numel() > _CHUNK]
        for batch in _batches([t for t in widened if t.numel() <= _CHUNK]):
            parts += torch._foreach_powsum(batch, 2, dtype=acc)
    return parts


def _batches(items: list) -> list:
    """Consecutive runs of ``items`` (tensors, or pairs sized by their last tensor) of at most ``_CHUNK``
    elements together; a larger one alone."""
    out, size = [], 0
    for item in items:
        numel = (item[-1] if isinstance(item, tuple) else item).numel()
        if not out or size + numel > _CHUNK:
            out.append([])
            size = 0
        out[-1].append(item)
        size += numel
    return out


#: Elements widened at a time for a sum in a wider dtype (and added at a time on the sync-free path): the
#: transient copies stay below 1 << 20 elements (8 MiB in float64), not the size of the largest tensor.
_CHUNK = 1 << 20


def _chunked_dot(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """Re <x, y> accumulated in ``dtype``, widening ``_CHUNK`` elements at a time (0-dim tensor)."""
    flat = lambda t: (torch.view_as_real(t) if t.is_complex() else t).reshape(-1)
    square = x is y
    x, y = flat(x), flat(y)
    pieces = []
    for start in range(0, max(x.numel(), 1), _CHUNK):
        a = x[start:start + _CHUNK].to(dtype)
        pieces.append(torch.dot(a, a if square else y[start:start + _CHUNK].to(dtype)))
        del a  # before the next piece is widened
    return pieces[0] if len(pieces) == 1 else torch.stack(pieces).sum()


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


def _directions(groups, foreach: bool, host: bool):
    """G = g + wd x per group, ||G||^2 summed over all groups, and the regulariser at x."""
    directions, sq_norm = [], 0
    for params, grads, wd in groups:
        if wd:
            d = torch._foreach_add(grads, params, alpha=wd) if foreach else [g.add(p, alpha=wd) for g, p in zip(grads, params)]
        else:
            d = grads
        directions.append(d)
        sq_norm = sq_norm + _sq_sum(d, foreach, host)
    return sq_norm, _regulariser(groups, foreach, host), directions


def _regulariser(groups, foreach: bool, host: bool):
    """sum over groups of wd/2 ||x||^2 at the current parameters."""
    reg = 0
    for params, _, wd in groups:
        if wd:
            reg = reg + 0.5 * wd * _sq_sum(params, foreach, host)
    return reg


def _clip_scale(sq_norm, max_norm):
    """s = min(1, max_norm / ||G||): 1.0 without clipping (a host float, or a tensor like sq_norm)."""
    if max_norm is None:
        return 1.0
    if isinstance(sq_norm, Tensor):
        return (max_norm / sq_norm.sqrt()).clamp(max=1.0)
    return min(1.0, max_norm / math.sqrt(sq_norm)) if sq_norm > 0 else 1.0


def _scaled_by_dtype(tensors: list, scale: Tensor, foreach: bool) -> list:
    """New tensors t * scale, each computed and kept in its dtype widened to float32 at least, so that a small
    step size is not rounded to a 16-bit dtype (and the product not rounded before it is added)."""
    out = [None] * len(tensors)
    for dtype in {t.dtype for t in tensors}:
        index = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        bucket = [_at_least_32_bit(tensors[i]) for i in index]
        s = _like(scale, bucket[0])
        products = torch._foreach_mul(bucket, s) if foreach else [t * s for t in bucket]
        for i, t in zip(index, products):
            out[i] = t
    return out


def _times(tensors: list, scale, foreach: bool) -> list:
    """New tensors t * scale for a Python number or a 0-dim tensor (each in its own dtype's arithmetic)."""
    if isinstance(scale, Tensor):
        return _scaled_by_dtype(tensors, scale, foreach)
    if scale == 1.0:
        return tensors
    return torch._foreach_mul(tensors, scale) if foreach else [t * scale for t in tensors]


def _mul_(tensors: list, scale, foreach: bool) -> None:
    """t *= scale in place, for a Python number or a 0-dim tensor."""
    if isinstance(scale, Tensor):
        for t in tensors:
            t.mul_(_like(scale, t))
    elif foreach:
        torch._foreach_mul_(tensors, scale)
    else:
        for t in tensors:
            t.mul_(scale)


def _like(scale, tensor: Tensor):
    """A scalar ready to multiply ``tensor``: a Python number as it is, a tensor on its device in a wide dtype."""
    if not isinstance(scale, Tensor):
        return scale
    return scale.to(device=tensor.device, dtype=_wide_dtype(tensor.dtype))


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which sums and scalars for tensors of ``dtype`` are made: float64 for 64-bit ones, else float32."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def _inner(a: list, b: list, host: bool):
    """Re sum_i <a_i, b_i>: a Python float when ``host`` (float64 where float32 overflows), else a 0-dim tensor."""
    device = a[0].device
    wide = _h_dtype(device)
    if not host:
        return torch.stack([_chunked_dot(x, y, wide) for x, y in zip(a, b)]).sum()
    for dtype in (None, wide):
        parts = [_chunked_dot(x, y, dtype or _wide_dtype(x.dtype)) for x, y in zip(a, b)]
        total = _host_sum(parts) if device.type == "cpu" else torch.stack([p.to(wide) for p in parts]).sum().item()
        if math.isfinite(total):
            break
    return total


def _state_tensor(state: dict, key: str, like: Tensor) -> Tensor:
    """A per-parameter buffer of the direction, zero on its first use; float32 for a 16-bit parameter (a float16
    buffer overflows from finite gradients: a second moment at |g| > 256, a momentum sum past 65504)."""
    dtype = _state_dtype(like.dtype)
    if key not in state:
        state[key] = torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)
    elif state[key].dtype != dtype:  # saved by an earlier release in the parameter's 16-bit dtype
        state[key] = state[key].to(dtype)
    return state[key]


def _same_tensor_data(a, b) -> bool:
    """``a`` is ``b``, or a view of the same memory (a loss returned again, detached or reshaped)."""
    if a is b:
        return True
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.device != b.device or a.device.type == "meta":
        return False
    try:
        pointer = a.untyped_storage().data_ptr()
        return pointer != 0 and pointer == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage to compare (lazy and XLA tensors, wrapper subclasses)
        return False


def _at_least_32_bit(t: Tensor) -> Tensor:
    """``t`` itself, or a float32 (complex64) copy of a 16-bit tensor."""
    return t.to(_state_dtype(t.dtype))  # no copy when the dtype is already that


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a direction's buffers and of step arithmetic: float32 (complex64) for 16-bit tensors."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype == getattr(torch, "complex32", None):
        return torch.complex64
    return dtype


def _add_scaled_(params: list, steps: list, scale, foreach: bool) -> None:
    """p += scale * t: a host number (:func:`_step_`), or a 0-dim tensor, then the products are made a bounded
    number of elements at a time so that they never take the parameters' size at once."""
    if not isinstance(scale, Tensor):
        _step_(params, steps, scale, foreach)
        return
    pieces = [(p, t) for p, t in zip(params, steps) if t.numel() <= _CHUNK or not _flat_views_possible(p, t)]
    for p, t in zip(params, steps):  # a large tensor goes in pieces of its flat view
        if t.numel() > _CHUNK and _flat_views_possible(p, t):
            pieces += zip(p.view(-1).split(_CHUNK), t.view(-1).split(_CHUNK))
    for batch in _batches(pieces):  # (param, step) pairs, sized by the step
        _add_([p for p, _ in batch], _scaled_by_dtype([t for _, t in batch], scale, foreach), 1.0, foreach)


def _flat_views_possible(p: Tensor, t: Tensor) -> bool:
    return p.is_contiguous() and t.is_contiguous() and p.shape == t.shape and not p.is_complex()


def _step_(params: list, steps: list, alpha: float, foreach: bool) -> None:
    """p += alpha * t on host numbers. A 16-bit step is made in float32 and rounded once, as it is added: a
    Python alpha passed to a 16-bit kernel is rounded to 16 bits first (1e-8 to 0, 1e-7 to 1.19e-7)."""
    narrow = [i for i, t in enumerate(steps) if _state_dtype(t.dtype) != t.dtype]
    if not narrow:
        _add_(params, steps, alpha, foreach)
        return
    wide = [i for i in range(len(steps)) if i not in set(narrow)]
    if wide:
        _add_([params[i] for i in wide], [steps[i] for i in wide], alpha, foreach)
    for i in narrow:
        params[i].add_(steps[i].to(_state_dtype(steps[i].dtype)).mul_(alpha))


def _add_(params: list, tensors: list, alpha, foreach: bool) -> None:
    if foreach:
        torch._foreach_add_(params, tensors, alpha=alpha)
    else:
        for p, t in zip(params, tensors):
            p.add_(t, alpha=alpha)


def _copy_(targets: list, sources: list, foreach: bool) -> None:
    if foreach and hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(targets, sources)
    else:
        for t, s in zip(targets, sources):
            t.copy_(s)


# ---------------------------------------------------------------- small pieces
def _h_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _as_h_tensor(value, like) -> Tensor:
    """``value`` as a 0-dim tensor of h's dtype on h's device (``like``: a device or a tensor)."""
    device = like.device if isinstance(like, Tensor) else like
    dtype = _h_dtype(device)
    if isinstance(value, Tensor) and value.device == device and value.dtype == dtype and value.dim() == 0:
        return value
    if isinstance(value, Tensor):
        return value.reshape(()).to(device=device, dtype=dtype, copy=True)
    return torch.full((), float(value), dtype=dtype, device=device)  # a fill kernel: no host-to-device copy


def _scalar_value(name: str, value) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        return float(value)
    return _number(name, value)


_BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "previous_step", "average")


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


def _refuse_a_foreign_state_dict(state_dict) -> None:
    """Another optimizer's state dict (torch's SGD, Adam, ...) says so instead of loading half-silently."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError("not an optimizer state dict (it needs 'state' and 'param_groups'); "
                         "pass the dict that optimizer.state_dict() returned")
    if groups and not {"c", "rollback"} <= set(groups[0]):
        keys = set(groups[0])
        guess = ("torch.optim.Adam or AdamW" if "amsgrad" in keys else "torch.optim.SGD" if "dampening" in keys
                 else "another optimizer")
        raise ValueError(
            f"not a LossGrad state dict: its param groups have {sorted(keys - {'params'})}, as saved by {guess}. "
            "LossGrad cannot resume another optimizer's state (its step size and buffers mean other things); "
            "load the model's weights and start LossGrad afresh")


def _check_loss(value, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must return the loss as a torch.Tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"{what} must be a scalar loss, got a tensor of shape {tuple(value.shape)}; reduce it, e.g. with .mean()")
    return value if value.dim() == 0 else value.reshape(())


def _grad_marks(param_groups) -> list:
    """Which gradient tensor each parameter holds (a weak reference) and its version counter."""
    return [(None, 0) if p.grad is None else (weakref.ref(p.grad), p.grad._version)
            for g in param_groups for p in g["params"]]


def _new_grads(param_groups, marks) -> bool:
    """A gradient tensor appeared that was not there when ``marks`` were taken: a backward created it."""
    params = [p for g in param_groups for p in g["params"]]
    return any(p.grad is not None and (ref is None or ref() is not p.grad) for p, (ref, _) in zip(params, marks))


def _same_grads(param_groups, marks) -> bool:
    """No backward (nor any in-place change) has touched the gradients since ``marks`` were taken."""
    params = [p for g in param_groups for p in g["params"]]
    return len(params) == len(marks) and any(p.grad is not None for p in params) and all(
        (p.grad is None and ref is None) or (ref is not None and ref() is p.grad and p.grad._version == version)
        for p, (ref, version) in zip(params, marks))


def _refuse_sharded(params) -> None:
    sharded = _sharded_types()
    for p in params:
        if sharded and isinstance(p, sharded):
            raise RuntimeError(
                f"LossGrad got a sharded parameter ({type(p).__name__}): under FSDP/ZeRO each rank sees only its "
                "shard, so ||G||^2 and the step size would differ between ranks. Use LossGrad with DDP "
                "(replicated parameters) instead")


_SHARDED_TYPES: Optional[tuple] = None


def _sharded_types() -> tuple:
    """DTensor and FSDP's FlatParameter, where torch has them (looked up once)."""
    global _SHARDED_TYPES
    if _SHARDED_TYPES is None:
        types = []
        if torch.distributed.is_available():
            try:
                from torch.distributed.tensor import DTensor
                types.append(DTensor)
            except ImportError:  # pragma: no cover - older torch
                pass
            try:
                from torch.distributed.fsdp._flat_param import FlatParameter
                types.append(FlatParameter)
            except ImportError:  # pragma: no cover
                pass
        _SHARDED_TYPES = tuple(types)
    return _SHARDED_TYPES


def _rng_state(devices):
    cuda = [d for d in devices if d.type == "cuda"]
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]


def _set_rng_state(state, devices) -> None:
    cpu, cuda_states = state
    torch.set_rng_state(cpu)
    for d, s in zip([d for d in devices if d.type == "cuda"], cuda_states):
        torch.cuda.set_rng_state(s, d)


class _QuietNormLayers:
    """During the probe, no module the probe calls changes a running statistic.

    A process-wide forward pre-hook sees every module called. In the thread that entered the context it acts
    on every module; in other threads (a thread pool inside the forward pass, ``nn.DataParallel``'s replicas)
    only on modules that own a parameter being optimised, so that another model run concurrently is left
    alone. A batch norm in training mode is switched to ``track_running_stats=False`` (it normalises with the
    batch statistics, as at x, and updates nothing); an instance norm with tracking (where that switch does
    nothing), and a module whose norm layers the hook cannot see as modules (TorchScript, an fx or
    ``torch.export`` graph module, ``nn.DataParallel``), get their buffers copied and restored. Nothing is
    kept after the probe.
    """

    def __init__(self, param_ids: set):
        self.thread = threading.get_ident()
        self.param_ids = param_ids
        self.lock = threading.Lock()
        self.switched: list = []
        self.saved: list = []  # (buffer, copy)
        self.seen: set = set()
        self.handle = None

    def _hook(self, module, args) -> None:
        if threading.get_ident() != self.thread and not any(
                id(p) in self.param_ids for p in module.parameters(recurse=False)):
            return
        with self.lock:
            if id(module) in self.seen:
                return
            self.seen.add(id(module))
            if isinstance(module, _OPAQUE_MODULES) or (
                    isinstance(module, _NormBase) and not isinstance(module, _BatchNorm)):
                self.saved += [(b, b.clone()) for b in module.buffers()]  # small: statistics, counters
            elif isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
                module.track_running_stats = False
                self.switched.append(weakref.ref(module))

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        for ref in self.switched:
            module = ref()
            if module is not None:
                module.track_running_stats = True
        with torch.no_grad():
            for buffer, copy in self.saved:
                buffer.copy_(copy)


#: Modules that run their norm layers as graph ops, not as modules the hook sees: their buffers are restored.
_OPAQUE_MODULES = (torch.jit.ScriptModule, torch.fx.GraphModule, torch.nn.DataParallel)
