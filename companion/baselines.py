"""The optimizers and learning-rate schedules LOSSGRAD is compared with, and one registry,
``make_optimizer``, that every notebook uses to build them.

Convention of the companion: after every ``step`` the step size just used is in
``optimizer.param_groups[0]['lr']`` (so one training loop logs all methods alike), and
custom optimizers accept ``step(closure=None, loss=None)``.

Schedules are ``torch.optim.lr_scheduler`` objects to be stepped once per EPOCH, at
the end of it (``scheduler.step()`` after the epoch's last batch).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Iterable

import torch
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, MultiStepLR, StepLR

__all__ = [
    "WNGrad",
    "L4SGD",
    "step_lr",
    "trapezoid",
    "multistep",
    "OPTIMIZER_NAMES",
    "make_optimizer",
    "adam_steps",
]


def _grads(optimizer: Optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(param, gradient + coupled weight decay) for every param that has a gradient."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
            g = p.grad
            if group["weight_decay"] != 0:
                g = g.add(p, alpha=group["weight_decay"])
            out.append((p, g))
    return out


def _sq_norm(tensors: Iterable[torch.Tensor]) -> float:
    """Σ ||t||² over tensors, accumulated in float64, as a Python float (one sync)."""
    tensors = list(tensors)
    if not tensors:
        return 0.0
    return float(torch.stack([t.detach().double().pow(2).sum() for t in tensors]).sum())


def _set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class WNGrad(Optimizer):
    """WNGrad (Wu, Ward, Bottou 2018, "WNGrad: learn the learning rate in gradient
    descent", arXiv 1803.02865) with one scalar b for all parameters.

    With g the (mini-batch) gradient at x, each step does

        b ← b + ||g||² / b          (b updated first, with the current gradient)
        x ← x − g / b               (step with the updated b)

    starting from b₀ = 1 / lr. The order (b first, then the step with the new b) and
    the b₀ ↔ learning-rate relation are those of ensmallen's WNGradUpdate
    (b += η²||g||²/b; x −= η g / b with b₀ = 1, which is this rule with b/η in place
    of b); the stored copies of the paper available here did not show its algorithm
    box. The step size 1/b never grows: WNGrad can only decrease the learning rate.

    State: b lives only as ``lr = 1/b`` in the param groups, so the step size used by
    the last step is ``param_groups[0]['lr']`` (the companion convention), and
    state_dict / load_state_dict need nothing extra. Weight decay, if any, is added
    to g (coupled L2, as torch SGD) and counts in ||g||².
    """

    reports_step_size_after_step = True  # lr is the step size just used (see train.step_size_used)

    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"WNGrad needs a finite lr > 0 (b0 = 1/lr), got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=float(lr), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None,
             loss: torch.Tensor | float | None = None):
        """One WNGrad step from the gradients in ``p.grad``.

        ``loss`` is accepted for the companion's uniform call and returned unchanged.
        A ``closure`` (torch convention: re-evaluates the model, computing gradients
        if it calls backward) is called only when ``loss`` is None.
        """
        if loss is None and closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = _grads(self)
        if not pairs:
            return loss
        b = 1.0 / self.param_groups[0]["lr"]
        b = b + _sq_norm(g for _, g in pairs) / b
        for p, g in pairs:
            p.add_(g, alpha=-1.0 / b)
        _set_lr(self, 1.0 / b)
        return loss


class L4SGD(Optimizer):
    """L4 step-size rule (Rolinek & Martius 2018, "L4: Practical loss-based stepsize
    adaptation for deep learning", arXiv 1802.05074) applied to plain SGD.

    Each step, with batch loss L, gradient g and update direction v = g:

        L_min ← γ₀·L on the first step, else min(L_min, L)
        η     = α · (L − γ·L_min) / (gᵀv + ε)
        x     ← x − η·v
        L_min ← (1 + 1/τ) · L_min          (slowly forget the minimum)

    Every detail above (the γ₀ = 0.75 initialisation, min-then-step-then-increase
    order, ε in the denominator, defaults α = 0.15, γ = 0.9, τ = 1000, ε = 1e-12) is
    read from the authors' TensorFlow code (martius-lab/l4-optimizer, L4/L4.py,
    class L4General). There the gradient estimate and the direction are momentum or
    Adam transforms; "L4 applied to SGD" (as the LOSSGRAD paper tried it) uses the
    raw gradient for both, so gᵀv = ||g||².

    The effective step size η of the last step is kept in ``param_groups[0]['lr']``
    (0.0 before the first step). Weight decay, if any, is added to g (coupled L2)
    while L stays the loss given; L should be positive, as L4 assumes.
    """

    reports_step_size_after_step = True

    def __init__(self, params, alpha: float = 0.15, gamma: float = 0.9, tau: float = 1000.0,
                 eps: float = 1e-12, gamma0: float = 0.75, weight_decay: float = 0.0):
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0 <= gamma <= 1 or not 0 <= gamma0 <= 1:
            raise ValueError(f"gamma and gamma0 must lie in [0, 1], got {gamma}, {gamma0}")
        if tau <= 0:
            raise ValueError(f"tau (forgetting time, in steps) must be > 0, got {tau}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        super().__init__(params, dict(lr=0.0, weight_decay=weight_decay))
        self.alpha, self.gamma, self.tau, self.eps, self.gamma0 = alpha, gamma, tau, eps, gamma0
        self.l4_state = {"min_loss": None}

    def state_dict(self):
        sd = super().state_dict()
        sd["l4_min_loss"] = self.l4_state["min_loss"]
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.l4_state["min_loss"] = state_dict.pop("l4_min_loss", None)
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None,
             loss: torch.Tensor | float | None = None):
        """One L4 step. Needs the batch loss, either

        * ``loss=`` after the caller ran ``loss.backward()`` (gradients in p.grad), or
        * a ``closure`` that returns the loss WITHOUT calling backward (the LOSSGRAD
          convention of the companion): gradients are zeroed, the closure is called,
          and backward is run here.
        """
        if loss is None:
            if closure is None:
                raise ValueError("L4SGD.step needs the batch loss: call step(loss=loss) after "
                                 "loss.backward(), or step(closure) with a closure that returns "
                                 "the loss without calling backward")
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
                loss.backward()
        value = float(loss)
        if not math.isfinite(value):  # no meaningful step: skip it and say so in the step size
            _set_lr(self, math.nan)
            return loss
        min_loss = self.l4_state["min_loss"]
        min_loss = self.gamma0 * value if min_loss is None else min(min_loss, value)
        pairs = _grads(self)
        eta = self.alpha * (value - self.gamma * min_loss) / (_sq_norm(g for _, g in pairs) + self.eps)
        for p, g in pairs:
            p.add_(g, alpha=-eta)
        self.l4_state["min_loss"] = (1.0 + 1.0 / self.tau) * min_loss
        _set_lr(self, eta)
        return loss


# --------------------------------------------------------------------------------------
# Schedules (stepped once per epoch)
# --------------------------------------------------------------------------------------

def step_lr(opt: Optimizer, step_size: int, gamma: float) -> StepLR:
    """lr × gamma every ``step_size`` epochs (the paper's "StepLR" baseline)."""
    return StepLR(opt, step_size=step_size, gamma=gamma)


class _TrapezoidFactor:
    """Piecewise-linear lr factor through (0, start), (warmup, 1), (flat_until, 1),
    (total, end); a class (not a lambda) so LambdaLR can save it in state_dict."""

    def __init__(self, warmup_epochs, flat_until, total_epochs, start_factor, end_factor):
        self.warmup_epochs, self.flat_until, self.total_epochs = warmup_epochs, flat_until, total_epochs
        self.start_factor, self.end_factor = start_factor, end_factor

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.start_factor + (1.0 - self.start_factor) * epoch / self.warmup_epochs
        if epoch <= self.flat_until:
            return 1.0
        if epoch >= self.total_epochs:
            return self.end_factor
        frac = (epoch - self.flat_until) / (self.total_epochs - self.flat_until)
        return 1.0 + (self.end_factor - 1.0) * frac


def trapezoid(opt: Optimizer, warmup_epochs: int = 10, flat_until: int = 15,
              total_epochs: int = 30, start_factor: float = 0.1,
              end_factor: float = 0.0) -> LambdaLR:
    """The paper's trapezoidal schedule as a LambdaLR.

    Paper (appendix A): the lr "linearly increases from [lost] to [lr] in epoch 10,
    stays constant until epoch 15 and decreases afterward". Here, for epoch index e
    (0-based; the lr used during epoch e):
        factor(e) = start_factor + (1 − start_factor)·e/warmup_epochs   for e < warmup_epochs
                  = 1                                                    for warmup ≤ e ≤ flat_until
                  = linear from 1 at flat_until to end_factor at total_epochs after that.
    ASSUMPTIONS (the paper's values are lost): start_factor 0.1, end_factor 0.0, and a
    linear decrease ending at total_epochs (so the last epoch, e = total−1, still
    has a small positive lr).
    """
    if not 0 <= warmup_epochs <= flat_until < total_epochs:
        raise ValueError("trapezoid needs 0 <= warmup_epochs <= flat_until < total_epochs, got "
                         f"{warmup_epochs}, {flat_until}, {total_epochs}")
    if start_factor < 0 or end_factor < 0:
        raise ValueError(f"start_factor and end_factor must be >= 0, got {start_factor}, {end_factor}")
    return LambdaLR(opt, _TrapezoidFactor(warmup_epochs, flat_until, total_epochs,
                                          start_factor, end_factor))


def multistep(opt: Optimizer, milestones=(100, 150), gamma: float = 0.1) -> MultiStepLR:
    """lr × gamma after each milestone epoch (the ResNet-56 schedule: ×0.1 after 100, 150)."""
    return MultiStepLR(opt, milestones=list(milestones), gamma=gamma)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

_SGD_OPTIONS = {"lr", "momentum", "weight_decay"}
_ACCEPTED = {
    "sgd": _SGD_OPTIONS,
    "sgd_steplr": _SGD_OPTIONS | {"step_size", "gamma"},
    "sgd_trapezoid": _SGD_OPTIONS | {"epochs", "warmup_epochs", "flat_until",
                                     "start_factor", "end_factor"},
    "sgd_multistep": _SGD_OPTIONS | {"milestones", "gamma"},
    "wngrad": {"lr", "weight_decay"},
    "l4": {"alpha", "gamma", "tau", "eps", "gamma0", "weight_decay"},
    "adam_steps": {"lr", "beta1", "beta2", "weight_decay", "milestones", "factors"},
}
OPTIMIZER_NAMES = tuple(_ACCEPTED) + ("lossgrad",)


def _sgd(params, options) -> SGD:
    if "lr" not in options:
        raise TypeError("SGD variants need an lr option, e.g. make_optimizer('sgd', params, lr=0.1)")
    return SGD(params, lr=options["lr"], momentum=options.get("momentum", 0.0),
               weight_decay=options.get("weight_decay", 0.0))


def _check_schedule_within_epochs(name: str, options: dict) -> None:
    """With ``epochs`` given, a schedule must change the lr within them: a milestone or step at or beyond
    the last epoch never acts (the class of bug a shrunk profile gets when its schedule is not shrunk too)."""
    epochs = options.get("epochs")
    if epochs is None:
        return
    if name in ("sgd_multistep", "adam_steps"):
        default = (100, 150) if name == "sgd_multistep" else ()
        milestones = list(options.get("milestones", default))
        if any(not 0 < m < epochs for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"{name}: milestones {milestones} must increase and lie in 1..{epochs - 1} "
                             f"(training runs {epochs} epochs); scale them with the epochs")
    if name == "sgd_steplr" and not 0 < options.get("step_size", 20) < epochs:
        raise ValueError(f"sgd_steplr: step_size {options.get('step_size', 20)} must lie in 1..{epochs - 1} "
                         f"(training runs {epochs} epochs); scale it with the epochs")


def make_optimizer(name: str, params, **options) -> tuple[Optimizer, LRScheduler | None]:
    """Build optimizer ``name`` (and its per-epoch scheduler, or None) from ``options``.

    Names and their options (defaults in brackets):
      sgd            lr, momentum [0], weight_decay [0]
      sgd_steplr     + step_size [20], gamma [0.1]     (ASSUMPTION: paper's values lost)
      sgd_trapezoid  + epochs (required: total epochs), warmup_epochs [10],
                     flat_until [15], start_factor [0.1], end_factor [0.0]
      sgd_multistep  + milestones [(100, 150)], gamma [0.1]
      wngrad         lr (b0 = 1/lr), weight_decay [0]
      l4             alpha [0.15], gamma [0.9], tau [1000], eps [1e-12], gamma0 [0.75],
                     weight_decay [0]
      adam_steps     lr, beta1 [0.9], beta2 [0.999], weight_decay [0], milestones [()],
                     factors [()]: lr multiplied by each factor once that many epochs finished
                     (the WAE paper's "original" optimizer: lr 1e-3, beta1 0.5, (30, 50), (0.5, 0.2))
      lossgrad       every option passed straight to lossgrad.LossGrad
    ``epochs`` is accepted (and ignored) by every name, so a notebook can pass it
    uniformly. Any other unknown option is a TypeError (catches typos).
    """
    if name == "lossgrad":
        from lossgrad import LossGrad  # lazy: repo-root module, imported only when asked for
        if "epochs" in options and not _takes_option(LossGrad, "epochs"):
            options.pop("epochs")
        return LossGrad(params, **options), None
    if name not in _ACCEPTED:
        raise ValueError(f"unknown optimizer name {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")
    unknown = set(options) - _ACCEPTED[name] - {"epochs"}
    if unknown:
        raise TypeError(f"make_optimizer({name!r}) got unknown option(s) {sorted(unknown)}; "
                        f"accepted: {sorted(_ACCEPTED[name] | {'epochs'})}")

    _check_schedule_within_epochs(name, options)
    if name == "wngrad":
        if "lr" not in options:
            raise TypeError("wngrad needs an lr option (its b0 = 1/lr)")
        return WNGrad(params, lr=options["lr"], weight_decay=options.get("weight_decay", 0.0)), None
    if name == "l4":
        kw = {k: v for k, v in options.items() if k != "epochs"}
        return L4SGD(params, **kw), None
    if name == "adam_steps":
        return adam_steps(params, lr=options.get("lr", 1e-3), betas=(options.get("beta1", 0.9), options.get("beta2", 0.999)),
                          weight_decay=options.get("weight_decay", 0.0), milestones=options.get("milestones", ()),
                          factors=options.get("factors", ()))

    opt = _sgd(params, options)
    if name == "sgd":
        return opt, None
    if name == "sgd_steplr":
        return opt, step_lr(opt, options.get("step_size", 20), options.get("gamma", 0.1))
    if name == "sgd_multistep":
        return opt, multistep(opt, options.get("milestones", (100, 150)), options.get("gamma", 0.1))
    # sgd_trapezoid
    if "epochs" not in options:
        raise TypeError("sgd_trapezoid needs epochs= (the total number of training epochs)")
    return opt, trapezoid(opt, warmup_epochs=options.get("warmup_epochs", 10),
                          flat_until=options.get("flat_until", 15),
                          total_epochs=options["epochs"],
                          start_factor=options.get("start_factor", 0.1),
                          end_factor=options.get("end_factor", 0.0))


def _takes_option(cls, option: str) -> bool:
    """Whether ``cls(...)`` accepts keyword ``option`` (by name or through **kwargs)."""
    params = inspect.signature(cls).parameters.values()
    return any(p.name == option or p.kind is p.VAR_KEYWORD for p in params)


class _PiecewiseFactor:
    """lr factor after ``epoch`` finished epochs: the product of the factors of the milestones passed."""

    def __init__(self, milestones, factors):
        self.milestones, self.factors = tuple(milestones), tuple(factors)

    def __call__(self, epoch: int) -> float:
        return math.prod(f for m, f in zip(self.milestones, self.factors) if epoch >= m)


def adam_steps(params, lr: float = 1e-3, betas=(0.9, 0.999), weight_decay: float = 0.0,
               milestones=(), factors=()) -> tuple[Optimizer, LambdaLR]:
    """Adam whose lr is multiplied by ``factors[i]`` once ``milestones[i]`` epochs have finished.

    With lr 1e-3, betas (0.5, 0.999), milestones (30, 50) and factors (0.5, 0.2) it is the WAE paper's
    optimizer for WAE-MMD (the official code, tolstikhin/wae: lr halved at epoch 30, divided by 5 at 50)."""
    if len(milestones) != len(factors):
        raise ValueError(f"need one factor per milestone, got milestones={milestones} and factors={factors}")
    opt = torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    return opt, LambdaLR(opt, _PiecewiseFactor(milestones, factors))
