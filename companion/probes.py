"""Which dropout masks LOSSGRAD's probe sees (notebook 08): matched, fresh or none.

LOSSGRAD compares the loss after its step, F(x'), with the loss before it, F(x), on the same batch. On a model with
dropout each evaluation draws masks, so *which* masks the probe F(x') uses decides what the comparison measures:

* ``"matched"``: the masks of the forward pass at x. ``LossGrad.step(closure)`` replays the random state of the
  forward pass in its probe, so this mode changes nothing: F(x') − F(x) is the change of one fixed function.
* ``"fresh"``: masks drawn anew for the probe, independent of the forward pass's: the behaviour of the authors' code
  (its probe ran in train mode after the forward pass, on the next draws of the generator). F(x') − F(x) then
  holds the difference of two independent dropout draws on top of the change the step made.
* ``"eval"``: the probe runs the model in eval mode (dropout off): F(x') is the deterministic network's loss,
  F(x) the loss with the forward pass's masks.

:func:`probe_closure` wraps a closure so that its probe call behaves per mode; :class:`DropoutProbeClassification`
is the cross-entropy task of :mod:`companion.train` with the mode built in (and recorded in every run's identity,
which describes a task by its class and its attributes), so an :class:`~companion.train.Experiment` can use it.

How the probe is told from the forward pass: ``LossGrad.step(closure)`` calls the closure for the forward pass with
autograd on and for the probe under ``no_grad`` (its default ``probe_grad=False``); :func:`companion.train.train_step`
relies on the same rule. With ``LossGrad(probe_grad=True)`` the probe cannot be told apart and every mode is
``"matched"``. Other optimizers call the closure once, with autograd on: every mode is then the plain loss.

Fresh masks, in detail: under ``no_grad`` the closure seeds the generators of the model's devices (the CPU's, and each
CUDA device's) from a hash of their state at that moment, evaluates the loss, and puts the generators back as they
were (:func:`torch.random.fork_rng`). So the probe's masks are a new, deterministic stream (a rerun draws the same
ones, a resumed run too: the state hashed is the one LossGrad replays, which fit() checkpoints), the training
stream is left as LossGrad leaves it (the forward passes of later steps draw what they would have drawn), and on an
accelerator, whose dropout does not touch the CPU's generator, the probe's masks still change every step.

Also here: :func:`mnist_mlp_dropout`, the paper's MNIST classifier with dropout after every hidden layer, and two
readings of a LOSSGRAD run's log for notebook 08 (:func:`probe_noise_share`, :func:`log_h_dispersion`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Callable

import torch
from torch import Tensor, nn

from . import models
from .train import Classification

__all__ = ["PROBES", "probe_closure", "DropoutProbeClassification", "mnist_mlp_dropout", "probe_noise_share",
           "log_h_dispersion"]

PROBES = ("matched", "fresh", "eval")


def _check_probe(probe: str) -> str:
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    return probe


def _is_probe() -> bool:
    """LossGrad's probe runs under ``no_grad`` (its default); its forward pass, and every other optimizer's, with grad."""
    return not torch.is_grad_enabled()


def _cuda_devices(model: nn.Module) -> list:
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def _fresh_seed(cuda_devices: list) -> int:
    """A 63-bit seed hashed from the generators' current state (the CPU's and the given CUDA devices')."""
    digest = hashlib.blake2b(torch.get_rng_state().numpy().tobytes(), digest_size=8, person=b"lossgrad-probe")
    for device in cuda_devices:
        digest.update(torch.cuda.get_rng_state(device).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


@contextlib.contextmanager
def _fresh_masks(model: nn.Module):
    """Inside: the generators of the model's devices run a new stream seeded from their state; after: as before."""
    cuda = _cuda_devices(model)
    seed = _fresh_seed(cuda)
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for device in cuda:
            torch.cuda.default_generators[device.index if device.index is not None else 0].manual_seed(seed)
        yield


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Inside: every module of ``model`` in eval mode; after: each one's own mode back (a frozen part stays frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def probe_context(model: nn.Module, probe: str):
    """The context a probe evaluation of ``model`` runs in under ``probe`` (a no-op for ``"matched"``)."""
    _check_probe(probe)
    if probe == "fresh":
        return _fresh_masks(model)
    if probe == "eval":
        return _eval_mode(model)
    return contextlib.nullcontext()


def probe_closure(closure: Callable[[], Tensor], model: nn.Module, probe: str = "matched") -> Callable[[], Tensor]:
    """``closure`` for ``LossGrad.step``, whose probe call (the one under ``no_grad``) sees ``probe``'s masks.

    ``"matched"`` returns ``closure`` itself (LossGrad replays the forward pass's masks); ``"fresh"`` evaluates the
    probe with masks drawn anew (see the module docstring); ``"eval"`` with ``model`` in eval mode. Calls with
    autograd on (the forward pass) are left alone. Example::

        loss = opt.step(probe_closure(lambda: F.cross_entropy(model(x), y), model, "fresh"))
    """
    _check_probe(probe)
    if probe == "matched":
        return closure

    def wrapped():
        if not _is_probe():
            return closure()
        with probe_context(model, probe):
            return closure()

    return wrapped


class DropoutProbeClassification(Classification):
    """Cross entropy (:class:`companion.train.Classification`) whose LOSSGRAD probe uses ``probe``'s masks.

    ``probe`` is one of :data:`PROBES`; it is an attribute, so it is part of every stored run's identity. Evaluation
    (:meth:`evaluate`, eval mode) and the forward pass are those of ``Classification``."""

    def __init__(self, probe: str = "matched"):
        self.probe = _check_probe(probe)

    def loss(self, model: nn.Module, batch: tuple) -> Tensor:
        with self._context(model):
            return super().loss(model, batch)

    def loss_and_step_metrics(self, model: nn.Module, batch: tuple) -> tuple:
        with self._context(model):
            return super().loss_and_step_metrics(model, batch)

    def _context(self, model: nn.Module):
        return probe_context(model, self.probe) if _is_probe() else contextlib.nullcontext()


def mnist_mlp_dropout(p: float = 0.0, init_std: float | None = 0.02, init_bias: float = 0.0) -> nn.Sequential:
    """The paper's MNIST classifier (:func:`companion.models.mnist_mlp`, 784-500-300-100-10, ReLU) with
    ``nn.Dropout(p)`` after every hidden layer's ReLU. The same initial weights as ``mnist_mlp`` under the same seed
    (dropout has no parameters); at ``p = 0`` the same function, and dropout draws no random numbers."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"the dropout probability p must lie in [0, 1), got {p!r}")
    layers = []
    for layer in models.mnist_mlp(init_std=init_std, init_bias=init_bias):
        layers.append(layer)
        if isinstance(layer, nn.ReLU):
            layers.append(nn.Dropout(p))
    return nn.Sequential(*layers)


def probe_noise_share(ratio, factor: float = 10.0) -> float:
    """Share of LOSSGRAD steps whose measured change |F(x') − F(x)| exceeds ``factor`` times the predicted decrease
    h‖G‖², read from the ratio alone: r = (F(x') − F(x) + h‖G‖²) / (h‖G‖²) gives |F(x') − F(x)| / (h‖G‖²) = |r − 1|.
    Steps without a ratio (NaN: a zero gradient, a step not taken) are left out; NaN when none is left."""
    r = torch.as_tensor(ratio, dtype=torch.float64)
    r = r[torch.isfinite(r)]
    if len(r) == 0:
        return math.nan
    return float(((r - 1).abs() > factor).double().mean())


def log_h_dispersion(lr, window: int) -> float:
    """The standard deviation of ln h over the last ``window`` steps: 0 for a constant h (LOSSGRAD moves ln h by ln c
    every step, up or down). NaN when some h there is not a finite number > 0."""
    h = torch.as_tensor(lr, dtype=torch.float64)
    if not 2 <= int(window) <= len(h):
        raise ValueError(f"window must be between 2 and the number of steps {len(h)}, got {window}")
    h = h[-int(window):]
    if not (h > 0).all() or not torch.isfinite(h).all():
        return math.nan
    return float(h.log().std())
