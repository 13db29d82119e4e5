"""Behaviour of the LossGrad optimizer (lossgrad.py)."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossgrad import LossGrad, next_step_size_float, next_step_size_tensor

EXACT = dict(rollback=None, resolution_guard=False)  # Algorithm 1 as published


# ----------------------------------------------------------- a plain reference
def reference_algorithm_1(params, closure, h, c, steps, weight_decay=0.0):
    """Algorithm 1 of the paper, one tensor at a time, with nothing clever in it.

    Objective F = closure() + wd/2 ||x||^2. Returns the step size after every step."""
    hs = []
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = closure()
        loss.backward()
        with torch.no_grad():
            directions = [p.grad + weight_decay * p for p in params]
            f_x = loss.item() + weight_decay / 2 * sum((p * p).sum().item() for p in params)
            lred = h * sum((d * d).sum().item() for d in directions)
            for p, d in zip(params, directions):
                p.sub_(h * d)
            f_xp = closure().item() + weight_decay / 2 * sum((p * p).sum().item() for p in params)
            ratio = (f_xp - f_x + lred) / lred
            h = h * c if ratio <= 0.5 else h / c
        hs.append(h)
    return hs


def small_mlp(dtype=torch.float32, seed=0, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1)).to(dtype)


def regression_batch(dtype=torch.float32, n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    return x, torch.sin(x.sum(1, keepdim=True))


def train(opt, model, x, y, steps):
    hs = []
    for _ in range(steps):
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y))
        hs.append(float(opt.param_groups[0]["lr"]))
    return hs


# ------------------------------------------------------------ agreement tests
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_paths_reproduce_reference_in_float64(foreach, sync_free, weight_decay):
    x, y = regression_batch(torch.float64)
    ref_model = small_mlp(torch.float64)
    model = copy.deepcopy(ref_model)
    ref_hs = reference_algorithm_1(list(ref_model.parameters()), lambda: F.mse_loss(ref_model(x), y),
                                   h=1e-2, c=1.05, steps=50, weight_decay=weight_decay)
    opt = LossGrad(model.parameters(), lr=1e-2, c=1.05, weight_decay=weight_decay,
                   foreach=foreach, sync_free=sync_free, **EXACT)
    hs = train(opt, model, x, y, 50)
    assert len(set(ref_hs)) > 2, "the reference run should both grow and shrink h"
    assert hs == pytest.approx(ref_hs, rel=1e-12, abs=0)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_loss_argument_path_equals_closure_path():
    x, y = regression_batch(torch.float64)
    a, b = small_mlp(torch.float64), small_mlp(torch.float64)
    opt_a, opt_b = LossGrad(a.parameters(), lr=1e-2), LossGrad(b.parameters(), lr=1e-2)
    hs_a = train(opt_a, a, x, y, 30)
    hs_b = []
    for _ in range(30):
        opt_b.zero_grad()
        loss = F.mse_loss(b(x), y)
        loss.backward()
        returned = opt_b.step(lambda: F.mse_loss(b(x), y), loss=loss)
        assert returned is loss
        hs_b.append(opt_b.param_groups[0]["lr"])
    assert hs_a == hs_b
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


EDGE_VALUES = [  # (h, ||G||^2, F(x), F(x'))
    (0.1, 1.0, 1.0, 0.93), (0.1, 1.0, 1.0, 0.97), (0.1, 1.0, 1.0, 1.2), (0.1, 0.0, 1.0, 1.0),
    (1e-12, 1.0, 1.0, 1.0), (1e-12, 1.0, 1.0, 1.0 + 1e-9), (0.1, 1.0, 1.0, math.nan),
    (0.1, 1.0, 1.0, math.inf), (0.1, math.nan, math.nan, math.nan), (1e-300, 1e-300, 0.5, 0.5),
]


@pytest.mark.parametrize("rollback", [None, "nonfinite", "increase"])
@pytest.mark.parametrize("resolution", [0.0, 64 * 1.19e-7])
@pytest.mark.parametrize("resolved", [False, True])
def test_host_and_tensor_rules_decide_alike(rollback, resolution, resolved):
    rule = dict(c=1.05, rollback=rollback, resolution=resolution, min_lr=0.0, max_lr=math.inf)
    for h, sq, fx, fxp in EDGE_VALUES:
        h_float, undo_float, _, resolved_float = next_step_size_float(h, sq, fx, fxp, resolved, **rule)
        as_t = lambda v: torch.tensor(v, dtype=torch.float64)
        h_tensor, undo_tensor, _, resolved_tensor = next_step_size_tensor(
            as_t(h), as_t(sq), as_t(fx), as_t(fxp), torch.tensor(resolved), **rule)
        case = (h, sq, fx, fxp, resolved)
        assert h_float == pytest.approx(float(h_tensor), rel=1e-15, abs=0), case
        assert undo_float == (False if undo_tensor is None else bool(undo_tensor)), case
        assert resolved_float == bool(resolved_tensor), case


# ------------------------------------------------------------- what it learns
def test_converges_on_a_2d_quadratic():
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    f = lambda: 0.5 * x @ a @ x
    f0 = f().item()
    opt = LossGrad([x], lr=1e-4, **EXACT)
    for _ in range(300):
        opt.zero_grad()
        opt.step(f)
    assert f().item() < 1e-12 * f0
    # h settles near the exact line-search steps, between 1/lambda_max and 1/lambda_min
    eig = torch.linalg.eigvalsh(a)
    assert 1 / eig[-1] / 1.5 < opt.param_groups[0]["lr"] < 1 / eig[0] * 1.5


def _insensitivity_run(h0, **options):
    """Small regression MLP, float32, batch 100, 1500 steps; returns (median h of the last 300, last loss)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 10, generator=g)
    y = torch.sin(x @ torch.randn(10, 3, generator=g)).sum(1, keepdim=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = LossGrad(model.parameters(), lr=h0, **options)
    hs = []
    for i in range(1500):
        idx = torch.arange(i * 100, (i + 1) * 100) % 1000
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        loss = opt.step(lambda: F.mse_loss(model(xb), yb))
        hs.append(float(opt.param_groups[0]["lr"]))
    return sorted(hs[-300:])[150], loss.item()


def _same_end(results):
    ends = [h for h, _ in results]
    return all(math.isfinite(l) for _, l in results) and max(ends) / min(ends) < 3


@pytest.fixture(scope="module")
def reference_end():
    return _insensitivity_run(1e-3, **EXACT)


def test_exact_form_is_insensitive_inside_its_range_and_fails_below(reference_end):
    assert _same_end([reference_end] + [_insensitivity_run(h0, **EXACT) for h0 in (1e-6, 1e-1)])
    # below the float32 resolution of the loss, the published rule drives h towards zero
    h_end, _ = _insensitivity_run(1e-10, **EXACT)
    assert h_end < 1e-10


def test_defaults_extend_the_range_down_to_1e_minus_10(reference_end):
    assert _same_end([reference_end] + [_insensitivity_run(h0) for h0 in (1e-10, 1e-6, 1e-1)])


def test_rollback_increase_extends_the_range_up_to_1e3(reference_end):
    assert _same_end([reference_end] + [_insensitivity_run(h0, rollback="increase") for h0 in (1e-10, 1.0, 1e3)])


# ------------------------------------------------------------------ guards
class ProbeSaboteur:
    """A closure whose second call (the probe) returns the given value instead of the loss."""

    def __init__(self, model, x, y, probe_value):
        self.model, self.x, self.y, self.probe_value, self.calls = model, x, y, probe_value, 0

    def __call__(self):
        self.calls += 1
        loss = F.mse_loss(self.model(self.x), self.y)
        return loss if self.calls % 2 else loss * 0 + self.probe_value


@pytest.mark.parametrize("sync_free", [False, True])
def test_nonfinite_probe_is_rolled_back_and_h_shrinks(sync_free):
    x, y = regression_batch()
    model = small_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = LossGrad(model.parameters(), lr=0.1, sync_free=sync_free)
    opt.step(ProbeSaboteur(model, x, y, math.nan))
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 / 1.05)
    assert bool(opt.last["undone"])
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


@pytest.mark.parametrize("sync_free", [False, True])
def test_without_rollback_a_nonfinite_probe_keeps_the_step(sync_free):
    x, y = regression_batch()
    model = small_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = LossGrad(model.parameters(), lr=0.1, sync_free=sync_free, rollback=None)
    opt.step(ProbeSaboteur(model, x, y, math.inf))
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 / 1.05)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("sync_free", [False, True])
def test_rollback_increase_undoes_a_step_that_raised_the_loss(sync_free):
    x, y = regression_batch()
    model = small_mlp()
    f_x = F.mse_loss(model(x), y).item()
    before = [p.detach().clone() for p in model.parameters()]
    opt = LossGrad(model.parameters(), lr=0.1, rollback="increase", sync_free=sync_free)
    opt.step(ProbeSaboteur(model, x, y, f_x * 1.5))
    assert bool(opt.last["undone"])
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 / 1.05)
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    # a step that lowers the loss is kept
    opt.step(lambda: F.mse_loss(model(x), y))
    assert not bool(opt.last["undone"])


def test_resolution_guard_grows_h_that_the_loss_cannot_resolve():
    x, y = regression_batch()
    model = small_mlp()
    guarded = LossGrad(model.parameters(), lr=1e-12)
    train(guarded, model, x, y, 10)
    assert guarded.param_groups[0]["lr"] == pytest.approx(1e-12 * 1.05 ** 10, rel=1e-12, abs=0)
    assert guarded.state["resolved"] is False


@pytest.mark.parametrize("sync_free", [False, True])
def test_resolution_guard_keeps_h_once_the_loss_has_converged(sync_free):
    """F = 1 + 50 x^2 in float32: once x is below the loss's resolution the guard must not push h up."""
    x = torch.tensor([1e-2], requires_grad=True)
    opt = LossGrad([x], lr=1e-3, sync_free=sync_free)
    hs, xs = [], []
    for _ in range(3000):
        opt.zero_grad()
        opt.step(lambda: 1.0 + 50.0 * (x * x).sum())
        hs.append(float(opt.param_groups[0]["lr"]))
        xs.append(abs(x.item()))
    assert bool(opt.state["resolved"])
    assert max(xs) <= 1e-2  # never pushed out of the valley
    assert max(hs) * 100.0 < 2.0 * 1.05 ** 2  # h stays near the stability limit 2/curvature, never far beyond


@pytest.mark.parametrize("sync_free", [False, True])
def test_zero_gradient_leaves_h_and_parameters_alone(sync_free):
    w = torch.zeros(3, requires_grad=True)
    opt = LossGrad([w], lr=0.5, sync_free=sync_free)
    with torch.autograd.set_detect_anomaly(False):
        for _ in range(3):
            opt.zero_grad()
            opt.step(lambda: (w * 0).sum() + 1.0)
    assert float(opt.param_groups[0]["lr"]) == 0.5
    assert torch.equal(w, torch.zeros(3))


def test_step_size_bounds_are_respected():
    x, y = regression_batch()
    model = small_mlp()
    hs = train(LossGrad(model.parameters(), lr=1e-3, min_lr=1e-3, max_lr=2e-3), model, x, y, 40)
    assert min(hs) >= 1e-3 and max(hs) <= 2e-3 and max(hs) == 2e-3


# ------------------------------------------------------------ a clean probe
def test_probe_leaves_batchnorm_running_statistics_as_one_forward_would():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    twin = copy.deepcopy(model)
    x, y = regression_batch()
    opt = LossGrad(model.parameters(), lr=0.1)
    for step in range(3):  # the first step discovers the layers, later ones reuse them
        with torch.no_grad():  # the twin does exactly one training-mode forward at x
            for p, q in zip(twin.parameters(), model.parameters()):
                p.copy_(q)
        twin(x)
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y))
        bn, twin_bn = model[1], twin[1]
        torch.testing.assert_close(bn.running_mean, twin_bn.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(bn.running_var, twin_bn.running_var, rtol=0, atol=0)
        assert bn.num_batches_tracked.item() == step + 1
        assert bn.track_running_stats


def test_probe_uses_batch_statistics_in_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    x, y = regression_batch()
    opt = LossGrad(model.parameters(), lr=0.1)
    opt.step(lambda: F.mse_loss(model(x), y))
    state = copy.deepcopy(model.state_dict())
    expected = F.mse_loss(model(x), y).item()  # training mode: batch statistics
    model.load_state_dict(state)
    assert opt.last["probe_loss"].item() == pytest.approx(expected, rel=1e-6)


def test_probe_sees_the_same_dropout_masks_and_consumes_no_randomness():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1))
    twin = copy.deepcopy(model)
    x, y = regression_batch()
    h = 0.05
    rng = torch.get_rng_state()
    opt = LossGrad(model.parameters(), lr=h, **EXACT)
    opt.step(lambda: F.mse_loss(model(x), y))
    after_step = torch.rand(3)

    # by hand: forward with the masks from `rng`, step, probe with the same masks
    torch.set_rng_state(rng)
    loss = F.mse_loss(twin(x), y)
    loss.backward()
    after_one_forward = torch.rand(3)
    with torch.no_grad():
        for p in twin.parameters():
            p -= h * p.grad
    torch.set_rng_state(rng)
    with torch.no_grad():
        probe = F.mse_loss(twin(x), y)
    assert opt.last["probe_loss"].item() == pytest.approx(probe.item(), rel=1e-6)
    assert torch.equal(after_step, after_one_forward)


# ------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("sync_free", [False, True])
def test_state_dict_round_trip_continues_bit_for_bit(sync_free, tmp_path):
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-3, sync_free=sync_free)
    train(opt, model, x, y, 20)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    hs_straight = train(opt, model, x, y, 20)

    resumed = small_mlp(seed=123)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    opt2 = LossGrad(resumed.parameters(), sync_free=sync_free)  # a different initial lr on purpose
    opt2.load_state_dict(ckpt["opt"])
    assert bool(opt2.state["resolved"])
    hs_resumed = train(opt2, resumed, x, y, 20)
    assert hs_resumed == hs_straight
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"), (dict(lr=math.nan), "lr"), (dict(lr=math.inf), "lr"),
    (dict(c=1.0), "c must be"), (dict(c=0.9), "c must be"), (dict(c=math.inf), "c must be"),
    (dict(c=math.nan), "c must be"), (dict(rollback="always"), "rollback"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(min_lr=1e-2, max_lr=1e-3), "min_lr"),
    (dict(lr=1.0, max_lr=0.1), "outside"),
])
def test_bad_options_are_refused_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossGrad(small_mlp().parameters(), **kwargs)


def test_param_groups_may_differ_only_in_weight_decay():
    model = small_mlp()
    LossGrad([{"params": model[0].parameters(), "weight_decay": 1e-4}, {"params": model[2].parameters()}])
    with pytest.raises(ValueError, match="only weight_decay"):
        LossGrad([{"params": model[0].parameters(), "c": 1.1}, {"params": model[2].parameters()}])
    with pytest.raises(ValueError, match="only weight_decay"):
        LossGrad([{"params": model[0].parameters(), "lr": 1.0}, {"params": model[2].parameters()}], lr=1e-3)


def test_groups_with_different_weight_decay_follow_the_reference():
    x, y = regression_batch(torch.float64)
    model = small_mlp(torch.float64)
    ref = copy.deepcopy(model)
    # reference: the whole objective f + 0.1/2 ||first layer||^2, by hand
    first = list(ref[0].parameters())
    rest = [p for p in ref.parameters() if all(p is not q for q in first)]
    ref_params = first + rest
    wd = 0.1
    hs_ref, h = [], 1e-2
    for _ in range(20):
        for p in ref_params:
            p.grad = None
        loss = F.mse_loss(ref(x), y)
        loss.backward()
        with torch.no_grad():
            dirs = [p.grad + wd * p for p in first] + [p.grad for p in rest]
            f_x = loss.item() + wd / 2 * sum((p * p).sum().item() for p in first)
            lred = h * sum((d * d).sum().item() for d in dirs)
            for p, d in zip(ref_params, dirs):
                p.sub_(h * d)
            f_xp = F.mse_loss(ref(x), y).item() + wd / 2 * sum((p * p).sum().item() for p in first)
            h = h * 1.05 if (f_xp - f_x + lred) / lred <= 0.5 else h / 1.05
        hs_ref.append(h)
    opt = LossGrad([{"params": model[0].parameters(), "weight_decay": wd},
                    {"params": [p for m in list(model)[1:] for p in m.parameters()]}], lr=1e-2, **EXACT)
    assert train(opt, model, x, y, 20) == pytest.approx(hs_ref, rel=1e-12, abs=0)


def test_closure_errors_say_what_to_pass():
    model = small_mlp()
    x, y = regression_batch()
    opt = LossGrad(model.parameters())
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step(F.mse_loss(model(x), y))
    with pytest.raises(TypeError, match="torch.Tensor"):
        opt.step(lambda: 0.5)
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(lambda: F.mse_loss(model(x), y, reduction="none"))
    with pytest.raises(RuntimeError, match="backward"):
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y), loss=F.mse_loss(model(x), y))


def test_parameters_without_gradient_are_skipped():
    model = small_mlp()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.clone()
    x, y = regression_batch()
    opt = LossGrad(model.parameters(), lr=0.1)
    train(opt, model, x, y, 3)
    assert torch.equal(frozen, before)


# ------------------------------------------------------ no host-device sync
def test_step_completes_on_the_meta_device():
    """On 'meta' every .item(), float() or Python branch on a tensor value raises."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 1))
        x, y = torch.randn(16, 4), torch.randn(16, 1)
    for options in (dict(), dict(rollback="increase", weight_decay=1e-4), EXACT):
        opt = LossGrad(model.parameters(), lr=1e-3, **options)
        for _ in range(2):
            opt.zero_grad()
            opt.step(lambda: F.mse_loss(model(x), y))
        h = opt.param_groups[0]["lr"]
        assert isinstance(h, torch.Tensor) and h.device.type == "meta" and h.dim() == 0
    with pytest.raises(Exception):
        float(h)  # the guard of this test: a sync would have raised inside step


# ----------------------------------------------------------------- DDP gloo
def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # identical initial weights, as DDP expects
    model = DDP(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)))
    opt = LossGrad(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    hs = []
    for _ in range(20):
        x = torch.randn(32, 4, generator=g)
        y = torch.sin(x.sum(1, keepdim=True)) + rank
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y))
        hs.append(opt.param_groups[0]["lr"])
    torch.save({"hs": hs, "params": [p.detach() for p in model.parameters()]}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_ranks_keep_the_same_step_size_and_parameters(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert len(set(r0["hs"])) > 2
    assert r0["hs"] == r1["hs"]
    for p, q in zip(r0["params"], r1["params"]):
        assert torch.equal(p, q)


def test_a_param_group_added_mid_run_joins_at_the_current_step_size():
    model = small_mlp()
    x, y = regression_batch()
    frozen = list(model[0].parameters())
    opt = LossGrad([p for p in model.parameters() if all(p is not q for q in frozen)], lr=1e-2)
    train(opt, model, x, y, 5)
    opt.add_param_group({"params": frozen})  # progressive unfreezing
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"] != 1e-2
    train(opt, model, x, y, 2)


def test_sync_free_state_dict_is_a_snapshot_and_a_given_lr_tensor_is_not_modified():
    model = small_mlp(torch.float64)
    x, y = regression_batch(torch.float64)
    h0 = torch.tensor(1e-2, dtype=torch.float64)
    opt = LossGrad(model.parameters(), lr=h0, sync_free=True)
    train(opt, model, x, y, 3)
    snapshot = opt.state_dict()["param_groups"][0]["lr"].clone()
    saved = opt.state_dict()
    train(opt, model, x, y, 5)
    assert float(h0) == 1e-2
    assert torch.equal(saved["param_groups"][0]["lr"], snapshot)
