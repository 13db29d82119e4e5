"""Today's learning-rate-free peers of notebook 09 (companion.baselines.PEER_NAMES), each from its pinned package.

Every peer is imported and trained once through ``make_optimizer`` (an upgrade that breaks a package or its
interface fails here), the step size each logs is the one its step used, schedule-free is evaluated at its x
(``optimizer.eval()`` weights) and DoG at its iterate average, exactly as a hand-written loop that follows the
packages' READMEs, and a run resumed from its checkpoint continues bit for bit.
"""

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import companion as C
from companion import baselines as B
from companion.train import Classification, batches, evaluate, fit

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def runs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "runs"))


@pytest.fixture(scope="module")
def mnist_like():
    return C.data.synthetic_mnist(n_train=200, n_test=100, seed=0)


def tiny_regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True)
    return model, lambda: nn.functional.mse_loss(model(x), y)


def tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


# Options of a smoke step: each package's defaults (lr = 1.0 where the package says so), except schedule-free
# SGD, whose default lr = 1.0 is its tuning knob (its README: "10x-50x larger than classical rates").
SMOKE_OPTIONS = {"sgd_schedulefree": dict(lr=0.05)}


@pytest.mark.parametrize("name", B.PEER_NAMES)
def test_each_peer_trains_a_tiny_model_through_make_optimizer(name):
    model, loss_fn = tiny_regression()
    opt, per_epoch = B.make_optimizer(name, model.parameters(), epochs=3, **SMOKE_OPTIONS.get(name, {}))
    assert isinstance(opt, B.PeerOptimizer) and isinstance(opt, torch.optim.Optimizer)
    assert type(opt.inner).__name__ == B.PEERS[name][2]
    assert (per_epoch is not None) == (name in ("dog", "ldog", "sgd_schedulefree", "adamw_schedulefree"))
    first = loss_fn().item()
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(loss=loss.detach())
        used = float(opt.param_groups[0]["lr"])
        assert math.isfinite(used) and used > 0, f"{name} logged step size {used}"
    if per_epoch is not None:
        per_epoch.step()  # the evaluation weights
    assert loss_fn().item() < 0.25 * first, f"{name} did not lower the loss: {first} -> {loss_fn().item()}"


def test_the_peer_packages_are_the_pinned_versions():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE))
    versions = B.peer_versions()
    assert set(versions) == {"dadaptation", "prodigyopt", "dog-optimizer", "schedulefree"}
    for package, version in versions.items():
        assert pins.get(package) == version, f"{package}: installed {version}, pinned {pins.get(package)}"


def test_the_existing_names_and_their_optimizers_are_unchanged():
    """Notebooks 00-08's runs: the same names, classes and options as before the peers came."""
    assert B.OPTIMIZER_NAMES == ("sgd", "sgd_steplr", "sgd_trapezoid", "sgd_multistep", "wngrad", "l4",
                                 "adam_steps", "lossgrad")
    assert not set(B.PEER_NAMES) & set(B.OPTIMIZER_NAMES)
    p = [nn.Parameter(torch.ones(2))]
    assert type(B.make_optimizer("sgd", p, lr=0.1)[0]) is torch.optim.SGD
    assert type(B.make_optimizer("wngrad", p, lr=0.1)[0]) is B.WNGrad
    assert type(B.make_optimizer("adam_steps", p, lr=1e-3)[0]) is torch.optim.Adam


def test_peer_options_are_the_packages_and_a_typo_is_refused():
    p = [nn.Parameter(torch.ones(2))]
    opt, _ = B.make_optimizer("prodigy", p, lr=1.0, d_coef=0.5, epochs=30)
    assert opt.inner.param_groups[0]["d_coef"] == 0.5
    opt, _ = B.make_optimizer("dog", p, reps_rel=1e-4, averaging_gamma=4.0)
    assert opt.inner.param_groups[0]["reps_rel"] == 1e-4 and opt.averager.gamma == 4.0
    with pytest.raises(TypeError, match="d_cof"):
        B.make_optimizer("prodigy", p, d_cof=0.5)
    with pytest.raises(TypeError, match="only dog and ldog"):
        B.make_optimizer("prodigy", p, averaging=False)
    with pytest.raises(ValueError, match="dadapt_sgd"):
        B.make_optimizer("dadapt", p)  # the message lists the valid names, peers included


# ------------------------------------------------------------------ the logged step size is the one used
@pytest.mark.parametrize("name", ["dadapt_sgd", "dog", "ldog"])
def test_the_logged_step_size_of_an_sgd_like_peer_is_the_step_it_took(name):
    """DAdaptSGD (momentum 0) moves by dlr·g, DoG by eta·g, LDoG by eta_i·g per tensor: each step checked (in
    float64, where a step of 1e-6 relative to the weights is resolved)."""
    model, loss_fn = tiny_regression()
    model.double()
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss_fn = lambda: nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))  # noqa: E731
    opt, _ = B.make_optimizer(name, model.parameters())
    for _ in range(20):
        opt.zero_grad()
        loss_fn().backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
        used = float(opt.param_groups[0]["lr"])
        steps = [float(((b - p.detach()).flatten() @ g.flatten()) / (g.flatten() @ g.flatten()))
                 for b, p, g in zip(before, model.parameters(), grads)]
        if name == "ldog":  # one eta per tensor; the logged value is their median
            assert used == pytest.approx(float(torch.tensor(steps).median()), rel=1e-4)
        else:
            assert all(s == pytest.approx(used, rel=1e-4) for s in steps)


@pytest.mark.parametrize("name", ["dadapt_adam", "prodigy"])
def test_the_logged_step_size_of_an_adam_like_peer_is_its_dlr(name):
    """d·lr with the d before the step (the value the package's own log calls dlr), bias correction on or off."""
    for bias_correction in (False, True):
        model, loss_fn = tiny_regression()
        opt, _ = B.make_optimizer(name, model.parameters(), use_bias_correction=bias_correction)
        for k in range(10):
            d = opt.inner.param_groups[0]["d"]
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
            correction = ((1 - 0.999 ** (k + 1)) ** 0.5 / (1 - 0.9 ** (k + 1))) if bias_correction else 1.0
            assert opt.param_groups[0]["lr"] == pytest.approx(d * 1.0 * correction, rel=1e-12)


def test_schedule_free_logs_its_warmed_up_lr():
    model, loss_fn = tiny_regression()
    opt, _ = B.make_optimizer("adamw_schedulefree", model.parameters(), lr=0.01, warmup_steps=4)
    logged = []
    for _ in range(6):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        logged.append(opt.param_groups[0]["lr"])
    assert logged == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


# ------------------------------------------------------------------ what is evaluated
def reference_loop(data, epochs, make, after_step=None, before_epoch=None, before_eval=None, batch_size=50, seed=0):
    """The loop a reader of the packages' READMEs writes: fit's data order, evaluation after every epoch."""
    model = tiny_classifier()
    opt = make(model)
    generator = torch.Generator().manual_seed(seed)
    task, rows = Classification(), []
    for _ in range(epochs):
        if before_epoch:
            before_epoch()
        for batch in batches(data["train"], batch_size, generator):
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
            if after_step:
                after_step()
        if before_eval:
            before_eval()
        rows.append(evaluate(model, task, data["test"], CPU))
    return model, opt, rows


def run_fit(data, name, epochs, checkpoint=None, **options):
    model = tiny_classifier()
    opt, per_epoch = B.make_optimizer(name, model.parameters(), epochs=epochs, **options)
    history = fit(model, opt, Classification(), data["train"], data["test"], epochs=epochs, batch_size=50,
                  device=CPU, scheduler=per_epoch, progress=False, eval_train=False, checkpoint=checkpoint)
    return model, opt, history


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name, cls", [("sgd_schedulefree", "SGDScheduleFree"),
                                       ("adamw_schedulefree", "AdamWScheduleFree")])
def test_schedule_free_is_evaluated_at_its_eval_mode_weights(mnist_like, name, cls):
    """fit + make_optimizer evaluate exactly what the README's loop does: optimizer.train() before training,
    optimizer.eval() before evaluation; and that is x, not the y the gradients are taken at."""
    import schedulefree

    options = dict(lr=0.05, warmup_steps=3) if name == "sgd_schedulefree" else dict(lr=0.01, warmup_steps=3)
    holder = {}

    def make(model):
        holder["opt"] = getattr(schedulefree, cls)(model.parameters(), **options)
        return holder["opt"]

    ref_model, ref_opt, ref_rows = reference_loop(mnist_like, 2, make, before_epoch=lambda: holder["opt"].train(),
                                                  before_eval=lambda: holder["opt"].eval())
    model, opt, history = run_fit(mnist_like, name, 2, **options)
    assert same(model.parameters(), ref_model.parameters())  # fit's model ends at x, bitwise
    assert [r["test_loss"] for r in history["epochs"][1:]] == [r["loss"] for r in ref_rows]
    assert [r["test_acc"] for r in history["epochs"][1:]] == [r["acc"] for r in ref_rows]
    ref_opt.train()  # y, where the gradients were taken: another point, another loss
    assert not same(model.parameters(), ref_model.parameters())
    assert evaluate(ref_model, Classification(), mnist_like["test"], CPU)["loss"] != history["epochs"][-1]["test_loss"]


def test_dog_is_evaluated_at_its_average_and_the_last_iterate_is_one_call_away(mnist_like):
    from dog import DoG, PolynomialDecayAverager

    holder = {}

    def make(model):
        holder["model"] = model
        holder["averager"] = PolynomialDecayAverager(model)
        return DoG(model.parameters())

    def average_rows():
        holder["rows"] = holder.get("rows", []) + [
            evaluate(holder["averager"].averaged_model, Classification(), mnist_like["test"], CPU)]

    ref_model, _, last_rows = reference_loop(mnist_like, 2, make, after_step=lambda: holder["averager"].step(),
                                             before_eval=average_rows)
    model, opt, history = run_fit(mnist_like, "dog", 2)
    averaged = list(holder["averager"].averaged_model.parameters())
    assert same(model.parameters(), averaged)  # the model ends at the average, bitwise
    assert [r["test_loss"] for r in history["epochs"][1:]] == [r["loss"] for r in holder["rows"]]
    with B.last_iterate(model) as found:
        assert found
        assert same(model.parameters(), ref_model.parameters())
        assert evaluate(model, Classification(), mnist_like["test"], CPU)["loss"] == last_rows[-1]["loss"]
    assert same(model.parameters(), averaged)  # back to the average after the block
    with B.last_iterate(tiny_classifier()) as found:  # a model no averaging peer trains
        assert not found


def test_dog_without_averaging_evaluates_the_last_iterate(mnist_like):
    model, opt, history = run_fit(mnist_like, "dog", 1, averaging=False)
    assert opt.averager is None
    with B.last_iterate(model) as found:
        assert not found


@pytest.mark.parametrize("name", ["sgd_schedulefree", "dog", "ldog", "prodigy", "dadapt_sgd"])
def test_a_resumed_peer_run_continues_bit_for_bit(mnist_like, name, tmp_path):
    options = SMOKE_OPTIONS.get(name, {})
    straight_model, _, straight = run_fit(mnist_like, name, 3, **options)
    checkpoint = tmp_path / "run.ckpt"
    run_fit(mnist_like, name, 1, checkpoint=checkpoint, **options)  # "killed" after its first epoch
    resumed_model, _, resumed = run_fit(mnist_like, name, 3, checkpoint=checkpoint, **options)
    assert same(resumed_model.parameters(), straight_model.parameters())
    assert torch.equal(resumed["steps"]["loss"], straight["steps"]["loss"])
    assert torch.equal(resumed["steps"]["lr"], straight["steps"]["lr"])
    assert resumed["epochs"] == straight["epochs"][:1] + resumed["epochs"][1:]
    assert [e["test_loss"] for e in resumed["epochs"]] == [e["test_loss"] for e in straight["epochs"]]


def test_the_step_size_of_every_peer_is_logged_by_fit(mnist_like):
    for name in B.PEER_NAMES:
        _, opt, history = run_fit(mnist_like, name, 1, **SMOKE_OPTIONS.get(name, {}))
        lr = history["steps"]["lr"]
        assert len(lr) == 4 and torch.isfinite(lr).all() and (lr > 0).all(), name
        assert float(lr[-1]) == pytest.approx(float(opt.param_groups[0]["lr"]))


@pytest.mark.parametrize("name", B.PEER_NAMES)
def test_a_peer_whose_loss_turns_non_finite_ends_as_a_diverged_run(mnist_like, name):
    """A NaN in a batch (as after a blow-up) must end the run as diverged, as for torch's optimizers, not raise
    inside the package (DoG asserts on its gradient sum and took the notebook's whole round down)."""
    images, labels = mnist_like["train"]
    images = images.clone()
    images[1::2] = math.nan  # every batch of 50 holds some
    data = dict(mnist_like, train=(images, labels))
    _, opt, history = run_fit(data, name, 2, **SMOKE_OPTIONS.get(name, {}))
    assert history["diverged"], name
    assert len(history["epochs"]) == 2, name  # stopped after the epoch whose losses were not finite


@pytest.mark.parametrize("name", ["dog", "ldog"])
def test_dog_skips_a_step_whose_gradient_is_not_finite(name):
    model, loss_fn = tiny_regression()
    opt, _ = B.make_optimizer(name, model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    next(model.parameters()).grad[0, 0] = math.inf  # a finite loss whose backward overflowed
    opt.step(loss=loss.detach())
    assert math.isnan(opt.param_groups[0]["lr"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_state_dict_round_trips_through_a_copy():
    model, loss_fn = tiny_regression()
    opt, per_epoch = B.make_optimizer("dog", model.parameters())
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    per_epoch.step()
    state = copy.deepcopy(opt.state_dict())
    assert state["last_iterate"] is not None and state["averager"]["t"] == 4
