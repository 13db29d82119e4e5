"""companion.linesearch: exact minimisers along a direction (closed forms on quadratics), and LOSSGRAD traces that
leave the run they measure unchanged (notebook 10)."""

import math

import cloudpickle
import pytest
import torch
from torch import nn

import companion as C
from companion import linesearch as L
from companion.train import Classification, Experiment, fit
from lossgrad import LossGrad

EXACT = dict(rollback=None, resolution_guard=False)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LOSSGRAD_THREADS", "1")
    for name in ("LOSSGRAD_JOBS", "LOSSGRAD_EXECUTOR", "LOSSGRAD_SLURM", "LOSSGRAD_PROGRESS_FILE", "LOSSGRAD_PROGRESS"):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------ the 1-D minimiser
@pytest.mark.parametrize("t_star", [2.3e-3, 0.0371, 0.5, 1.0, 16.0, 740.0])
def test_minimise_log_finds_a_parabola_minimum_to_rtol(t_star):
    a = 3.7
    f = lambda t: a * (t - t_star) ** 2 - 1.25  # noqa: E731
    found = L.minimise_log(f, lo=1e-3, hi=1e3, per_decade=3, rtol=1e-3)
    assert abs(found["t"] / t_star - 1) <= 1e-3
    assert found["value"] == pytest.approx(-1.25, abs=a * (1e-3 * t_star) ** 2 + 1e-15)
    assert not found["at_edge"]
    assert found["value"] <= min(found["grid_f"])
    assert found["grid_t"][0] == pytest.approx(1e-3) and found["grid_t"][-1] == pytest.approx(1e3)
    assert len(found["grid_t"]) == 19  # 6 decades, 3 per decade, both ends


def test_minimise_log_in_log_t_on_a_quadratic_in_ln_t():
    # f(e^u) = (u - ln 5)^2: golden section in ln t converges to 5 (rtol in t)
    found = L.minimise_log(lambda t: (math.log(t) - math.log(5.0)) ** 2, lo=0.01, hi=100, per_decade=2, rtol=1e-4)
    assert found["t"] == pytest.approx(5.0, rel=1e-4)


def test_minimise_log_keeps_the_lowest_of_two_dips_and_flags_the_edge():
    two_dips = lambda t: min((math.log10(t) + 2) ** 2 + 0.5, (math.log10(t) - 1) ** 2)  # dips at 0.01 and 10  # noqa: E731
    assert L.minimise_log(two_dips, 1e-3, 1e3, 3, 1e-3)["t"] == pytest.approx(10.0, rel=1e-3)
    below = L.minimise_log(lambda t: t, 1e-3, 1e3, 3, 0.01)  # decreasing towards 0: the grid's first point
    assert below["at_edge"] and below["t"] == pytest.approx(1e-3, rel=0.02)
    above = L.minimise_log(lambda t: -t, 1e-3, 1e3, 3, 0.01)
    assert above["at_edge"] and above["t"] == pytest.approx(1e3, rel=0.02)


def test_minimise_log_treats_non_finite_values_as_infinite():
    f = lambda t: math.nan if t > 3 else (math.inf if t < 1e-2 else (t - 0.2) ** 2)  # noqa: E731
    found = L.minimise_log(f, 1e-3, 1e3, 3, 1e-3)
    assert found["t"] == pytest.approx(0.2, rel=1e-3)
    assert math.isnan(found["grid_f"][-1])
    nothing = L.minimise_log(lambda t: math.nan, 1e-3, 1e3, 3, 0.01)
    assert math.isnan(nothing["t"]) and math.isnan(nothing["value"])


def test_log_grid_and_argument_checks():
    assert L.log_grid(1, 100, 1) == pytest.approx([1, 10, 100])
    assert len(L.log_grid(1e-3, 1e3, 3)) == 19
    for bad in (dict(lo=0, hi=1, per_decade=3), dict(lo=2, hi=1, per_decade=3), dict(lo=1, hi=2, per_decade=0)):
        with pytest.raises(ValueError):
            L.log_grid(**bad)
    with pytest.raises(ValueError):
        L.minimise_log(lambda t: t, rtol=0)


# ------------------------------------------------------------------ along a direction, on least squares
class LeastSquares:
    """mean((x·w − y)²): quadratic in the weights, so every minimiser along a direction has a closed form."""

    metrics = ("loss",)

    def loss(self, model, batch):
        x, y = batch
        return ((model(x).squeeze(-1) - y) ** 2).mean()

    def evaluate(self, model, batch):
        x, y = batch
        return {"loss": ((model(x).squeeze(-1) - y) ** 2).sum()}


def least_squares(n=300, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 1.5, d, dtype=torch.float64)  # an ill-conditioned design
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1, bias=False, dtype=torch.float64)
    return model, (x, y)


def gradient(x, y, w):
    return 2 * x.T @ (x @ w - y) / len(y)


def closed_form(x, y, w, direction):
    """argmin_t mean((x(w − t d) − y)²) = <∇, d> / (2 |x d|² / n), ∇ = 2 xᵀ(xw − y) / n."""
    return float(gradient(x, y, w) @ direction) / float(2 * (x @ direction).pow(2).sum() / len(y))


def test_measure_finds_the_three_closed_form_minimisers():
    model, (x, y) = least_squares()
    batch, full = (x[:10], y[:10]), (x[10:], y[10:])
    w = model.weight.detach().reshape(-1).clone()
    g_batch, g_full = gradient(*batch, w), gradient(*full, w)
    t_batch = closed_form(*batch, w, g_batch)
    t_full_gB = closed_form(*full, w, g_batch)
    t_full_gF = closed_form(*full, w, g_full)
    assert t_full_gB > 1.4 * t_batch and t_full_gF > 1.4 * t_full_gB  # three different answers
    before = model.weight.detach().clone()
    row = L.measure(model, LeastSquares(), batch, full, dict(lo=1e-6, hi=1e2, per_decade=3, rtol=1e-4),
                    eval_batch_size=64)
    assert torch.equal(model.weight, before) and model.weight.grad is None  # put back bitwise, no .grad touched
    for name, expected in (("batch", t_batch), ("full_gB", t_full_gB), ("full_gF", t_full_gF)):
        assert row[f"t_{name}"] == pytest.approx(expected, rel=1e-4), name
        assert not row[f"edge_{name}"]
        assert len(row[f"profile_{name}"]) == len(row["grid_t"])
    assert row["sq_grad_batch"] == pytest.approx(float(g_batch @ g_batch), rel=1e-12)
    assert row["sq_grad_full"] == pytest.approx(float(g_full @ g_full), rel=1e-12)
    cos = float(g_batch @ g_full) / float(g_batch.norm() * g_full.norm())
    assert row["cos_batch_full"] == pytest.approx(cos, rel=1e-12)
    assert row["full_loss"] == pytest.approx(float(((full[0] @ w - full[1]) ** 2).mean()), rel=1e-12)
    assert row["batch_loss"] == pytest.approx(float(((batch[0] @ w - batch[1]) ** 2).mean()), rel=1e-12)


def test_along_restores_the_parameters_bitwise_even_after_an_error():
    torch.manual_seed(0)
    model = C.models.mnist_mlp()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    direction = [torch.randn_like(p) for p in params]
    with L.along(params, direction) as go:
        go(0.37)
        assert not torch.equal(params[0], before[0])
        go(0.0)
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        go(1e3)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(RuntimeError, match="inside"):
        with L.along(params, direction) as go:
            go(5.0)
            raise RuntimeError("inside")
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(ValueError):
        with L.along(params, direction[:-1]):
            pass


def test_mean_loss_and_gradient_over_chunks_equal_the_whole_data_at_once():
    model, (x, y) = least_squares(n=250)
    task = LeastSquares()
    whole = task.loss(model, (x, y))
    value = float(whole.detach())
    expected = torch.autograd.grad(whole, list(model.parameters()))
    assert model.weight.grad is None
    assert L.mean_loss(model, task, (x, y), batch_size=64) == pytest.approx(value, rel=1e-13)
    got = L.mean_gradient(model, task, (x, y), batch_size=64)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(got, expected))
    assert model.weight.grad is None


# ------------------------------------------------------------------ traces: the run they measure, unchanged
@pytest.fixture(scope="module")
def data():
    return C.data.synthetic_mnist(n_train=96, n_test=48, seed=0)


SEARCH = dict(lo=1e-3, hi=1e2, per_decade=2, rtol=0.05)


def test_trace_steps():
    assert L.trace_steps(6000, 50, 20)[0] == 50 and L.trace_steps(6000, 50, 20)[-1] == 5999
    assert len(L.trace_steps(6000, 50, 20)) == 20
    assert L.trace_steps(12, 1, 3) == [1, 3, 11]
    assert L.trace_steps(4, 50, 5) == [3]  # a first step past the end is the last step
    assert L.trace_steps(1, 1, 3) == [0]
    with pytest.raises(ValueError):
        L.trace_steps(0, 1, 3)


def test_a_trace_takes_fits_steps_bitwise_and_measures_before_the_chosen_steps(data):
    dev, epochs, batch_size, seed = torch.device("cpu"), 2, 32, 3
    train, test = data["train"], data["test"]

    def fresh():
        torch.manual_seed(seed)
        model = C.models.mnist_mlp()
        return model, LossGrad(model.parameters(), lr=0.05, **EXACT)

    model, opt = fresh()
    plain = fit(model, opt, Classification(), train, test, epochs=epochs, batch_size=batch_size, device=dev,
                seed=seed, eval_train=False, progress=False)
    traced_model, traced_opt = fresh()
    at = [0, 2, 5]
    full = (train[0][:64], train[1][:64])
    trace = L.trace_fit(traced_model, traced_opt, Classification(), train, test, full, epochs=epochs,
                        batch_size=batch_size, device=dev, seed=seed, at=at, search=SEARCH)
    for key in ("loss", "lr", "ratio"):
        assert torch.equal(trace["steps"][key], plain["steps"][key]), key
    assert all(torch.equal(a, b) for a, b in zip(traced_model.parameters(), model.parameters()))
    timeless = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h["epochs"]]  # noqa: E731
    assert timeless(trace) == timeless(plain)
    assert [row["step"] for row in trace["trace"]] == at
    for row in trace["trace"]:
        assert row["h"] == float(plain["steps"]["lr"][row["step"]])
        assert row["ratio"] == float(plain["steps"]["ratio"][row["step"]])
        assert row["parabola"] == pytest.approx(row["h"] / (2 * row["ratio"]))
        for name in L.PROFILES:
            assert row[f"t_{name}"] > 0
    assert trace["measure_seconds"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the data start on the CPU)")
def test_a_trace_on_the_gpu_measures_with_full_data_given_on_the_cpu(data):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = C.models.mnist_mlp().to(dev)
    opt = LossGrad(model.parameters(), lr=0.05, **EXACT)
    full = (data["train"][0][:64], data["train"][1][:64])  # on the CPU, as the notebook builds it
    trace = L.trace_fit(model, opt, Classification(), data["train"], data["test"], full, epochs=1, batch_size=32,
                        device=dev, seed=0, at=[1], search=SEARCH)
    assert [row["step"] for row in trace["trace"]] == [1] and trace["trace"][0]["t_full_gF"] > 0


def tiny_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))


def trace_experiment(data, at=(1, 4), jobs=1, search=SEARCH, full_data=None):
    full = C.data.take(data["train"], 64) if full_data is None else full_data
    return L.TraceExperiment("linesearch_test", "smoke", data["train"], data["test"], Classification(), tiny_mlp,
                             epochs=2, batch_size=32, device=torch.device("cpu"), progress=False, jobs=jobs,
                             full_data=full, at=at, search=search)


def test_trace_experiment_stores_its_runs_under_an_identity_with_the_measurement(data):
    exp = trace_experiment(data)
    first = exp.run_all([("trace", "lossgrad", dict(lr=0.05, **EXACT))], seeds=[0])
    assert [row["step"] for row in first[0]["trace"]] == [1, 4]
    assert first[0]["label"] == "trace" and first[0]["seed"] == 0
    again = exp.run_all([("trace", "lossgrad", dict(lr=0.05, **EXACT))], seeds=[0])
    assert again[0]["config_digest"] == first[0]["config_digest"]
    assert again[0]["trace"][0]["t_batch"] == first[0]["trace"][0]["t_batch"]
    identity = exp.identity("lossgrad", 0, lr=0.05)
    assert identity["settings"]["trace"]["at"] == [1, 4] and identity["settings"]["trace"]["n_full"] == 64
    for other in (trace_experiment(data, at=(1, 5)), trace_experiment(data, search=dict(SEARCH, rtol=0.01)),
                  trace_experiment(data, full_data=C.data.take(data["train"], 32))):
        assert other.identity("lossgrad", 0, lr=0.05) != identity
    # a plain run of the same label and options has another identity: the store never mixes the two
    plain = Experiment("linesearch_test", "smoke", data["train"], data["test"], Classification(), tiny_mlp,
                       epochs=2, batch_size=32, device=torch.device("cpu"), eval_train=False)
    assert plain.identity("lossgrad", 0, lr=0.05) != identity
    with pytest.raises(ValueError, match="lossgrad"):
        exp.run_all([("sgd", "sgd", dict(lr=0.1))], seeds=[0])
    with pytest.raises(ValueError, match="full_data"):
        L.TraceExperiment("x", "smoke", data["train"], data["test"], Classification(), tiny_mlp, epochs=1,
                          batch_size=32, device=torch.device("cpu"))


def test_trace_experiment_runs_in_worker_processes_as_in_this_one(data, tmp_path, monkeypatch):
    methods = [("trace", "lossgrad", dict(lr=0.05, **EXACT))]
    here = trace_experiment(data, jobs=1).run_all(methods, seeds=[0, 1])
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "parallel"))
    exp = trace_experiment(data, jobs=2)
    cloudpickle.loads(cloudpickle.dumps(exp))  # what the runner hands its workers
    workers = exp.run_all(methods, seeds=[0, 1])
    for a, b in zip(here, workers):
        assert torch.equal(a["steps"]["lr"], b["steps"]["lr"])
        assert [r["t_full_gF"] for r in a["trace"]] == [r["t_full_gF"] for r in b["trace"]]


def test_final_train_metrics_evaluate_once_on_the_whole_training_set(data):
    torch.manual_seed(0)
    model = tiny_mlp()
    on_finish = L.FinalTrainMetrics(Classification(), data["train"], torch.device("cpu"))
    on_finish = cloudpickle.loads(cloudpickle.dumps(on_finish))
    got = on_finish(model)["train"]
    assert got == C.train.evaluate(model, Classification(), data["train"], torch.device("cpu"))
