"""From which initial step sizes h0 does LOSSGRAD end at the same h?  The README's insensitivity claim.

    .venv/bin/python benchmarks/insensitivity.py

One problem only: a small float32 regression MLP (10-64-64-1, ReLU, 1000 examples of a fixed random
function, batch 100, 1500 steps, seed 0). For each h0 and each form of the optimizer it prints the median h
of the last 300 steps, the last batch loss and the share of steps that were undone. The tests
(tests/test_lossgrad.py) check the ranges the README states on this same problem. Other problems can
behave otherwise: on some tiny full-batch problems the exact algorithm diverges already from h0 = 1e-2.
"""

from __future__ import annotations

import datetime
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lossgrad import LossGrad  # noqa: E402

FORMS = {  # name: LossGrad options
    "exact (rollback=None, resolution_guard=False)": dict(rollback=None, resolution_guard=False),
    "defaults": dict(),
    "rollback='increase'": dict(rollback="increase"),
    "momentum 0.9, exact": dict(direction="momentum", rollback=None, resolution_guard=False),
    "momentum 0.9": dict(direction="momentum"),
    "momentum 0.9, rollback='increase'": dict(direction="momentum", rollback="increase"),
    "Nesterov 0.9": dict(direction="momentum", nesterov=True),
    "Adam, exact": dict(direction="adam", rollback=None, resolution_guard=False),
    "Adam": dict(direction="adam"),
    "Adam, rollback='increase'": dict(direction="adam", rollback="increase"),
}
H0 = (1e-10, 1e-6, 1e-3, 1e-1, 1.0, 10.0, 1e3)


def insensitivity_run(h0: float, **options) -> tuple[float, float, float]:
    """(median h of the last 300 steps, last batch loss, share of steps undone)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 10, generator=g)
    y = torch.sin(x @ torch.randn(10, 3, generator=g)).sum(1, keepdim=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = LossGrad(model.parameters(), lr=h0, **options)
    hs, undone = [], 0
    for i in range(1500):
        idx = torch.arange(i * 100, (i + 1) * 100) % 1000
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        loss = opt.step(lambda: F.mse_loss(model(xb), yb))
        hs.append(float(opt.param_groups[0]["lr"]))
        undone += bool(opt.last["undone"])
    return statistics.median(hs[-300:]), loss.item(), undone / 1500


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| form | " + " | ".join(f"h0 = {h0:g}" for h0 in H0) + " |")
    print("|---|" + "---|" * len(H0))
    for name in args.forms:
        options = FORMS[name]
        cells = []
        for h0 in H0:
            h, loss, undone = insensitivity_run(h0, **options)
            cell = f"h {h:.2g}, loss {loss:.2g}" if math.isfinite(loss) else f"h {h:.2g}, loss {loss}"
            cells.append(cell + (f", {undone:.0%} undone" if undone else ""))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nCPU, 1 thread; torch {torch.__version__}; seed 0; {datetime.date.today().isoformat()}.")


if __name__ == "__main__":
    main()
