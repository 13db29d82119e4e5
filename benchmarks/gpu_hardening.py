"""The second adversarial round's fixes on a CUDA device (issue 25 §1), where the sync-free path is the default.

    python benchmarks/gpu_hardening.py          # needs CUDA; prints one line per check; exit 1 if one fails

Every LossGrad step below runs under ``torch.cuda.set_sync_debug_mode("error")``, so a host-device
synchronisation inside ``step`` (or ``add_param_group``, or adopting an h written in place) raises. Checks:
the three directions on float32, bfloat16 and float16 parameters (a small MLP with a batch norm: steps finite,
not all undone, running statistics advanced once per step); a closure returning the loss at x refused; a
closure over outputs from before the step holds h instead of growing it; a NaN gradient shrinks h by c; the
16-bit step made in float32; and the transient memory of one step (``torch.cuda.max_memory_allocated`` above
its start, in parameter sizes) for each form beside the torch optimizer of that form, on an MLP with 64 M
float32 parameters.
"""

from __future__ import annotations

import contextlib
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lossgrad  # noqa: E402
from lossgrad import LossGrad  # noqa: E402

DEVICE = torch.device("cuda")
FORMS = {"sgd": {}, "momentum": dict(direction="momentum"), "adam": dict(direction="adam")}


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def small_model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 1)).to(DEVICE, dtype)


def data(dtype, seed=0, n=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x.to(DEVICE, dtype), torch.sin(x.sum(1, keepdim=True)).to(DEVICE, dtype)


def check_forms_and_dtypes() -> str:
    out = []
    for form, options in FORMS.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            model = small_model(dtype)
            opt = LossGrad(model.parameters(), lr=1e-3, weight_decay=1e-4, **options)
            x, y = data(dtype)
            closure = lambda: F.mse_loss(model(x).float(), y.float())  # noqa: E731
            opt.step(closure)  # lazy state outside the sync check
            undone = []
            with no_sync():
                for _ in range(30):
                    opt.zero_grad()
                    opt.step(closure)
                    undone.append(opt.last["undone"])
            h, undone = float(opt.param_groups[0]["lr"]), int(torch.stack(undone).sum())
            tracked = int(model[1].num_batches_tracked)
            assert torch.isfinite(torch.tensor(h)) and undone < 30 and tracked == 31, (form, dtype, h, undone, tracked)
            out.append(f"{form}/{str(dtype)[6:]}: h {h:.3g}, {undone}/30 undone")
    return "; ".join(out)


def check_stale_closure() -> str:
    model = small_model(torch.float32)
    x, y = data(torch.float32)
    opt = LossGrad(model.parameters(), lr=1e-3)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    try:
        with no_sync():
            opt.step(lambda: loss, loss=loss)
    except RuntimeError as error:
        assert "recompute" in str(error), error
    else:
        raise AssertionError("a closure returning the loss at x was accepted")
    hs, worst = [], 0.0
    for step in range(600):  # outputs from before the step: the probe equals F(x) exactly
        x, y = data(torch.float32, seed=step)
        opt.zero_grad()
        out = model(x)
        loss = F.mse_loss(out, y)
        loss.backward()
        h = float(opt.param_groups[0]["lr"])
        with no_sync():
            opt.step(lambda: F.mse_loss(out, y), loss=loss)
        hs.append(float(opt.param_groups[0]["lr"]))
        cap = 1.05 * lossgrad.BLIND_FRACTION * float(opt.last["loss"]) / float(opt.last["sq_grad_norm"])
        worst = max(worst, hs[-1] / max(h, cap))
        assert math.isfinite(float(opt.last["loss"])), step
    assert worst <= 1 + 1e-9, worst
    return (f"identity refused; cached outputs: h {hs[0]:.3g} -> {hs[-1]:.3g}, max {max(hs):.3g}, never grown past "
            f"a predicted change of {lossgrad.BLIND_FRACTION:.3g} |F|")


def check_nan_gradient_and_lr_writes() -> str:
    out = []
    for form in ("momentum", "adam"):
        model = small_model(torch.float32)
        x, y = data(torch.float32)
        opt = LossGrad(model[0].parameters(), lr=1e-3, **FORMS[form])
        closure = lambda: F.mse_loss(model(x), y)  # noqa: E731
        opt.step(closure)
        with no_sync():
            opt.add_param_group({"params": model[3].parameters()})
            opt.zero_grad()
            opt.step(closure)
        h = float(opt.param_groups[0]["lr"])
        handle = model[0].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
        with no_sync():
            opt.zero_grad()
            opt.step(closure)
        handle.remove()
        ratio = float(opt.param_groups[0]["lr"]) / h
        assert abs(ratio * 1.05 - 1) < 1e-9, ratio
        opt.param_groups[0]["lr"].mul_(0.5)  # ReduceLROnPlateau-style, in place on the device h
        with no_sync(), warnings_ignored():
            opt.zero_grad()
            opt.step(closure)
        out.append(f"{form}: NaN gradient h x {ratio:.4f}")
    return "; ".join(out) + "; add_param_group and an in-place lr write without a sync"


@contextlib.contextmanager
def warnings_ignored():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check_16_bit_step() -> str:
    out = []
    for h in (1e-8, 1e-7):
        w = nn.Parameter(torch.full((4,), 1e-4, dtype=torch.float16, device=DEVICE))
        g = torch.tensor([1.0, 0.5, 2.0, 3.0], device=DEVICE)
        opt = LossGrad([w], lr=h, rollback=None, resolution_guard=False)
        before = w.detach().clone()
        opt.step(lambda: (w.float() * g).sum())
        expected = (before.float() - h * g).half()
        assert torch.equal(w.detach(), expected), (h, w, expected)
        out.append(f"h={h:g} exact")
    return ", ".join(out)


def step_peak(make_opt, lossgrad: bool) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(4)]).to(DEVICE)
    x, y = torch.randn(64, 4096, device=DEVICE), torch.randn(64, 4096, device=DEVICE)
    closure = lambda: F.mse_loss(model(x), y)  # noqa: E731
    opt = make_opt(model.parameters())
    for i in range(3):
        opt.zero_grad()
        loss = closure()
        loss.backward()
        if i < 2:
            opt.step(closure, loss=loss) if lossgrad else opt.step()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step(closure, loss=loss) if lossgrad else opt.step()
    torch.cuda.synchronize()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return (torch.cuda.max_memory_allocated() - start) / params, params


def check_memory() -> str:
    torch_forms = {"sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3, weight_decay=1e-4, foreach=True),
                   "momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=1e-4, foreach=True),
                   "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-4, foreach=True)}
    out = []
    for form, options in FORMS.items():
        ours, params = step_peak(lambda ps: LossGrad(ps, lr=1e-4, weight_decay=1e-4, **options), True)
        theirs, _ = step_peak(torch_forms[form], False)
        out.append(f"{form}: LossGrad +{ours:.2f} vs torch +{theirs:.2f}")
        del ours
    return f"step peak above start, in parameter sizes ({params / 2**20:.0f} MiB of parameters): " + "; ".join(out)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing checked")
        return 1
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    failed = 0
    for check in (check_forms_and_dtypes, check_stale_closure, check_nan_gradient_and_lr_writes, check_16_bit_step,
                  check_memory):
        try:
            print(f"ok    {check.__name__}: {check()}", flush=True)
        except Exception:  # noqa: BLE001 - every check reports
            failed += 1
            print(f"FAIL  {check.__name__}:\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
