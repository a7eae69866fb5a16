"""Lesson 6's merge figure (course_utils/merge_plots.py): the bars show the numbers passed, on a log axis."""

import matplotlib.patches
import pytest
import torch

from course_utils.merge_plots import logit_gap, plot_logit_gaps


def test_logit_gap_is_max_and_mean_of_the_absolute_difference():
    reference = torch.zeros(2, 3)
    logits = torch.tensor([[1.0, -2.0, 0.0],  # |Δ| = 1, 2, 0
                           [0.0, 0.0, -3.0]])  # |Δ| = 0, 0, 3
    assert logit_gap(logits, reference) == (3.0, 1.0)  # max 3, mean 6 / 6
    with pytest.raises(ValueError, match="not the same prompts"):
        logit_gap(logits, torch.zeros(3, 3))


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle)]


def test_bars_are_the_values_passed_on_a_log_axis_with_labels():
    gaps = {"merged": (1.3e-4, 1.4e-5), "naive": (7.3, 0.65), "adapter on vs off": (4.5, 0.63)}
    fig = plot_logit_gaps(gaps, tolerance=1e-3)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    bars = _bars(ax)
    assert len(bars) == 2 * len(gaps)
    max_bars, mean_bars = bars[:3], bars[3:]  # one barh call per statistic, methods in the order given
    assert [b.get_width() for b in max_bars] == pytest.approx([v[0] for v in gaps.values()])
    assert [b.get_width() for b in mean_bars] == pytest.approx([v[1] for v in gaps.values()])
    # the first method is drawn on top; tick labels are the methods
    by_label = {t.get_text(): t.get_position()[1] for t in ax.get_yticklabels()}
    assert set(by_label) == set(gaps) and by_label["merged"] > by_label["naive"] > by_label["adapter on vs off"]
    assert max_bars[0].get_y() > max_bars[1].get_y()
    texts = {t.get_text() for t in ax.texts}
    assert {"1.3e-04", "1.4e-05", "7.3e+00", "6.5e-01"} <= texts  # every bar carries its number
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("max" in t for t in legend) and any("mean" in t for t in legend) and any("0.001" in t for t in legend)
    low, high = ax.get_xlim()
    assert low <= 1.4e-5 and high >= 7.3  # every bar inside the axis
    assert "log" in ax.get_xlabel()


def test_a_zero_is_drawn_at_a_floor_and_labelled_zero():
    fig = plot_logit_gaps({"identical": (0.0, 0.0), "different": (1e-2, 1e-3)})
    ax = fig.axes[0]
    widths = [b.get_width() for b in _bars(ax)]
    assert min(widths) == pytest.approx(1e-4) and all(w > 0 for w in widths)  # a tenth of the smallest positive
    assert [t.get_text() for t in ax.texts].count("0") == 2


def test_refuses_nothing_and_negative_values():
    with pytest.raises(ValueError):
        plot_logit_gaps({})
    with pytest.raises(ValueError):
        plot_logit_gaps({"bad": (-1.0, 0.1)})
