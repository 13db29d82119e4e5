"""The transient memory of one optimizer step, LossGrad's forms beside the torch optimizers, in one process.

    .venv/bin/python benchmarks/step_memory.py

Each optimizer trains an MLP 512-2048-2048-512 (float32, 6.3 M parameters) on random data for two steps (so that
its state exists), then one more step runs under ``torch.profiler`` with ``profile_memory=True``: forward and
backward outside the measured region (weight decay 1e-4 for all), then the optimizer's step alone (``opt.step()``; LossGrad:
``opt.step(closure, loss=loss)``, which includes the probe's forward pass). The profiler records every CPU
allocation and free in order; the peak of their running sum is the most memory the step held above what was
live when it began. Reported in units of the parameters' memory, beside ``probe forward``: the same forward pass
under ``no_grad`` alone, the least any LOSSGRAD step adds. Allocations are exact (no allocator caching, no RSS).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lossgrad import LossGrad  # noqa: E402

OPTIMIZERS = {  # name: constructor over the parameters
    "torch SGD": lambda ps: torch.optim.SGD(ps, lr=1e-3, weight_decay=1e-4, foreach=True),
    "torch SGD momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=1e-4, foreach=True),
    "torch Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-4, foreach=True),
}
for form, options in (("sgd", {}), ("momentum", dict(direction="momentum")), ("adam", dict(direction="adam"))):
    for path, sync_free in (("host", False), ("sync-free", True)):
        for rollback in ("nonfinite", None):
            name = f"LossGrad {form}, {path}, rollback={rollback}"
            OPTIMIZERS[name] = (lambda ps, o=options, s=sync_free, r=rollback:
                                LossGrad(ps, lr=1e-4, sync_free=s, rollback=r, weight_decay=1e-4, **o))


def peak_bytes(fn) -> int:
    """The peak, above the start, of the running sum of CPU allocations and frees made while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(name: str) -> tuple:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048),
                                torch.nn.ReLU(), torch.nn.Linear(2048, 512))
    x, y = torch.randn(32, 512), torch.randn(32, 512)
    closure = lambda: F.mse_loss(model(x), y)
    opt = OPTIMIZERS[name](model.parameters())
    is_lossgrad = isinstance(opt, LossGrad)
    for _ in range(3):
        opt.zero_grad()
        loss = closure()
        loss.backward()
        if _ < 2:
            opt.step(closure, loss=loss) if is_lossgrad else opt.step()
    step = (lambda: opt.step(closure, loss=loss)) if is_lossgrad else opt.step
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        forward = peak_bytes(closure)
    return peak_bytes(step) / params, forward / params, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="names of OPTIMIZERS to measure")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| optimizer | step's peak above its start / parameter memory | probe forward alone |")
    print("|---|---|---|")
    for name in args.only or OPTIMIZERS:
        step, forward, params = measure(name)
        print(f"| {name} | {step:.2f} | {forward:.3f} |", flush=True)
    print(f"\nCPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread); MLP "
          f"512-2048-2048-512, float32, {params / 2**20:.1f} MiB of parameters, batch 32, weight_decay 1e-4; "
          f"torch.profiler allocation records; torch {torch.__version__}; {datetime.date.today().isoformat()}.")


if __name__ == "__main__":
    main()
