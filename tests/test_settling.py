"""companion.settling: notebook 10's tagged runs and the rows and figures of its questions, on made-up runs."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import companion as C  # noqa: E402
from companion import settling as T  # noqa: E402


def run(losses, lr=None, diverged=False, seed=0, steps=4, ratio=None, loss=None, train_loss=0.5, **tags):
    """A made-up run: test loss ``losses`` after each epoch, ``steps`` steps per epoch."""
    n = (len(losses) - 1) * steps
    lr = torch.full((n,), 0.5, dtype=torch.float64) if lr is None else torch.as_tensor(lr, dtype=torch.float64)
    return dict(seed=seed, diverged=diverged, label=tags.pop("label", "row"),
                epochs=[{"epoch": k, "test_loss": v, "test_acc": 1 - v} for k, v in enumerate(losses)],
                steps={"lr": lr, "ratio": torch.full((n,), 0.5, dtype=torch.float64) if ratio is None
                       else torch.as_tensor(ratio, dtype=torch.float64),
                       "loss": torch.ones(n, dtype=torch.float64) if loss is None else torch.as_tensor(loss, dtype=torch.float64)},
                extra={"train": {"loss": train_loss, "acc": 0.5}}, **tags)


def no_spikes(r):
    return 0


# ------------------------------------------------------------------ runs
@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSGRAD_RUNS", str(tmp_path / "runs"))
    data = (torch.rand(20, 784), torch.randint(0, 10, (20,)))
    models = {"classifier": (C.models.mnist_mlp, dict(init_std=0.02, init_bias=0.0), C.train.Classification())}
    return T.Runs("test_settling", "smoke", models, data, data, batch_size=10, epochs=2, device=torch.device("cpu"))


def test_experiments_take_the_authors_or_pytorch_s_initialisation(runs):
    authors = runs.experiment("classifier")
    torch_init = runs.experiment("classifier", batch_size=5, epochs=1, init=T.TORCH)
    assert authors.model_options == dict(init_std=0.02, init_bias=0.0) and (authors.batch_size, authors.epochs) == (10, 2)
    assert torch_init.model_options == dict(init_std=None) and (torch_init.batch_size, torch_init.epochs) == (5, 1)
    assert isinstance(authors.on_finish, C.linesearch.FinalTrainMetrics) and authors.eval_train is False


def test_train_tags_each_result_with_its_row_and_pick_selects_by_tags(runs, monkeypatch):
    asked = []

    def fake_run_all(experiment, specs, jobs=None, executor=None):
        asked.extend(specs)
        return [dict(label=label, seed=seed) for label, _, seed, _ in specs]

    monkeypatch.setattr(C.runner, "run_all", fake_run_all)
    exp = runs.experiment("classifier")
    rows = [("SGD lr=0.1", "sgd", dict(lr=0.1), [0, 1], dict(method="SGD", lr=0.1)),
            ("LOSSGRAD", "lossgrad", dict(lr=1e-4), [0], dict(method="LOSSGRAD", tau=0.5))]
    done = runs.train(exp, "classifier b=10", rows, kind="main", b=10)
    assert [s[0] for s in asked] == ["classifier b=10 SGD lr=0.1"] * 2 + ["classifier b=10 LOSSGRAD"]
    assert [(r["row"], r["seed"], r.get("lr")) for r in done] == [("SGD lr=0.1", 0, 0.1), ("SGD lr=0.1", 1, 0.1),
                                                                  ("LOSSGRAD", 0, None)]
    assert runs.train(exp, "x", [("empty", "sgd", {}, [], {})]) == []
    assert [r["seed"] for r in runs.pick(kind="main", method="SGD")] == [0, 1]
    assert runs.pick(kind="main", tau=0.5)[0]["row"] == "LOSSGRAD" and runs.pick(kind="guard") == []


def test_the_best_rate_has_the_lowest_mean_test_loss_a_diverged_run_counting_as_infinite():
    grid = [dict(run([1, v], diverged=d), lr=lr) for lr, v, d in
            ((2.0, 0.4, False), (4.0, 0.3, False), (4.0, 0.1, True), (8.0, 0.35, False), (1.0, 0.35, False))]
    assert T.best_rate(grid) == 1.0  # 4.0 has a diverged seed; 1.0 and 8.0 tie at 0.35: the smaller wins
    assert T.losses(grid[1:3]) == {"seeds": 2, "test loss": "diverged", "diverged": 1}


# ------------------------------------------------------------------ questions 1 and 3
def test_the_batch_noise_row_compares_settled_h_with_the_best_rate_and_flags_the_grid_s_edge():
    lossgrad = [run([1, 0.5, 0.4], lr=[1e-4, 1e-3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]),
                run([1, 0.5, 0.6], lr=[1e-4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4], seed=1),
                run([1, 0.5], diverged=True, seed=2, lr=[1e-4, 1e3, 1e3, 1e3])]
    sgd = [dict(run([1, 0.3, 0.25]), lr=8.0), dict(run([1, 0.3, 0.25], seed=1), lr=8.0)]
    row = T.batch_noise_row("ae", 100, lossgrad, sgd, grid=[2.0, 4.0, 8.0], spikes=lambda r: 1)
    assert row["settled h"] == pytest.approx(0.3) and row["h sd"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert row["edge"] == "highest" and row["best lr / settled h"] == pytest.approx(8 / 0.3)
    assert row["LOSSGRAD / SGD loss"] == pytest.approx(0.5 / 0.25) and row["steps"] == 8
    assert (row["seeds"], row["diverged"]) == ("3/2", "1/0")
    assert row["in band from step"] == 2  # seed 0 enters h's band (0.1 .. 0.4) at step 2, seed 1 at step 1
    assert row["spikes / 1000 steps LOSSGRAD"] == pytest.approx(1000 * 3 / 20)
    assert T.batch_noise_row("ae", 100, lossgrad[:1], sgd, grid=[8.0, 16.0], spikes=no_spikes)["edge"] == "lowest"


def test_threshold_rows_compare_each_tau_with_the_rule_s_and_tuned_sgd():
    by_tau = {0.5: [run([1, 0.4], lr=[0.2] * 4), run([1, 0.6], lr=[0.2] * 4, seed=1)],
              0.75: [run([1, 0.2], lr=[0.6] * 4), run([1, 0.5], diverged=True, seed=1)]}
    sgd = [run([1, 0.25])]
    rows = T.threshold_rows("ae", by_tau, sgd, best_lr=1.2, spikes=lambda r: 2)
    half, three = rows
    assert (half["h / h(0.5)"], half["predicted ratio"], half["test loss / best SGD's"]) == (1.0, 1.0, 2.0)
    assert three["settled h"] == pytest.approx(0.6) and three["h / h(0.5)"] == pytest.approx(3.0)
    assert three["best SGD lr / h"] == pytest.approx(2.0) and three["diverged"] == 1 and three["spikes"] == 4
    assert three["test loss"] == "diverged" and three["test loss / best SGD's"] == pytest.approx(0.8)
    assert half["sd ln h"] == 0.0 and half["median r"] == 0.5
    seeds = T.seed_rows("classifier", by_tau)
    assert [(s["tau"], s["seed"], s["diverged"]) for s in seeds] == [(0.5, 0, False), (0.5, 1, False), (0.75, 0, False),
                                                                     (0.75, 1, True)]
    assert math.isnan(seeds[3]["settled h"]) and seeds[0]["test acc"] == pytest.approx(0.6)


def test_the_threshold_figure_shows_diverged_seeds_names_a_lost_tau_and_labels_its_axes():
    q3 = pd.DataFrame([{"task": "classifier", "tau": tau, "seeds": 3, "settled h": h, "test loss / best SGD's": l,
                        "sd ln h": 0.1, "spikes": 0} for tau, h, l in ((0.5, 0.2, 1.0), (0.6, 0.5, 1.1), (0.75, math.nan, math.nan))])
    seeds = pd.DataFrame([{"task": "classifier", "tau": tau, "seed": s, "settled h": math.nan if d else 0.2,
                           "test loss": math.nan if d else 0.4, "diverged": d}
                          for tau, lost in ((0.5, 0), (0.6, 1), (0.75, 3)) for s in range(3) for d in [s < lost]])
    fig = T.plot_threshold(q3, seeds, best={"classifier": 0.4}, sgd_loss={"classifier": 0.4},
                           colours={"classifier": "tab:orange"})
    axes = fig.axes
    assert all(ax.get_ylabel() for ax in axes)
    for ax in axes[:2]:
        crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
        assert sorted(float(line.get_xdata()[0]) for line in crosses) == pytest.approx(
            [0.6, 0.744, 0.75, 0.756])  # one per diverged seed, side by side
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend.count("classifier: a seed that diverged") == 1
        assert "classifier, τ = 0.75: no point, 3/3 diverged" in legend
    plt.close(fig)


# ------------------------------------------------------------------ question 2
def trace_row(h=0.5, step=100, epoch=2):
    grid = [0.01, 0.1, 1.0, 10.0]
    return {"step": step, "epoch": epoch, "h": h, "t_batch": 0.5, "t_full_gB": 0.25, "t_full_gF": 1.0, "parabola": 0.55,
            "edge_batch": False, "edge_full_gB": True, "edge_full_gF": False, "cos_batch_full": 0.8, "ratio": 0.45,
            "grid_t": grid, "profile_batch": [1.0, 0.9, 0.8, 2.0], "profile_full_gB": [2.0, 1.8, 1.0, 4.0],
            "profile_full_gF": [2.0, 1.5, 1.2, 3.0], "full_loss": 2.0, "batch_loss": 1.0, "min_full_gB": 1.0}


def test_change_at_interpolates_the_profile_in_log_t_and_is_nan_outside_it():
    row = trace_row()
    assert T.change_at(row, 0.1) == pytest.approx(1.8 / 2 - 1)
    assert T.change_at(row, math.sqrt(0.1 * 1.0)) == pytest.approx((1.8 + 1.0) / 2 / 2 - 1)
    assert math.isnan(T.change_at(row, 100.0)) and math.isnan(T.change_at(row, 1e-3))
    assert T.change_at(dict(row, profile_full_gB=[math.nan, 1.8, 1.0, 4.0]), 0.01) != T.change_at(row, 0.01)


def test_line_search_rows_report_the_typical_factor_between_h_and_each_minimiser():
    traces = [dict(task="ae", seed=s, trace=[trace_row(h=0.5 * (1 + s)), trace_row(h=1.0, step=200)]) for s in (0, 1)]
    checkpoints = T.checkpoints(traces, best={"ae": 4.0})
    assert len(checkpoints) == 4 and checkpoints["dF at t_full_gB"].tolist() == [-0.5] * 4
    assert checkpoints["edge t_full_gB"].all() and not checkpoints["edge t_batch"].any()
    rows = pd.DataFrame(T.line_search_rows(checkpoints, "ae", 4.0)).set_index("minimiser")
    batch = rows.loc["batch loss along -g_B (the rule's target)"]
    assert batch["typical factor h vs t"] == pytest.approx(2.0)  # |ln(h / 0.5)| is ln 1, ln 2, ln 2, ln 2
    assert batch["h / t"] == "1.75 ± 0.35" and batch["at edge"] == 0.0
    assert rows.loc["full loss along -g_B", "at edge"] == 1.0
    assert rows.loc["best SGD lr (question 1)", "median t"] == 4.0 and rows.loc["h itself", "median t"] == 1.0


# ------------------------------------------------------------------ questions 4 and 5, every row
def test_the_guard_row_counts_seeds_that_started_and_the_sentences_name_the_h0s():
    runs = [run([2.0, 1.0], ratio=[1, 1, 0.5, 2]), run([2.0, 1.95], seed=1, ratio=[1, 1, 1, 1]),
            run([2.0, 5.0], seed=2, diverged=True)]
    row = T.guard_row("classifier", 1e-4, "exact", runs, no_spikes)
    assert (row["started"], row["diverged"], row["seeds"]) == (1, 1, 3)
    assert row["share r = 1"] == pytest.approx((0.5 + 1 + 0) / 3) and row["share r > 1"] == pytest.approx(0.25 / 3)
    assert row["test loss after"] == pytest.approx((1.0 + 1.95) / 2)
    q4 = pd.DataFrame([row, dict(row, h0=10.0, started=1, diverged=0, seeds=1), dict(row, form="defaults", started=3)])
    assert T.start_failures(q4) == [
        "classifier, exact: did not start (in some seed, without diverging) from h0 = 0.0001; diverged from h0 = 0.0001",
        "classifier, defaults: did not start (in some seed, without diverging) from h0 = none; diverged from h0 = 0.0001"]


def test_the_spike_row_and_the_summary_row_and_which_questions_a_row_answers():
    runs = [run([2.0, 1.0, 0.5], lr=[1, 1, 1, 1, 3, 2, 2, 2], row="LOSSGRAD exact tau=0.5"),
            run([2.0, 1.0, 0.7], seed=1, row="LOSSGRAD exact tau=0.5")]
    row = T.spike_row(runs, spikes=lambda r: r["seed"] + 1)
    assert row["spikes per run"] == [1, 2] and row["spikes"] == 3 and row["max h after epoch 1"] == 3.0
    assert row["test loss"] == "0.6 ± 0.14" and row["row"] == "LOSSGRAD exact tau=0.5"
    summary = T.summary_row("a label", runs, "1, 3", spikes=lambda r: 1)
    assert (summary["questions"], summary["seeds"], summary["spikes per run"]) == ("1, 3", 2, 1.0)
    main = dict(kind="main", method="LOSSGRAD", form="exact", tau=0.5, data="fmnist", b=100, task="classifier")
    assert T.questions(main, "fmnist", "fmnist", 100) == "1, 3, 5"
    assert T.questions(dict(main, b=25), "fmnist", "fmnist", 100) == "1"
    assert T.questions(dict(main, tau=0.9), "fmnist", "mnist", 100) == "3"
    assert T.questions(dict(main, data="mnist"), "fmnist", "mnist", 100) == "5"
    assert T.questions(dict(kind="guard"), "fmnist", "fmnist", 100) == "4"
    assert T.questions(dict(kind="trace"), "fmnist", "fmnist", 100) == "2"
