"""Ten minutes on a CUDA machine: is the companion ready for the paper's GPU runs?

    python benchmarks/gpu_check.py              # needs CUDA; prints one table; exit 1 if a check fails
    python benchmarks/gpu_check.py --skip-notebook --epochs 1

Checks, each a row of the table:

1. ``sync-free step``: LossGrad steps (``sync_free=True``, the default on a GPU) on ResNet-56 under
   ``torch.cuda.set_sync_debug_mode("error")``: any host-device synchronisation inside ``step`` raises.
2. ``epoch time``: one ResNet-56 epoch on CIFAR-10-shaped data with SGD and with LossGrad, side by side
   in this process (same data, same batches); the ratio LossGrad / SGD. The goal is 1.4 or less: the
   extra forward pass (about a third of a forward+backward step) and nothing more.
3. ``data on device``: the same SGD epoch with the data set kept on the GPU against per-batch host
   copies (what ``Experiment(data_on_device=...)`` chooses between).
4. ``resume``: two epochs straight against one epoch, a checkpoint, a fresh process state and the second
   epoch resumed (``companion.train.fit``): the parameters must match (bitwise with deterministic cuDNN).
5. ``2-job notebook``: ``./run_all.sh --profile smoke --jobs 2 04`` into a scratch run store: the
   parallel runner over the GPUs (one worker per GPU, or two on one GPU).

Without CUDA it says so and exits 1. The checks are functions of a device, so the tests run their CPU
parts (``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from companion import data as D  # noqa: E402
from companion import models as M  # noqa: E402
from companion import train as T  # noqa: E402
from lossgrad import LossGrad  # noqa: E402


def synthetic_cifar(n: int, device: torch.device) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def check_sync_free_step(device: torch.device, model_fn=M.resnet56, steps: int = 5, batch: int = 128) -> dict:
    """LossGrad steps with every host-device synchronisation an error (CUDA only; elsewhere, steps only)."""
    torch.manual_seed(0)
    model = model_fn().to(device)
    opt = LossGrad(model.parameters(), lr=1e-2, sync_free=True)
    x, y = synthetic_cifar(batch, device)
    closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    opt.step(closure)  # warm-up: lazy state, cuDNN autotuning (may sync; not the steady state)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            opt.step(closure)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    h = float(opt.param_groups[0]["lr"])
    ok = torch.isfinite(torch.tensor(h)).item()
    where = "under set_sync_debug_mode('error')" if device.type == "cuda" else "(sync check needs CUDA)"
    return dict(check="sync-free step", ok=ok, result=f"{steps} steps {where}, h = {h:.3g}")


def _epoch_seconds(model, optimizer, data: tuple, batch: int, device: torch.device, on_device: bool) -> float:
    """Seconds for one epoch of SGD-style steps (LossGrad through its closure)."""
    x_all, y_all = data
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    tic = time.perf_counter()
    for idx in order.split(batch):
        x, y = x_all[idx], y_all[idx]
        if not on_device:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
        if isinstance(optimizer, LossGrad):
            optimizer.step(closure)
        else:
            closure().backward()
            optimizer.step()
    sync()
    return time.perf_counter() - tic


def check_epoch_ratio(device: torch.device, model_fn=M.resnet56, n: int = 50_000, batch: int = 128,
                      epochs: int = 2) -> dict:
    """LossGrad / SGD epoch time (the best of ``epochs`` epochs each, alternating)."""
    data = synthetic_cifar(n, device)
    torch.manual_seed(0)
    sgd_model, lg_model = model_fn().to(device), model_fn().to(device)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9)
    lossgrad = LossGrad(lg_model.parameters(), lr=1e-2)
    times = {"sgd": [], "lossgrad": []}
    for _ in range(epochs):
        times["sgd"].append(_epoch_seconds(sgd_model, sgd, data, batch, device, on_device=True))
        times["lossgrad"].append(_epoch_seconds(lg_model, lossgrad, data, batch, device, on_device=True))
    ratio = min(times["lossgrad"]) / min(times["sgd"])
    return dict(check="epoch time", ok=ratio <= 1.4,
                result=f"SGD {min(times['sgd']):.1f} s, LossGrad {min(times['lossgrad']):.1f} s: "
                       f"{ratio:.2f}x (goal <= 1.4)")


def check_data_on_device(device: torch.device, model_fn=M.resnet56, n: int = 50_000, batch: int = 128) -> dict:
    """An SGD epoch with the data on the device against per-batch copies from host memory (as ``fit`` does
    when the data stay on the host: each batch is gathered on the host, then copied)."""
    host = synthetic_cifar(n, torch.device("cpu"))
    on_device = tuple(t.to(device) for t in host)
    torch.manual_seed(0)
    model = model_fn().to(device)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _epoch_seconds(model, sgd, on_device, batch, device, on_device=True)  # warm-up
    kept = _epoch_seconds(model, sgd, on_device, batch, device, on_device=True)
    copied = _epoch_seconds(model, sgd, host, batch, device, on_device=False)
    return dict(check="data on device", ok=True,
                result=f"epoch {kept:.1f} s kept on {device.type} vs {copied:.1f} s copied per batch "
                       f"({copied / kept:.2f}x)")


def check_resume(device: torch.device, model_fn=M.resnet56, n: int = 2048, batch: int = 128) -> dict:
    """Two epochs straight against one epoch, a checkpoint, and the second resumed in a fresh model and
    optimizer: the same weights, norm buffers and step size h? (A resume that restarted from scratch
    or lost the optimizer's state would differ.)"""
    deterministic = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    train = synthetic_cifar(n, torch.device("cpu"))
    test = synthetic_cifar(256, torch.device("cpu"))
    task = T.Classification()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            finals = []
            for name, stops in (("straight", [2]), ("resumed", [1, 2])):
                checkpoint = Path(tmp) / f"{name}.ckpt"
                for epochs in stops:  # a fresh model and optimizer each time, as after a crash
                    torch.manual_seed(0)
                    model = model_fn().to(device)
                    opt = LossGrad(model.parameters(), lr=1e-2)
                    T.fit(model, opt, task, train, test, epochs=epochs, batch_size=batch, device=device,
                          checkpoint=checkpoint, eval_train=False, progress=False)
                state = [t.detach().float().flatten().cpu() for t in model.state_dict().values()]
                finals.append(torch.cat(state + [torch.tensor([float(opt.param_groups[0]["lr"])])]))
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic
    gap = (finals[0] - finals[1]).abs().max().item()
    return dict(check="resume", ok=gap == 0.0, result="bitwise equal (weights, buffers, h)" if gap == 0
                else f"max |diff| {gap:.3g}")


def check_notebook_jobs(jobs: int = 2, notebook: str = "04") -> dict:
    """``./run_all.sh --profile smoke --jobs 2 04`` into a scratch run store."""
    with tempfile.TemporaryDirectory() as runs:
        tic = time.perf_counter()
        try:
            proc = subprocess.run([str(REPO / "run_all.sh"), "--profile", "smoke", "--jobs", str(jobs), notebook],
                                  env=dict(os.environ, LOSSGRAD_RUNS=runs), capture_output=True, text=True,
                                  timeout=300)
        except subprocess.TimeoutExpired:
            return dict(check=f"{jobs}-job notebook", ok=False, result="no result in 300 s")
        seconds = time.perf_counter() - tic
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return dict(check=f"{jobs}-job notebook", ok=proc.returncode == 0,
                result=f"run_all.sh --jobs {jobs} {notebook}: exit {proc.returncode} in {seconds:.0f} s; {tail[0][:60]}")


def table(rows: list) -> str:
    width = max(len("check"), *(len(r["check"]) for r in rows))
    lines = [f"{'check':<{width}}  ok    result"]
    lines += [f"{r['check']:<{width}}  {'yes' if r['ok'] else 'NO':<4}  {r['result']}" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per optimizer (the best counts)")
    parser.add_argument("--n", type=int, default=50_000, help="images per timed epoch (CIFAR-10: 50000)")
    parser.add_argument("--skip-notebook", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; this check needs a CUDA GPU (nothing was measured).")
        return 1
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name(device)}, {torch.cuda.device_count()} GPU(s), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; ResNet-56, batch 128")
    rows = []
    checks = [("sync-free step", lambda: check_sync_free_step(device)),
              ("epoch time", lambda: check_epoch_ratio(device, n=args.n, epochs=args.epochs)),
              ("data on device", lambda: check_data_on_device(device, n=args.n)),
              ("resume", lambda: check_resume(device))]
    if not args.skip_notebook:
        checks.append(("2-job notebook", check_notebook_jobs))
    for name, check in checks:
        try:
            rows.append(check())
        except Exception as err:  # one failing check does not hide the others
            rows.append(dict(check=name, ok=False, result=f"{type(err).__name__}: {err}"))
        print(table(rows[-1:]).splitlines()[1], flush=True)
    print()
    print(table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
