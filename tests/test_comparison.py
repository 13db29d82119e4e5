"""companion.comparison: notebook 09's bookkeeping (rounds of runs, scores, failures, tables and figures), on runs
made up for each test, and companion.profiles.resolve's full_grid (09 and 10 resolve with it)."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import companion as C  # noqa: E402
from companion.comparison import Comparison, Task, step_noise, trivial_score  # noqa: E402

STEPS = 4  # steps per epoch: 40 training images, batch 10


def fake_loader(name, profile, n_train, n_test):
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(40, 6, generator=g), torch.tensor([0, 1, 1, 2] * 10))
    test = (torch.rand(20, 6, generator=g), torch.tensor([2] * 12 + [0] * 8))
    return train, test


@pytest.fixture
def cmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "runs"))
    tasks = {"ae": Task("fake", C.models.fmnist_autoencoder, C.train.Reconstruction(), "test_loss", higher=False,
                        epochs=3, title="AE task", short="AE"),
             "cl": Task("fake", C.models.mnist_mlp, C.train.Classification(), "test_acc", higher=True,
                        epochs=3, title="CL task", short="CL")}
    return Comparison("test_comparison", "smoke", tasks, ["ae", "cl"], {"own": None, "torch": dict(init_std=None)},
                      batch_size=10, device=torch.device("cpu"), loader=fake_loader)


def run(task, method, values, seed=0, init="own", diverged=False, family="peer", lr=None, options=None, seconds=None,
        extra=None, remedy=False, forwards=1, **series):
    """A made-up run of ``len(values) - 1`` epochs whose ranking metric after each epoch is ``values``."""
    rank = "test_loss" if task == "ae" else "test_acc"
    epochs = [{"epoch": k, "seconds": float(k), rank: v, "test_loss": v if rank == "test_loss" else 1.0 - v}
              for k, v in enumerate(values)]
    n = (len(values) - 1) * STEPS
    steps = {"lr": torch.full((n,), 0.1, dtype=torch.float64) if lr is None else torch.as_tensor(lr, dtype=torch.float64)}
    steps.update({k: torch.as_tensor(v, dtype=torch.float64) for k, v in series.items()})
    return dict(task=task, init=init, method=method, family=family, seed=seed, diverged=diverged, epochs=epochs,
                steps=steps, options=options or {}, seconds=(len(values) - 1) * 2.0 if seconds is None else seconds,
                extra=extra if extra is not None else {"train": {"loss": 0.5, "acc": 0.5}}, remedy=remedy,
                forwards=forwards, optimizer=method.lower())


# ------------------------------------------------------------------ set-up
def test_the_experiments_are_one_per_task_and_initialisation_with_its_model_options(cmp):
    assert list(cmp.experiments) == [("ae", "own"), ("ae", "torch"), ("cl", "own"), ("cl", "torch")]
    assert cmp.experiments["cl", "torch"].model_options == dict(init_std=None)
    assert cmp.experiments["cl", "own"].model_options is None
    assert cmp.experiments["ae", "own"].eval_train is False and cmp.experiments["ae", "own"].epochs == 3
    assert cmp.steps_per_epoch(("ae", "own")) == STEPS
    assert cmp.column(("cl", "torch")) == "CL torch"


def test_the_trivial_score_is_the_mean_image_s_error_or_the_majority_class_share():
    train = (torch.tensor([[0.0, 2.0], [2.0, 4.0]]), torch.tensor([0, 1]))
    test = (torch.tensor([[1.0, 3.0], [3.0, 3.0]]), torch.tensor([1, 1, 1, 0]))
    assert trivial_score(train, test, "test_loss") == pytest.approx((0 + 0 + 4 + 0) / 4)
    assert trivial_score(train, test, "test_acc") == 0.75


def test_the_run_label_names_task_initialisation_and_method(cmp):
    assert cmp.label("ae", "own", "SGD lr=4") == "SGD lr=4 [ae, own init]"


def test_a_round_tags_every_run_in_plan_order(cmp, monkeypatch):
    calls = []

    def fake_run_together(batches, jobs=None):
        calls.append(batches)
        return [[{"label": label, "seed": seed} for label, _, _ in methods for seed in seeds]
                for _, methods, seeds in batches]

    monkeypatch.setattr(C.runner, "run_together", fake_run_together)
    cmp.forwards = {"lossgrad": 2}
    out = cmp.run_round([(("ae", "own"), [("A", "peer", "adam", {}), ("L", "LOSSGRAD", "lossgrad", {})], range(2)),
                         (("cl", "own"), [], range(2)), (("cl", "torch"), [("B", "peer", "sgd", {})], range(0))],
                        remedy=True)
    assert len(calls[0]) == 1  # empty methods and empty seeds are left out
    assert [(r["method"], r["seed"], r["forwards"], r["remedy"]) for r in out] == [
        ("A", 0, 1, True), ("A", 1, 1, True), ("L", 0, 2, True), ("L", 1, 2, True)]
    assert out[0]["label"] == "A [ae, own init]" and out[0]["family"] == "peer"


# ------------------------------------------------------------------ scores
def test_the_score_is_lower_is_better_and_a_diverged_run_is_worst(cmp):
    assert cmp.score([run("ae", "A", [1.0, 0.2]), run("ae", "A", [1.0, 0.4])], "ae") == pytest.approx(0.3)
    assert cmp.score([run("cl", "A", [0.1, 0.8]), run("cl", "A", [0.1, 0.9])], "cl") == pytest.approx(-0.85)
    assert cmp.score([run("ae", "A", [1.0, 0.2]), run("ae", "A", [1.0, 0.4], diverged=True)], "ae") == math.inf
    assert cmp.score([], "ae") == math.inf
    grid = [run("ae", "SGD", [1.0, v], options=dict(lr=lr)) for lr, v in ((2, 0.5), (4, 0.3), (16, 0.4))]
    assert min((2, 4, 16), key=lambda lr: cmp.option_score(grid, ("ae", "own"), lr=lr)) == 4


def test_a_stall_is_no_better_than_the_start_or_within_the_margin_of_the_trivial_score(cmp):
    cmp.trivial = {"ae": 0.1, "cl": 0.6}
    assert cmp.stalled_at(0.5, 0.5, "ae")                # no better than before training
    assert cmp.stalled_at(0.0995, 0.5, "ae")             # within 1% of the mean image's error
    assert not cmp.stalled_at(0.098, 0.5, "ae")
    assert cmp.stalled_at(0.605, 0.1, "cl") and not cmp.stalled_at(0.62, 0.1, "cl")  # 1 point of accuracy
    cmp.stall_margin = 0.0
    assert not cmp.stalled_at(0.605, 0.1, "cl")


def test_failures_are_diverged_stalled_collapsed_or_a_step_size_that_does_not_grow(cmp):
    cmp.trivial = {"ae": 0.1, "cl": 0.1}
    trained = run("cl", "A", [0.1, 0.7, 0.8])
    assert cmp.failure_of([trained], "cl") is None
    assert cmp.failure_of([trained, run("cl", "A", [0.1, 0.7, 0.8], diverged=True)], "cl") == "diverged"
    assert cmp.failure_of([run("cl", "A", [0.1, 0.1, 0.1])], "cl") == "stalled"
    fell = run("cl", "A", [0.1, 0.8, 0.1])
    assert cmp.best_epoch_index(fell) == 1 and cmp.best_epoch(fell) == 0.8
    assert cmp.failure_of([fell], "cl") == "collapsed"
    assert cmp.failure_of([fell, run("cl", "A", [0.1, 0.1, 0.1])], "cl") == "stalled"  # not every stalled seed trained
    flat = run("cl", "DoG", [0.1, 0.7, 0.8], lr=[1.0] * 8)
    growing = run("cl", "DoG", [0.1, 0.7, 0.8], lr=[1.0, 1.5, 2.5, 3, 3, 3, 3, 3])
    assert cmp.failure_of([flat], "cl", growth=3) == "step size not growing"
    assert cmp.failure_of([growing], "cl", growth=3) is None
    assert cmp.failure_of([flat], "cl") is None  # no growth check asked


def test_failures_list_each_failing_row_and_plan_its_documented_remedy(cmp):
    cmp.trivial = {"ae": 0.1, "cl": 0.1}
    plan = {("cl", "own"): [("SGD", "reference", "sgd", {}), ("A", "peer", "a", dict(lr=1.0)),
                            ("B", "peer", "b", {}), ("C", "peer", "c", {})]}
    main = [run("cl", "SGD", [0.1, 0.1]),  # a reference: never judged
            run("cl", "A", [0.1, 0.8]), run("cl", "A", [0.1, 0.7], seed=1, diverged=True),
            run("cl", "B", [0.1, 0.1]), run("cl", "C", [0.1, 0.8])]
    remedy = lambda method, options, failure: ("lr=0.1", dict(options, lr=0.1)) if method == "A" else None  # noqa: E731
    failures, remedies = cmp.failures(main, plan, remedy, growth=lambda m: None, seeds=lambda init: [0, 1])
    assert [(f["method"], f["failure"], f["seeds"], f["remedy"]) for f in failures] == [
        ("A", "diverged", "1/2", "lr=0.1"), ("B", "stalled", "1/1", "none documented")]
    assert remedies == [(("cl", "own"), [("A (lr=0.1)", "peer", "a", dict(lr=0.1))], [0, 1])]
    off, none = cmp.failures(main, plan, None, growth=lambda m: None, seeds=lambda init: [0])
    assert [f["remedy"] for f in off] == ["not tried (remedies=False)"] * 2 and none == []


# ------------------------------------------------------------------ tables
def test_the_final_table_gives_metrics_seconds_against_the_base_and_forward_passes(cmp):
    runs = [run("cl", "SGD (best rate)", [0.1, 0.8], seconds=2.0), run("cl", "SGD (best rate)", [0.1, 0.9], seed=1, seconds=4.0),
            run("cl", "L", [0.1, 0.85], seconds=9.0, forwards=2, extra={"train": {"loss": 0.25, "acc": 0.75}}),
            run("cl", "D", [0.1, 0.85], diverged=True)]
    table = cmp.final_table(runs, base="SGD (best rate)")
    assert list(table.method) == ["SGD (best rate)", "L", "D"]
    assert list(table.columns) == ["method", "seeds", "diverged", "train loss", "test loss", "train acc", "test acc",
                                   "s / epoch", "vs SGD", "forwards / step"]
    sgd, lg, div = (table.iloc[i] for i in range(3))
    assert sgd["test acc"] == "0.85 ± 0.071" and sgd["s / epoch"] == 3.0
    assert (lg["train acc"], lg["vs SGD"], lg["forwards / step"]) == ("0.75", 3.0, 2)
    assert (div["test acc"], div["train loss"], div["diverged"]) == ("diverged", "diverged", 1)


def test_the_ranking_places_methods_per_column_ties_share_and_the_mean_is_over_the_columns_run(cmp):
    results = [run("ae", "A", [1.0, 0.1]), run("ae", "B", [1.0, 0.2]), run("ae", "C", [1.0, 0.3]),
               run("ae", "A", [1.0, 0.1], init="torch"), run("ae", "B", [1.0, 0.3], init="torch", diverged=True),
               run("ae", "C", [1.0, 0.3], init="torch", diverged=True),
               run("cl", "A", [0.1, 0.7]), run("cl", "B", [0.1, 0.9])]
    table, fields = cmp.ranking(results)
    assert fields == {"AE own": 3, "AE torch": 3, "CL own": 2}
    rows = table.set_index("method")
    assert rows.loc["B", "AE torch"] == rows.loc["C", "AE torch"] == 2.5  # both diverged: they share places 2 and 3
    assert rows.loc["A", "mean place"] == pytest.approx((0 + 0 + 1) / 3)
    assert rows.loc["C", "ranked on"] == 2 and math.isnan(rows.loc["C", "CL own"])
    assert math.isnan(rows.loc["B", "AE torch loss"]) and rows.loc["B", "CL own acc"] == pytest.approx(0.9)
    assert list(table.method) == ["A", "B", "C"]  # sorted by mean place: A 0.333, B (1/2 + 3/4 + 0) / 3, C 7/8


def test_versus_gives_relative_errors_accuracy_points_diverged_and_not_run(cmp):
    results = [run("ae", "LOSSGRAD x", [1.0, 0.3]), run("ae", "P", [1.0, 0.2]), run("cl", "LOSSGRAD x", [0.1, 0.8]),
               run("cl", "P", [0.1, 0.85]), run("ae", "LOSSGRAD x", [1.0, 0.3], init="torch"),
               run("ae", "P", [1.0, 0.3], init="torch", diverged=True), run("cl", "Q (remedy)", [0.1, 0.9], remedy=True)]
    table = cmp.versus(results)
    assert table.to_dict("records") == [{"LOSSGRAD": "x", "against": "P", "AE own": "+50.0%", "AE torch": "diverged",
                                         "CL own": "-5.00 pts", "CL torch": "–"}]


def test_reach_counts_the_epochs_forward_passes_and_seconds_to_the_target(cmp):
    results = [run("ae", "SGD (best rate)", [1.0, 0.5, 0.3]), run("ae", "L", [1.0, 0.3, 0.2], forwards=2),
               run("ae", "N", [1.0, 0.9, 0.8])]
    table = cmp.reach(results, "SGD (best rate)")
    rows = table.set_index("method")
    assert list(table.columns)[3] == "target (SGD's final)" and rows.loc["L", "target (SGD's final)"] == 0.3
    assert (rows.loc["SGD (best rate)", "epochs"], rows.loc["L", "epochs"], rows.loc["N", "epochs"]) == (2, 1, "–")
    assert rows.loc["L", "forward passes"] == 1 * STEPS * 2 and rows.loc["L", "seconds"] == 1.0


def test_step_sizes_iterates_and_the_failure_table_read_the_right_runs(cmp):
    lr = [0.1] * STEPS + [0.2, 0.4, 0.4, 0.8]
    dog = run("ae", "DoG", [1.0, 0.5, 0.4], lr=lr, extra={"train": {"loss": 0.3},
                                                          "last_iterate": {"train": {"loss": 0.35}, "test": {"loss": 0.45}}})
    table = cmp.step_sizes([dog, run("ae", "DoG", [1.0, 0.5, 0.4], seed=1)], seed=0)
    assert table.to_dict("records") == [{"task": "ae", "init": "own", "method": "DoG",
                                         "median step size, last epoch": 0.4, "largest step size": 0.8}]
    iterates = cmp.iterates([dog, run("ae", "SGD", [1.0, 0.5, 0.4])])
    assert iterates.to_dict("records") == [{"task": "ae", "init": "own", "method": "DoG", "metric": "loss",
                                            "train, averaged": "0.3", "train, last": "0.35",
                                            "test, averaged": "0.4", "test, last": "0.45"}]
    cmp.trivial = {"ae": 0.6, "cl": 0.1}
    failing = run("ae", "P", [1.0, 0.5, 1.0], lr=lr)
    fixed = run("ae", "P (lr=0.1)", [1.0, 0.4, 0.3], remedy=True)
    failures = [dict(task="ae", init="own", method="P", failure="collapsed", seeds="1/1", remedy="lr=0.1")]
    row = cmp.failure_table(failures, [failing], [fixed]).iloc[0]
    assert (row["start"], row["before"], row["best epoch"]) == ("1", "1", "0.5")
    assert row["seed 0: step size at its best epoch, last"] == "0.1 (epoch 1), 0.4"
    assert (row["remedy's failures"], row["with the remedy"], row["its best epoch"]) == ("0/1", "0.3", "0.3")


def test_a_collapse_is_read_epoch_by_epoch_from_the_first_seed_that_stalled(cmp):
    cmp.trivial = {"ae": 0.01, "cl": 0.1}
    ratio = [0.5, 0.5, math.nan, 0.4] + [0.5] * 4 + [math.nan] * 4 + [0.5] * 4
    lr = [0.1, 0.1, 0.1, 0.3] + [0.2] * 4 + [5.0] * 4 + [5.0] * 4
    first = run("cl", "L", [0.1, 0.7, 0.8, 0.1, 0.1], lr=lr, ratio=ratio, loss=[1.0] * 16, acc=[0.5] * 16)
    trained = run("cl", "L", [0.1, 0.7, 0.8, 0.8, 0.8], seed=1)
    later = run("cl", "L", [0.1, 0.7, 0.1, 0.1, 0.1], seed=2)
    r, best, fell, table = cmp.collapse([later, trained, first])
    assert r is first and (best, fell) == (2, 3)
    assert list(table.epoch) == [1, 2, 3, 4]
    assert table.iloc[0]["median h"] == pytest.approx(0.1) and table.iloc[0]["largest h"] == pytest.approx(0.3)
    assert table.iloc[0]["r undefined"] == 0.25 and table.iloc[2]["r undefined"] == 1.0
    assert math.isnan(table.iloc[2]["median r"])


# ------------------------------------------------------------------ figures
def test_a_noisy_step_size_is_drawn_behind_and_fainter_than_a_smooth_one(cmp):
    steps = 2 * STEPS
    smooth = torch.linspace(1.0, 0.1, steps)
    jumping = torch.tensor([1.0, 0.01] * (steps // 2))
    assert step_noise(smooth) < C.comparison.NOISY < step_noise(jumping)
    assert step_noise(torch.tensor([0.0, 0.0])) == 0.0
    results = [run("ae", "WNGrad", [1.0, 0.5, 0.4], lr=smooth), run("ae", "L4", [1.0, 0.5, 0.4], lr=jumping),
               run("ae", "Adam", [1.0, 0.5, 0.4], lr=torch.full((steps,), 1e-3)), run("ae", "Zero", [1.0, 0.5, 0.4], lr=torch.zeros(steps))]
    colours = cmp.colours(["WNGrad", "L4", "Adam", "Zero"])
    fig = cmp.plot_step_sizes(results, "own", colours, families={"SGD": lambda m: m != "Adam", "Adam": lambda m: m == "Adam"})
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"WNGrad", "L4"}  # a step size never positive is left out
    assert lines["L4"].get_zorder() < lines["WNGrad"].get_zorder()
    assert lines["L4"].get_alpha() < 1 and lines["WNGrad"].get_alpha() == 1.0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["WNGrad", "L4"]  # the results' order
    assert {line.get_label() for line in fig.axes[1].get_lines()} == {"Adam"}
    plt.close(fig)


def test_the_metric_panels_are_one_per_task_and_initialisation_or_per_x(cmp):
    results = [run(t, "A", [1.0, 0.5, 0.4] if t == "ae" else [0.1, 0.5, 0.6], init=i, family=f)
               for t in ("ae", "cl") for i in ("own", "torch") for f in ("peer",)]
    fig = cmp.plot_metric(results, cmp.colours(["A"]))
    assert [ax.get_title() for ax in fig.axes] == ["AE task, own init", "AE task, torch init", "CL task, own init",
                                                    "CL task, torch init"]
    assert fig.axes[0].get_yscale() == "log" and fig.axes[2].get_ylim()[1] == 1.0
    plt.close(fig)
    fig = cmp.plot_metric(results, cmp.colours(["A"]), inits=["own"], xs=["seconds", "forwards"])
    assert [ax.get_xlabel() for ax in fig.axes[:2]] == ["training time (s)", "forward passes"]
    assert list(fig.axes[1].get_lines()[0].get_xdata()) == [0, STEPS, 2 * STEPS]
    plt.close(fig)


# ------------------------------------------------------------------ profiles: the full grid
def test_full_grid_replaces_the_cut_settings_only_when_it_is_on():
    kw = dict(paper=dict(seeds=1, lrs=[1.0], full_grid=False), quick=dict(seeds=1), smoke=dict(), full_grid=dict(seeds=3, lrs=[1.0, 5.0]))
    cut = C.profiles.resolve("paper", {}, **kw)
    assert (cut.seeds, cut.lrs, cut.changed) == (1, [1.0], [])
    full = C.profiles.resolve("paper", {"full_grid": True}, **kw)
    assert (full.seeds, full.lrs, full.changed) == (3, [1.0, 5.0], ["full_grid", "lrs", "seeds"])
    assert list(vars(full)).index("seeds") < list(vars(full)).index("full_grid")  # the settings keep their order
    with pytest.raises(ValueError, match="full_grid sets unknown"):
        C.profiles.resolve("paper", {}, **dict(kw, full_grid=dict(seed=3)))


# ---------------------------------------------------------------- widening a tuned baseline's grid
@pytest.mark.parametrize("grid, best, expected", [
    ([2.0, 4.0, 16.0], 16.0, 160.0),   # the largest rate is best: the next one out above
    ([2.0, 4.0, 16.0], 2.0, 0.2),      # the smallest: the next one out below
    ([16.0, 2.0, 4.0], 4.0, None),     # inside (in any order): done
    ([0.3], 0.3, 3.0),                 # one rate: upwards
])
def test_rate_beyond_edge_widens_a_grid_only_where_its_best_rate_is_on_an_edge(grid, best, expected):
    found = C.comparison.rate_beyond_edge(grid, best, 10.0)
    assert found == (pytest.approx(expected) if expected is not None else None)


def test_rate_beyond_edge_refuses_a_factor_that_does_not_widen_and_a_best_rate_off_the_grid():
    with pytest.raises(ValueError, match="factor must be > 1"):
        C.comparison.rate_beyond_edge([1.0, 2.0], 2.0, 1.0)
    with pytest.raises(ValueError, match="not in the grid"):
        C.comparison.rate_beyond_edge([1.0, 2.0], 3.0, 2.0)


def test_widen_grids_adds_rates_outwards_until_each_best_lies_inside_and_trains_only_the_new_ones():
    def loss(key, lr):  # a valley per key: best at 0.3 (inside at once), 10 (two rounds up), 1e-5 (down: a bound)
        return {"a": abs(math.log(lr / 0.3)), "b": abs(math.log(lr / 10.0)), "c": abs(math.log(lr / 1e-5))}[key]

    grids = {"a": [0.1, 0.3, 1.0], "b": [0.1, 0.3, 1.0], "c": [0.1, 0.3, 1.0]}
    scored = {(key, lr) for key in grids for lr in grids[key]}  # the runs so far; a rate not trained scores worst
    trained = []

    def run_rates(new):
        trained.append(dict(new))
        scored.update(new.items())

    best = C.comparison.widen_grids(
        grids, lambda key: min(grids[key], key=lambda lr: loss(key, lr) if (key, lr) in scored else math.inf),
        run_rates, factor=math.sqrt(10), times=3)
    assert best["a"] == 0.3 and best["b"] == pytest.approx(10.0)
    assert grids["a"] == [0.1, 0.3, 1.0]
    assert grids["b"] == pytest.approx([0.1, 0.3, 1.0, math.sqrt(10), 10.0, 10 * math.sqrt(10)])
    assert len(grids["c"]) == 6 and best["c"] == grids["c"][0]  # still on the edge after three rounds: a bound
    assert [sorted(t) for t in trained] == [["b", "c"], ["b", "c"], ["b", "c"]]
    assert all(lr not in (0.1, 0.3, 1.0) for t in trained for lr in t.values())  # only new rates train


def test_widen_grids_stops_once_every_best_lies_inside():
    grids = {"a": [1.0, 2.0, 4.0]}
    trained = []
    best = C.comparison.widen_grids(grids, lambda key: 8.0 if 8.0 in grids[key] else 4.0,
                                    lambda new: trained.append(new), factor=2.0, times=5)
    assert best == {"a": 8.0} and grids["a"] == [1.0, 2.0, 4.0, 8.0, 16.0] and trained == [{"a": 8.0}, {"a": 16.0}]


def test_widen_grids_with_no_rounds_only_picks_the_best_and_refuses_a_negative_count():
    grids = {"a": [0.1, 1.0]}
    assert C.comparison.widen_grids(grids, lambda key: 1.0, lambda new: pytest.fail("trained"), 10.0, 0) == {"a": 1.0}
    with pytest.raises(ValueError, match="times must be >= 0"):
        C.comparison.widen_grids(grids, lambda key: 1.0, lambda new: None, 10.0, -1)
