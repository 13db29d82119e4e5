"""companion.report's readers of one run (final, epoch_window, last_epoch, settled_h, steps_per_epoch, finite_mean),
show_table and the per-seed epoch plot (notebooks 08 to 10)."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from companion import report as R  # noqa: E402


def run(values, lr=None, diverged=False, label="A", seed=0, extra=None):
    epochs = [{"epoch": k, "seconds": float(k), "test_loss": v, "test_acc": 1 - v} for k, v in enumerate(values)]
    n = len(values) - 1
    lr = torch.arange(1, 3 * n + 1, dtype=torch.float64) if lr is None else torch.as_tensor(lr, dtype=torch.float64)
    return dict(label=label, seed=seed, diverged=diverged, epochs=epochs, steps={"lr": lr, "ratio": lr / 10},
                extra=extra or {})


def test_final_reads_the_last_epoch_or_the_train_evaluation_and_is_nan_when_diverged():
    r = run([1.0, 0.5, 0.25], extra={"train": {"loss": 0.2, "acc": 0.9}})
    assert R.final(r) == 0.25 and R.final(r, "test_acc") == 0.75
    assert R.final(r, "train_loss") == 0.2 and R.final(r, "train_acc") == 0.9
    assert math.isnan(R.final(dict(r, diverged=True))) and math.isnan(R.final(dict(r, diverged=True), "train_loss"))
    with pytest.raises(KeyError):
        R.final(run([1.0, 0.5]), "train_loss")  # no train evaluation, and no train metric per epoch


def test_epoch_windows_and_the_settled_step_size_read_the_right_steps():
    r = run([1.0, 0.5, 0.25, 0.2])  # 3 epochs of 3 steps: lr 1 .. 9
    assert R.steps_per_epoch(r) == 3
    assert R.epoch_window(r, 2).tolist() == [4.0, 5.0, 6.0]
    assert R.epoch_window(r, 1, steps=2).tolist() == [1.0, 2.0]
    assert R.epoch_window(r, 1, "missing").tolist() == []
    r["steps"]["lr"][7] = math.nan
    assert R.epoch_window(r, 3, finite=True).tolist() == [7.0, 9.0]
    assert R.last_epoch(r, "ratio").tolist()[0] == pytest.approx(0.7)
    assert R.settled_h(run([1.0, 0.5, 0.25, 0.2])) == 8.0
    assert math.isnan(R.settled_h(run([1.0, 0.5], diverged=True)))
    assert R.finite_mean([1.0, math.nan, 3.0, math.inf]) == 2.0 and math.isnan(R.finite_mean([math.nan]))


def test_show_table_prints_every_row_with_the_float_format_and_writes_both_files(tmp_path, capsys):
    table = pd.DataFrame({"name": [f"row {i}" for i in range(80)], "x": [1 / 3] * 80})
    R.show_table(table, tmp_path, "t", "conditions line", float_format="{:.3g}")
    printed = capsys.readouterr().out
    assert "row 79" in printed and "..." not in printed and "0.333 " not in printed.replace("0.333\n", "")
    assert printed.splitlines()[1].split()[-1] == "0.333"
    assert (tmp_path / "t.csv").exists() and "conditions line" in (tmp_path / "t.md").read_text()
    R.show_table(table.iloc[:0], tmp_path, "empty", empty="nothing to show")
    assert capsys.readouterr().out == "nothing to show\n" and (tmp_path / "empty.csv").exists()
    assert R.show_table(table, tmp_path, "t") is None  # nothing for a notebook cell to display twice


def test_the_per_seed_plot_draws_every_seed_and_no_band():
    results = [run([0.9, 0.2, 0.1], label="split", seed=s) if s else run([0.9, 0.9, 0.9], label="split", seed=0)
               for s in range(3)] + [run([0.9, 0.3, 0.2], label="other", seed=s) for s in range(3)]
    fig, ax = plt.subplots()
    R.plot_epoch_metric_per_seed(results, "test_acc", ax=ax, colours={"split": "red", "other": "blue"})
    drawn = [line for line in ax.get_lines() if len(line.get_xdata())]
    assert len(drawn) == 6 and not ax.collections  # a line per run, no fill
    assert [line.get_ydata()[-1] for line in drawn[:3]] == pytest.approx([0.1, 0.9, 0.9])  # the stalled seed stays
    assert [line.get_linestyle() for line in drawn[:3]] == ["-", "--", ":"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["split", "other", "seed 0", "seed 1", "seed 2"]
    assert ax.get_ylim()[1] < 1.05  # the data's range, not a band beyond it
    plt.close(fig)
