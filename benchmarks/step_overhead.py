"""What one LOSSGRAD step costs against torch.optim.SGD, measured side by side in one process.

    .venv/bin/python benchmarks/step_overhead.py                 # all three models, CPU
    .venv/bin/python benchmarks/step_overhead.py --models mlp --reps 9

For each model (the paper's MNIST MLP at batch 100, CIFAR-10 CNN at batch 100, ResNet-56 at batch 128, on random
data of the right shapes) it times, in alternating repetitions, and reports medians:

* ``sgd``: a full SGD training step (zero_grad, forward, backward, ``SGD(foreach=True).step()``);
* ``floor``: that step plus one forward pass under no_grad: what any LOSSGRAD step must cost at least;
* ``lossgrad``: a full ``LossGrad.step(closure)`` with the defaults;
* ``exact``: the same with ``rollback=None, resolution_guard=False`` (Algorithm 1: no copy of the weights);
* ``internal``: LossGrad's own work, i.e. ``step(closure, loss=loss)`` minus the probe's forward pass, against
  ``sgd.step()`` alone.
Forms ``*+next`` (``probe='next'``) evaluate no probe: their step is compared with the torch step itself
(``LossGrad / torch step``), the floor being the paper's probe's.
Targets: lossgrad <= 1.05 x floor, internal <= 2.5 x sgd.step().

``--memory`` instead measures peak memory: each optimizer trains a wide MLP (about 100 MB of float32
parameters) for a few steps in a fresh process, which reports its peak resident set size (the CPU
allocator's high-water mark, ``ru_maxrss``) or, on a GPU, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import datetime
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from companion import models  # noqa: E402
from companion.train import device_name  # noqa: E402
from lossgrad import LossGrad  # noqa: E402

MODELS = {  # name: (constructor, input shape, batch size, steps per repetition)
    "mlp": (models.mnist_mlp, (1, 28, 28), 100, 40),
    "cnn": (models.cifar_cnn, (3, 32, 32), 100, 20),
    "resnet56": (models.resnet56, (3, 32, 32), 128, 3),
}


def timed(fn, steps: int) -> float:
    fn()  # warm-up outside the clock
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


FORMS = {  # LOSSGRAD's direction: (the torch optimizer it is compared with, LossGrad's options)
    "sgd": (lambda params: torch.optim.SGD(params, lr=1e-12, foreach=True), dict()),
    "momentum": (lambda params: torch.optim.SGD(params, lr=1e-12, momentum=0.9, foreach=True),
                 dict(direction="momentum")),
    "adam": (lambda params: torch.optim.Adam(params, lr=1e-12, foreach=True), dict(direction="adam")),
    # notebook 11's options: the next batch's verdict (no probe forward pass), the averaged iterate
    "sgd+next": (lambda params: torch.optim.SGD(params, lr=1e-12, foreach=True), dict(probe="next")),
    "adam+next": (lambda params: torch.optim.Adam(params, lr=1e-12, foreach=True),
                  dict(direction="adam", probe="next")),
    "adam+next+average": (lambda params: torch.optim.Adam(params, lr=1e-12, foreach=True),
                          dict(direction="adam", probe="next", average=8.0)),
    # notebook 11's chosen form (asymmetric factors) and its proposed combination (with smoothing and averaging)
    "adam+shrink": (lambda params: torch.optim.Adam(params, lr=1e-12, foreach=True),
                    dict(direction="adam", shrink=1.05 ** 2)),
    "adam+shrink+smoothing+average": (lambda params: torch.optim.Adam(params, lr=1e-12, foreach=True),
                                      dict(direction="adam", shrink=1.05 ** 2, smoothing=0.9, average=8.0)),
}


def measure(name: str, reps: int, form: str = "sgd") -> dict:
    build, shape, batch, steps = MODELS[name]
    make_reference, options = FORMS[form]
    torch.manual_seed(0)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    model = build()
    closure = lambda: F.cross_entropy(model(x), y)
    # tiny steps keep the weights (and so the work per step) the same throughout
    sgd = make_reference(model.parameters())  # the torch optimizer of this form
    lossgrad = LossGrad(model.parameters(), lr=1e-12, max_lr=1e-12, **options)
    exact = LossGrad(model.parameters(), lr=1e-12, max_lr=1e-12, rollback=None, resolution_guard=False, **options)

    def sgd_step():
        sgd.zero_grad()
        closure().backward()
        sgd.step()

    def floor_step():
        sgd_step()
        with torch.no_grad():
            closure()

    def lossgrad_step():
        lossgrad.zero_grad()
        lossgrad.step(closure)

    def exact_step():  # Algorithm 1 as published: no copy of the weights for a rollback
        exact.zero_grad()
        exact.step(closure)

    probe_time = [0.0]

    def timed_probe():
        start = time.perf_counter()
        loss = closure()
        probe_time[0] += time.perf_counter() - start
        return loss

    def internal_step():  # forward and backward outside; the probe's forward is subtracted below
        lossgrad.zero_grad()
        loss = closure()
        loss.backward()
        start = time.perf_counter()
        lossgrad.step(timed_probe, loss=loss)
        internal_step.total += time.perf_counter() - start

    def sgd_inner():
        sgd.zero_grad()
        closure().backward()
        start = time.perf_counter()
        sgd.step()
        sgd_inner.total += time.perf_counter() - start

    samples = {k: [] for k in ("sgd", "floor", "lossgrad", "exact", "internal", "sgd.step")}
    for _ in range(reps):
        samples["sgd"].append(timed(sgd_step, steps))
        samples["floor"].append(timed(floor_step, steps))
        samples["lossgrad"].append(timed(lossgrad_step, steps))
        samples["exact"].append(timed(exact_step, steps))
        internal_step.total, probe_time[0] = 0.0, 0.0
        lossgrad_step()  # warm-up of this path
        internal_step.total, probe_time[0] = 0.0, 0.0
        for _ in range(steps):
            internal_step()
        samples["internal"].append((internal_step.total - probe_time[0]) / steps)
        sgd_inner.total = 0.0
        for _ in range(steps):
            sgd_inner()
        samples["sgd.step"].append(sgd_inner.total / steps)
    return {k: statistics.median(v) for k, v in samples.items()}


MEMORY_OPTIMIZERS = {  # name: constructor over the parameters
    "SGD": lambda params: torch.optim.SGD(params, lr=1e-3, foreach=True),
    "LossGrad exact (rollback=None)": lambda params: LossGrad(params, lr=1e-3, rollback=None, resolution_guard=False),
    "LossGrad defaults": lambda params: LossGrad(params, lr=1e-3),
    "LossGrad defaults, sync_free": lambda params: LossGrad(params, lr=1e-3, sync_free=True),
}


def peak_memory_child(name: str, device: str) -> None:
    """Runs in a fresh process: a few training steps, then prints the peak memory in MiB."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096),
                                torch.nn.ReLU(), torch.nn.Linear(4096, 1024)).to(dev)
    x, y = torch.randn(64, 1024, device=dev), torch.randn(64, 1024, device=dev)
    closure = lambda: F.mse_loss(model(x), y)
    opt = MEMORY_OPTIMIZERS[name](model.parameters())
    for _ in range(3):
        opt.zero_grad()
        if isinstance(opt, LossGrad):
            opt.step(closure)
        else:
            closure().backward()
            opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated(dev) / 2**20)
    else:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
    print(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20)


def peak_memory(device: str) -> None:
    print(f"| optimizer | peak memory (MiB) | above SGD (MiB) | above SGD / parameter memory |")
    print("|---|---|---|---|")
    base = None
    for name in MEMORY_OPTIMIZERS:
        out = subprocess.run([sys.executable, __file__, "--memory-child", name, "--device", device],
                             check=True, capture_output=True, text=True).stdout.split()
        peak, params = float(out[0]), float(out[1])
        base = peak if base is None else base
        print(f"| {name} | {peak:.0f} | {peak - base:.0f} | {(peak - base) / params:.2f} |", flush=True)
    what = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "peak RSS (ru_maxrss)"
    print(f"\n{device_name(torch.device(device))}; {what}; MLP 1024-4096-4096-1024 ({params:.0f} MiB of float32 "
          f"parameters), batch 64, 3 steps; torch {torch.__version__}; {datetime.date.today().isoformat()}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=["sgd"],
                        help="LOSSGRAD directions, each against its torch optimizer (sgd: SGD; momentum: "
                             "SGD(momentum=0.9); adam: Adam), all foreach")
    parser.add_argument("--reps", type=int, default=7, help="alternating repetitions (medians are reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--memory", action="store_true", help="measure peak memory instead of time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --memory")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return peak_memory_child(args.memory_child, args.device)
    if args.memory:
        return peak_memory(args.device)
    print("| model | form | torch step (ms) | floor (ms) | LossGrad step (ms) | LossGrad / torch step | LossGrad / floor | "
          "exact / floor | LossGrad internal (ms) | torch .step() (ms) | internal / .step() |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, form in [(name, form) for name in args.models for form in args.forms]:
        m = measure(name, args.reps, form)
        ms = {k: v * 1e3 for k, v in m.items()}
        print(f"| {name} | {form} | {ms['sgd']:.2f} | {ms['floor']:.2f} | {ms['lossgrad']:.2f} | "
              f"{m['lossgrad'] / m['sgd']:.3f} | {m['lossgrad'] / m['floor']:.3f} | {m['exact'] / m['floor']:.3f} | {ms['internal']:.3f} | "
              f"{ms['sgd.step']:.3f} | {m['internal'] / m['sgd.step']:.2f} |", flush=True)
    print(f"\n{device_name(torch.device('cpu'))}; torch {torch.__version__}; medians of {args.reps} alternating "
          f"repetitions; {datetime.date.today().isoformat()}.")


if __name__ == "__main__":
    main()
