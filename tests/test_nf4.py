"""course_utils.nf4: NF4's levels as bitsandbytes stores them, as QLoRA builds them, and as a CPU quantisation
returns them, agree; the figure of lesson 4 draws them. Fast: one 64-value block, no model."""

from __future__ import annotations

import numpy as np
import pytest

from course_utils.nf4 import nf4_levels, normal_quantile_levels, plot_nf4_levels, quantised_levels


def test_bitsandbytes_table_is_16_sorted_levels_with_an_exact_zero():
    levels = nf4_levels().numpy()
    assert levels.shape == (16,) and np.all(np.diff(levels) > 0)
    assert levels[0] == -1.0 and levels[-1] == 1.0 and 0.0 in levels
    assert (levels < 0).sum() == 7 and (levels > 0).sum() == 8  # one more positive level, so that 0 is exact


def test_normal_quantiles_rebuild_the_table():
    # the construction of QLoRA (bitsandbytes' create_normal_map) in float64 vs bitsandbytes' float32 table
    assert normal_quantile_levels() == pytest.approx(nf4_levels().numpy(), abs=1e-6)


def test_levels_are_dense_near_zero():
    gaps = np.diff(normal_quantile_levels())
    assert gaps.max() == gaps[0] and gaps.max() > 3 * gaps.min()  # widest in the tails, narrowest around 0
    assert np.argmin(gaps) in (7, 8)  # the two gaps next to 0


@pytest.mark.parametrize("scale", [3.0, 0.02])
def test_cpu_quantisation_returns_exactly_these_levels(scale):
    # a ramp through quantize_4bit / dequantize_4bit on the CPU: every value comes back as level * absmax
    back = quantised_levels(scale=scale).numpy()
    assert back == pytest.approx(nf4_levels().numpy(), abs=1e-6)


def test_plot_draws_the_levels():
    fig = plot_nf4_levels()
    ax = fig.axes[0]
    dots = [line for line in ax.get_lines() if line.get_marker() == "o"][0]
    assert np.allclose(dots.get_xdata(), nf4_levels().numpy())
    assert "[-1, 1]" in ax.get_title()
