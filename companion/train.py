"""One training loop for every optimizer of the companion, and what a notebook's runs share.

* :func:`fit` trains a model for a number of epochs with any optimizer (``LossGrad`` through
  its closure, so its probe sees the same dropout masks; L4 with the batch loss; the rest with a
  plain ``step()``), logs the loss and the step size of every step, evaluates train and test
  metrics after every epoch, shows a progress bar, and checkpoints after every epoch so that a
  killed run resumes where it stopped, bit for bit on the CPU.
* :class:`Experiment` holds a notebook's data, task, model and budget, derives each run's identity and
  trains (or loads) a run through the run store (:mod:`companion.store`, below this module); where its
  runs train is :mod:`companion.runner`'s business (above it), which registers itself here.
* A run at one torch thread trains with denormal floats flushed to zero on the CPU (:func:`flushed_denormals`):
  execution, not part of a run's identity, like the thread count.

Layers: ``store`` <- ``train`` <- ``runner`` <- notebooks; no module imports one above it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lossgrad import LossGrad

from .baselines import make_optimizer
from .data import atomic_save
from .profiles import headless
from .store import RunStore, tensors_digest

Batch = tuple  # a tuple of tensors sharing their first dimension

# Part of every run's identity. Bump it when a change to lossgrad.py or companion/ changes the numbers a
# run computes (not for refactors that keep them bit for bit): every stored run is then recomputed.
RUN_CODE_VERSION = 1

# The data sets of the last experiment that trained on a GPU, moved there once (Experiment._data_on_device).
_ON_DEVICE: dict = {}

# How often fit() reports progress within an epoch (seconds).
REPORT_SECONDS = 2.0


# ------------------------------------------------------------------- basics
def pick_device(device: Optional[str] = None) -> torch.device:
    """``device`` if given, else CUDA when available, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------- denormals
FLUSH_DENORMALS_ENV = "LOSSGRAD_FLUSH_DENORMALS"


def denormals_flushed() -> bool:
    """Whether the calling thread's CPU arithmetic flushes denormal floats to zero (torch has a setter, no getter)."""
    return (torch.tensor([1e-39]) * 1.0).item() == 0.0


def flush_denormals_setting() -> bool:
    """``$LOSSGRAD_FLUSH_DENORMALS``: ``1`` (the default) flushes denormals while a run trains at one torch
    thread, ``0`` keeps them; anything else is an error that says so."""
    value = os.environ.get(FLUSH_DENORMALS_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"${FLUSH_DENORMALS_ENV} must be 1 (flush denormal floats to zero while a run trains at one "
                         f"torch thread: the default) or 0 (keep them), got {value!r}")
    return value == "1"


@contextlib.contextmanager
def flushed_denormals(enabled: Optional[bool] = None):
    """Denormal floats (float32 magnitudes below 1.2e-38) flushed to zero inside the block when the process
    computes on one torch thread; the calling thread's mode before it is restored after. Yields whether it
    flushed. ``enabled``: None reads :func:`flush_denormals_setting`.

    Why: CPU arithmetic on denormals is many times slower, and training makes them: Adam's second moments of
    parameters whose gradients vanish, and networks that collapsed. Measured on this project's 2-core CPU, two
    runs side by side at one thread each: LOSSGRAD's Adam form on the MNIST network went from 12-13 s to 5.5 s
    per epoch once it collapsed, and at batch 32 from 37 to 12 s per epoch. Why one thread only: the mode
    belongs to a CPU thread, and torch's intra-op threads started before the block keep theirs, so with more
    threads only part of the arithmetic would flush and a run's numbers could depend on what the process did
    before; at one thread all of it runs on the calling thread. Flushing changes a number only where a denormal
    would have reached it; like the thread count it is execution, not part of a run's identity (each result
    records ``denormals``: flushed or kept). It acts on the CPU only: CUDA kernels keep their own rule."""
    if enabled is None:
        enabled = flush_denormals_setting()
    flush = enabled and torch.get_num_threads() == 1
    before = denormals_flushed()
    torch.set_flush_denormal(flush)
    try:
        yield flush
    finally:
        torch.set_flush_denormal(before)


def seed_everything(seed: int) -> None:
    """Seeds torch's CPU and CUDA generators; on the CPU, runs are then deterministic."""
    torch.manual_seed(seed)


def batches(tensors: Batch, batch_size: int, generator: Optional[torch.Generator] = None):
    """Mini-batches of in-memory tensors: shuffled with ``generator``, in order without it."""
    n = len(tensors[0])
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for idx in order.split(batch_size):
        yield tuple(t[idx] for t in tensors)


# -------------------------------------------------------------------- tasks
class Classification:
    """Cross entropy on (inputs, labels); reports loss and accuracy, and the batch accuracy of every step."""

    metrics = ("loss", "acc")
    step_metrics = ("acc",)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def loss_and_step_metrics(self, model: nn.Module, batch: Batch) -> tuple:
        """The batch loss and the batch accuracy (logged per step by :func:`fit`)."""
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(1) == y).float().mean()}

    def evaluate(self, model: nn.Module, batch: Batch) -> dict:
        x, y = batch
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y, reduction="sum"), "acc": (logits.argmax(1) == y).sum()}


class BinaryClassification:
    """Binary cross entropy with logits on (inputs..., labels in {0, 1}); loss and accuracy, and the batch
    accuracy of every step."""

    metrics = ("loss", "acc")
    step_metrics = ("acc",)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        *inputs, y = batch
        return F.binary_cross_entropy_with_logits(model(*inputs), y)

    def loss_and_step_metrics(self, model: nn.Module, batch: Batch) -> tuple:
        """The batch loss and the batch accuracy (logged per step by :func:`fit`)."""
        *inputs, y = batch
        logits = model(*inputs)
        acc = ((logits > 0).to(y.dtype) == y).float().mean()
        return F.binary_cross_entropy_with_logits(logits, y), {"acc": acc}

    def evaluate(self, model: nn.Module, batch: Batch) -> dict:
        *inputs, y = batch
        logits = model(*inputs)
        return {"loss": F.binary_cross_entropy_with_logits(logits, y, reduction="sum"),
                "acc": ((logits > 0).to(y.dtype) == y).sum()}


class Reconstruction:
    """Mean squared error between the model's output and its input (batch = (images, ...)).

    The loss is the mean over pixels and images, the MSE the paper's autoencoder table reports."""

    metrics = ("loss",)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x = batch[0]
        return F.mse_loss(model(x), x)

    def evaluate(self, model: nn.Module, batch: Batch) -> dict:
        x = batch[0]
        per_image = F.mse_loss(model(x), x, reduction="none").flatten(1).mean(1)
        return {"loss": per_image.sum()}


@torch.no_grad()
def evaluate(model: nn.Module, task, data: Batch, device: torch.device, batch_size: int = 1000) -> dict:
    """Metrics of ``task`` averaged over ``data`` with the model in eval mode."""
    was_training = model.training
    model.eval()
    sums: dict = {}
    for batch in batches(data, batch_size):
        for k, v in task.evaluate(model, _to(batch, device)).items():
            sums[k] = sums.get(k, 0) + v.double()
    model.train(was_training)
    return {k: float(v) / len(data[0]) for k, v in sums.items()}


# --------------------------------------------------------------------- fit
def step_size(optimizer: torch.optim.Optimizer):
    """``param_groups[0]['lr']`` now (a float, or a 0-dim tensor we must not sync on)."""
    lr = optimizer.param_groups[0]["lr"]
    return lr.detach().clone() if isinstance(lr, Tensor) else lr


def step_size_used(optimizer, before):
    """The step size the last step used: ``lr`` before it (SGD, schedules, LossGrad, which sets the next
    step's h), or after it for optimizers that derive it from the batch (WNGrad, L4)."""
    return step_size(optimizer) if getattr(optimizer, "reports_step_size_after_step", False) else before


def train_step(model: nn.Module, optimizer, task, batch: Batch, step_metrics: Optional[dict] = None) -> Tensor:
    """One optimizer step on ``batch``; returns the batch loss at the point before the step.

    With ``step_metrics`` (a dict) and a task that has ``loss_and_step_metrics``, the dict receives
    that task's batch metrics (accuracy) of the forward pass before the step, at no extra forward pass."""
    optimizer.zero_grad(set_to_none=True)
    if step_metrics is not None and hasattr(task, "loss_and_step_metrics"):
        def closure():
            loss, metrics = task.loss_and_step_metrics(model, batch)
            if torch.is_grad_enabled():  # the forward pass at x, not LossGrad's probe (run under no_grad)
                step_metrics.update({k: v.detach() for k, v in metrics.items()})
            return loss
    else:
        closure = lambda: task.loss(model, batch)
    if isinstance(optimizer, LossGrad):
        return optimizer.step(closure).detach()
    loss = closure()
    loss.backward()
    if "loss" in inspect.signature(optimizer.step).parameters:
        optimizer.step(loss=loss.detach())
    else:
        optimizer.step()
    return loss.detach()


def fit(model: nn.Module, optimizer, task, train_data: Batch, test_data: Batch, *, epochs: int,
        batch_size: int, device: torch.device, seed: int = 0, scheduler=None,
        augment: Optional[Callable[[Batch, torch.Generator], Batch]] = None,
        checkpoint: Optional[Path] = None, eval_train: bool = True, eval_batch_size: int = 1000,
        progress: bool = True, desc: str = "", report: Optional[Callable[[dict], None]] = None) -> dict:
    """Trains ``model`` and returns its history (see :func:`run` for the layout).

    Epoch 0 in ``history['epochs']`` is the evaluation before training. A run whose loss
    stops being finite is stopped and marked ``diverged``. With ``checkpoint``, the state is
    saved after every epoch and a run that finds its checkpoint resumes from it.

    ``report``, if given, replaces the progress bar: it receives ``dict(epoch, epochs, step, steps,
    start_step, metrics)`` (``step`` counts the run's steps, resumed ones included; ``start_step`` those
    done before this call; ``metrics`` the latest epoch's test metrics) when training starts, every
    ``REPORT_SECONDS``, and after each epoch once its checkpoint is on disk."""
    generator = torch.Generator().manual_seed(seed)  # data order and augmentation
    history = {"epochs": [], "steps": {"loss": [], "lr": [], "ratio": []}, "diverged": False, "seconds": 0.0}
    step_keys = getattr(task, "step_metrics", ()) if hasattr(task, "loss_and_step_metrics") else ()
    for key in step_keys:
        history["steps"][key] = []
    start_epoch = 1
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history, start_epoch = state["history"], state["epoch"] + 1
    else:
        history["epochs"].append(_epoch_metrics(0, model, task, train_data, test_data, device,
                                                eval_train, eval_batch_size, history))

    n_batches = math.ceil(len(train_data[0]) / batch_size)
    start_step = step = (start_epoch - 1) * n_batches
    total = epochs * n_batches
    bar = _progress(total=total, initial=step, desc=desc, enabled=progress and report is None)
    last_report = time.monotonic()

    def tell(epoch: int) -> None:
        latest = {k: v for k, v in history["epochs"][-1].items() if k.startswith("test_")}
        report(dict(epoch=epoch, epochs=epochs, step=step, steps=total, start_step=start_step, metrics=latest))

    if report is not None:
        tell(start_epoch - 1)
    model.train()
    for epoch in range(start_epoch, epochs + 1):
        if history["diverged"]:
            break
        tic = time.perf_counter()
        losses, lrs, ratios = [], [], []
        per_step = {key: [] for key in step_keys}
        for batch in batches(train_data, batch_size, generator):
            batch = _to(batch, device)
            if augment is not None:
                batch = augment(batch, generator)
            before = step_size(optimizer)
            metrics = {} if step_keys else None
            losses.append(train_step(model, optimizer, task, batch, metrics))
            for key in step_keys:
                per_step[key].append(metrics[key])
            lrs.append(step_size_used(optimizer, before))
            if isinstance(optimizer, LossGrad):
                ratios.append(optimizer.last["ratio"])
            bar.update(1)
            step += 1
            if report is not None and time.monotonic() - last_report > REPORT_SECONDS:
                tell(epoch - 1)
                last_report = time.monotonic()
        if scheduler is not None:
            scheduler.step()
        epoch_losses = torch.stack(losses).float().cpu()  # one sync per epoch
        history["steps"]["loss"].append(epoch_losses)
        history["steps"]["lr"].append(_host_series(lrs))
        if ratios:
            history["steps"]["ratio"].append(_host_series(ratios))
        for key in step_keys:
            history["steps"].setdefault(key, []).append(torch.stack(per_step[key]).float().cpu())
        history["seconds"] += time.perf_counter() - tic
        if not torch.isfinite(epoch_losses).all():
            history["diverged"] = True
        row = _epoch_metrics(epoch, model, task, train_data, test_data, device, eval_train, eval_batch_size, history)
        history["epochs"].append(row)
        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.startswith("test_")}, refresh=False)
        if checkpoint is not None:
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict() if scheduler is not None else None,
                          "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                          "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                          "history": history, "epoch": epoch}, Path(checkpoint))
        if report is not None:
            tell(epoch)  # after the checkpoint: a reported epoch survives a crash
    bar.close()
    steps = history["steps"]
    history["steps"] = {k: torch.cat(v) if v else torch.empty(0) for k, v in steps.items()}
    return history


def _epoch_metrics(epoch, model, task, train_data, test_data, device, eval_train, eval_batch_size, history):
    row = {"epoch": epoch, "seconds": history["seconds"]}
    if eval_train:
        row.update({f"train_{k}": v for k, v in evaluate(model, task, train_data, device, eval_batch_size).items()})
    row.update({f"test_{k}": v for k, v in evaluate(model, task, test_data, device, eval_batch_size).items()})
    return row


# --------------------------------------------------------------------- run
@dataclass
class Experiment:
    """What a notebook's runs share: data, task, model constructor, budget, device."""

    notebook: str
    profile: str
    train_data: Batch
    test_data: Batch
    task: object
    model_fn: Callable[[], nn.Module]
    epochs: int
    batch_size: int
    device: torch.device
    overrides: Optional[dict] = None
    augment: Optional[Callable] = None
    eval_train: bool = True
    on_finish: Optional[Callable[[nn.Module], dict]] = None
    progress: bool = True
    config: Optional[dict] = None  # settings that shape the model or data (part of every run's identity)
    eval_batch_size: int = 1000
    model_options: Optional[dict] = None  # keyword arguments of model_fn, e.g. the initialisation
    # Execution, not part of any run's identity (companion.runner): worker processes (None: one per GPU,
    # 1 on a CPU; $LOSSGRAD_JOBS), 'local' or 'slurm' ($LOSSGRAD_EXECUTOR), and whether the data sets move
    # to the GPU once instead of per batch (None: when they take under a quarter of its free memory).
    jobs: Optional[int] = None
    executor: Optional[str] = None
    data_on_device: Optional[bool] = None

    def __post_init__(self):
        self.store = RunStore(self.notebook, self.profile, self.overrides)

    def identity(self, optimizer: str, seed: int, **options) -> dict:
        """Everything that changes the numbers of the run (optimizer, options, seed): its stored identity.

        Derived from what the run uses, so that no setting can be left out: the data themselves (a
        digest of every tensor, so the data set, its preprocessing, n_train and n_test), the task and
        its parameters, the model's name, its changed options and a digest of its initial weights
        (initialisation, architecture, frozen layers), the augmentation's code, the training code's
        version (:data:`RUN_CODE_VERSION`), the profile, and the notebook's ``config`` and overrides."""
        model_name = getattr(self.model_fn, "__name__", None)
        if not model_name or model_name == "<lambda>":
            raise ValueError("Experiment's model_fn needs a stable name (a def'd function, not a lambda or "
                             "functools.partial): the name is part of every stored run's identity")
        config = dict(notebook=self.notebook, optimizer=optimizer, options=options, seed=seed, epochs=self.epochs,
                      batch_size=self.batch_size, n_train=len(self.train_data[0]), model=model_name)
        changed = model_options_changed(self.model_fn, self.model_options)
        if changed:  # only what differs from model_fn's defaults: the defaults spelt out are the same run
            config["model_options"] = changed
        if self.config:
            config["settings"] = self.config
        if self.overrides:
            config["overrides"] = self.overrides
        config.update(
            code_version=RUN_CODE_VERSION, profile=self.profile, n_test=len(self.test_data[0]),
            train_data=self._data_digest("train_data"), test_data=self._data_digest("test_data"),
            task=_describe_task(self.task), augment=_describe_code(self.augment),
            model_init=self._init_digest(seed), eval_train=self.eval_train)
        return config

    def run(self, label: str, optimizer: str, seed: int, **options) -> dict:
        """Train one (optimizer, options, seed) run, or load it if it already finished.

        Returns ``dict(label, optimizer, options, seed, epochs=[per-epoch metrics],
        steps=dict(loss, lr, ratio), diverged, seconds, device, torch, denormals, extra)``. Trains like
        :meth:`run_all` (progress, executor); trained in this process (``jobs=1``), an error it raises reaches the
        caller as it is, and from a worker or a job as :class:`companion.runner.RunsFailed`."""
        return _execute(self, [(label, optimizer, seed, dict(options))])[0]

    def run_name(self, label: str, seed: int) -> str:
        """The file name of a run in the store."""
        return f"{_slug(label)}-seed{seed}"

    def check(self, optimizer: str, options: dict) -> None:
        """Bad options (a schedule beyond the epochs, an unknown argument) fail here, before anything trains."""
        make_optimizer(optimizer, [torch.zeros(1, requires_grad=True)], epochs=self.epochs, **options)

    def _run(self, label: str, optimizer: str, seed: int, options: dict,
             report: Optional[Callable[[dict], None]] = None, config: Optional[dict] = None) -> dict:
        """Trains (or loads) one run in this process. ``config``: its identity as the caller computed it (a
        worker gets its kernel's: a function defined in a notebook cell has no source file to hash there)."""
        if config is None:
            self.check(optimizer, options)
            config = self.identity(optimizer, seed, **options)

        def compute(checkpoint: Path) -> dict:
            with flushed_denormals() as flushed:
                return dict(train_run(checkpoint), denormals="flushed" if flushed else "kept")

        def train_run(checkpoint: Path) -> dict:
            seed_everything(seed)
            model = self.model_fn(**(self.model_options or {})).to(self.device)
            opt, scheduler = make_optimizer(optimizer, model.parameters(), epochs=self.epochs, **options)
            train_data, test_data = self._data_on_device()
            history = self.train(model, opt, scheduler, train_data, test_data, seed=seed, checkpoint=checkpoint,
                                 report=report, desc=f"{label} seed {seed}")
            extra = self.on_finish(model) if self.on_finish is not None else {}
            return dict(history, extra=extra, device=device_name(self.device), torch=torch.__version__)

        result = self.store.get(self.run_name(label, seed), config, compute)
        result.update(label=label, optimizer=optimizer, options=options, seed=seed)
        return result

    def train(self, model: nn.Module, optimizer, scheduler, train_data: Batch, test_data: Batch, *, seed: int,
              checkpoint: Path, report: Optional[Callable[[dict], None]], desc: str) -> dict:
        """How one run trains: :func:`fit` with this experiment's settings. A subclass that trains differently
        (measuring along the way, say) overrides this and keeps the rest: store, identity, executors."""
        return fit(model, optimizer, self.task, train_data, test_data, epochs=self.epochs,
                   batch_size=self.batch_size, device=self.device, seed=seed, scheduler=scheduler,
                   augment=self.augment, checkpoint=checkpoint, eval_train=self.eval_train,
                   eval_batch_size=self.eval_batch_size, progress=self.progress, desc=desc, report=report)

    def _data_on_device(self) -> tuple:
        """The data sets on the training device when they fit (moved once, kept for every run of this
        process), else where they are: each batch then moves on its own. The values are the same."""
        device = torch.device(self.device)
        if device.type == "cpu" or self.data_on_device is False:
            return self.train_data, self.test_data
        key = (str(device), *(id(t) for t in (*self.train_data, *self.test_data)))
        if _ON_DEVICE.get("key") != key:  # one copy per process, shared by experiments on the same data
            _ON_DEVICE.clear()
            size = sum(t.numel() * t.element_size() for t in (*self.train_data, *self.test_data))
            fits = self.data_on_device or (device.type == "cuda" and size < torch.cuda.mem_get_info(device)[0] / 4)
            data = (self.train_data, self.test_data)
            _ON_DEVICE.update(key=key, data=tuple(tuple(t.to(device) for t in d) for d in data) if fits else data,
                              sources=data)  # holds the tensors whose ids make the key

        return _ON_DEVICE["data"]

    def run_all(self, methods, seeds) -> list:
        """Every ``(label, optimizer, options)`` of ``methods`` with every seed of ``seeds``: the results in
        that order (methods outer, seeds inner), each loaded when stored, else trained.

        Where the runs train is execution, not part of any run's identity: in this process one after
        another (``jobs=1``), in ``jobs`` worker processes, or as cluster jobs (see :mod:`companion.runner`)."""
        return _execute(self, [(label, optimizer, seed, dict(options))
                               for label, optimizer, options in methods for seed in seeds])

    def _data_digest(self, field: str) -> str:
        cache = self.__dict__.setdefault("_digests", {})
        if field not in cache:  # hashing the data once per experiment
            cache[field] = tensors_digest(getattr(self, field))
        return cache[field]

    def _init_digest(self, seed: int) -> str:
        """Digest of the model's initial weights (and which are trained) as the run builds it under ``seed``."""
        key = ("init", seed, json.dumps(self.model_options, sort_keys=True, default=str))
        cache = self.__dict__.setdefault("_digests", {})
        if key not in cache:
            rng = torch.get_rng_state()
            seed_everything(seed)
            model = self.model_fn(**(self.model_options or {}))
            torch.set_rng_state(rng)
            trained = [name for name, p in model.named_parameters() if p.requires_grad]
            cache[key] = tensors_digest(tuple(model.state_dict().values()), extra=(list(model.state_dict()), trained))
        return cache[key]


# Where Experiment.run and run_all train their runs: companion.runner registers its run_all here when it is
# imported (companion/__init__.py imports it), so that this module, a layer below the runner, never imports it.
_RUN_ALL: Optional[Callable] = None


def register_executor(run_all: Callable) -> None:
    """Called by :mod:`companion.runner`: ``run_all(experiment, runs, jobs=..., executor=...)`` trains runs."""
    global _RUN_ALL
    _RUN_ALL = run_all


def _execute(experiment: "Experiment", runs: list) -> list:
    if _RUN_ALL is None:  # pragma: no cover - importing any part of companion imports the runner
        raise RuntimeError("no executor: import companion (or companion.runner) before running an Experiment")
    return _RUN_ALL(experiment, runs, jobs=experiment.jobs, executor=experiment.executor)


# ------------------------------------------------------------------ helpers
def model_options_changed(model_fn: Callable, options: Optional[dict]) -> dict:
    """The entries of ``options`` that differ from ``model_fn``'s defaults (an unknown name is an error)."""
    params = inspect.signature(model_fn).parameters
    unknown = sorted(set(options or {}) - set(params))
    if unknown:
        raise ValueError(f"{getattr(model_fn, '__name__', model_fn)} has no argument(s) {unknown}")
    return {k: v for k, v in (options or {}).items()
            if params[k].default is inspect.Parameter.empty or params[k].default != v}


def _describe_task(task) -> dict:
    """A task's class and its parameters (e.g. WAE-MMD's lambda and prior)."""
    return {"class": type(task).__qualname__, **{k: v for k, v in sorted(vars(task).items())}}


def _describe_code(fn) -> Optional[dict]:
    """A function's name and a digest of its source (an augmentation): changing its code changes runs."""
    if fn is None:
        return None
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError) as err:
        raise ValueError(f"the source of {fn!r} is needed for the run identity and cannot be read ({err}); "
                         "define it in a file or a notebook cell") from err
    closure = inspect.getclosurevars(fn).nonlocals if inspect.isfunction(fn) else {}
    # values it reads as globals (a notebook's S) are not seen: pass those as the Experiment's config
    return {"name": getattr(fn, "__qualname__", repr(fn)), "source": hashlib.sha256(source.encode()).hexdigest()[:16],
            "closure": {k: repr(v) for k, v in sorted(closure.items())}}


def _host_series(values: list) -> Tensor:
    """Per-step floats or 0-dim device tensors as one float64 CPU tensor (one copy, not one sync per step)."""
    if values and isinstance(values[0], Tensor):
        return torch.stack(values).double().cpu()
    return torch.tensor(values, dtype=torch.float64)


def _to(batch: Batch, device: torch.device) -> Batch:
    return tuple(t.to(device, non_blocking=True) for t in batch)


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in label)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled or headless():  # run_all.sh: no bar frozen into the executed notebook
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, mininterval=2.0)


@torch.no_grad()
def reconstruct(model: nn.Module, images: Tensor, device: torch.device) -> Tensor:
    """The model's outputs for ``images`` in eval mode, on the CPU (for image grids)."""
    was_training = model.training
    model.eval()
    out = model(images.to(device)).cpu()
    model.train(was_training)
    return out
