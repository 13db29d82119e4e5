"""Behaviour of the LossGrad optimizer (lossgrad.py)."""

import copy
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.insensitivity import insensitivity_run
from lossgrad import LossGrad, next_step_size_float, next_step_size_tensor

EXACT = dict(rollback=None, resolution_guard=False)  # Algorithm 1 as published


# ----------------------------------------------------------- a plain reference
def reference_algorithm_1(params, closure, h, c, steps, weight_decay=0.0, max_norm=None, threshold=0.5):
    """Algorithm 1 of the paper, one tensor at a time, with nothing clever in it.

    Objective F = closure() + wd/2 ||x||^2. With ``max_norm`` the step is clipped to that norm and the
    prediction made along the clipped step. h grows when the ratio is <= ``threshold`` (the paper: 1/2).
    Returns the step size after every step."""
    hs = []
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = closure()
        loss.backward()
        with torch.no_grad():
            directions = [p.grad + weight_decay * p for p in params]
            f_x = loss.item() + weight_decay / 2 * sum((p * p).sum().item() for p in params)
            sq = sum((d * d).sum().item() for d in directions)
            s = 1.0 if max_norm is None else min(1.0, max_norm / math.sqrt(sq))
            lred = h * s * sq
            for p, d in zip(params, directions):
                p.sub_(h * s * d)
            f_xp = closure().item() + weight_decay / 2 * sum((p * p).sum().item() for p in params)
            ratio = (f_xp - f_x + lred) / lred
            h = h * c if ratio <= threshold else h / c
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
    (0.1, -1.0, 1.0, 1.2), (0.1, -1.0, 1.0, math.inf), (0.1, -1.0, 1.0, 0.9),  # non-descent directions
]


@pytest.mark.parametrize("rollback", [None, "nonfinite", "increase"])
@pytest.mark.parametrize("resolution", [0.0, 8 * 1.19e-7, 64 * 1.19e-7])
@pytest.mark.parametrize("resolved_lr", [math.inf, 1e-12 * 1.02, 0.5])
@pytest.mark.parametrize("threshold", [0.5, 0.75])
@pytest.mark.parametrize("smoothing, shrink", [(0.0, None), (0.8, 1.3)])
def test_host_and_tensor_rules_decide_alike(rollback, resolution, resolved_lr, threshold, smoothing, shrink):
    rule = dict(c=1.05, threshold=threshold, rollback=rollback, resolution=resolution, min_lr=0.0, max_lr=math.inf,
                smoothing=smoothing, shrink=shrink)
    memory = dict(previous_slope=math.nan, smoothed_num=0.02, smoothed_den=0.05)
    for h, sq, fx, fxp in EDGE_VALUES:
        h_float, undo_float, _, resolved_float, memory_float = next_step_size_float(
            h, sq, fx, fxp, resolved_lr, memory=memory, **rule)
        as_t = lambda v: torch.tensor(v, dtype=torch.float64)
        h_tensor, undo_tensor, _, resolved_tensor, memory_tensor = next_step_size_tensor(
            as_t(h), as_t(sq), as_t(fx), as_t(fxp), as_t(resolved_lr), memory={k: as_t(v) for k, v in memory.items()},
            **rule)
        case = (h, sq, fx, fxp, resolved_lr)
        assert h_float == pytest.approx(float(h_tensor), rel=1e-15, abs=0), case
        assert undo_float == bool(undo_tensor), case
        assert resolved_float == pytest.approx(float(resolved_tensor), rel=1e-15, abs=0), case
        for key in ("smoothed_num", "smoothed_den"):
            assert memory_float[key] == pytest.approx(float(memory_tensor[key]), rel=1e-15, abs=0), case


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
    """The README's problem (benchmarks/insensitivity.py): (median h of the last 300 steps, last loss)."""
    return insensitivity_run(h0, **options)[:2]


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
    assert bool(opt.last["undone"]) and not bool(opt.last["skipped"])
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # restored bitwise


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
        assert torch.equal(p, q)  # restored bitwise
    # a step that lowers the loss is kept
    opt.step(lambda: F.mse_loss(model(x), y))
    assert not bool(opt.last["undone"])


def test_resolution_guard_grows_h_that_the_loss_cannot_resolve():
    x, y = regression_batch()
    model = small_mlp()
    guarded = LossGrad(model.parameters(), lr=1e-12)
    train(guarded, model, x, y, 10)
    assert guarded.param_groups[0]["lr"] == pytest.approx(1e-12 * 1.05 ** 10, rel=1e-12, abs=0)
    assert guarded.param_groups[0]["resolved_lr"] == math.inf  # start-up: nothing resolved yet


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
    assert float(opt.param_groups[0]["resolved_lr"]) < math.inf
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
    assert float(opt2.param_groups[0]["resolved_lr"]) < math.inf
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
    for options in (dict(), dict(rollback="increase", weight_decay=1e-4), EXACT, dict(max_grad_norm=1.0),
                    dict(foreach=False), dict(probe_grad=True), dict(distributed=False)):
        opt = LossGrad(model.parameters(), lr=1e-3, **options)
        for _ in range(2):
            opt.zero_grad()
            opt.step(lambda: F.mse_loss(model(x), y))
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step(lambda: F.mse_loss(model(x), y), loss=loss)
        h = opt.param_groups[0]["lr"]
        assert isinstance(h, torch.Tensor) and h.device.type == "meta" and h.dim() == 0
    with pytest.raises(Exception):
        float(h)  # the guard of this test: a sync would have raised inside step


# ----------------------------------------------------------------- DDP gloo
def _ddp_worker(rank, world, init_file, out_dir, options=None):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # identical initial weights, as DDP expects
    model = DDP(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)))
    opt = LossGrad(model.parameters(), lr=1e-2, **(options or {}))
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


@pytest.mark.parametrize("direction", ["sgd", "momentum", "adam"])
def test_ddp_ranks_keep_the_same_step_size_and_parameters(tmp_path, direction):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), dict(direction=direction)), nprocs=2,
             join=True)
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


# ====================================================== hardening (issue 9)
PATHS = [dict(sync_free=False), dict(sync_free=True), dict(sync_free=False, foreach=False),
         dict(sync_free=True, foreach=False)]
PATH_IDS = ["host", "sync_free", "host-per-tensor", "sync_free-per-tensor"]


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_a_nonfinite_gradient_is_never_stepped_into(path):
    """One inf input whose sample a ReLU kills: the loss is finite, the weight gradient is NaN (inf * 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.abs_()  # so that an input of -inf sends every unit to -inf, then ReLU to 0
    x = torch.linspace(-1, 1, 64).unsqueeze(1)
    y = torch.sin(3 * x)
    bad = x.clone()
    bad[0] = -math.inf
    before = _snapshot(model)
    opt = LossGrad(model.parameters(), lr=0.05, **path)
    opt.zero_grad()
    loss = opt.step(lambda: F.mse_loss(model(bad), y))
    assert math.isfinite(loss.item()), "the test needs a finite loss with a non-finite gradient"
    assert not math.isfinite(float(opt.last["sq_grad_norm"]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert bool(opt.last["undone"]) and bool(opt.last["skipped"])
    assert set(opt.last) == {"loss", "probe_loss", "ratio", "sq_grad_norm", "clip_scale", "slope", "non_descent",
                             "undone", "skipped"}
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.05 / 1.05)
    first = F.mse_loss(model(x), y).item()
    train(opt, model, x, y, 20)  # keeps training on good batches
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert F.mse_loss(model(x), y).item() < first


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_a_nonfinite_loss_at_x_is_undone_bitwise(path):
    p = torch.tensor([1.0, -1.0], requires_grad=True)
    opt = LossGrad([p], lr=0.1, **path)
    calls = []

    def closure():
        calls.append(1)
        return (p * p).sum() * (math.nan if len(calls) == 1 else 1.0)

    opt.step(closure)
    assert torch.equal(p.detach(), torch.tensor([1.0, -1.0])) and bool(opt.last["undone"])


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_an_undone_step_restores_x_bitwise_where_the_step_dwarfs_x(path):
    """|hG| >> |x|: (x - hG) + hG is not x in floating point; the undo must not depend on it."""
    p = torch.tensor([1.0, -1.0], requires_grad=True)
    opt = LossGrad([p], lr=0.3, **path)
    opt.step(lambda: 0.5e20 * (p * p).sum())
    assert bool(opt.last["undone"])  # the probe overflows to inf
    assert torch.equal(p.detach(), torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_the_undo_does_not_use_the_gradients_a_closure_may_change(path):
    x, y = regression_batch()
    model = small_mlp()
    before = _snapshot(model)
    opt = LossGrad(model.parameters(), lr=0.1, rollback="increase", **path)
    f_x = F.mse_loss(model(x), y).item()
    saboteur = ProbeSaboteur(model, x, y, f_x * 2)

    def closure():  # zeroes the gradients in place at every call, as some training loops do
        for q in model.parameters():
            if q.grad is not None:
                q.grad.zero_()
        return saboteur()

    opt.step(closure)
    assert bool(opt.last["undone"])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_last_has_one_type_on_every_path():
    x, y = regression_batch()
    kinds = []
    for rollback in (None, "nonfinite"):
        for path in PATHS:
            model = small_mlp()
            opt = LossGrad(model.parameters(), lr=1e-2, rollback=rollback, **path)
            train(opt, model, x, y, 2)
            last = opt.last
            assert set(last) == {"loss", "probe_loss", "ratio", "sq_grad_norm", "clip_scale", "slope", "non_descent",
                                 "undone", "skipped"}
            assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in last.values())
            kinds.append((last["undone"].dtype, last["skipped"].dtype))
    assert set(kinds) == {(torch.bool, torch.bool)}


# ----------------------------------------------------------------- 16-bit
def test_float16_sums_do_not_overflow():
    """||G||^2 and ||x||^2 past float16's 65504 are summed in float32."""
    x = torch.full((1000,), 10.0, dtype=torch.float16, requires_grad=True)
    opt = LossGrad([x], lr=1e-3, weight_decay=1e-2)
    opt.step(lambda: (x.float() * 10.0).sum())  # gradient 10 per entry: ||g||^2 = 1e5
    expected = ((10.0 + 1e-2 * 10.0) ** 2) * 1000
    assert float(opt.last["sq_grad_norm"]) == pytest.approx(expected, rel=1e-3)
    assert not bool(opt.last["undone"]) and math.isfinite(float(opt.last["ratio"]))


@pytest.mark.parametrize("foreach", [True, False])
def test_sync_free_scales_each_tensor_in_its_own_dtype(foreach):
    """A float16 tensor first in the group must not round h = 1e-8 for a float64 tensor after it."""
    half = torch.ones(3, dtype=torch.float16, requires_grad=True)
    wide = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = LossGrad([half, wide], lr=1e-8, sync_free=True, foreach=foreach, **EXACT)
    opt.step(lambda: half.float().sum() + wide.sum())
    assert torch.equal(wide.detach(), torch.full((3,), 1.0 - 1e-8, dtype=torch.float64))


def test_loss_resolution_is_that_of_the_dtype_the_loss_is_resolved_in():
    from lossgrad import RESOLUTION_ULPS, loss_resolution
    eps = lambda dtype: torch.finfo(dtype).eps
    assert loss_resolution(torch.float32) == RESOLUTION_ULPS * eps(torch.float32)
    assert loss_resolution(torch.float64) == RESOLUTION_ULPS * eps(torch.float64)
    assert 1 < RESOLUTION_ULPS <= 8  # a few ulps: 64 hid readable steps (see the Adam range test)
    for dtype in (torch.float16, torch.bfloat16):  # a few of its own ulps, not 64
        assert eps(dtype) < loss_resolution(dtype) <= 2 * eps(dtype)


def test_a_bfloat16_loss_ends_the_start_up_and_trains():
    """With a band of 64 bfloat16 ulps (50% of the loss) no step was ever resolved: the guard's start-up
    never ended and h grew until the model diverged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(torch.bfloat16)
    x, y = regression_batch(torch.bfloat16, n=256)
    first = F.mse_loss(model(x), y).item()
    opt = LossGrad(model.parameters(), lr=1e-2)
    train(opt, model, x, y, 400)
    assert opt.param_groups[0]["resolved_lr"] < math.inf
    assert F.mse_loss(model(x), y).item() < 0.5 * first


# ------------------------------------------------- the guard must not freeze h
def test_h_pushed_below_the_resolution_climbs_back():
    x, y = regression_batch(n=100)
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2)
    train(opt, model, x, y, 300)
    settled = opt.param_groups[0]["lr"]
    with pytest.warns(UserWarning, match="new step size"):
        opt.param_groups[0]["lr"] = 1e-12  # as a scheduler or a run of rollbacks might leave it
        loss_before = F.mse_loss(model(x), y).item()
        train(opt, model, x, y, 700)
    assert opt.param_groups[0]["lr"] > settled / 10
    assert F.mse_loss(model(x), y).item() < 0.9 * loss_before


def test_reduce_lr_on_plateau_restarts_h_with_a_warning():
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2)
    train(opt, model, x, y, 5)
    h = opt.param_groups[0]["lr"]
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
    scheduler.step(1.0)
    scheduler.step(1.0)  # no improvement: lr * 0.1
    with pytest.warns(UserWarning, match="ReduceLROnPlateau"):
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y))
    assert opt.last["ratio"] is not None
    assert float(opt.param_groups[0]["lr"]) in (pytest.approx(h * 0.1 * 1.05), pytest.approx(h * 0.1 / 1.05))


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1),
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=False),
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0),
], ids=["StepLR", "OneCycleLR", "LambdaLR"])
def test_lr_schedulers_are_refused_with_the_reason(make):
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2)
    make(opt)
    with pytest.raises(RuntimeError, match="scheduler.*sets the\\s+step size itself"):
        opt.step(lambda: F.mse_loss(model(x), y))


# ------------------------------------------------------------------ clipping
@pytest.mark.parametrize("sync_free", [False, True])
def test_max_grad_norm_clips_the_step_and_predicts_along_it(sync_free):
    x, y = regression_batch(torch.float64)
    ref = small_mlp(torch.float64)
    model = copy.deepcopy(ref)
    max_norm = 0.05
    ref_hs = reference_algorithm_1(list(ref.parameters()), lambda: F.mse_loss(ref(x), y), 1e-1, 1.05, 40,
                                   max_norm=max_norm)
    opt = LossGrad(model.parameters(), lr=1e-1, max_grad_norm=max_norm, sync_free=sync_free, **EXACT)
    hs = train(opt, model, x, y, 1)
    assert float(opt.last["clip_scale"]) < 1.0  # the run does clip
    hs += train(opt, model, x, y, 39)
    assert hs == pytest.approx(ref_hs, rel=1e-12, abs=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan, "1"])
def test_max_grad_norm_must_be_positive(value):
    with pytest.raises(ValueError, match="max_grad_norm"):
        LossGrad(small_mlp().parameters(), max_grad_norm=value)


# ------------------------------------------------------------- usage mistakes
@pytest.mark.parametrize("retain, zeroed", [(False, True), (True, True), (False, False)],
                         ids=["backward", "retain_graph", "gradients-not-zeroed"])
def test_a_closure_that_calls_backward_is_refused(retain, zeroed):
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2)
    train(opt, model, x, y, 1)  # leaves gradients in place

    def closure():
        loss = F.mse_loss(model(x), y)
        loss.backward(retain_graph=retain)
        return loss

    if zeroed:
        opt.zero_grad()
    with pytest.raises(RuntimeError, match="closure called backward"):
        opt.step(closure)


def test_stale_gradients_with_the_loss_argument_are_refused():
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step(lambda: F.mse_loss(model(x), y), loss=loss)
    with pytest.raises(RuntimeError, match="same gradients as the previous step"):
        opt.step(lambda: F.mse_loss(model(x), y), loss=F.mse_loss(model(x), y))  # backward forgotten


def test_no_optimizer_wide_key_in_optimizer_state():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2)
    train(opt, model, x, y, 3)
    assert all(isinstance(k, torch.Tensor) for k in opt.state)
    for state in opt.state.values():  # the usual loop that moves optimizer state to a device
        for k, v in state.items():
            state[k] = v.to("cpu")
    saved = get_optimizer_state_dict(model, opt)
    assert saved["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]


def test_a_state_dict_from_before_resolved_lr_still_loads():
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2)
    train(opt, model, x, y, 3)
    legacy = opt.state_dict()
    for group in legacy["param_groups"]:
        del group["resolved_lr"]
    legacy["state"]["resolved"] = True
    fresh = LossGrad(small_mlp().parameters())
    fresh.load_state_dict(legacy)
    assert fresh.param_groups[0]["resolved_lr"] == opt.param_groups[0]["lr"]
    assert "resolved" not in fresh.state
    legacy["state"]["resolved"] = False
    fresh.load_state_dict(legacy)
    assert fresh.param_groups[0]["resolved_lr"] == math.inf


# ------------------------------------------------------- norm layers, probe
def _one_forward_twin(model, twin, x):
    with torch.no_grad():
        for p, q in zip(twin.parameters(), model.parameters()):
            p.copy_(q)
    twin(x)


def _assert_same_buffers(a, b):
    for (name, u), (_, v) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(u, v), name


def test_a_norm_layer_first_used_after_step_one_is_protected():
    torch.manual_seed(0)
    trunk = nn.Linear(4, 8)
    branch = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 1))
    twin_branch = copy.deepcopy(branch)
    x, y = regression_batch()
    opt = LossGrad(list(trunk.parameters()) + list(branch.parameters()), lr=0.05)
    opt.step(lambda: F.mse_loss(trunk(x).sum(1, keepdim=True), y))  # the branch is not used yet
    for _ in range(2):
        with torch.no_grad():
            for p, q in zip(twin_branch.parameters(), branch.parameters()):
                p.copy_(q)
            twin_branch(trunk(x))
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(branch(trunk(x)), y))
        _assert_same_buffers(branch, twin_branch)


def test_norm_layers_are_protected_after_a_failed_first_probe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    x, y = regression_batch()
    opt = LossGrad(model.parameters(), lr=0.05)
    calls = []

    def failing_probe():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the first probe never runs a module
        return F.mse_loss(model(x), y)

    with pytest.raises(KeyboardInterrupt):
        opt.step(failing_probe)
    twin = copy.deepcopy(model)
    _one_forward_twin(model, twin, x)
    opt.zero_grad()
    opt.step(lambda: F.mse_loss(model(x), y))
    _assert_same_buffers(model, twin)


@pytest.mark.parametrize("kind", ["instance_norm", "torchscript"])
def test_instance_norm_and_torchscript_statistics_are_left_as_one_forward_leaves_them(kind):
    torch.manual_seed(0)
    if kind == "instance_norm":
        model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, track_running_stats=True),
                              nn.Flatten(), nn.Linear(4 * 6, 1))
    else:
        with pytest.warns(FutureWarning):
            model = torch.jit.script(nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(),
                                                   nn.Linear(4 * 6, 1)))
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 2, 8, generator=g), torch.randn(16, 1, generator=g)
    opt = LossGrad(model.parameters(), lr=0.05)
    for _ in range(2):
        _one_forward_twin(model, twin, x)
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y))
        _assert_same_buffers(model, twin)


def test_the_probe_does_not_touch_another_threads_modules():
    import threading

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    other = nn.BatchNorm1d(3)  # trained by another thread while the probe runs
    x, y = regression_batch()
    opt = LossGrad(model.parameters(), lr=0.05)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) % 2 == 0:  # during the probe
            worker = threading.Thread(target=lambda: other(torch.randn(10, 3) + 5.0))
            worker.start()
            worker.join()
        return F.mse_loss(model(x), y)

    opt.step(closure)
    assert other.num_batches_tracked.item() == 1 and other.running_mean.mean().item() > 0.1
    assert other.track_running_stats and model[1].track_running_stats


@pytest.mark.parametrize("probe_grad", [False, True])
def test_probe_grad_makes_the_probe_compute_the_function_of_the_forward_pass(probe_grad):
    """A module that branches on grad mode (as eval-mode TransformerEncoder's fast path does): with
    probe_grad the probe computes the training function; without it, the documented caveat holds."""

    class GradModeBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, x):
            out = self.linear(x)
            return out if torch.is_grad_enabled() else 2 * out

    torch.manual_seed(0)
    model = GradModeBranch()
    x, y = regression_batch()
    opt = LossGrad(model.parameters(), lr=0.05, probe_grad=probe_grad, **EXACT)
    opt.step(lambda: F.mse_loss(model(x), y))
    with torch.set_grad_enabled(probe_grad):
        expected = F.mse_loss(model(x), y).item()
    assert opt.last["probe_loss"].item() == expected
    with torch.no_grad():
        assert F.mse_loss(model(x), y).item() != F.mse_loss(model.linear(x), y).item()  # the branch matters


def test_probe_grad_with_an_eval_mode_transformer_encoder_and_a_padding_mask():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=True).eval()
    x = torch.randn(4, 6, 8)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 4:] = True  # padding
    loss_fn = lambda: model(x, src_key_padding_mask=mask).square().mean()
    opt = LossGrad(model.parameters(), lr=1e-3, probe_grad=True, **EXACT)
    opt.step(loss_fn)
    assert opt.last["probe_loss"].item() == pytest.approx(loss_fn().item(), rel=1e-6)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("rollback", [None, "nonfinite"])
def test_an_error_in_the_probe_restores_x_and_keeps_h(path, rollback):
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=0.05, rollback=rollback, **path)
    train(opt, model, x, y, 2)
    before, h = _snapshot(model), float(opt.param_groups[0]["lr"])
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("data loader died")
        return F.mse_loss(model(x), y)

    opt.zero_grad()
    with pytest.raises(ValueError, match="data loader died"):
        opt.step(closure)
    assert float(opt.param_groups[0]["lr"]) == h
    for p, q in zip(model.parameters(), before):
        if rollback is None:  # no copy is kept: x' + hG, exact up to rounding
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(p, q)


# ------------------------------------------------------------------- complex
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_complex_parameters_follow_their_real_view(path):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 3, dtype=torch.complex128, generator=g)
    b = torch.randn(6, dtype=torch.complex128, generator=g)
    z = torch.zeros(3, dtype=torch.complex128, requires_grad=True)
    w = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)  # the same unknowns as real pairs
    opt_z = LossGrad([z], lr=1e-2, weight_decay=0.01, **path, **EXACT)
    opt_w = LossGrad([w], lr=1e-2, weight_decay=0.01, **path, **EXACT)
    hs_z, hs_w = [], []
    for _ in range(30):
        for opt, hs, f in ((opt_z, hs_z, lambda: (a @ z - b).abs().square().sum()),
                           (opt_w, hs_w, lambda: (a @ torch.view_as_complex(w) - b).abs().square().sum())):
            opt.zero_grad()
            opt.step(f)
            hs.append(float(opt.param_groups[0]["lr"]))
    assert len(set(hs_w)) > 2
    assert hs_z == pytest.approx(hs_w, rel=1e-12, abs=0)
    torch.testing.assert_close(torch.view_as_real(z.detach()), w.detach(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- distributed
def _local_worker(rank, world, init_file, out_dir):
    import datetime

    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    torch.manual_seed(rank)
    model = nn.Linear(4, 1)  # each rank its own model, not wrapped in DDP
    opt = LossGrad(model.parameters(), lr=1e-2, distributed=False)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(3 + 4 * rank):  # uneven: a collective would wait for ever
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y))
    mesh = DeviceMesh("cpu", list(range(world)))
    sharded = nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh))
    sharded.grad = distribute_tensor(torch.ones(4, 2), mesh)
    message = ""
    try:
        LossGrad([sharded], lr=1e-2).step(lambda: (sharded * 0).sum().full_tensor() if False else torch.tensor(0.0),
                                          loss=torch.tensor(1.0))
    except RuntimeError as error:
        message = str(error)
    torch.save({"steps": 3 + 4 * rank, "message": message}, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_per_rank_optimizers_do_not_communicate_and_sharded_parameters_are_refused(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_local_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"{rank}.pt")
        assert out["steps"] == 3 + 4 * rank
        assert "sharded parameter (DTensor)" in out["message"]


def test_distributed_true_needs_a_process_group():
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        opt.step(lambda: F.mse_loss(model(x), y))
    with pytest.raises(ValueError, match="distributed"):
        LossGrad(model.parameters(), distributed="yes")


@pytest.mark.parametrize("sync_free", [False, True])
def test_float32_squares_past_float32_range_are_summed_wider(sync_free):
    """Gradient entries of 1e20 are finite in float32, their squares are not: the step is still taken."""
    x = torch.ones(4, requires_grad=True)
    opt = LossGrad([x], lr=1e-45, sync_free=sync_free)
    opt.step(lambda: (x * 1e20).sum())
    assert float(opt.last["sq_grad_norm"]) == pytest.approx(4e40, rel=1e-6)
    assert not bool(opt.last["skipped"])


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # documented: the hook asks the thread id
def test_a_compiled_model_keeps_its_norm_statistics_as_one_forward_leaves_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")  # Dynamo's tracing without a C++ toolchain
    x, y = regression_batch()
    opt = LossGrad(model.parameters(), lr=0.05)
    for _ in range(3):
        _one_forward_twin(model, twin, x)
        opt.zero_grad()
        with pytest.warns(UserWarning, match="global hooks"):  # documented: the probe's hook is process-wide
            opt.step(lambda: F.mse_loss(compiled(x), y))
        _assert_same_buffers(model, twin)


# ============================================ momentum and Adam directions (issue 13)
def reference_direction_rule(params, closure, h, c, steps, direction, momentum=0.9, nesterov=False,
                             betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, threshold=0.5):
    """The rule on a direction d, one tensor at a time, with nothing clever in it: x' = x - h d,
    l = h <G, d>, r = (F(x') - F(x) + l) / l, h grows when r <= ``threshold``; d from torch.optim.SGD(momentum) /
    torch.optim.Adam's update. Returns the step size after every step."""
    buffers = [torch.zeros_like(p) for p in params]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    hs = []
    for t in range(1, steps + 1):
        for p in params:
            p.grad = None
        loss = closure()
        loss.backward()
        with torch.no_grad():
            grads = [p.grad + weight_decay * p for p in params]
            f_x = loss.item() + weight_decay / 2 * sum((p * p).sum().item() for p in params)
            if direction == "momentum":
                buffers = [momentum * b + g for b, g in zip(buffers, grads)]
                d = [g + momentum * b for g, b in zip(grads, buffers)] if nesterov else buffers
            else:
                b1, b2 = betas
                exp_avg = [b1 * m + (1 - b1) * g for m, g in zip(exp_avg, grads)]
                exp_avg_sq = [b2 * v + (1 - b2) * g * g for v, g in zip(exp_avg_sq, grads)]
                d = [(m / (1 - b1 ** t)) / ((v.sqrt() / math.sqrt(1 - b2 ** t)) + eps)
                     for m, v in zip(exp_avg, exp_avg_sq)]
            slope = sum((g * e).sum().item() for g, e in zip(grads, d))
            for p, e in zip(params, d):
                p.sub_(h * e)
            f_xp = closure().item() + weight_decay / 2 * sum((p * p).sum().item() for p in params)
            lred = h * slope
            if lred > 0:
                h = h * c if (f_xp - f_x + lred) / lred <= threshold else h / c
        hs.append(h)
    return hs


FORMS = {"momentum": dict(direction="momentum", momentum=0.9),
         "nesterov": dict(direction="momentum", momentum=0.9, nesterov=True),
         "adam": dict(direction="adam")}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_directions_reproduce_their_reference_in_float64(form, path, weight_decay):
    x, y = regression_batch(torch.float64)
    ref_model = small_mlp(torch.float64)
    model = copy.deepcopy(ref_model)
    options = FORMS[form]
    reference = {k: v for k, v in options.items() if k != "direction"}
    ref_hs = reference_direction_rule(list(ref_model.parameters()), lambda: F.mse_loss(ref_model(x), y), 1e-3,
                                      1.05, 40, options["direction"], weight_decay=weight_decay, **reference)
    opt = LossGrad(model.parameters(), lr=1e-3, weight_decay=weight_decay, **options, **path, **EXACT)
    hs = train(opt, model, x, y, 40)
    assert len(set(ref_hs)) > 2
    assert hs == pytest.approx(ref_hs, rel=1e-12, abs=0)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", list(FORMS))
def test_at_a_fixed_step_size_the_directions_are_torch_optimizers(form):
    """Pinned by min_lr = max_lr (up to 1e-15), the momentum and Adam forms step as torch.optim.SGD(momentum)
    and torch.optim.Adam with lr = h do, L2 weight decay included."""
    x, y = regression_batch(torch.float64)
    model, twin = small_mlp(torch.float64), small_mlp(torch.float64)
    h, wd = 1e-2, 1e-3
    options = FORMS[form]
    if options["direction"] == "adam":
        torch_opt = torch.optim.Adam(twin.parameters(), lr=h, weight_decay=wd)
    else:
        torch_opt = torch.optim.SGD(twin.parameters(), lr=h, momentum=0.9, nesterov=options.get("nesterov", False),
                                    weight_decay=wd)
    opt = LossGrad(model.parameters(), lr=h, min_lr=h, max_lr=h * (1 + 1e-15), weight_decay=wd, **options)
    for _ in range(30):
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y))
        torch_opt.zero_grad()
        F.mse_loss(twin(x), y).backward()
        torch_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_momentum_ratio_and_decisions_by_hand_on_a_2d_quadratic():
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    f = lambda z: 0.5 * z @ a @ z
    opt = LossGrad([x], lr=0.1, direction="momentum", momentum=0.5, **EXACT)
    z, v, h = x.detach().clone(), torch.zeros(2, dtype=torch.float64), 0.1
    for _ in range(6):
        g = a @ z  # by hand: v <- 0.5 v + g, d = v, r = (f(z - h d) - f(z) + h <g, d>) / (h <g, d>)
        v = 0.5 * v + g
        slope = (g @ v).item()
        z_new = z - h * v
        ratio = (f(z_new) - f(z) + h * slope).item() / (h * slope)
        opt.zero_grad()
        opt.step(lambda: f(x))
        assert float(opt.last["ratio"]) == pytest.approx(ratio, rel=1e-12)
        assert float(opt.last["slope"]) == pytest.approx(slope, rel=1e-12)
        h = h * 1.05 if ratio <= 0.5 else h / 1.05
        z = z_new
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(h, rel=1e-12)
        torch.testing.assert_close(x.detach(), z, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_non_descent_momentum_step_is_taken_with_h_kept_and_counted(sync_free):
    """f = x^2 from x = 1: a large step overshoots to x < 0, where the momentum still points the old way."""
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = LossGrad([x], lr=0.9, direction="momentum", momentum=0.9, sync_free=sync_free, **EXACT)
    opt.step(lambda: (x * x).sum())  # v = 2, x = 1 - 1.8 = -0.8
    h, before = float(opt.param_groups[0]["lr"]), x.detach().clone()
    opt.zero_grad()
    opt.step(lambda: (x * x).sum())  # g = -1.6, v = 0.9 * 2 - 1.6 = 0.2: <g, v> < 0
    assert bool(opt.last["non_descent"]) and float(opt.last["slope"]) < 0
    assert float(opt.param_groups[0]["lr"]) == h
    assert not torch.equal(x.detach(), before)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("sync_free", [False, True])
def test_an_undone_step_keeps_the_gradient_in_the_buffers(form, sync_free):
    """Documented: an undone step restores x bitwise; its gradient (taken at x, where the weights stay) stays in
    the direction's buffers."""
    x, y = regression_batch()
    model = small_mlp()
    before = _snapshot(model)
    opt = LossGrad(model.parameters(), lr=0.1, sync_free=sync_free, **FORMS[form])
    opt.step(ProbeSaboteur(model, x, y, math.nan))
    assert bool(opt.last["undone"])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    key = "exp_avg" if FORMS[form]["direction"] == "adam" else "momentum_buffer"
    for p in model.parameters():
        scale = 0.1 if key == "exp_avg" else 1.0  # first step: m = (1 - beta1) g, v = g
        torch.testing.assert_close(opt.state[p][key], scale * p.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("sync_free", [False, True])
def test_a_nonfinite_gradient_never_enters_the_buffers(form, sync_free):
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2, sync_free=sync_free, **FORMS[form])
    train(opt, model, x, y, 3)
    state = copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(model.parameters())})
    params = _snapshot(model)
    opt.zero_grad()
    opt.step(lambda: F.mse_loss(model(x), y) * torch.tensor(math.inf) * 0)  # NaN loss and gradient
    assert bool(opt.last["undone"])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for i, p in enumerate(model.parameters()):
        for key, value in state[i].items():
            assert torch.equal(opt.state[p][key].cpu(), value.cpu()), key
    train(opt, model, x, y, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("sync_free", [False, True])
def test_direction_state_round_trip_continues_bit_for_bit(form, sync_free, tmp_path):
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-3, sync_free=sync_free, **FORMS[form])
    train(opt, model, x, y, 10)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    hs_straight = train(opt, model, x, y, 10)
    resumed = small_mlp(seed=7)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    opt2 = LossGrad(resumed.parameters(), sync_free=sync_free, **FORMS[form])
    opt2.load_state_dict(ckpt["opt"])
    assert train(opt2, resumed, x, y, 10) == hs_straight
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(direction="rmsprop"), "direction must be"), (dict(direction="momentum", momentum=1.0), "momentum must"),
    (dict(direction="momentum", momentum=-0.1), "momentum must"), (dict(direction="adam", betas=(0.9, 1.0)), "betas"),
    (dict(direction="adam", betas=(-0.1, 0.9)), "betas"), (dict(direction="adam", betas=0.9), "betas"),
    (dict(direction="adam", eps=0.0), "eps"), (dict(direction="adam", eps=-1e-8), "eps"),
    (dict(momentum=0.9), "do not apply|do\\(es\\) not apply"), (dict(direction="momentum", betas=(0.9, 0.99)), "apply"),
    (dict(direction="adam", nesterov=True), "apply"), (dict(direction="momentum", nesterov="yes"), "nesterov"),
])
def test_bad_direction_options_are_refused_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossGrad(small_mlp().parameters(), **kwargs)


def test_directions_complete_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 1))
        x, y = torch.randn(16, 4), torch.randn(16, 1)
    for options in FORMS.values():
        opt = LossGrad(model.parameters(), lr=1e-3, weight_decay=1e-4, **options)
        for _ in range(2):
            opt.zero_grad()
            opt.step(lambda: F.mse_loss(model(x), y))
        assert opt.param_groups[0]["lr"].device.type == "meta"


@pytest.mark.parametrize("form", list(FORMS))
def test_directions_keep_the_probe_clean(form):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))
    twin = copy.deepcopy(model)
    x, y = regression_batch()
    opt = LossGrad(model.parameters(), lr=1e-2, **FORMS[form])
    for _ in range(2):
        _one_forward_twin(model, twin, x)
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y))
        _assert_same_buffers(model, twin)


@pytest.mark.parametrize("options, h0s", [
    (dict(direction="momentum"), (1e-10, 1e-6, 1e-3, 1e-1)),
    (dict(direction="momentum", rollback="increase"), (1e-10, 1e-3, 1.0, 1e3)),
    (dict(direction="adam", rollback=None, resolution_guard=False), (1e-6, 1e-3)),
    (dict(direction="adam"), (1e-10, 1e-6, 1e-3)),
], ids=["momentum", "momentum-increase", "adam-exact", "adam"])
def test_directions_end_at_the_same_step_size_over_the_stated_ranges(options, h0s):
    """The README's ranges for the momentum and Adam forms, on the problem of benchmarks/insensitivity.py."""
    assert _same_end([_insensitivity_run(h0, **options) for h0 in h0s])


# ------------------------------------------------- review of the hardening
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _fixture_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


@pytest.mark.parametrize("release", ["2026-11-28", "63c971d"])
def test_state_dicts_saved_by_earlier_releases_load_and_train(release):
    """Saved by the lossgrad.py of that release (5 steps, two groups, tests/fixtures/)."""
    saved = torch.load(os.path.join(FIXTURES, f"lossgrad_state_{release}.pt"))
    model = _fixture_model()
    model.load_state_dict(saved["model"])
    opt = LossGrad([{"params": model[0].parameters(), "weight_decay": 1e-3},
                    {"params": list(model[2].parameters()) + list(model[4].parameters())}])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no spurious "lr changed outside" warning either
        opt.load_state_dict(saved["optimizer"])
        assert opt.param_groups[0]["lr"] == saved["h"]
        assert all(isinstance(k, torch.Tensor) for k in opt.state)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 4, generator=g)
        train(opt, model, x, torch.sin(x.sum(1, keepdim=True)), 5)


@pytest.mark.parametrize("sync_free", [False, True])
def test_deepcopy_and_pickle_give_an_optimizer_that_steps_alike(sync_free):
    import pickle

    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2, sync_free=sync_free, probe_grad=True, rollback="increase")
    train(opt, model, x, y, 3)
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    expected = train(opt, model, x, y, 5)
    for model2, opt2 in copies:
        assert (opt2.sync_free, opt2.probe_grad, opt2.param_groups[0]["rollback"]) == (sync_free, True, "increase")
        assert train(opt2, model2, x, y, 5) == expected
        assert all(torch.equal(p, q) for p, q in zip(model2.parameters(), model.parameters()))


def test_a_multi_group_state_dict_round_trip_through_torch_save_is_not_an_external_write(tmp_path):
    import warnings

    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad([{"params": model[0].parameters()}, {"params": model[2].parameters()},
                    {"params": model[4].parameters()}], lr=1e-2)
    train(opt, model, x, y, 3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt.load_state_dict(torch.load(tmp_path / "opt.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(opt, model, x, y, 2)


def test_an_in_place_write_of_a_sync_free_step_size_is_seen():
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2, sync_free=True)
    train(opt, model, x, y, 2)
    opt.param_groups[0]["lr"].fill_(1e-5)  # as ReduceLROnPlateau writes a tensor step size
    with pytest.warns(UserWarning, match="changed outside"):
        train(opt, model, x, y, 1)
    assert float(opt.param_groups[0]["lr"]) in (pytest.approx(1e-5 * 1.05), pytest.approx(1e-5 / 1.05))


def test_a_step_size_written_outside_the_bounds_is_held_to_them_before_stepping():
    w = torch.zeros(1, requires_grad=True)
    opt = LossGrad([w], lr=0.1, max_lr=0.5, **EXACT)
    opt.param_groups[0]["lr"] = 100.0
    with pytest.warns(UserWarning, match="held to"):
        opt.step(lambda: ((w - 1) ** 2).sum())
    assert w.item() == pytest.approx(1.0)  # stepped with h = 0.5 (a step of 100 would give 200)


def test_a_removed_scheduler_can_be_cleared_as_the_error_says():
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.raises(RuntimeError, match=r"g.pop\('initial_lr'\)") as error:
        opt.step(lambda: F.mse_loss(model(x), y))
    for g in opt.param_groups:
        g.pop("initial_lr")
    train(opt, model, x, y, 2)


def test_the_rollback_copy_lives_no_longer_than_its_parameter():
    import gc
    import weakref

    big, small = torch.zeros(1000, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = LossGrad([small], lr=0.1)
    opt.add_param_group({"params": [big]})
    opt.step(lambda: (big ** 2).sum() + ((small - 1) ** 2).sum())
    del opt.param_groups[1]
    ref = weakref.ref(big)
    del big
    gc.collect()
    assert ref() is None
    assert sum(b.numel() for b in opt._backup.values()) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_with_a_float32_loss_trains_from_a_small_h(dtype):
    """Its outputs are rounded to 16 bits before the float32 loss sees them: a small step leaves F exactly
    unchanged, which must read as unresolved (h grows), not as r = 1 (h shrinks for ever)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 10, generator=g)
    y = torch.sin(x @ torch.randn(10, 3, generator=g)).sum(1, keepdim=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)).to(dtype)
    first = F.mse_loss(model(x.to(dtype)).float(), y).item()
    opt = LossGrad(model.parameters(), lr=1e-6)
    for i in range(600):
        idx = torch.arange(i * 100, (i + 1) * 100) % 1000
        xb, yb = x[idx].to(dtype), y[idx]
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(xb).float(), yb))
    assert F.mse_loss(model(x.to(dtype)).float(), y).item() < 0.5 * first


def test_under_autocast_resolution_dtype_lets_h_start():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 10, generator=g)
    y = torch.sin(x @ torch.randn(10, 3, generator=g)).sum(1, keepdim=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    first = F.mse_loss(model(x), y).item()
    opt = LossGrad(model.parameters(), lr=1e-6, resolution_dtype=torch.bfloat16)
    for i in range(600):
        idx = torch.arange(i * 100, (i + 1) * 100) % 1000
        xb, yb = x[idx], y[idx]

        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.mse_loss(model(xb).float(), yb)

        opt.zero_grad()
        opt.step(closure)
    assert F.mse_loss(model(x), y).item() < 0.5 * first
    with pytest.raises(ValueError, match="resolution_dtype"):
        LossGrad(model.parameters(), resolution_dtype=torch.int32)


def test_complex_adam_is_torch_adam_per_real_and_imaginary_part():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(6, dtype=torch.complex128, generator=g)
    weights = torch.rand(6, dtype=torch.float64, generator=g) + 0.5
    z = torch.zeros(6, dtype=torch.complex128, requires_grad=True)
    twin = z.detach().clone().requires_grad_(True)
    f = lambda v: (weights * (v - target).abs().square()).sum() + v.real.pow(4).sum()
    opt = LossGrad([z], lr=1e-2, min_lr=1e-2, max_lr=1e-2 * (1 + 1e-15), direction="adam")
    torch_opt = torch.optim.Adam([twin], lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        opt.step(lambda: f(z))
        torch_opt.zero_grad()
        f(twin).backward()
        torch_opt.step()
    torch.testing.assert_close(z.detach(), twin.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_rise_along_a_non_descent_direction_undone_by_increase_keeps_h(sync_free):
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    grads = iter([1.0, 1.0, -0.1])
    opt = LossGrad([w], lr=0.5, direction="momentum", rollback="increase", sync_free=sync_free)
    for _ in range(2):  # linear losses with slope +1: w moves down, the momentum builds up
        opt.zero_grad()
        slope = next(grads)
        opt.step(lambda: slope * w.sum() + 10.0)
    h = float(opt.param_groups[0]["lr"])
    slope = next(grads)
    opt.zero_grad()
    opt.step(lambda: slope * w.sum() + 10.0)  # the momentum carries w further down, where this loss rises
    assert bool(opt.last["non_descent"]) and bool(opt.last["undone"])
    assert float(opt.param_groups[0]["lr"]) == h


@pytest.mark.parametrize("saved, loaded", [("momentum", "sgd"), ("sgd", "adam"), ("adam", "momentum")])
def test_a_state_dict_of_another_direction_is_refused(saved, loaded):
    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2, direction=saved)
    train(opt, model, x, y, 2)
    with pytest.raises(ValueError, match=f"direction={saved!r}"):
        LossGrad(model.parameters(), direction=loaded).load_state_dict(opt.state_dict())


def test_complex128_slopes_are_summed_in_float64():
    from lossgrad import _inner, _sq_sum

    a = [torch.randn(50, dtype=torch.complex128, generator=torch.Generator().manual_seed(0)) * 7]
    assert _inner(a, a, host=True) == pytest.approx(_sq_sum(a, foreach=True, host=True), rel=1e-14, abs=0)


# ================================================== the threshold of the ratio (r <= threshold)
THRESHOLD_FORMS = {"sgd": {}, **FORMS}
# initial h at which each form's 40 steps stay finite, both grow and shrink h, and decide differently at
# thresholds 0.5, 0.75 and 0.9 (no ratio lies within 1e-4 of these: rounding cannot flip a decision)
THRESHOLD_H0 = {"sgd": 0.1, "momentum": 0.1, "nesterov": 0.035, "adam": 0.05}


def _reference_hs(form, model, x, y, h0, steps, threshold):
    params, closure = list(model.parameters()), lambda: F.mse_loss(model(x), y)
    options = THRESHOLD_FORMS[form]
    if not options:
        return reference_algorithm_1(params, closure, h=h0, c=1.05, steps=steps, threshold=threshold)
    reference = {k: v for k, v in options.items() if k != "direction"}
    return reference_direction_rule(params, closure, h0, 1.05, steps, options["direction"], threshold=threshold,
                                    **reference)


@pytest.mark.parametrize("form", list(THRESHOLD_FORMS))
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_default_threshold_is_the_papers_rule_bit_for_bit(form, path):
    """threshold left out and threshold=0.5 step alike to the bit, and take the plain reference's decisions
    (r <= 1/2): the same h after every step, exactly, and the same parameters up to rounding."""
    x, y = regression_batch(torch.float64)
    h0 = THRESHOLD_H0[form]
    ref_model = small_mlp(torch.float64)
    ref_hs = _reference_hs(form, ref_model, x, y, h0, 40, threshold=0.5)
    runs = []
    for kwargs in ({}, dict(threshold=0.5)):
        model = small_mlp(torch.float64)
        opt = LossGrad(model.parameters(), lr=h0, c=1.05, **THRESHOLD_FORMS[form], **path, **EXACT, **kwargs)
        assert opt.param_groups[0]["threshold"] == 0.5
        runs.append((train(opt, model, x, y, 40), _snapshot(model)))
    (hs_default, params_default), (hs_half, params_half) = runs
    steps = list(zip([h0] + ref_hs, ref_hs))
    assert any(b > a for a, b in steps) and any(b < a for a, b in steps), "the run should grow and shrink h"
    assert hs_default == hs_half == ref_hs
    assert all(torch.equal(p, q) for p, q in zip(params_default, params_half))
    for p, q in zip(params_default, ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)  # rounding, grown by steps that overshoot


@pytest.mark.parametrize("form", list(THRESHOLD_FORMS))
@pytest.mark.parametrize("path", [PATHS[0], PATHS[1]], ids=PATH_IDS[:2])
@pytest.mark.parametrize("threshold", [0.75, 0.9])
def test_a_threshold_follows_the_reference_rule(form, path, threshold):
    x, y = regression_batch(torch.float64)
    h0 = THRESHOLD_H0[form]
    ref_model = small_mlp(torch.float64)
    ref_hs = _reference_hs(form, ref_model, x, y, h0, 40, threshold=threshold)
    assert ref_hs != _reference_hs(form, small_mlp(torch.float64), x, y, h0, 40, threshold=0.5)
    model = small_mlp(torch.float64)
    opt = LossGrad(model.parameters(), lr=h0, c=1.05, threshold=threshold, **THRESHOLD_FORMS[form], **path, **EXACT)
    assert train(opt, model, x, y, 40) == ref_hs
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


# f(x) = x^2 (a = 2 in f = a x^2 / 2) from x = 1: G = 2, and the first direction is d = k G. Momentum's buffer
# starts at zero (d = G); Nesterov's d = G + mu v = (1 + mu) G; Adam's first d = G / (|G| + eps) (bias-corrected
# m = G, sqrt(v) = |G|), G / 4 exactly with eps = 2.
BOUNDARY_FORMS = {"sgd": (dict(), 1.0), "momentum": (dict(direction="momentum", momentum=0.9), 1.0),
                  "nesterov": (dict(direction="momentum", momentum=0.5, nesterov=True), 1.5),
                  "adam": (dict(direction="adam", eps=2.0), 0.25)}


@pytest.mark.parametrize("threshold", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("form", list(BOUNDARY_FORMS))
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_threshold_moves_the_decision_to_its_boundary_on_a_hand_checked_quadratic(threshold, form, path):
    """By hand, for f = a x^2 / 2 and d = k G: F(x - h d) - F(x) + h <G, d> = a h^2 k^2 G^2 / 2 and
    h <G, d> = h k G^2, so r = a k h / 2 (= k h here). r just below the threshold grows h by c, just above
    shrinks it, and r equal to it grows (the rule is r <= threshold), wherever h = threshold / k is exact."""
    from fractions import Fraction

    options, k = BOUNDARY_FORMS[form]
    c = 1.25

    def one_step(h):
        x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
        opt = LossGrad([x], lr=h, c=c, threshold=threshold, **options, **path)
        opt.step(lambda: (x * x).sum())
        assert not bool(opt.last["undone"])
        return float(opt.last["ratio"]), float(opt.param_groups[0]["lr"])

    boundary = threshold / k
    for h, grows in ((boundary * (1 - 2 ** -20), True), (boundary * (1 + 2 ** -20), False)):
        ratio, new_h = one_step(h)
        assert ratio == pytest.approx(k * h, rel=1e-14)
        assert (ratio < threshold) == grows
        assert new_h == (h * c if grows else h / c)
    if threshold in (0.5, 0.75) and Fraction(boundary) * Fraction(k) == Fraction(threshold):  # every sum is exact
        ratio, new_h = one_step(boundary)
        assert ratio == threshold
        assert new_h == boundary * c


@pytest.mark.parametrize("value", [0, 0.0, 1, 1.0, -0.5, 1.5, math.nan, math.inf, -math.inf, True, None, "0.5"])
def test_bad_thresholds_are_refused_with_a_clear_message(value):
    message = r"threshold must be a finite number strictly between 0 and 1 .*got " + re.escape(repr(value))
    with pytest.raises(ValueError, match=message):
        LossGrad(small_mlp().parameters(), threshold=value)
    with pytest.raises(ValueError, match=message):  # nor through a param group
        LossGrad([{"params": small_mlp().parameters(), "threshold": value}])


def test_param_groups_may_not_differ_in_threshold():
    model = small_mlp()
    with pytest.raises(ValueError, match="threshold=0.75 but group 0 has 0.5"):
        LossGrad([{"params": model[0].parameters()}, {"params": model[2].parameters(), "threshold": 0.75}])
    opt = LossGrad([{"params": model[0].parameters()}, {"params": model[2].parameters()}], threshold=0.75)
    assert [g["threshold"] for g in opt.param_groups] == [0.75, 0.75]
    opt.add_param_group({"params": model[4].parameters()})
    assert opt.param_groups[-1]["threshold"] == 0.75


@pytest.mark.parametrize("sync_free", [False, True])
def test_threshold_is_saved_with_the_param_groups_and_resumes_bit_for_bit(sync_free, tmp_path):
    import pickle

    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-3, threshold=0.75, sync_free=sync_free)
    train(opt, model, x, y, 10)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    hs_straight = train(opt, model, x, y, 20)

    ckpt = torch.load(tmp_path / "ckpt.pt")
    assert [g["threshold"] for g in ckpt["opt"]["param_groups"]] == [0.75]
    resumed = small_mlp(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = LossGrad(resumed.parameters(), sync_free=sync_free)  # the default threshold: the saved one wins
    opt2.load_state_dict(ckpt["opt"])
    copies.append((resumed, opt2))
    for model2, opt3 in copies:
        assert opt3.param_groups[0]["threshold"] == 0.75
        assert train(opt3, model2, x, y, 20) == hs_straight
        assert all(torch.equal(p, q) for p, q in zip(model2.parameters(), model.parameters()))


@pytest.mark.parametrize("release", ["2026-11-28", "63c971d"])
def test_state_dicts_from_before_threshold_load_with_the_papers_rule(release):
    """The fixtures were saved when the rule was r <= 1/2: they load with threshold 0.5, also into an optimizer
    built with another threshold (as a saved c replaces the given one)."""
    saved = torch.load(os.path.join(FIXTURES, f"lossgrad_state_{release}.pt"))
    assert all("threshold" not in g for g in saved["optimizer"]["param_groups"])
    model = _fixture_model()
    model.load_state_dict(saved["model"])
    opt = LossGrad([{"params": model[0].parameters(), "weight_decay": 1e-3},
                    {"params": list(model[2].parameters()) + list(model[4].parameters())}], threshold=0.75)
    opt.load_state_dict(saved["optimizer"])
    assert [g["threshold"] for g in opt.param_groups] == [0.5, 0.5]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    train(opt, model, x, torch.sin(x.sum(1, keepdim=True)), 3)
    assert opt.state_dict()["param_groups"][0]["threshold"] == 0.5


def test_an_optimizer_pickled_before_threshold_unpickles_with_the_papers_rule(monkeypatch):
    import pickle

    x, y = regression_batch()
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2)
    train(opt, model, x, y, 3)
    current = LossGrad.__getstate__

    def before_threshold(self):  # what an earlier release pickled: no threshold anywhere
        state = current(self)
        state["defaults"] = {k: v for k, v in state["defaults"].items() if k != "threshold"}
        state["param_groups"] = [{k: v for k, v in g.items() if k != "threshold"} for g in state["param_groups"]]
        return state

    monkeypatch.setattr(LossGrad, "__getstate__", before_threshold)
    blob = pickle.dumps((model, opt))
    monkeypatch.undo()
    assert b"threshold" not in blob
    model2, opt2 = pickle.loads(blob)
    assert opt2.defaults["threshold"] == 0.5 and opt2.param_groups[0]["threshold"] == 0.5
    expected = train(opt, model, x, y, 5)
    assert train(opt2, model2, x, y, 5) == expected
    opt2.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert opt2.param_groups[-1]["threshold"] == 0.5
