"""The shared training loop, run store, profiles and report helpers (companion.train/profiles/report)."""

import math

import pytest
import torch
from torch import nn

import companion as C
from companion.store import RunStore
from companion.train import Classification, Experiment, Reconstruction, fit


@pytest.fixture(autouse=True)
def runs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "runs"))


def tiny_classifier():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def mnist_like():
    return C.data.synthetic_mnist(n_train=300, n_test=100, seed=0)


@pytest.mark.parametrize("optimizer, options", [
    ("sgd", dict(lr=0.1)), ("lossgrad", dict(lr=0.05)), ("wngrad", dict(lr=1.0)), ("l4", dict()),
    ("sgd_steplr", dict(lr=0.1, step_size=1, gamma=0.5)),
])
def test_every_optimizer_lowers_the_loss_and_logs_its_step_size(mnist_like, optimizer, options):
    torch.manual_seed(0)
    model = tiny_classifier()
    opt, scheduler = C.baselines.make_optimizer(optimizer, model.parameters(), epochs=3, **options)
    history = fit(model, opt, Classification(), mnist_like["train"], mnist_like["test"], epochs=3, batch_size=50,
                  device=torch.device("cpu"), scheduler=scheduler, progress=False)
    first, last = history["epochs"][0], history["epochs"][-1]
    assert [e["epoch"] for e in history["epochs"]] == [0, 1, 2, 3]
    assert last["train_loss"] < first["train_loss"]
    assert last["test_acc"] > 0.3  # ten classes: chance is 0.1
    assert len(history["steps"]["loss"]) == len(history["steps"]["lr"]) == 3 * 6
    if optimizer == "sgd_steplr":  # the schedule halves lr after every epoch
        assert history["steps"]["lr"][::6].tolist() == [0.1, 0.05, 0.025]
    if optimizer == "lossgrad":
        assert len(history["steps"]["ratio"]) == 18
        assert history["steps"]["lr"][-1] != history["steps"]["lr"][0]


def test_diverging_run_is_stopped_and_marked(mnist_like):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 784), nn.Unflatten(1, (1, 28, 28)))  # a linear autoencoder
    opt = torch.optim.SGD(model.parameters(), lr=1e3)  # far above 2/L on this quadratic objective
    history = fit(model, opt, Reconstruction(), mnist_like["train"], mnist_like["test"], epochs=5, batch_size=50,
                  device=torch.device("cpu"), progress=False)
    assert history["diverged"]
    assert len(history["epochs"]) < 6


def test_a_killed_run_resumes_from_its_checkpoint_bit_for_bit(mnist_like, tmp_path):
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
        return model, C.baselines.make_optimizer("lossgrad", model.parameters(), lr=1e-3)[0]

    kwargs = dict(epochs=4, batch_size=50, device=torch.device("cpu"), progress=False, seed=3)
    model, opt = make()
    straight = fit(model, opt, Classification(), mnist_like["train"], mnist_like["test"], **kwargs)

    ckpt = tmp_path / "run.ckpt"
    model, opt = make()
    fit(model, opt, Classification(), mnist_like["train"], mnist_like["test"], checkpoint=ckpt,
        **dict(kwargs, epochs=2))  # "killed" after epoch 2: its checkpoint is on disk
    torch.manual_seed(12345)  # a fresh process would have another random state
    model, opt = make()
    resumed = fit(model, opt, Classification(), mnist_like["train"], mnist_like["test"], checkpoint=ckpt, **kwargs)
    assert torch.equal(resumed["steps"]["loss"], straight["steps"]["loss"])
    assert torch.equal(resumed["steps"]["lr"], straight["steps"]["lr"])
    assert resumed["epochs"][-1]["test_loss"] == straight["epochs"][-1]["test_loss"]


def test_run_store_skips_finished_runs_and_reruns_changed_ones(tmp_path):
    store = RunStore("99_test", "smoke", root=tmp_path)
    calls = []

    def compute(checkpoint):
        calls.append(checkpoint)
        return {"value": len(calls)}

    assert store.get("a", {"lr": 1}, compute)["value"] == 1
    assert store.get("a", {"lr": 1}, compute)["value"] == 1  # loaded, not computed
    assert store.get("a", {"lr": 2}, compute)["value"] == 2  # settings changed: computed again
    assert len(calls) == 2
    assert (tmp_path / "smoke" / "99_test" / "a.pt").exists()
    assert not list((tmp_path / "smoke" / "99_test").glob("*.ckpt"))
    with pytest.raises(ValueError, match="file name"):
        store.path("../escape")


def test_experiment_runs_are_stored_and_reloaded(mnist_like):
    exp = Experiment("99_test", "smoke", mnist_like["train"], mnist_like["test"], Classification(), tiny_classifier,
                     epochs=1, batch_size=100, device=torch.device("cpu"), progress=False)
    first = exp.run("SGD lr=0.1", "sgd", seed=0, lr=0.1)
    again = exp.run("SGD lr=0.1", "sgd", seed=0, lr=0.1)
    assert again["seconds"] == first["seconds"]  # the stored result, not a new run
    other_seed = exp.run("SGD lr=0.1", "sgd", seed=1, lr=0.1)
    assert not torch.equal(other_seed["steps"]["loss"], first["steps"]["loss"])


def test_reconstruction_task_reports_mean_squared_error_per_pixel():
    x = torch.rand(20, 1, 28, 28)
    model = nn.Identity()
    assert C.train.evaluate(model, Reconstruction(), (x,), torch.device("cpu"))["loss"] == 0.0
    class Half(nn.Module):
        def forward(self, t):
            return t * 0.5

    half = Half()
    expected = ((x * 0.5 - x) ** 2).mean().item()
    assert C.train.evaluate(half, Reconstruction(), (x,), torch.device("cpu"))["loss"] == pytest.approx(expected)


def test_batches_cover_every_example_once_and_shuffle_with_a_generator():
    x = torch.arange(10)
    ordered = torch.cat([b[0] for b in C.train.batches((x,), 3)])
    shuffled = torch.cat([b[0] for b in C.train.batches((x,), 3, torch.Generator().manual_seed(0))])
    assert ordered.tolist() == list(range(10))
    assert sorted(shuffled.tolist()) == list(range(10)) and shuffled.tolist() != list(range(10))


# ------------------------------------------------------------------ profiles
def test_profiles_resolve_paper_then_profile_then_overrides():
    kw = dict(paper=dict(epochs=30, seeds=3, lr=0.1), quick=dict(epochs=3), smoke=dict(epochs=1, seeds=1))
    assert C.profiles.resolve("paper", {}, **kw).epochs == 30
    quick = C.profiles.resolve("quick", {}, **kw)
    assert (quick.epochs, quick.seeds, quick.changed) == (3, 3, ["epochs"])
    custom = C.profiles.resolve("smoke", {"epochs": 7}, **kw)
    assert (custom.epochs, custom.seeds) == (7, 1)
    with pytest.raises(ValueError, match="unknown setting"):
        C.profiles.resolve("paper", {"epoch": 5}, **kw)
    with pytest.raises(ValueError, match="profile must be one of"):
        C.profiles.resolve("fast", {}, **kw)


def test_smoke_and_custom_outputs_never_land_in_figures(tmp_path):
    figures = C.profiles.REPO / "figures"
    assert C.profiles.figures_dir("paper") == figures
    assert C.profiles.figures_dir("quick") == figures / "quick"
    for profile, overrides in (("smoke", None), ("paper", {"epochs": 1}), ("quick", {"seeds": 1})):
        path = C.profiles.figures_dir(profile, overrides)
        assert figures not in path.parents and path != figures
        assert str(path).startswith(str(tmp_path))


# -------------------------------------------------------------------- report
def test_mean_std_and_summary_table_put_the_paper_beside_ours():
    assert C.report.mean_std([1.0, 2.0, 3.0]) == "2 ± 1"
    assert C.report.mean_std([0.5]) == "0.5"
    assert C.report.mean_std([1.0, math.nan]) == "diverged"
    runs = [{"label": "A", "seed": s, "diverged": False, "epochs": [{"test_loss": v}]} for s, v in enumerate([1.0, 3.0])]
    runs.append({"label": "B", "seed": 0, "diverged": True, "epochs": [{"test_loss": 0.1}]})
    table = C.report.summary_table(runs, ["test_loss"], paper={"A": {"test_loss": 1.5}})
    assert table.to_dict("records") == [
        {"method": "A", "seeds": 2, "test_loss (ours)": "2 ± 1.4", "test_loss (paper)": "1.5"},
        {"method": "B", "seeds": 1, "test_loss (ours)": "diverged", "test_loss (paper)": "–"},
    ]


def test_write_table_writes_markdown_with_conditions_and_csv(tmp_path):
    import pandas as pd

    path = C.report.write_table(pd.DataFrame([{"a": 1}]), tmp_path, "t", "conditions line")
    assert "conditions line" in path.read_text() and "| a |" in path.read_text().replace("|   a |", "| a |")
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a", "1"]


def test_conditions_label_synthetic_data():
    line = C.report.conditions("smoke", [{"device": "CPU", "seed": 0, "seconds": 60.0}])
    assert "SYNTHETIC" in line and "not a result" in line and "1.0 min" in line
    assert "SYNTHETIC" not in C.report.conditions("paper", [])


def test_spikes_finds_each_spike_once():
    loss = torch.ones(300)
    loss[100:103] = 10.0  # one spike lasting three steps
    loss[200] = 5.0
    loss[250] = 2.0  # below 3x the median: not a spike
    assert C.report.spikes(loss, window=50, factor=3.0).tolist() == [100, 200]


def test_a_run_whose_l4_step_size_breaks_down_is_marked_diverged_not_crashed(mnist_like):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 784), nn.Unflatten(1, (1, 28, 28)))
    opt, _ = C.baselines.make_optimizer("l4", model.parameters(), alpha=1e6)
    history = fit(model, opt, Reconstruction(), mnist_like["train"], mnist_like["test"], epochs=3, batch_size=50,
                  device=torch.device("cpu"), progress=False)
    assert history["diverged"]


@pytest.mark.parametrize("optimizer", ["wngrad", "l4"])
def test_logged_step_size_is_the_one_each_step_used(mnist_like, optimizer):
    torch.manual_seed(0)
    model = tiny_classifier()
    opt, _ = C.baselines.make_optimizer(optimizer, model.parameters(), **({"lr": 1.0} if optimizer == "wngrad" else {}))
    used = []
    original = opt.step

    def recording_step(closure=None, loss=None):
        out = original(closure, loss=loss)
        used.append(opt.param_groups[0]["lr"])  # these two report the step size after the step
        return out

    opt.step = recording_step
    history = fit(model, opt, Classification(), mnist_like["train"], mnist_like["test"], epochs=1, batch_size=100,
                  device=torch.device("cpu"), progress=False, eval_train=False)
    assert history["steps"]["lr"].tolist() == used


def test_experiment_refuses_a_model_constructor_without_a_stable_name(mnist_like):
    exp = Experiment("99_test", "smoke", mnist_like["train"], mnist_like["test"], Classification(),
                     lambda: tiny_classifier(), epochs=1, batch_size=100, device=torch.device("cpu"), progress=False)
    with pytest.raises(ValueError, match="stable name"):
        exp.run("SGD", "sgd", seed=0, lr=0.1)


# -------------------------------------------------- per-step batch accuracy
def batch_accuracies(model, data, batch_size, seed):
    """Accuracy of a fixed ``model`` on every batch, in the order fit draws them."""
    with torch.no_grad():
        return [(model(x).argmax(1) == y).float().mean().item()
                for x, y in C.train.batches(data, batch_size, torch.Generator().manual_seed(seed))]


def test_fit_logs_the_batch_accuracy_of_every_step_before_the_step(mnist_like):
    torch.manual_seed(0)
    model = tiny_classifier()
    expected = batch_accuracies(model, mnist_like["train"], 50, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the model never moves: every batch sees the init
    history = fit(model, opt, Classification(), mnist_like["train"], mnist_like["test"], epochs=1, batch_size=50,
                  device=torch.device("cpu"), progress=False, eval_train=False)
    assert history["steps"]["acc"].tolist() == pytest.approx(expected)


def test_lossgrad_logs_the_accuracy_of_the_forward_pass_not_of_the_probe(mnist_like):
    torch.manual_seed(0)
    model = tiny_classifier()
    first = batch_accuracies(model, mnist_like["train"], 50, seed=0)[0]
    opt = C.baselines.make_optimizer("lossgrad", model.parameters(), lr=5.0)[0]  # a large step moves the probe
    history = fit(model, opt, Classification(), mnist_like["train"], mnist_like["test"], epochs=1, batch_size=50,
                  device=torch.device("cpu"), progress=False, eval_train=False)
    assert len(history["steps"]["acc"]) == len(history["steps"]["loss"]) == 6
    assert history["steps"]["acc"][0].item() == pytest.approx(first)
    autoencoder = nn.Sequential(nn.Flatten(), nn.Linear(784, 784), nn.Unflatten(1, (1, 28, 28)))
    no_acc = fit(autoencoder, torch.optim.SGD(autoencoder.parameters(), lr=0.1), Reconstruction(), mnist_like["train"],
                 mnist_like["test"], epochs=1, batch_size=100, device=torch.device("cpu"), progress=False)
    assert "acc" not in no_acc["steps"]  # a task without a batch metric logs none


# ------------------------------------------------------------ model options
def test_model_options_reach_the_model_and_only_changed_ones_enter_the_run_identity(mnist_like):
    def make(**options):
        return Experiment("99_test", "smoke", mnist_like["train"], mnist_like["test"], Reconstruction(),
                          C.models.fmnist_autoencoder, epochs=1, batch_size=100, device=torch.device("cpu"),
                          progress=False, eval_train=False, model_options=options or None,
                          on_finish=lambda model: {"first_bias": model[1].bias.detach().clone()})

    plain = make().run("SGD", "sgd", seed=0, lr=0.0)
    explicit = make(init_std=0.05, init_bias=0.2).run("SGD", "sgd", seed=0, lr=0.0)
    assert explicit["config_digest"] == plain["config_digest"]  # the defaults, spelt out: the same run
    assert explicit["seconds"] == plain["seconds"]  # loaded, not trained again
    torch_init = make(init_std=None).run("SGD torch init", "sgd", seed=0, lr=0.0)
    assert torch_init["config"]["model_options"] == {"init_std": None}
    assert not torch.allclose(torch_init["extra"]["first_bias"], torch.full((200,), 0.2))  # PyTorch's init
    assert torch.equal(plain["extra"]["first_bias"], torch.full((200,), 0.2))
    with pytest.raises(ValueError, match="no argument"):
        make(init_sdt=0.1).run("SGD", "sgd", seed=0, lr=0.0)


# ------------------------------------------------------------ run identity
def shifted(x, y):  # an augmentation
    return x.roll(1, dims=-1), y


def shifted_other_way(x, y):
    return x.roll(-1, dims=-1), y


def tiny_classifier_wide():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 33), nn.ReLU(), nn.Linear(33, 10))


class ScaledClassification(Classification):
    def __init__(self, scale=1.0):
        self.scale = scale


IDENTITY_CHANGES = {
    "n_test": lambda kw: kw.update(test_data=tuple(t[:50] for t in kw["test_data"])),
    "n_train": lambda kw: kw.update(train_data=tuple(t[:200] for t in kw["train_data"])),
    "data content (same sizes)": lambda kw: kw.update(train_data=(kw["train_data"][0].flip(0), kw["train_data"][1])),
    "preprocessing": lambda kw: kw.update(train_data=(kw["train_data"][0] * 0.5, kw["train_data"][1])),
    "augmentation added": lambda kw: kw.update(augment=lambda batch, g: shifted(*batch)),
    "task": lambda kw: kw.update(task=ScaledClassification()),
    "task parameter": lambda kw: kw.update(task=ScaledClassification(2.0)),
    "model": lambda kw: kw.update(model_fn=tiny_classifier_wide),
    "initialisation": lambda kw: kw.update(model_fn=C.models.mnist_mlp, model_options=dict(init_std=0.03)),
    "profile": lambda kw: kw.update(profile="quick"),
    "epochs": lambda kw: kw.update(epochs=2),
    "batch_size": lambda kw: kw.update(batch_size=50),
    "eval_train": lambda kw: kw.update(eval_train=False),
    "config": lambda kw: kw.update(config={"hidden": 3}),
}


def identity_base(mnist_like):
    return dict(notebook="99_test", profile="smoke", train_data=mnist_like["train"], test_data=mnist_like["test"],
                task=Classification(), model_fn=tiny_classifier, epochs=1, batch_size=100,
                device=torch.device("cpu"), progress=False)


def counting_run(exp, calls, **options):
    real_fit = C.train.fit

    def fit_and_count(*args, **kwargs):
        calls.append(1)
        return real_fit(*args, **kwargs)

    C.train.fit = fit_and_count
    try:
        return exp.run("SGD", "sgd", seed=0, lr=0.1, **options)
    finally:
        C.train.fit = real_fit


@pytest.mark.parametrize("change", list(IDENTITY_CHANGES))
def test_changing_any_input_of_a_run_recomputes_it(mnist_like, change):
    calls = []
    counting_run(Experiment(**identity_base(mnist_like)), calls)
    counting_run(Experiment(**identity_base(mnist_like)), calls)
    assert len(calls) == 1, "the same run was not loaded"
    if change == "initialisation":  # first store the run with the default initialisation of this model
        counting_run(Experiment(**dict(identity_base(mnist_like), model_fn=C.models.mnist_mlp)), calls)
        assert len(calls) == 2
    kw = identity_base(mnist_like)
    IDENTITY_CHANGES[change](kw)
    before = len(calls)
    counting_run(Experiment(**kw), calls)
    assert len(calls) == before + 1, f"changing {change} reused the stored run"


def make_shift(k):
    def augment(batch, generator):  # the same source for every k: only the closure differs
        x, y = batch
        return x.roll(k, dims=-1), y
    return augment


def test_changing_the_augmentation_code_its_closure_or_the_code_version_recomputes(mnist_like, monkeypatch):
    calls = []
    kw = identity_base(mnist_like)
    first = lambda batch, g: shifted(*batch)  # noqa: E731
    second = lambda batch, g: shifted_other_way(*batch)  # noqa: E731
    for augment in (first, second, make_shift(1), make_shift(2)):
        counting_run(Experiment(**dict(kw, augment=augment)), calls)
    assert len(calls) == 4
    counting_run(Experiment(**dict(kw, augment=make_shift(2))), calls)
    assert len(calls) == 4  # the same code and closure: loaded
    counting_run(Experiment(**kw), calls)
    monkeypatch.setattr(C.train, "RUN_CODE_VERSION", C.train.RUN_CODE_VERSION + 1)
    counting_run(Experiment(**kw), calls)
    assert len(calls) == 6


def test_stored_only_refuses_to_train_and_says_why(mnist_like, monkeypatch):
    exp = Experiment(**identity_base(mnist_like))
    exp.run("SGD", "sgd", seed=0, lr=0.1)
    monkeypatch.setenv(C.store.STORED_ONLY_ENV, "1")
    assert exp.run("SGD", "sgd", seed=0, lr=0.1)["config"]["n_test"] == len(mnist_like["test"][0])  # loads
    shorter = Experiment(**dict(identity_base(mnist_like), test_data=tuple(t[:10] for t in mnist_like["test"])))
    with pytest.raises(C.store.StoredRunMissing, match="n_test: 100 -> 10"):
        shorter.run("SGD", "sgd", seed=0, lr=0.1)
    with pytest.raises(C.store.StoredRunMissing, match="not stored"):
        exp.run("SGD", "sgd", seed=5, lr=0.1)


def test_a_schedule_beyond_the_epochs_is_refused_before_training(mnist_like):
    exp = Experiment(**dict(identity_base(mnist_like), epochs=3))
    with pytest.raises(ValueError, match="milestones \\[2, 5\\] must increase and lie in 1..2"):
        exp.run("step", "sgd_multistep", seed=0, lr=0.1, milestones=[2, 5])
    with pytest.raises(ValueError, match="step_size 3 must lie in 1..2"):
        exp.run("step", "sgd_steplr", seed=0, lr=0.1, step_size=3)


FLUSHED_DURING_FORWARD: list = []


class RecordsDenormalMode(nn.Module):
    """A tiny classifier whose forward pass records whether the CPU flushes denormals to zero."""

    def __init__(self):
        super().__init__()
        self.net = tiny_classifier()

    def forward(self, x):
        FLUSHED_DURING_FORWARD.append(C.train.denormals_flushed())
        return self.net(x)


def recording_classifier():
    return RecordsDenormalMode()


@pytest.mark.parametrize("setting, threads, flushed", [(None, 1, True), ("1", 1, True), ("0", 1, False), ("1", 2, False)])
def test_runs_at_one_thread_train_with_denormals_flushed_unless_told_not_to_and_the_mode_is_restored(
        mnist_like, monkeypatch, setting, threads, flushed):
    monkeypatch.delenv(C.train.FLUSH_DENORMALS_ENV, raising=False)
    if setting is not None:
        monkeypatch.setenv(C.train.FLUSH_DENORMALS_ENV, setting)
    monkeypatch.setenv("LOSSGRAD_THREADS", str(threads))  # more threads: torch's pool would keep its own mode
    torch.set_flush_denormal(False)
    FLUSHED_DURING_FORWARD.clear()
    exp = Experiment(**dict(identity_base(mnist_like), model_fn=recording_classifier, jobs=1))
    result = exp.run("SGD", "sgd", seed=0, lr=0.1)
    assert FLUSHED_DURING_FORWARD and set(FLUSHED_DURING_FORWARD) == {flushed}
    assert result["denormals"] == ("flushed" if flushed else "kept")
    assert ("denormals flushed" in C.report.conditions("smoke", [result])) == flushed
    assert not C.train.denormals_flushed()  # the calling thread's own mode is back


def test_the_denormal_mode_before_the_block_comes_back_even_after_an_error():
    torch.set_flush_denormal(True)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with C.train.flushed_denormals(enabled=False):
                assert not C.train.denormals_flushed()
                raise RuntimeError("inside")
        assert C.train.denormals_flushed()
    finally:
        torch.set_flush_denormal(False)


def test_conditions_count_the_runs_that_flushed_denormals():
    runs = [dict(seed=0, seconds=60.0, denormals="flushed"), dict(seed=1, seconds=60.0, denormals="kept"), dict(seed=2)]
    assert "denormals flushed in 1 of 3 runs" in C.report.conditions("paper", runs)
    assert "denormals" not in C.report.conditions("paper", runs[1:])


def test_flushing_denormals_is_not_part_of_a_run_identity(mnist_like, monkeypatch):
    exp = Experiment(**identity_base(mnist_like))
    first = exp.run("SGD", "sgd", seed=0, lr=0.1)
    monkeypatch.setenv(C.train.FLUSH_DENORMALS_ENV, "0")
    monkeypatch.setenv(C.store.STORED_ONLY_ENV, "1")  # loading it must not need training
    assert exp.run("SGD", "sgd", seed=0, lr=0.1)["config_digest"] == first["config_digest"]


def test_a_bad_denormal_setting_is_refused_with_what_to_set_even_when_every_run_is_stored(mnist_like, monkeypatch):
    exp = Experiment(**identity_base(mnist_like))
    exp.run("SGD", "sgd", seed=0, lr=0.1)
    monkeypatch.setenv(C.train.FLUSH_DENORMALS_ENV, "yes")
    with pytest.raises(ValueError, match="LOSSGRAD_FLUSH_DENORMALS must be 1 .* or 0 .*got 'yes'"):
        exp.run("SGD", "sgd", seed=0, lr=0.1)
