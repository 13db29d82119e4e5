"""Tests for the step-size helpers appended to companion/report.py: step_size_settling,
step_series_per_epoch and plot_step_series_per_epoch (used by notebooks 01, 02 and 05)."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from companion import report as R  # noqa: E402


def rise_then_oscillate(h0, target, c=1.05, oscillate=200):
    """h grows by c per step from h0 until it passes target, then alternates ×c, ÷c around it:
    what LOSSGRAD's rule does from a too small start."""
    series = [h0]
    while series[-1] < target:
        series.append(series[-1] * c)
    for i in range(oscillate):
        series.append(series[-1] / c if i % 2 == 0 else series[-1] * c)
    return torch.tensor(series, dtype=torch.float64)


# ------------------------------------------------------------ step_size_settling
def test_settled_value_is_the_median_of_the_final_window():
    lr = torch.tensor([1.0, 5.0, 0.1, 0.3, 0.2, 100.0, 0.25])
    out = R.step_size_settling(lr, window=5)
    assert out["settled"] == pytest.approx(0.25)  # median of 0.1, 0.3, 0.2, 100, 0.25


def test_reached_counts_the_steps_before_entering_the_band():
    lr = rise_then_oscillate(1e-6, 0.05)
    out = R.step_size_settling(lr, window=100)
    # the rise is exact powers of c, so the first step within a factor 2 follows from logs
    first = next(i for i, h in enumerate(lr.tolist()) if out["settled"] / 2 <= h <= 2 * out["settled"])
    assert out["reached"] == first
    # and it is the ~log(settled/2/h0)/log(c) steps the rule needs, not 0 and not the end
    expected = math.log(out["settled"] / 2 / 1e-6) / math.log(1.05)
    assert abs(out["reached"] - expected) <= 1
    assert out["settled"] == pytest.approx(0.05, rel=0.1)


def test_settled_value_does_not_depend_on_the_start_but_reached_does():
    small = R.step_size_settling(rise_then_oscillate(1e-6, 0.05), window=100)
    large = R.step_size_settling(rise_then_oscillate(1e-2, 0.05), window=100)
    assert small["settled"] == pytest.approx(large["settled"], rel=0.1)
    assert small["reached"] > large["reached"] + 100


def test_a_start_inside_the_band_needs_no_steps():
    lr = torch.full((50,), 0.1)
    out = R.step_size_settling(lr, window=10)
    assert out["reached"] == 0 and out["stays"] == 0


def test_stays_is_after_a_late_excursion_and_peak_finds_the_spike():
    lr = torch.full((100,), 0.1, dtype=torch.float64)
    lr[10] = 5.0  # a spike at the start of training
    lr[60] = 0.01  # a dip later
    out = R.step_size_settling(lr, window=20)
    assert out["reached"] == 0
    assert out["stays"] == 61
    assert out["peak"] == pytest.approx(5.0) and out["peak_step"] == 10


def test_stays_is_none_when_the_last_value_is_outside_the_band():
    lr = torch.tensor([0.1] * 30 + [10.0])
    assert R.step_size_settling(lr, window=30)["stays"] is None


def test_factor_sets_the_band_width():
    lr = torch.tensor([0.03] + [0.1] * 20)
    assert R.step_size_settling(lr, window=10, factor=2.0)["reached"] == 1  # 0.03 is > 2x below 0.1
    assert R.step_size_settling(lr, window=10, factor=4.0)["reached"] == 0


def shrinking_step_sizes(h0, steps, c=1.05, flush_denormal=False):
    """h divided by c at every step in float32, as exact Algorithm 1 does while its ratio reads above 1/2."""
    previous = torch.set_flush_denormal(flush_denormal) and False
    try:
        h, series = torch.tensor(h0, dtype=torch.float32), []
        for _ in range(steps):
            series.append(float(h))
            h = h / c
    finally:
        torch.set_flush_denormal(previous)
    return torch.tensor(series, dtype=torch.float64)


def test_a_step_size_that_underflows_to_zero_is_reported_not_an_error():
    # with subnormals flushed to zero (torch.set_flush_denormal, accelerators' fast modes) h reaches 0.0
    lr = shrinking_step_sizes(1e-6, 2000, flush_denormal=True)
    first_zero = lr.tolist().index(0.0)
    out = R.step_size_settling(lr, window=100)
    assert out["collapsed_step"] == first_zero
    assert out["settled"] == 0.0 and out["reached"] is None and out["stays"] is None
    assert out["peak"] == pytest.approx(1e-6) and out["peak_step"] == 0


def test_with_round_to_nearest_a_shrinking_step_size_stops_at_the_smallest_subnormal():
    lr = shrinking_step_sizes(1e-6, 2500)
    tail = lr[-100:]
    assert (tail == tail[-1]).all() and 0 < tail[-1] < torch.finfo(torch.float32).smallest_normal  # h / 1.05 rounds back to h
    out = R.step_size_settling(lr, window=100)
    assert out["collapsed_step"] is None and out["settled"] == lr[-1].item()


def test_a_single_zero_or_infinite_step_size_leaves_the_band_and_is_reported():
    lr = torch.full((60,), 0.1, dtype=torch.float64)
    lr[20], lr[30] = 0.0, math.inf
    out = R.step_size_settling(lr, window=20)
    assert out["settled"] == pytest.approx(0.1)
    assert out["collapsed_step"] == 20 and out["reached"] == 0 and out["stays"] == 31
    assert R.step_size_settling(torch.full((10,), 0.1), window=5)["collapsed_step"] is None


@pytest.mark.parametrize("lr, window, factor, match", [
    (torch.tensor([]), 1, 2.0, "non-empty"),
    (torch.ones(3, 2), 1, 2.0, "1-D"),
    (torch.ones(5), 0, 2.0, "window"),
    (torch.ones(5), 6, 2.0, "window"),
    (torch.ones(5), 2, 1.0, "factor"),
    (torch.tensor([0.1, -0.1, 0.1]), 2, 2.0, "not NaN"),
    (torch.tensor([0.1, float("nan"), 0.1]), 2, 2.0, "not NaN"),
])
def test_bad_input_is_a_clear_value_error(lr, window, factor, match):
    with pytest.raises(ValueError, match=match):
        R.step_size_settling(lr, window=window, factor=factor)


# ------------------------------------------------------- step_series_per_epoch
def fake_run(label, seed, lr, n_epochs):
    return {"label": label, "seed": seed, "steps": {"lr": torch.as_tensor(lr, dtype=torch.float64)},
            "epochs": [{"epoch": e} for e in range(n_epochs + 1)]}  # epoch 0: before training


def test_per_epoch_reductions_use_each_epochs_own_steps():
    run = fake_run("a", 0, [1.0, 3.0, 10.0, 1000.0], n_epochs=2)
    assert R.step_series_per_epoch(run, "lr", "mean") == pytest.approx([2.0, 505.0])
    assert R.step_series_per_epoch(run, "lr", "geomean") == pytest.approx([math.sqrt(3), 100.0])
    assert R.step_series_per_epoch(run, "lr", "max") == pytest.approx([3.0, 1000.0])
    assert R.step_series_per_epoch(run, "lr", "min") == pytest.approx([1.0, 10.0])


def test_per_epoch_rejects_unknown_reductions_and_uneven_series():
    with pytest.raises(ValueError, match="how"):
        R.step_series_per_epoch(fake_run("a", 0, [1.0, 2.0], 1), how="sum")
    with pytest.raises(ValueError, match="equal epochs"):
        R.step_series_per_epoch(fake_run("a", 0, [1.0, 2.0, 3.0], 2))


def test_per_epoch_of_a_run_without_steps_is_empty():
    assert len(R.step_series_per_epoch(fake_run("a", 0, [], 0))) == 0


def test_plot_per_epoch_draws_one_line_per_label_at_the_mean_over_seeds():
    runs = [fake_run("a", 0, [1.0, 1.0, 4.0, 4.0], 2), fake_run("a", 1, [3.0, 3.0, 2.0, 2.0], 2),
            fake_run("b", 0, [0.1, 0.1, 0.2, 0.2], 2)]
    fig, ax = plt.subplots()
    R.plot_step_series_per_epoch(runs, "lr", "mean", ax=ax)
    drawn = [line for line in ax.get_lines() if len(line.get_xdata())]  # seaborn adds empty legend proxies
    assert len(drawn) == 2
    ys = sorted((list(line.get_ydata()) for line in drawn), key=lambda y: y[0])
    assert np.allclose(ys[0], [0.1, 0.2]) and np.allclose(ys[1], [2.0, 3.0])  # "a": mean over its two seeds
    assert all(np.allclose(line.get_xdata(), [1, 2]) for line in drawn)  # training epochs start at 1
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"a", "b"}
    assert ax.get_yscale() == "log"
    plt.close(fig)


# ---------------------------------------------------------- plot_loss_and_step_size
def test_loss_and_step_size_plot_marks_each_spike_onset_once():
    loss = torch.ones(200)
    loss[120:123] = 50.0  # one spike lasting three steps
    loss[170] = 20.0  # and a second one
    lr = torch.linspace(0.01, 0.1, 200, dtype=torch.float64)
    run = {"label": "x", "seed": 0, "steps": {"loss": loss, "lr": lr}, "epochs": [{}, {}]}
    fig, ax = plt.subplots()
    ax_loss, ax_lr = R.plot_loss_and_step_size(run, ax=ax)
    marks = [line.get_xdata()[0] for line in ax_loss.get_lines() if line.get_color() == "tab:red"]
    assert marks == [120, 170]
    assert np.allclose(ax_lr.get_lines()[0].get_ydata(), lr.numpy())
    # limited to the first steps: the later spikes are not drawn, and neither are later step sizes
    fig2, ax2 = plt.subplots()
    ax_loss, ax_lr = R.plot_loss_and_step_size(run, ax=ax2, first=150)
    assert [line.get_xdata()[0] for line in ax_loss.get_lines() if line.get_color() == "tab:red"] == [120]
    assert len(ax_lr.get_lines()[0].get_ydata()) == 150
    plt.close(fig)
    plt.close(fig2)


# ------------------------------------------- data.cifar10_normalized (CIFAR notebooks)
def test_cifar10_normalized_cuts_then_standardises_the_smoke_stand_in():
    from companion import data as D

    (x, y), (xt, yt) = D.cifar10_normalized("smoke", n_train=40, n_test=10)
    raw = D.load("cifar10", "smoke")
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.float32 and xt.shape == (10, 3, 32, 32)
    assert torch.equal(y, raw["train"][1][:40]) and torch.equal(yt, raw["test"][1][:10])
    assert torch.allclose(x, D.cifar10_normalize(raw["train"][0][:40]))


# ------------------------------------------------------------------ plain_log_ticks
def test_plain_log_ticks_label_a_narrow_log_axis_with_plain_numbers():
    def minor_labels(plain):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [2.300, 2.305])
        ax.set_yscale("log")
        if plain:
            R.plain_log_ticks(ax)
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()]
        plt.close(fig)
        return labels

    assert any("times" in s for s in minor_labels(plain=False))  # matplotlib's default: 2.3x10^0 mathtext
    labels = minor_labels(plain=True)
    assert labels and not any("times" in s or "^" in s for s in labels)
    assert any(s.startswith("2.30") for s in labels)
    with pytest.raises(ValueError, match="axis"):
        R.plain_log_ticks(plt.gca(), axis="z")


def test_plain_log_ticks_keep_neighbouring_labels_apart():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1e-4, 1.007e-4])  # a step size that hardly moved (c = 1.001)
    ax.set_yscale("log")
    R.plain_log_ticks(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()]
    plt.close(fig)
    assert len(labels) >= 3 and len(set(labels)) == len(labels)
    assert all(float(s) == pytest.approx(1e-4, rel=0.01) for s in labels)


def test_epoch_median_ignores_the_nan_ratio_of_a_zero_gradient_step():
    run = {"epochs": [{}, {}, {}], "steps": {"ratio": torch.tensor([0.4, float("nan"), 0.6, 0.5, 0.5, 0.5],
                                                                  dtype=torch.float64)}}
    assert R.step_series_per_epoch(run, "ratio", "median").tolist() == [0.4, 0.5]


def test_nan_median_is_nanmedian_and_says_nan_quietly_for_a_group_without_numbers():
    import warnings

    import numpy as np

    from companion.report import nan_median

    values = [3.0, float("nan"), 1.0, float("inf"), 2.0]
    assert nan_median(values) == np.nanmedian(values)
    assert nan_median([[4.0, float("nan")], [1.0, 2.0]]) == 2.0  # flattened, as np.nanmedian without an axis
    assert nan_median([float("inf"), float("nan"), float("inf")]) == math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # np.nanmedian warns 'All-NaN slice encountered' here
        assert math.isnan(nan_median([float("nan"), float("nan")]))
        assert math.isnan(nan_median([]))
        assert math.isnan(nan_median([-math.inf, math.inf, float("nan")]))  # np.median warns 'invalid value'


def test_mean_std_names_what_a_value_that_is_not_finite_means():
    from companion.report import mean_std

    assert mean_std([1.0, math.nan], 3) == "diverged"  # the default: a run that did not end finite
    assert mean_std([math.nan, math.nan], 3, not_finite="n/a") == "n/a"  # nothing measured
    assert mean_std([1.0, 3.0], 3, not_finite="n/a") == "2 ± 1.4"
