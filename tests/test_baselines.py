"""Tests for companion/baselines.py: WNGrad, L4 on SGD, the schedules, make_optimizer."""

import copy
import importlib.util
import math

import numpy as np
import pytest
import torch
from torch import nn

from companion import baselines as B

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)  # SPD


def quad(x):
    """f(x) = ½ xᵀAx, minimum 0 at x = 0."""
    return 0.5 * x @ A @ x


def _grad_step(opt, x, **step_kwargs):
    opt.zero_grad()
    loss = quad(x)
    loss.backward()
    opt.step(**step_kwargs)
    return loss.item()


# ----------------------------------------------------------------------------- WNGrad

def test_wngrad_first_two_steps_match_hand_computation():
    x0 = [1.0, -2.0]
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = B.WNGrad([x], lr=0.5)
    # by hand: g = A x, b1 = b0 + |g|²/b0 with b0 = 1/lr, then x1 = x0 - g/b1
    g = [3 * x0[0] + 1 * x0[1], 1 * x0[0] + 2 * x0[1]]
    b1 = 2.0 + (g[0] ** 2 + g[1] ** 2) / 2.0
    x1 = [x0[0] - g[0] / b1, x0[1] - g[1] / b1]
    _grad_step(opt, x)
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / b1, rel=1e-12)
    assert x.tolist() == pytest.approx(x1, rel=1e-12)
    g = [3 * x1[0] + x1[1], x1[0] + 2 * x1[1]]
    b2 = b1 + (g[0] ** 2 + g[1] ** 2) / b1
    _grad_step(opt, x)
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / b2, rel=1e-12)
    assert x.tolist() == pytest.approx([x1[0] - g[0] / b2, x1[1] - g[1] / b2], rel=1e-12)


@pytest.mark.parametrize("lr", [0.01, 1.0, 100.0])
def test_wngrad_converges_from_small_and_large_learning_rates(lr):
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = B.WNGrad([x], lr=lr)
    start = quad(x).item()
    lrs = []
    for _ in range(3000):
        _grad_step(opt, x)
        lrs.append(opt.param_groups[0]["lr"])
    # b0 = 1/lr far too small makes b overshoot (b1 ≈ |g|²/b0): slower, but still converging
    assert quad(x).item() < 1e-3 * start
    assert all(b <= a for a, b in zip([lr] + lrs, lrs))  # WNGrad never raises the lr


def test_wngrad_one_b_for_all_parameters():
    # Splitting x into two tensors must not change the trajectory: b is global.
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    opt_x, opt_uv = B.WNGrad([x], lr=0.3), B.WNGrad([u, v], lr=0.3)
    for _ in range(5):
        _grad_step(opt_x, x)
        opt_uv.zero_grad()
        quad(torch.cat([u, v])).backward()
        opt_uv.step()
    assert torch.cat([u, v]).tolist() == pytest.approx(x.tolist(), rel=1e-12)


def test_wngrad_rejects_bad_lr():
    with pytest.raises(ValueError, match="lr"):
        B.WNGrad([torch.zeros(1, requires_grad=True)], lr=0.0)


# ----------------------------------------------------------------------------- L4

def test_l4_two_steps_match_hand_computation():
    alpha, gamma, tau, eps, gamma0 = 0.15, 0.9, 1000.0, 1e-12, 0.75
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = B.L4SGD([x], alpha=alpha, gamma=gamma, tau=tau, eps=eps, gamma0=gamma0)
    # step 1: L_min = gamma0·L, eta = alpha (L - gamma L_min)/(|g|² + eps), then L_min grows
    xs = x.tolist()
    loss0 = 0.5 * (3 * xs[0] ** 2 + 2 * xs[0] * xs[1] + 2 * xs[1] ** 2)
    g = [3 * xs[0] + xs[1], xs[0] + 2 * xs[1]]
    min_loss = gamma0 * loss0
    eta = alpha * (loss0 - gamma * min_loss) / (g[0] ** 2 + g[1] ** 2 + eps)
    expected = [xs[0] - eta * g[0], xs[1] - eta * g[1]]
    min_loss *= 1 + 1 / tau
    opt.zero_grad()
    loss = quad(x)
    loss.backward()
    opt.step(loss=loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(eta, rel=1e-12)
    assert x.tolist() == pytest.approx(expected, rel=1e-12)
    # step 2: L_min = min(grown L_min, L)
    xs = expected
    loss1 = 0.5 * (3 * xs[0] ** 2 + 2 * xs[0] * xs[1] + 2 * xs[1] ** 2)
    g = [3 * xs[0] + xs[1], xs[0] + 2 * xs[1]]
    min_loss = min(min_loss, loss1)
    eta = alpha * (loss1 - gamma * min_loss) / (g[0] ** 2 + g[1] ** 2 + eps)
    opt.zero_grad()
    loss = quad(x)
    loss.backward()
    opt.step(loss=loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(eta, rel=1e-12)
    assert x.tolist() == pytest.approx([xs[0] - eta * g[0], xs[1] - eta * g[1]], rel=1e-12)


def test_l4_closure_path_equals_loss_path():
    x1 = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    opt1, opt2 = B.L4SGD([x1]), B.L4SGD([x2])
    for _ in range(4):
        opt1.zero_grad()
        loss = quad(x1)
        loss.backward()
        opt1.step(loss=loss)
        opt2.step(lambda: quad(x2))  # closure returns the loss, no backward
    assert x2.tolist() == pytest.approx(x1.tolist(), rel=1e-12)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt1.param_groups[0]["lr"], rel=1e-12)


def test_l4_needs_the_loss():
    x = torch.tensor([1.0], requires_grad=True)
    opt = B.L4SGD([x])
    quad_1d = (x ** 2).sum()
    quad_1d.backward()
    with pytest.raises(ValueError, match="loss"):
        opt.step()


def test_l4_state_dict_keeps_min_loss():
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = B.L4SGD([x])
    for _ in range(3):
        opt.step(lambda: quad(x))
    y = x.detach().clone().requires_grad_(True)
    resumed = B.L4SGD([y])
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.step(lambda: quad(x))
    resumed.step(lambda: quad(y))
    assert y.tolist() == pytest.approx(x.tolist(), rel=1e-12)


# ----------------------------------------------------------------------------- schedules

def _epoch_lrs(opt, sched, epochs):
    """lr in force during each epoch, stepping the scheduler at each epoch's end."""
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def _sgd(lr=2.0):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_step_lr_sequence():
    opt = _sgd()
    got = _epoch_lrs(opt, B.step_lr(opt, step_size=20, gamma=0.1), 30)
    assert got == pytest.approx([2.0 if e < 20 else 0.2 for e in range(30)])


def test_trapezoid_sequence():
    opt = _sgd()
    got = _epoch_lrs(opt, B.trapezoid(opt, warmup_epochs=10, flat_until=15, total_epochs=30,
                                      start_factor=0.1, end_factor=0.0), 30)
    expected = 2.0 * np.interp(np.arange(30), [0, 10, 15, 30], [0.1, 1.0, 1.0, 0.0])
    assert got == pytest.approx(expected.tolist(), abs=1e-12)
    assert max(got) == pytest.approx(2.0) and got[10] == got[15] == pytest.approx(2.0)


def test_trapezoid_rejects_inconsistent_epochs():
    with pytest.raises(ValueError, match="warmup_epochs"):
        B.trapezoid(_sgd(), warmup_epochs=20, flat_until=15, total_epochs=30)


def test_multistep_sequence():
    opt = _sgd(0.1)
    got = _epoch_lrs(opt, B.multistep(opt), 200)
    expected = [0.1 * 0.1 ** sum(e >= m for m in (100, 150)) for e in range(200)]
    assert got == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------- registry

def _tiny():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    return model, lambda: nn.functional.mse_loss(model(x), y)


NAME_OPTIONS = {
    "sgd": dict(lr=0.1),
    "sgd_steplr": dict(lr=0.1, step_size=2, gamma=0.5),
    "sgd_trapezoid": dict(lr=0.1, epochs=30),
    "sgd_multistep": dict(lr=0.1, milestones=(1, 2)),
    "wngrad": dict(lr=0.1),
    "l4": dict(),
    "adam_steps": dict(lr=1e-3, milestones=(1,), factors=(0.5,)),
    "lossgrad": dict(lr=1e-3),
}


@pytest.mark.parametrize("name", B.OPTIMIZER_NAMES)
def test_make_optimizer_builds_and_steps(name):
    if name == "lossgrad" and importlib.util.find_spec("lossgrad") is None:
        pytest.skip("lossgrad.py is not there yet")
    model, closure = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    opt, sched = B.make_optimizer(name, model.parameters(), **NAME_OPTIONS[name])
    opt.zero_grad()
    loss = closure()
    loss.backward()
    if name.startswith(("sgd", "adam")):
        opt.step()
    else:
        opt.step(closure, loss=loss)
    lr = float(opt.param_groups[0]["lr"])
    assert math.isfinite(lr) and lr > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert (sched is None) == (name in ("sgd", "wngrad", "l4", "lossgrad"))
    if sched is not None:
        sched.step()


def test_make_optimizer_passes_sgd_options():
    p = nn.Parameter(torch.ones(2))
    opt, _ = B.make_optimizer("sgd", [p], lr=0.5, weight_decay=0.1, momentum=0.9)
    p.grad = torch.zeros(2)
    opt.step()  # only weight decay acts: p ← p − lr·wd·p
    assert p.tolist() == pytest.approx([1 - 0.5 * 0.1] * 2)
    p.grad = torch.zeros(2)
    opt.step()  # momentum carries the first update: v = 0.9 v + wd·p
    v = 0.9 * 0.1 + 0.1 * (1 - 0.05)
    assert p.tolist() == pytest.approx([0.95 - 0.5 * v] * 2)


def test_make_optimizer_errors():
    params = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="valid names: sgd"):
        B.make_optimizer("adam", params, lr=0.1)
    with pytest.raises(TypeError, match="unknown option"):
        B.make_optimizer("sgd", params, lr=0.1, lr_decay=0.5)
    with pytest.raises(TypeError, match="lr"):
        B.make_optimizer("sgd", params)
    with pytest.raises(TypeError, match="epochs"):
        B.make_optimizer("sgd_trapezoid", params, lr=0.1)
    opt, _ = B.make_optimizer("wngrad", params, lr=0.1, epochs=30)  # epochs is always accepted
    assert opt.param_groups[0]["lr"] == 0.1


def test_adam_steps_is_adam_with_the_wae_papers_schedule():
    make_optimizer = B.make_optimizer
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt, sched = make_optimizer("adam_steps", params, lr=1e-3, beta1=0.5, milestones=(30, 50), factors=(0.5, 0.2),
                                epochs=80)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["betas"] == (0.5, 0.999)
    lrs = []
    for _ in range(60):
        lrs.append(opt.param_groups[0]["lr"])  # the lr of epoch len(lrs)
        opt.step()
        sched.step()
    assert lrs[29] == pytest.approx(1e-3) and lrs[30] == pytest.approx(5e-4)
    assert lrs[49] == pytest.approx(5e-4) and lrs[50] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="factor"):
        make_optimizer("adam_steps", params, milestones=(30,), factors=(0.5, 0.2))
