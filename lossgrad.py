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
    h    &\leftarrow \begin{cases} c\,h & r \le \tfrac12\\ h / c & \text{otherwise}\end{cases}
    \end{aligned}

Why :math:`\tfrac12`: the parabola :math:`q` with :math:`q(0)=F(x)`,
:math:`q'(0)=-\lVert G\rVert^2`, :math:`q(h)=F(x')` has :math:`q'(h) < 0` exactly when
:math:`r < \tfrac12`, so the minimum along :math:`-G` lies beyond :math:`h`.
The cost is one extra forward pass (:math:`F(x')` on the same batch) and one extra read of
the gradients (for :math:`\lVert G\rVert^2`); no copy of the weights is made.

Two guards, on by default, change Algorithm 1 only where it fails
-----------------------------------------------------------------
* ``resolution_guard``: a step is *unresolved* when both :math:`\ell` and :math:`|F(x') - F(x)|`
  are below :math:`\kappa\,\varepsilon\,|F(x)|` (:math:`\varepsilon` the machine epsilon of the loss
  dtype, :math:`\kappa` = ``RESOLUTION_ULPS``): the difference is rounding noise and :math:`r` says
  nothing. Until the first resolved step, :math:`h` then grows (a too-small initial :math:`h`);
  after it, :math:`h` is kept (a converged loss, where there is nothing left to resolve, must not
  push :math:`h` up). Without the guard a small initial :math:`h` drifts down forever, because a
  loss difference that rounds to zero reads as :math:`r = 1`.
* ``rollback``: ``'nonfinite'`` undoes a step whose probe loss :math:`F(x')` is not finite and
  shrinks :math:`h`; ``'increase'`` also undoes a step whose probe loss exceeds :math:`F(x)` by
  more than that resolution (an acceptance test on the same batch); ``None`` never undoes.
  Undoing is :math:`x \leftarrow x' + hG`, in place.

``LossGrad(params, rollback=None, resolution_guard=False)`` is exactly Algorithm 1 (the
reproduction notebooks use it so). A zero gradient (:math:`\ell = 0`) leaves :math:`h` as it is.

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
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase
from torch.optim.optimizer import Optimizer

__all__ = ["LossGrad", "RESOLUTION_ULPS"]

#: kappa in the resolution guard: the loss difference must exceed this many machine epsilons
#: of |F(x)| to be read. A batch-mean loss carries rounding errors of a few ulps per
#: reduction level; 64 leaves a margin without making the guard fire on healthy steps.
RESOLUTION_ULPS = 64.0

_ROLLBACKS = (None, "nonfinite", "increase")
# Options that are one value for the whole optimizer; groups may differ only in weight_decay.
_GLOBAL_OPTIONS = ("lr", "c", "rollback", "resolution_guard", "min_lr", "max_lr")


class LossGrad(Optimizer):
    r"""SGD with the LOSSGRAD step-size rule (see the module docstring for the math).

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer. Groups may
            differ only in ``weight_decay``; the step size :math:`h` and the rule are shared by
            all parameters, because :math:`\lVert G\rVert^2` and the probe are taken over all of
            them. Parameters whose ``.grad`` is ``None`` are skipped.
        lr: initial step size :math:`h_0` (> 0). The rule forgets it within a few hundred
            steps; the paper uses 1e-4.
        c: factor by which :math:`h` grows or shrinks each step (> 1). The paper's default 1.05
            is the one to keep; 1.001 adapts too slowly, 1.2 is unstable (the paper's Table 1).
        weight_decay: :math:`\lambda` of the regulariser :math:`\tfrac{\lambda}{2}\lVert x\rVert^2`,
            which is part of the objective: it enters the gradient, the prediction and the probe.
        rollback: ``'nonfinite'`` (default), ``'increase'`` or ``None``; see the module docstring.
        resolution_guard: while a step is below the loss's floating-point resolution, grow
            :math:`h` at start-up and keep it later (default ``True``). Leave it on.
        min_lr, max_lr: optional bounds on :math:`h` (default 0 and infinity).
        foreach: use the multi-tensor ``torch._foreach_*`` kernels (default: when available).
            Both paths compute the same thing.
        sync_free: keep :math:`h`, :math:`\lVert G\rVert^2` and the ratio as device tensors and
            decide with ``torch.where``, so ``step`` never waits for the device (the undo pass
            then always runs, scaled by 0 or 1). Default: on for parameters off the CPU, off on
            the CPU, where host numbers are faster and the undo pass runs only when needed.
        process_group: under ``torch.distributed``, the group over which the pair
            :math:`(F(x), F(x'))` is averaged once per step so that every rank keeps the same
            :math:`h` (default: the default group when one is initialised). Intended for DDP,
            where gradients are already averaged.

    ``step(closure)``: ``closure()`` returns the scalar loss on the current batch and does not
    call ``backward``; zero the gradients before ``step`` as with any optimizer. ``step``
    evaluates it with gradients, back-propagates, takes :math:`x' = x - hG`, evaluates
    ``closure()`` once more under ``no_grad`` at :math:`x'` and updates :math:`h`. It returns
    the loss at :math:`x`.

    ``step(closure, loss=loss)``: you already ran forward and backward (to reuse the outputs);
    ``step`` then only probes.

    The probe is clean: batch-norm layers normalise with the batch statistics, as at :math:`x`,
    but their running statistics are left untouched; it sees the random state of the
    evaluation at :math:`x` (the same dropout masks), and the random stream continues as if the
    probe had not run. With ``loss=`` the forward pass happened before ``step`` was called, so
    the probe's dropout masks differ from it; use the closure form for models with dropout.
    Batch-norm layers are found on the first step (every norm layer the probe calls).

    The current :math:`h` is ``param_groups[0]['lr']`` (a float, or a 0-dim tensor when
    ``sync_free``; ``float()`` of either is the step size). It is saved by ``state_dict()``.
    ``last`` holds the latest step's loss, probe loss, ratio and whether it was undone.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-4,
        c: float = 1.05,
        *,
        weight_decay: float = 0.0,
        rollback: Optional[str] = "nonfinite",
        resolution_guard: bool = True,
        min_lr: float = 0.0,
        max_lr: float = math.inf,
        foreach: Optional[bool] = None,
        sync_free: Optional[bool] = None,
        process_group=None,
    ):
        lr_value = _scalar_value("lr", lr)
        if not (math.isfinite(lr_value) and lr_value > 0):
            raise ValueError(f"lr is the initial step size h and must be a finite number > 0, got {lr!r}; the paper uses 1e-4")
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 1):
            raise ValueError(f"c must be a finite number > 1 (h is multiplied or divided by it each step), got {c!r}; the paper uses 1.05")
        if rollback not in _ROLLBACKS:
            raise ValueError(f"rollback must be one of {_ROLLBACKS}, got {rollback!r}")
        if not (0 <= min_lr < max_lr):
            raise ValueError(f"need 0 <= min_lr < max_lr, got min_lr={min_lr!r}, max_lr={max_lr!r}")
        if not min_lr <= lr_value <= max_lr:
            raise ValueError(f"lr={lr_value!r} lies outside [min_lr, max_lr] = [{min_lr!r}, {max_lr!r}]")
        defaults = dict(lr=lr, c=float(c), weight_decay=weight_decay, rollback=rollback,
                        resolution_guard=bool(resolution_guard), min_lr=float(min_lr), max_lr=float(max_lr))
        super().__init__(params, defaults)
        self.foreach = _foreach_available() if foreach is None else bool(foreach)
        self.sync_free = sync_free
        self.process_group = process_group
        self.last: dict = {}
        self._norm_layers: Optional[list] = None  # found on the first probe
        self.state["resolved"] = False  # kept in state_dict(): the guard's start-up is over once True
        self._constructed = True

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_constructed", False) and "lr" not in param_group:
            param_group = dict(param_group, lr=self.param_groups[0]["lr"])  # joins at the current h, not h0
        wd = param_group.get("weight_decay", self.defaults["weight_decay"])
        if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {wd!r}")
        super().add_param_group(param_group)
        first, new = self.param_groups[0], self.param_groups[-1]
        for key in _GLOBAL_OPTIONS:
            if key == "lr" and _scalar_value("lr", new[key]) == _scalar_value("lr", first[key]):
                continue
            if new[key] != first[key]:
                raise ValueError(
                    f"param group {len(self.param_groups) - 1} sets {key}={new[key]!r} but group 0 has "
                    f"{first[key]!r}: LossGrad keeps one step size and one rule for all parameters; "
                    "only weight_decay may differ between groups")

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None, loss: Optional[Tensor] = None) -> Tensor:
        if closure is None or not callable(closure):
            raise TypeError(
                "LossGrad.step needs a closure that returns the loss on the current batch, without "
                "calling backward, e.g. opt.step(lambda: loss_fn(model(x), y)); got " + repr(closure))
        devices = None
        rng_at_x = None
        if loss is None:
            devices = self._devices()
            rng_at_x = _rng_state(devices)
            with torch.enable_grad():
                loss = _check_loss(closure(), "closure()")
                loss.backward()
        else:
            loss = _check_loss(loss, "loss")

        groups = self._gradient_groups()
        if not groups:
            raise RuntimeError(
                "no parameter has a gradient: with step(closure) the closure's loss must depend on the "
                "parameters; with step(closure, loss=loss) call loss.backward() first")
        if devices is None:
            devices = self._devices()
        options = self.param_groups[0]
        sync_free = self.sync_free if self.sync_free is not None else any(d.type != "cpu" for d in devices)
        h = self._current_h(sync_free, groups[0][0][0].device)

        # F(x), ||G||^2, and the step x' = x - hG
        f_x = loss.detach()
        sq_norm, reg_x, directions = _directions(groups, self.foreach, host=not sync_free)
        if sync_free:
            deltas = [_scaled(d, -h, self.foreach) for d in directions]
            for (params, _, _), delta in zip(groups, deltas):
                _add_(params, delta, 1.0, self.foreach)
        else:
            for (params, _, _), direction in zip(groups, directions):
                _add_(params, direction, -h, self.foreach)

        f_xp = self._probe(closure, rng_at_x, devices)
        reg_xp = _regulariser(groups, self.foreach, host=not sync_free)
        f_x, f_xp = self._all_reduce_mean(f_x, f_xp)
        eps = torch.finfo(loss.dtype).eps if loss.dtype.is_floating_point else torch.finfo(torch.float32).eps
        resolution = RESOLUTION_ULPS * eps if options["resolution_guard"] else 0.0
        rule = dict(c=options["c"], rollback=options["rollback"], resolution=resolution,
                    min_lr=options["min_lr"], max_lr=options["max_lr"])

        resolved = self.state["resolved"]  # has a step been resolved yet (the guard's start-up)?
        if sync_free:
            resolved = torch.as_tensor(resolved, device=h.device)
            h, undo, ratio, resolved = next_step_size_tensor(h, sq_norm, f_x + reg_x, f_xp + reg_xp, resolved, **rule)
            if undo is not None:
                for (params, _, _), delta in zip(groups, deltas):
                    _add_(params, _scaled(delta, undo, self.foreach), -1.0, self.foreach)
        else:
            new_h, undo, ratio, resolved = next_step_size_float(h, sq_norm, f_x.item() + reg_x, f_xp.item() + reg_xp,
                                                                bool(resolved), **rule)
            if undo:
                for (params, _, _), direction in zip(groups, directions):
                    _add_(params, direction, h, self.foreach)
            h = new_h
        self.state["resolved"] = resolved
        for group in self.param_groups:
            group["lr"] = h
        self.last = dict(loss=f_x, probe_loss=f_xp, ratio=ratio, undone=undo, sq_grad_norm=sq_norm)
        return loss

    # --------------------------------------------------------------- helpers
    def _gradient_groups(self):
        """[(params, grads, weight_decay)] over the groups, parameters without a gradient left out."""
        out = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                if any(p.grad.is_sparse for p in params):
                    raise RuntimeError("LossGrad does not support sparse gradients; use dense embeddings")
                out.append((params, [p.grad for p in params], group["weight_decay"]))
        return out

    def _devices(self):
        return sorted({p.device for g in self.param_groups for p in g["params"]}, key=str)

    def _current_h(self, sync_free: bool, device: torch.device):
        h = self.param_groups[0]["lr"]
        if not sync_free:
            return float(h)  # on the CPU this costs nothing
        if not (isinstance(h, Tensor) and h.device == device and h.dtype == _h_dtype(device)):
            h = torch.as_tensor(h, dtype=_h_dtype(device), device=device).clone()
        return h

    def _probe(self, closure, rng_at_x, devices) -> Tensor:
        """F_B(x') under no_grad, with the random state of the evaluation at x and frozen norm statistics."""
        rng_after = _rng_state(devices)
        if rng_at_x is not None:
            _set_rng_state(rng_at_x, devices)
        try:
            with _FrozenNormStatistics(self):
                f_xp = _check_loss(closure(), "closure()").detach()
        finally:
            _set_rng_state(rng_after, devices)
        return f_xp

    def _all_reduce_mean(self, f_x: Tensor, f_xp: Tensor):
        dist = torch.distributed
        if self.process_group is None and not (dist.is_available() and dist.is_initialized()):
            return f_x, f_xp
        pair = torch.stack([f_x, f_xp]).to(_h_dtype(f_x.device))
        dist.all_reduce(pair, op=dist.ReduceOp.SUM, group=self.process_group)
        pair = pair / dist.get_world_size(self.process_group)
        return pair[0], pair[1]


# ------------------------------------------------------------------- the rule
def next_step_size_float(h, sq_norm, f_x, f_xp, resolved=True, *, c, rollback, resolution, min_lr, max_lr):
    """One decision of the rule on host numbers.

    Returns (new h, undo the step?, ratio, resolved: has any step been resolved so far)."""
    lred = h * sq_norm
    diff = f_xp - f_x
    noise = resolution * abs(f_x)
    if rollback == "increase":
        undo = not diff <= noise  # a NaN probe is undone too
    elif rollback == "nonfinite":
        undo = not math.isfinite(f_xp)
    else:
        undo = False
    ratio = (diff + lred) / lred if lred > 0 else math.nan
    unresolved = resolution > 0 and sq_norm > 0 and lred < noise and abs(diff) <= noise
    if undo:
        new_h = h / c
    elif unresolved:
        new_h = h if resolved else h * c  # the probe cannot see this step: grow only at start-up
    elif not lred > 0:
        new_h = h  # zero gradient: nothing to learn from
    else:
        new_h = h * c if ratio <= 0.5 else h / c
    resolved = resolved or (lred > 0 and not unresolved)
    return min(max(new_h, min_lr), max_lr), undo, ratio, resolved


def next_step_size_tensor(h, sq_norm, f_x, f_xp, resolved=None, *, c, rollback, resolution, min_lr, max_lr):
    """The same decision as :func:`next_step_size_float` with tensor ops only (no host sync).

    Returns (new h, undo mask or None when rollback is None, ratio, resolved)."""
    if resolved is None:
        resolved = torch.ones_like(h, dtype=torch.bool)
    dtype = h.dtype
    sq_norm, f_x, f_xp = sq_norm.to(dtype), f_x.to(dtype), f_xp.to(dtype)
    lred = h * sq_norm
    diff = f_xp - f_x
    noise = resolution * f_x.abs()
    positive = lred > 0
    ratio = torch.where(positive, (diff + lred) / torch.where(positive, lred, torch.ones_like(lred)),
                        torch.full_like(lred, math.nan))
    grow = ratio <= 0.5
    unresolved = (sq_norm > 0) & (lred < noise) & (diff.abs() <= noise) if resolution > 0 else torch.zeros_like(positive)
    grow = torch.where(unresolved, ~resolved, grow)  # unresolved: grow only at start-up, else keep (below)
    if rollback == "increase":
        undo = ~(diff <= noise)
    elif rollback == "nonfinite":
        undo = ~torch.isfinite(f_xp)
    else:
        undo = None
    if undo is not None:
        grow = grow & ~undo
    new_h = torch.where(grow, h * c, h / c)
    keep = (~positive | unresolved) & ~grow
    if undo is not None:
        keep = keep & ~undo
    new_h = torch.where(keep, h, new_h)
    return new_h.clamp(min_lr, max_lr), undo, ratio, resolved | (positive & ~unresolved)


# ------------------------------------------------------ multi-tensor / per-tensor
def _foreach_available() -> bool:
    return hasattr(torch, "_foreach_add_") and hasattr(torch, "_foreach_mul")


def _sq_sum(tensors: list, foreach: bool, host: bool = False):
    """sum_i ||t_i||^2: a Python float when ``host``, else a 0-dim float64 tensor (float32 where float64 is missing)."""
    if foreach and hasattr(torch, "_foreach_powsum"):
        parts = torch._foreach_powsum(tensors, 2)
    elif foreach:
        parts = [n * n for n in torch._foreach_norm(tensors)]
    else:
        parts = [t.square().sum() for t in tensors]
    if host and parts[0].device.type == "cpu":
        return math.fsum(p.item() for p in parts)
    device = tensors[0].device
    dtype = _h_dtype(device)
    if len({(p.dtype, p.device) for p in parts}) > 1:
        parts = [p.to(device=device, dtype=dtype) for p in parts]
    total = torch.stack(parts).sum(dtype=dtype)
    return total.item() if host else total


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


def _scaled(tensors: list, scale: Tensor, foreach: bool) -> list:
    """New tensors t * scale for a 0-dim tensor scale (a step size, or the 0/1 undo mask)."""
    if foreach:
        return torch._foreach_mul(tensors, scale.to(device=tensors[0].device, dtype=tensors[0].dtype))
    return [t * scale.to(device=t.device, dtype=t.dtype) for t in tensors]


def _add_(params: list, tensors: list, alpha: float, foreach: bool) -> None:
    if foreach:
        torch._foreach_add_(params, tensors, alpha=alpha)
    else:
        for p, t in zip(params, tensors):
            p.add_(t, alpha=alpha)


# ---------------------------------------------------------------- small pieces
def _h_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _scalar_value(name: str, value) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        return float(value)
    if not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _check_loss(value, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must return the loss as a torch.Tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"{what} must be a scalar loss, got a tensor of shape {tuple(value.shape)}; reduce it, e.g. with .mean()")
    return value if value.dim() == 0 else value.reshape(())


def _rng_state(devices):
    cuda = [d for d in devices if d.type == "cuda"]
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]


def _set_rng_state(state, devices) -> None:
    cpu, cuda_states = state
    torch.set_rng_state(cpu)
    for d, s in zip([d for d in devices if d.type == "cuda"], cuda_states):
        torch.cuda.set_rng_state(s, d)


class _FrozenNormStatistics:
    """Keeps running statistics of norm layers unchanged during the probe.

    A norm layer in training mode with ``track_running_stats=False`` normalises with the batch
    statistics (as at x) and updates nothing. On the optimizer's first probe a global forward
    pre-hook finds the layers that the closure calls; later probes switch those directly.
    """

    def __init__(self, optimizer: LossGrad):
        self.optimizer = optimizer
        self.switched: list = []
        self.handle = None

    def _switch(self, module) -> None:
        if module.training and module.track_running_stats:
            module.track_running_stats = False
            self.switched.append(module)

    def _discover(self, module, args) -> None:
        if isinstance(module, _NormBase):
            if all(module is not m for m in self.optimizer._norm_layers):
                self.optimizer._norm_layers.append(module)
            self._switch(module)

    def __enter__(self):
        if self.optimizer._norm_layers is None:
            self.optimizer._norm_layers = []
            self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._discover)
        else:
            for module in self.optimizer._norm_layers:
                self._switch(module)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
        for module in self.switched:
            module.track_running_stats = True
