"""A smoke check, not a result: does each LOSSGRAD direction train notebook 04's autoencoder without diverging?

    .venv/bin/python benchmarks/directions_smoke.py            # 5 epochs, seed 0, real Fashion-MNIST

Notebook 04's model (784-200-100-50-100-200-784, the authors' code's N(0, 0.05^2) init with bias 0.2), MSE, batch
100, on real Fashion-MNIST (the Debian package dataset-fashion-mnist, or torchvision's download), one seed, a few
epochs, each form from h0 = 1e-4 (the authors' code's value) with LossGrad's defaults. It prints the test MSE after
every epoch and the final step size. How well the forms train is the modern-optimizers notebook's question.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from companion import data, models  # noqa: E402
from companion.train import Reconstruction, device_name, fit, seed_everything  # noqa: E402
from lossgrad import LossGrad  # noqa: E402

FORMS = {"sgd": dict(), "momentum 0.9": dict(direction="momentum"),
         "Nesterov 0.9": dict(direction="momentum", nesterov=True), "Adam": dict(direction="adam")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    fmnist = data.fashion_mnist(root=Path(__file__).resolve().parent.parent / "data")
    print(f"| form | test MSE by epoch (0..{args.epochs}) | final h | diverged | seconds |")
    print("|---|---|---|---|---|")
    for name, options in FORMS.items():
        seed_everything(args.seed)
        model = models.fmnist_autoencoder()
        opt = LossGrad(model.parameters(), lr=1e-4, **options)
        start = time.perf_counter()
        history = fit(model, opt, Reconstruction(), fmnist["train"], fmnist["test"], epochs=args.epochs,
                      batch_size=100, device=device, seed=args.seed, eval_train=False, progress=False)
        mse = " ".join(f"{e['test_loss']:.4f}" for e in history["epochs"])
        print(f"| {name} | {mse} | {float(opt.param_groups[0]['lr']):.3g} | {history['diverged']} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
    print(f"\nSmoke figure, not a result: {device_name(device)}; seed {args.seed}; {args.epochs} epochs; "
          f"torch {torch.__version__}; {datetime.date.today().isoformat()}.")


if __name__ == "__main__":
    main()
