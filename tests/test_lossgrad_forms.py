"""LossGrad's options from notebook 11 (probe='next', smoothing, shrink, average), each against a plain reference."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossgrad import LossGrad, judge_by_slopes_float, judge_by_slopes_tensor
from test_lossgrad import EXACT, FORMS, PATH_IDS, PATHS, _ddp_worker, reference_algorithm_1, regression_batch, small_mlp

DIRECTIONS = {"sgd": dict(direction="sgd"), **FORMS}


def _direction(direction, grads, state, t, momentum=0.9, nesterov=False, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.SGD(momentum) / torch.optim.Adam's step direction, one tensor at a time; updates ``state``."""
    if direction == "sgd":
        return grads
    if direction == "momentum":
        state["v"] = [momentum * b + g for b, g in zip(state.get("v", [torch.zeros_like(g) for g in grads]), grads)]
        return [g + momentum * b for g, b in zip(grads, state["v"])] if nesterov else state["v"]
    b1, b2 = betas
    state["m"] = [b1 * m + (1 - b1) * g for m, g in zip(state.get("m", [torch.zeros_like(g) for g in grads]), grads)]
    state["v"] = [b2 * v + (1 - b2) * g * g for v, g in zip(state.get("v", [torch.zeros_like(g) for g in grads]), grads)]
    return [(m / (1 - b1 ** t)) / ((v.sqrt() / math.sqrt(1 - b2 ** t)) + eps) for m, v in zip(state["m"], state["v"])]


def reference_next_probe(params, closures, h, c, direction="sgd", threshold=0.5, smoothing=0.0, shrink=None,
                         **direction_options):
    """probe='next', one tensor at a time: at each step the last step (start slope s0 = <G_last, d_last>) is judged
    by this batch's gradient G at its end point, s1 = <G, d_last>: r = (s0 - s1) / (2 s0), h * c if r <= threshold
    else h / shrink (with smoothing: the ratio of the moving averages of h (s0 - s1) / 2 and h s0); then
    x <- x - h d. ``closures``: one loss per step (a new batch each). Returns h after every step."""
    state, hs, last, s0, num, den = {}, [], None, math.nan, 0.0, 0.0
    for t, closure in enumerate(closures, start=1):
        for p in params:
            p.grad = None
        closure().backward()
        with torch.no_grad():
            grads = [p.grad.clone() for p in params]
            if last is not None and s0 > 0:
                s1 = sum((g * e).sum().item() for g, e in zip(grads, last))
                r = (s0 - s1) / (2 * s0)
                if smoothing:
                    num = smoothing * num + (1 - smoothing) * h * (s0 - s1) / 2
                    den = smoothing * den + (1 - smoothing) * h * s0
                    r = num / den
                h = h * c if r <= threshold else h / (shrink or c)
            d = _direction(direction, grads, state, t, **direction_options)
            s0 = sum((g * e).sum().item() for g, e in zip(grads, d))
            for p, e in zip(params, d):
                p.sub_(h * e)
            last = [e.clone() for e in d]
        hs.append(h)
    return hs


def batches_of(model, n_steps, seed=3):
    """One closure per step, each on its own regression batch (probe='next' judges a step on the next one)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        x = torch.randn(32, 4, generator=g, dtype=torch.float64)
        y = torch.sin(x.sum(1, keepdim=True))
        out.append(lambda x=x, y=y: F.mse_loss(model(x), y))
    return out


def run(opt, closures):
    hs = []
    for closure in closures:
        opt.zero_grad()
        opt.step(closure)
        hs.append(float(opt.param_groups[0]["lr"]))
    return hs


# ------------------------------------------------------------------ probe='next'
@pytest.mark.parametrize("form", list(DIRECTIONS))
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("extra", [dict(), dict(smoothing=0.9, shrink=1.1025)], ids=["plain", "smoothed-shrink"])
def test_next_probe_reproduces_its_reference_in_float64(form, path, extra):
    ref_model = small_mlp(torch.float64)
    model = copy.deepcopy(ref_model)
    options = DIRECTIONS[form]
    reference = {k: v for k, v in options.items() if k != "direction"}
    ref_hs = reference_next_probe(list(ref_model.parameters()), batches_of(ref_model, 40), 1e-2, 1.05,
                                  options["direction"], **extra, **reference)
    opt = LossGrad(model.parameters(), lr=1e-2, probe="next", **options, **extra, **path)
    hs = run(opt, batches_of(model, 40))
    assert len(set(ref_hs)) > 3, "the reference run should both grow and shrink h"
    assert hs == pytest.approx(ref_hs, rel=1e-12, abs=0)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_next_probe_evaluates_the_closure_once_per_step():
    model = small_mlp()
    x, y = regression_batch()
    calls = []
    opt = LossGrad(model.parameters(), lr=1e-2, probe="next")
    for _ in range(5):
        opt.zero_grad()
        opt.step(lambda: calls.append(1) or F.mse_loss(model(x), y))
    assert len(calls) == 5
    assert math.isnan(float(opt.last["probe_loss"]))


def test_next_probe_grows_h_exactly_when_the_next_batch_still_descends():
    """r <= 1/2 exactly when s1 >= 0, whatever s0 > 0 (the verdict is the sign of the hypergradient)."""
    rule = dict(c=2.0, threshold=0.5)
    for s0 in (1e-3, 1.0, 7.0):
        assert judge_by_slopes_float(1.0, s0, 0.0, {}, **rule)[0] == 2.0
        assert judge_by_slopes_float(1.0, s0, -1e-9, {}, **rule)[0] == 0.5
        assert judge_by_slopes_float(1.0, s0, 0.3 * s0, {}, **rule)[1] == pytest.approx(0.35)
    assert judge_by_slopes_float(1.0, math.nan, 1.0, {}, **rule)[0] == 1.0  # nothing to judge: the first step
    assert judge_by_slopes_float(1.0, -1.0, 1.0, {}, **rule)[0] == 1.0  # a non-descent step: h kept
    assert judge_by_slopes_float(1.0, 1.0, math.inf, {}, **rule)[0] == 0.5  # a non-finite gradient: h shrinks


@pytest.mark.parametrize("s0, s1", [(1.0, 0.2), (1.0, -0.2), (math.nan, 0.5), (-1.0, 0.5), (2.0, math.nan),
                                    (3.0, 3.0), (0.0, 1.0)])
@pytest.mark.parametrize("smoothing", [0.0, 0.8])
def test_next_probe_host_and_tensor_rules_decide_alike(s0, s1, smoothing):
    memory = dict(previous_slope=s0, smoothed_num=0.1, smoothed_den=0.4)
    rule = dict(c=1.05, threshold=0.5, smoothing=smoothing, shrink=1.2, min_lr=1e-6, max_lr=10.0)
    h_f, r_f, m_f = judge_by_slopes_float(0.1, s0, s1, memory, **rule)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    h_t, r_t, m_t = judge_by_slopes_tensor(t(0.1), t(s0), t(s1), {k: t(v) for k, v in memory.items()}, **rule)
    assert float(h_t) == pytest.approx(h_f, rel=1e-15)
    assert (math.isnan(r_f) and math.isnan(float(r_t))) or float(r_t) == pytest.approx(r_f, rel=1e-15)
    for key in ("smoothed_num", "smoothed_den"):
        assert float(m_t[key]) == pytest.approx(m_f[key], rel=1e-15)


@pytest.mark.parametrize("sync_free", [False, True])
def test_next_probe_never_steps_into_a_nonfinite_gradient_nor_judges_by_it(sync_free):
    model = small_mlp()
    x, y = regression_batch()
    opt = LossGrad(model.parameters(), lr=1e-2, probe="next", sync_free=sync_free)
    run(opt, [lambda: F.mse_loss(model(x), y)] * 3)
    before = [p.detach().clone() for p in model.parameters()]
    h = float(opt.param_groups[0]["lr"])
    opt.zero_grad()
    opt.step(lambda: F.mse_loss(model(x), y) * math.nan)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(h / 1.05)
    assert bool(opt.last["skipped"])
    opt.zero_grad()
    opt.step(lambda: F.mse_loss(model(x), y))  # the step that was not taken is not judged: h kept
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(h / 1.05)


def test_next_probe_state_dict_round_trip_continues_bit_for_bit(tmp_path):
    model = small_mlp()
    closures = batches_of(model, 30)
    closures = [lambda f=f: f().float() for f in closures]
    model.double()
    opt = LossGrad(model.parameters(), lr=1e-2, probe="next", direction="adam", smoothing=0.5)
    run(opt, closures[:10])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    rest = run(opt, closures[10:])
    twin = copy.deepcopy(model)
    saved = torch.load(tmp_path / "ckpt.pt")
    twin.load_state_dict(saved["model"])
    opt2 = LossGrad(twin.parameters(), lr=1.0, probe="next", direction="adam", smoothing=0.5)
    opt2.load_state_dict(saved["opt"])
    twin_closures = [lambda f=f: f() for f in batches_of(twin, 30)]
    assert run(opt2, twin_closures[10:]) == rest
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_state_dict_from_before_these_options_loads_with_the_papers_rule():
    model = small_mlp()
    opt = LossGrad(model.parameters(), lr=1e-2)
    state = opt.state_dict()
    for group in state["param_groups"]:
        for key in ("probe", "smoothing", "shrink", "average", "previous_slope", "smoothed_num", "smoothed_den"):
            group.pop(key)
    fresh = LossGrad(model.parameters(), lr=1e-2, probe="next", smoothing=0.9, shrink=2.0, average=8.0)
    fresh.load_state_dict(state)
    group = fresh.param_groups[0]
    assert (group["probe"], group["smoothing"], group["shrink"], group["average"]) == ("same", 0.0, None, None)
    x, y = regression_batch()
    run(fresh, [lambda: F.mse_loss(model(x), y)] * 2)


def test_next_probe_on_the_meta_device_never_syncs():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        x, y = torch.randn(16, 4), torch.randn(16, 1)
    for options in (dict(probe="next"), dict(probe="next", direction="adam", smoothing=0.9, average=8.0),
                    dict(smoothing=0.9, shrink=1.2), dict(probe="next", rollback=None, max_grad_norm=1.0)):
        opt = LossGrad(model.parameters(), lr=1e-3, **options)
        for _ in range(3):
            opt.zero_grad()
            opt.step(lambda: F.mse_loss(model(x), y))
        assert opt.param_groups[0]["lr"].device.type == "meta"


@pytest.mark.parametrize("direction", ["sgd", "adam"])
def test_next_probe_ddp_ranks_keep_the_same_step_size_and_parameters(tmp_path, direction):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), dict(direction=direction, probe="next")),
             nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert len(set(r0["hs"])) > 2
    assert r0["hs"] == r1["hs"]
    for p, q in zip(r0["params"], r1["params"]):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ smoothing and shrink on the paper's probe
def reference_smoothed(params, closure, h, c, steps, smoothing=0.0, shrink=None, threshold=0.5):
    """Algorithm 1 with the ratio of moving averages of its numerator F(x') - F(x) + l and denominator l, and
    h / shrink when that ratio exceeds the threshold. Returns h after every step."""
    num = den = 0.0
    hs = []
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss = closure()
        loss.backward()
        with torch.no_grad():
            sq = sum((p.grad * p.grad).sum().item() for p in params)
            lred = h * sq
            for p in params:
                p.sub_(h * p.grad)
            diff = closure().item() - loss.item()
            r = (diff + lred) / lred
            if smoothing:
                num = smoothing * num + (1 - smoothing) * (diff + lred)
                den = smoothing * den + (1 - smoothing) * lred
                r = num / den
            h = h * c if r <= threshold else h / (shrink or c)
        hs.append(h)
    return hs


@pytest.mark.parametrize("options", [dict(smoothing=0.9), dict(shrink=1.3), dict(smoothing=0.5, shrink=1.1)])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_smoothing_and_shrink_reproduce_their_reference_in_float64(options, path):
    x, y = regression_batch(torch.float64)
    ref_model = small_mlp(torch.float64)
    model = copy.deepcopy(ref_model)
    ref_hs = reference_smoothed(list(ref_model.parameters()), lambda: F.mse_loss(ref_model(x), y), 1e-3, 1.05, 60,
                                **options)
    opt = LossGrad(model.parameters(), lr=1e-3, **options, **path, **EXACT)
    hs = run(opt, [lambda: F.mse_loss(model(x), y)] * 60)
    assert len(set(ref_hs)) > 3
    assert hs == pytest.approx(ref_hs, rel=1e-12, abs=0)


def test_with_the_new_options_off_the_exact_path_still_takes_algorithm_1s_step_sizes_exactly():
    x, y = regression_batch(torch.float64)
    ref_model = small_mlp(torch.float64)
    model = copy.deepcopy(ref_model)
    ref_hs = reference_algorithm_1(list(ref_model.parameters()), lambda: F.mse_loss(ref_model(x), y), 1e-3, 1.05, 40)
    opt = LossGrad(model.parameters(), lr=1e-3, probe="same", smoothing=0.0, shrink=None, average=None, **EXACT)
    assert run(opt, [lambda: F.mse_loss(model(x), y)] * 40) == ref_hs  # every decision, exactly
    for p, q in zip(model.parameters(), ref_model.parameters()):  # x - h G fused in the optimizer: rounding apart
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ the averaged iterate
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("probe", ["same", "next"])
def test_eval_puts_the_polynomial_average_in_and_train_puts_the_weights_back_bitwise(path, probe):
    gamma = 8.0
    model = small_mlp(torch.float64)
    x, y = regression_batch(torch.float64)
    opt = LossGrad(model.parameters(), lr=1e-2, average=gamma, probe=probe, **path)
    average = None
    for t in range(1, 26):
        opt.zero_grad()
        opt.step(lambda: F.mse_loss(model(x), y))
        current = [p.detach().clone() for p in model.parameters()]
        w = (1 + gamma) / (t + gamma)
        average = current if average is None else [a + w * (c - a) for a, c in zip(average, current)]
    opt.eval()
    for p, a in zip(model.parameters(), average):
        torch.testing.assert_close(p.detach(), a, rtol=1e-12, atol=1e-14)
    opt.eval()  # twice: still the average, the training weights kept once
    opt.train()
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), current))
    opt.eval()
    opt.zero_grad()  # the next step or zero_grad puts the training weights back
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), current))


def test_a_checkpoint_taken_in_eval_resumes_from_the_training_weights(tmp_path):
    model = small_mlp(torch.float64)
    x, y = regression_batch(torch.float64)
    closure = lambda: F.mse_loss(model(x), y)  # noqa: E731
    opt = LossGrad(model.parameters(), lr=1e-2, average=8.0)
    run(opt, [closure] * 10)
    opt.eval()  # as a training loop that evaluates, then checkpoints
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    rest = run(opt, [closure] * 10)
    twin = copy.deepcopy(model)
    saved = torch.load(tmp_path / "ckpt.pt")
    twin.load_state_dict(saved["model"])
    opt2 = LossGrad(twin.parameters(), lr=1.0, average=8.0)
    opt2.load_state_dict(saved["opt"])
    assert run(opt2, [lambda: F.mse_loss(twin(x), y)] * 10) == rest
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_eval_without_average_does_nothing():
    model = small_mlp()
    x, y = regression_batch()
    opt = LossGrad(model.parameters(), lr=1e-2)
    run(opt, [lambda: F.mse_loss(model(x), y)] * 3)
    before = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ------------------------------------------------------------------ bad options
@pytest.mark.parametrize("kwargs, match", [
    (dict(probe="other"), "probe must be one of"),
    (dict(probe="next", rollback="increase"), "rollback='increase' needs F"),
    (dict(smoothing=1.0), "smoothing must be a number in"),
    (dict(smoothing=True), "smoothing must be a number in"),
    (dict(shrink=1.0), "shrink must be None"),
    (dict(shrink=math.inf), "shrink must be None"),
    (dict(average=-1.0), "average must be None"),
    (dict(average="yes"), "average must be a number"),
])
def test_bad_new_options_are_refused_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossGrad(small_mlp().parameters(), lr=1e-3, **kwargs)


def test_groups_may_not_differ_in_the_new_options():
    model = small_mlp()
    with pytest.raises(ValueError, match="sets probe='next' but group 0 has 'same'"):
        LossGrad([{"params": model[0].parameters()}, {"params": model[2].parameters(), "probe": "next"}], lr=1e-3)


# ------------------------------------------------------------------ found in review
def _nan_then(model, x, y, steps):
    return [lambda: F.mse_loss(model(x), y) * math.nan] + [lambda: F.mse_loss(model(x), y)] * (steps - 1)


def test_both_paths_shrink_h_alike_when_the_first_gradients_are_not_finite():
    hs = {}
    for sync_free in (False, True):
        model = small_mlp(torch.float64)
        x, y = regression_batch(torch.float64)
        opt = LossGrad(model.parameters(), lr=1e-2, probe="next", sync_free=sync_free)
        closures = [lambda: F.mse_loss(model(x), y) * math.nan] * 2 + [lambda: F.mse_loss(model(x), y)] * 3
        hs[sync_free] = run(opt, closures)
    assert hs[False] == pytest.approx(hs[True], rel=1e-15) and hs[False][1] == pytest.approx(1e-2 / 1.05 ** 2)


@pytest.mark.parametrize("probe", ["same", "next"])
def test_the_average_counts_a_skipped_step_alike_on_both_paths(probe):
    averages = {}
    for sync_free in (False, True):
        model = small_mlp(torch.float64)
        x, y = regression_batch(torch.float64)
        opt = LossGrad(model.parameters(), lr=1e-2, probe=probe, average=2.0, sync_free=sync_free)
        run(opt, [lambda: F.mse_loss(model(x), y)] * 3 + _nan_then(model, x, y, 3))
        opt.eval()
        averages[sync_free] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(averages[False], averages[True]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_16_bit_buffers_of_the_new_options_stay_float32_through_a_state_dict():
    model = small_mlp().to(torch.bfloat16)
    x, y = regression_batch(torch.bfloat16)
    opt = LossGrad(model.parameters(), lr=1e-3, probe="next", direction="adam", average=8.0)
    run(opt, [lambda: F.mse_loss(model(x), y)] * 3)
    fresh = LossGrad(model.parameters(), lr=1e-3, probe="next", direction="adam", average=8.0)
    fresh.load_state_dict(opt.state_dict())
    for p in model.parameters():
        assert fresh.state[p]["previous_step"].dtype == torch.float32
        assert fresh.state[p]["average"].dtype == torch.float32
        assert torch.equal(fresh.state[p]["previous_step"], opt.state[p]["previous_step"])


def test_a_parameter_that_did_not_move_adds_nothing_to_the_verdict():
    a, b = nn.Parameter(torch.tensor([1.0], dtype=torch.float64)), nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LossGrad([a, b], lr=0.1, probe="next", c=2.0)
    for loss in (lambda: (a * a).sum() + (b * b).sum(), lambda: (a * a).sum()):  # b moves, then has no gradient
        opt.zero_grad()
        opt.step(loss)
    # step 1: x = (1, 1) -> (0.8, 0.8); step 2 judges it (r = 0.3: h = 0.2) and moves a only: 0.8 -> 0.48 along
    # d = (1.6, 0), s0 = 1.6^2. Step 3 sees b's gradient again: its d of step 2 was 0, not the 2 of step 1
    s0, s1 = 1.6 ** 2, (2 * 0.48) * 1.6
    opt.zero_grad()
    opt.step(lambda: (a * a).sum() + (b * b).sum())
    assert float(opt.last["ratio"]) == pytest.approx((s0 - s1) / (2 * s0), rel=1e-12)


def test_the_host_path_does_not_step_into_a_nonfinite_direction():
    p = nn.Parameter(torch.tensor([1.0]))
    opt = LossGrad([p], lr=1.0, direction="momentum", momentum=0.99, probe="next")
    opt.state[p]["momentum_buffer"] = torch.tensor([3e38])  # finite, and G + mu v overflows to inf
    opt.zero_grad()
    opt.step(lambda: (p * 1e38).sum())
    assert float(p.detach()) == 1.0 and bool(opt.last["skipped"])


def test_the_average_of_16_bit_parameters_is_kept_in_float32():
    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = LossGrad([p], lr=1e-3, average=0.0, min_lr=1e-3, max_lr=1e-3 * (1 + 1e-12))
    iterates = []
    for _ in range(500):
        opt.zero_grad()
        opt.step(lambda: -(p.float()).sum())
        iterates.append(float(p[0]))
    mean = sum(iterates) / len(iterates)  # gamma = 0: the plain mean of the bfloat16 iterates
    assert opt.state[p]["average"].dtype == torch.float32
    assert float(opt.state[p]["average"][0]) == pytest.approx(mean, abs=1e-5)  # a bfloat16 buffer: off by ~1e-2


def test_a_loss_computed_at_the_averaged_weights_is_refused():
    model = small_mlp()
    x, y = regression_batch()
    opt = LossGrad(model.parameters(), lr=1e-2, average=8.0)
    run(opt, [lambda: F.mse_loss(model(x), y)] * 3)
    opt.eval()
    model.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    with pytest.raises(RuntimeError, match="after opt.eval"):
        opt.step(lambda: F.mse_loss(model(x), y), loss=loss)


def test_the_average_includes_parameters_without_a_gradient_in_a_step():
    a = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = LossGrad([a, b], lr=0.1, average=0.0, min_lr=0.1, max_lr=0.1 * (1 + 1e-12))
    iterates = []
    for t in range(10):
        opt.zero_grad()
        opt.step((lambda: -(a + b).sum()) if t < 5 else (lambda: -a.sum()))  # b is frozen after 5 steps
        iterates.append(float(b))
    opt.eval()
    assert float(b) == pytest.approx(sum(iterates) / len(iterates), rel=1e-12)  # gamma = 0: the plain mean


def test_a_state_dict_taken_in_eval_keeps_its_training_weights_after_train():
    model = small_mlp()
    x, y = regression_batch()
    opt = LossGrad(model.parameters(), lr=1e-2, average=8.0)
    run(opt, [lambda: F.mse_loss(model(x), y)] * 3)
    opt.eval()
    saved = opt.state_dict()
    opt.train()
    assert all("training_weights" in state for state in saved["state"].values())


def test_the_tensor_verdict_reads_a_nonfinite_end_slope_as_nan_like_the_host():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    for s1 in (math.inf, -math.inf):
        _, r, _ = judge_by_slopes_tensor(t(1.0), t(1.0), t(s1), {}, c=1.05)
        assert math.isnan(float(r)) and math.isnan(judge_by_slopes_float(1.0, 1.0, s1, {}, c=1.05)[1])
