"""A problem where the insensitivity of benchmarks/insensitivity.py does not hold: a full-batch tanh MLP.

    .venv/bin/python benchmarks/fullbatch_tanh.py

10-64-64-1 tanh MLP, 100 examples y = sin(sum x) trained full batch (the same batch every step), 400 steps,
seed 0, float32, CPU. Prints, for each form and h0, the loss at the last step (or the step where it passed 1e6).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lossgrad import LossGrad  # noqa: E402

FORMS = {"exact": dict(rollback=None, resolution_guard=False), "defaults": dict(),
         "rollback='increase'": dict(rollback="increase")}
H0 = (1e-8, 1e-3, 1e-1)


def run(h0: float, **options) -> str:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 10, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = LossGrad(model.parameters(), lr=h0, **options)
    first = F.mse_loss(model(x), y).item()
    for step in range(1, 401):
        opt.zero_grad()
        loss = opt.step(lambda: F.mse_loss(model(x), y)).item()
        if not loss < 1e6:
            return f"loss {loss:.3g} at step {step} (from {first:.3g})"
    return f"loss {loss:.3g} after 400 steps (from {first:.3g}), h {float(opt.param_groups[0]['lr']):.3g}"


def main() -> None:
    torch.set_num_threads(1)
    print("| form | " + " | ".join(f"h0 = {h0:g}" for h0 in H0) + " |")
    print("|---|" + "---|" * len(H0))
    for name, options in FORMS.items():
        print(f"| {name} | " + " | ".join(run(h0, **options) for h0 in H0) + " |", flush=True)
    print(f"\nCPU, 1 thread; torch {torch.__version__}; seed 0; {datetime.date.today().isoformat()}.")


if __name__ == "__main__":
    main()
