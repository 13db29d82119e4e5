"""The optimizers and learning-rate schedules LOSSGRAD is compared with, and one registry,
``make_optimizer``, that every notebook uses to build them.

Convention of the companion: after every ``step`` the step size just used is in
``optimizer.param_groups[0]['lr']`` (so one training loop logs all methods alike), and
custom optimizers accept ``step(closure=None, loss=None)``.

Schedules are ``torch.optim.lr_scheduler`` objects to be stepped once per EPOCH, at
the end of it (``scheduler.step()`` after the epoch's last batch).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
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
    "PEER_NAMES",
    "PeerOptimizer",
    "EvaluationWeights",
    "last_iterate",
    "peer_versions",
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
      lossgrad       every option passed straight to lossgrad.LossGrad; with average=..., returned with an
                     :class:`EvaluationWeights` (its averaged iterate is evaluated)
    Today's learning-rate-free peers (``PEER_NAMES``; notebook 09), each its package's class with every option
    passed on (the package's defaults otherwise), behind a :class:`PeerOptimizer` that logs its step size:
      dadapt_sgd, dadapt_adam   dadaptation.DAdaptSGD, DAdaptAdam (the package says: lr=1.0, its default)
      prodigy                   prodigyopt.Prodigy (lr=1.0, its default)
      dog, ldog                 dog.DoG, LDoG + averaging [True] with dog.PolynomialDecayAverager (averaging_gamma
                                [8.0]); returned with an :class:`EvaluationWeights` (the average is evaluated)
      sgd_schedulefree, adamw_schedulefree
                                schedulefree.SGDScheduleFree, AdamWScheduleFree; returned with an
                                :class:`EvaluationWeights` (``optimizer.eval()`` before every evaluation)
    ``epochs`` is accepted (and ignored) by every name, so a notebook can pass it
    uniformly. Any other unknown option is a TypeError (catches typos).
    """
    if name in PEERS:
        return _make_peer(name, params, options)
    if name == "lossgrad":
        from lossgrad import LossGrad  # lazy: repo-root module, imported only when asked for
        if "epochs" in options and not _takes_option(LossGrad, "epochs"):
            options.pop("epochs")
        opt = LossGrad(params, **options)
        return opt, EvaluationWeights(opt) if options.get("average") is not None else None
    if name not in _ACCEPTED:
        raise ValueError(f"unknown optimizer name {name!r}; valid names: "
                         f"{', '.join(OPTIMIZER_NAMES + PEER_NAMES)}")
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


# --------------------------------------------------------------------------------------
# Today's learning-rate-free peers (notebook 09), from their own packages
# --------------------------------------------------------------------------------------
#
# Each peer is the package's own optimizer class, built with the options given (every one of them passed on;
# the package's defaults otherwise), behind a thin facade that only (a) reports the step size each step used in
# ``param_groups[0]['lr']``, the companion's convention, read from the package's own state, and (b) puts the
# weights the package says to evaluate (schedule-free's x, DoG's iterate average) into the model for evaluation.
# The facade never changes what the package computes.

# name -> (package on the index, module, class): the packages are pinned in requirements.txt
PEERS = {
    "dadapt_sgd": ("dadaptation", "dadaptation", "DAdaptSGD"),
    "dadapt_adam": ("dadaptation", "dadaptation", "DAdaptAdam"),
    "prodigy": ("prodigyopt", "prodigyopt", "Prodigy"),
    "dog": ("dog-optimizer", "dog", "DoG"),
    "ldog": ("dog-optimizer", "dog", "LDoG"),
    "sgd_schedulefree": ("schedulefree", "schedulefree", "SGDScheduleFree"),
    "adamw_schedulefree": ("schedulefree", "schedulefree", "AdamWScheduleFree"),
}
PEER_NAMES = tuple(PEERS)
# options of the facade itself (DoG's iterate averaging), beside the package class's own
_AVERAGING_OPTIONS = {"averaging", "averaging_gamma"}


def peer_versions() -> dict:
    """The installed version of every peer package (``{'dadaptation': '3.2', ...}``; None when missing): for the
    conditions line of a notebook that uses them."""
    from importlib import metadata

    versions = {}
    for package, _, _ in PEERS.values():
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _peer_class(name: str):
    import importlib

    package, module, cls = PEERS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise ImportError(f"make_optimizer({name!r}) needs the package {package!r} (pinned in requirements.txt: "
                          f".venv/bin/pip install -r requirements.txt)") from err


class PeerOptimizer(Optimizer):
    """A learning-rate-free optimizer of another package (``inner``), seen by the companion's training loop as
    every other optimizer is.

    * ``step(closure=None, loss=None)`` runs ``inner.step()`` on the gradients in ``p.grad`` (a ``closure``,
      torch's convention, is called first when ``loss`` is None) and then writes the step size that step used
      into ``param_groups[0]['lr']`` (``reports_step_size_after_step``, as WNGrad and L4): the value is read
      from the package's state, see :meth:`used_step_size`. Writing ``lr`` here changes nothing: the inner
      optimizer keeps its own ``lr`` (the multiplier its documentation says to leave at 1.0).
    * ``zero_grad`` and ``step`` first put the training weights back (:meth:`use_training_weights`) when
      :meth:`use_evaluation_weights` took them out; the latter is what the per-epoch object
      :class:`EvaluationWeights` that ``make_optimizer`` returns with such a peer calls (``fit`` steps it at the
      end of every epoch, right before it evaluates).
    * ``state_dict``/``load_state_dict`` hold the inner optimizer's and the facade's own state: a run resumed
      from a checkpoint continues as it would have.
    """

    reports_step_size_after_step = True

    def __init__(self, inner: Optimizer):
        params = [p for group in inner.param_groups for p in group["params"]]
        super().__init__(params, dict(lr=0.0))  # lr: the step size of the last step (0.0 before the first)
        self.inner = inner

    def _skip_step(self, loss) -> bool:
        """Whether to leave this step out (its step size logged as NaN); by default never."""
        return False

    # -- what each package calls its step size
    def _before_step(self):
        """What :meth:`used_step_size` needs from before the step (the package's state is updated by it)."""
        return None

    def used_step_size(self, before):
        """The step size the last step used, from the package's own state (float or 0-dim tensor)."""
        raise NotImplementedError

    # -- evaluation weights (overridden by schedule-free and DoG)
    def use_evaluation_weights(self) -> None:
        """Put the weights the package says to evaluate into the parameters (default: the trained ones)."""

    def use_training_weights(self) -> None:
        """Put the weights training continues from back into the parameters (undoes the call above)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.use_training_weights()
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], torch.Tensor] | None = None,
             loss: torch.Tensor | float | None = None):
        """One step of the inner optimizer; ``param_groups[0]['lr']`` is then the step size it used."""
        self.use_training_weights()
        if loss is None and closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._skip_step(loss):
            for group in self.param_groups:
                group["lr"] = math.nan
            return loss
        before = self._before_step()
        self.inner.step()
        used = self.used_step_size(before)
        for group in self.param_groups:
            group["lr"] = used
        self._after_step()
        return loss

    def _after_step(self) -> None:
        pass

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "lr": self.param_groups[0]["lr"], **self._extra_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict["inner"])
        for group in self.param_groups:
            group["lr"] = state_dict["lr"]
        self._load_extra_state(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "inner", None) is not None:
            raise RuntimeError(f"{type(self).__name__}: add the group to the inner optimizer's package class "
                               "before wrapping it (the facade mirrors its parameters once)")
        super().add_param_group(param_group)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


class DAdaptationPeer(PeerOptimizer):
    """D-Adaptation (``DAdaptSGD``, ``DAdaptAdam``) and Prodigy: the step size is the packages' ``dlr``, the
    value their own logging reports as "the learning rate being used (d*lr)": ``d·lr/‖g₀‖`` for DAdaptSGD (its
    step is ``dlr·g``), ``d·lr`` (times Adam's bias correction when ``use_bias_correction``) for DAdaptAdam and
    Prodigy (their step is ``dlr·m/√v``: Adam's lr), with the ``d`` and ``k`` before the step (the step
    updates them after using them)."""

    def _before_step(self):
        group = self.inner.param_groups[0]
        return group["d"], group["k"]

    def used_step_size(self, before):
        d, k = before
        group = self.inner.param_groups[0]
        lr = max(g["lr"] for g in self.inner.param_groups)
        if type(self.inner).__name__ == "DAdaptSGD":
            g0 = group.get("g0_norm", math.nan)
            return d * lr / g0 if g0 else math.nan
        if group.get("use_bias_correction"):
            beta1, beta2 = group["betas"]
            lr = lr * (1 - beta2 ** (k + 1)) ** 0.5 / (1 - beta1 ** (k + 1))
        return d * lr


class ScheduleFreePeer(PeerOptimizer):
    """Schedule-free SGD and AdamW: the gradient is taken at y, the weights to evaluate are x. As the package
    says, ``optimizer.train()`` goes where ``model.train()`` is called and ``optimizer.eval()`` where
    ``model.eval()`` is: here ``inner.eval()`` when an epoch ends, right before ``fit`` evaluates (and saves
    its checkpoint: "in eval mode when storing checkpoints"), and ``inner.train()`` before the next step. The
    step size is the package's ``scheduled_lr``: ``lr`` times the linear warm-up factor."""

    def use_evaluation_weights(self) -> None:
        self.inner.eval()

    def use_training_weights(self) -> None:
        self.inner.train()

    def used_step_size(self, before):
        return self.inner.param_groups[0]["scheduled_lr"]

    @property
    def evaluating(self) -> bool:
        return not self.inner.param_groups[0]["train_mode"]


class _Parameters(torch.nn.Module):
    """The optimizer's parameters as a module, for ``dog.PolynomialDecayAverager`` (which averages a module)."""

    def __init__(self, params):
        super().__init__()
        self.params = torch.nn.ParameterList(params)


class DoGPeer(PeerOptimizer):
    """DoG and LDoG with the iterate averaging their README makes a condition of a fair comparison:
    ``dog.PolynomialDecayAverager`` (its default γ = 8) stepped after every optimizer step. The averaged
    iterate is the one evaluated (it replaces the weights when an epoch ends, and the last iterate comes back
    before the next step, bitwise); :func:`last_iterate` gives the other one. ``averaging=False`` evaluates the
    last iterate instead. The step size is DoG's ``eta`` (LDoG: the median of its per-tensor etas), a 0-dim
    tensor (no host sync)."""

    def __init__(self, inner: Optimizer, averaging: bool = True, averaging_gamma: float = 8.0):
        super().__init__(inner)
        self.averaging = bool(averaging)
        self.averager = None
        self._last = None  # the last iterate while the averaged one is in the parameters, else None
        if self.averaging:
            from dog import PolynomialDecayAverager

            params = [p for group in self.param_groups for p in group["params"]]
            self.averager = PolynomialDecayAverager(_Parameters(params), gamma=averaging_gamma)
        _AVERAGING.add(self)

    def _skip_step(self, loss) -> bool:
        """After a non-finite loss or gradient: DoG's step would assert on its gradient sum (``G > 0`` fails on NaN)
        and take the training loop down, so the step is left out, and the loop marks the run diverged at the epoch's
        end as for every other optimizer. (DoG's assert reads G on the host every step anyway: this check adds no new
        kind of sync.)"""
        grads = [p.grad for p in self._params() if p.grad is not None]
        finite_grads = not grads or bool(torch.isfinite(torch.stack([g.detach().abs().sum() for g in grads]).sum()))
        return (loss is not None and not math.isfinite(float(loss))) or not finite_grads

    def used_step_size(self, before):
        eta = self.inner.param_groups[0]["eta"]
        if type(self.inner).__name__ == "LDoG":
            return torch.stack([e.detach().reshape(()) for e in eta]).median()
        return eta[0].detach().reshape(()).clone()

    def _after_step(self) -> None:
        if self.averager is not None:
            self.averager.step()

    def _params(self) -> list:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def use_evaluation_weights(self) -> None:
        if self.averager is None or self._last is not None or self.averager.t == 1:  # nothing averaged yet
            return
        params = self._params()
        self._last = [p.detach().clone() for p in params]
        for p, a in zip(params, self.averager.averaged_model.parameters()):
            p.copy_(a)

    @torch.no_grad()
    def use_training_weights(self) -> None:
        if self._last is None:
            return
        for p, last in zip(self._params(), self._last):
            p.copy_(last)
        self._last = None

    @property
    def evaluating(self) -> bool:
        return self._last is not None

    def _extra_state(self) -> dict:
        return {"averager": self.averager.state_dict() if self.averager is not None else None,
                "last_iterate": self._last}

    def _load_extra_state(self, state: dict) -> None:
        if self.averager is not None and state.get("averager") is not None:
            self.averager.load_state_dict(state["averager"])
        last = state.get("last_iterate")
        self._last = None if last is None else [t.to(p.device) for t, p in zip(last, self._params())]


_AVERAGING: "weakref.WeakSet[DoGPeer]" = weakref.WeakSet()  # live averaging peers, for last_iterate


@contextlib.contextmanager
def last_iterate(model: torch.nn.Module):
    """``with last_iterate(model) as found:`` the model holds DoG's last iterate inside the block when a live
    averaging :class:`DoGPeer` trains it and has put the averaged iterate in (``found`` is True); the averaged
    one is back after the block. Otherwise the model is left as it is and ``found`` is False. For an
    ``Experiment``'s ``on_finish``: evaluating the last iterate beside the averaged one ``fit`` evaluated."""
    first = next(iter(model.parameters()), None)
    peer = next((o for o in list(_AVERAGING) if o.evaluating and first is not None
                 and any(p is first for p in o._params())), None)
    if peer is None:
        yield False
        return
    averaged = [p.detach().clone() for p in peer._params()]
    peer.use_training_weights()
    try:
        yield True
    finally:
        with torch.no_grad():
            peer._last = [p.detach().clone() for p in peer._params()]
            for p, a in zip(peer._params(), averaged):
                p.copy_(a)


class EvaluationWeights:
    """The per-epoch object ``make_optimizer`` returns with a schedule-free or DoG peer (or LossGrad with
    ``average``), in the place of an LR
    scheduler: ``fit`` steps it at the end of every epoch, right before it evaluates and checkpoints, and it
    puts the weights the package says to evaluate into the model (schedule-free's x, DoG's average). The next
    ``zero_grad``/``step`` puts the training weights back. It has no state of its own."""

    def __init__(self, optimizer: PeerOptimizer):
        self.optimizer = optimizer

    def step(self) -> None:
        if isinstance(self.optimizer, PeerOptimizer):
            self.optimizer.use_evaluation_weights()
        else:  # LossGrad(average=...): its averaged iterate, until its next step or zero_grad
            self.optimizer.eval()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def _make_peer(name: str, params, options: dict):
    cls = _peer_class(name)
    options = {k: v for k, v in options.items() if k != "epochs"}
    own = {k: options.pop(k) for k in list(options) if k in _AVERAGING_OPTIONS}
    if own and name not in ("dog", "ldog"):
        raise TypeError(f"make_optimizer({name!r}) got unknown option(s) {sorted(own)} (only dog and ldog average)")
    accepted = set(inspect.signature(cls).parameters) - {"params", "self"}
    unknown = set(options) - accepted
    if unknown:
        own_options = _AVERAGING_OPTIONS if name in ("dog", "ldog") else set()
        raise TypeError(f"make_optimizer({name!r}) got unknown option(s) {sorted(unknown)}; accepted (the "
                        f"package's {cls.__name__}): {sorted(accepted | own_options | {'epochs'})}")
    inner = cls(params, **options)
    if name in ("sgd_schedulefree", "adamw_schedulefree"):
        opt = ScheduleFreePeer(inner)
        return opt, EvaluationWeights(opt)
    if name in ("dog", "ldog"):
        opt = DoGPeer(inner, **own)
        return opt, EvaluationWeights(opt) if opt.averaging else None
    return DAdaptationPeer(inner), None
