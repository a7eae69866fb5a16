"""NF4, QLoRA's 4-bit NormalFloat: its 16 levels, where they come from, and a picture of them (lesson 4, 1.1).

QLoRA (Dettmers et al., 2023, Section 3) stores each weight of a block of 64 as one of 16 levels in [-1, 1],
times the block's absolute maximum (``absmax``). The levels are quantiles of a standard normal distribution,
so that pretrained weights, which are roughly normal, fall into each level about equally often: the levels are
dense near 0, where most weights are, and sparse in the tails. The 4-bit code is only an index into this table.

* :func:`nf4_levels` reads the table bitsandbytes quantises with (``bitsandbytes.functional.get_4bit_type``);
* :func:`normal_quantile_levels` builds it from the normal quantiles, as bitsandbytes' ``create_normal_map``
  does, with the standard library's ``NormalDist`` instead of scipy;
* :func:`quantised_levels` quantises a ramp with bitsandbytes on the CPU and returns the distinct values it
  came back as, divided by ``absmax``: what NF4 actually does (``tests/test_nf4.py`` checks that all three agree);
* :func:`plot_nf4_levels` draws the levels on the normal density they were built from.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import torch
from matplotlib.figure import Figure

# bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True) builds NF4: the outermost level sits at
# the 96.77 % quantile of N(0, 1), about 1.85 standard deviations (the value QLoRA's authors chose; a quantile of
# 1 would be infinite).
NF4_OFFSET = 0.9677083


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels bitsandbytes quantises to, sorted, in [-1, 1]: ``(16,)`` float32 on the CPU."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device="cpu").sort().values


def normal_quantile_levels(offset: float = NF4_OFFSET) -> np.ndarray:
    """The 16 levels built from N(0, 1): ``(16,)`` float64, sorted, the largest 1, one exactly 0.

    Eight positive levels at the normal quantiles of 8 evenly spaced probabilities from ``offset`` down to (not
    including) 0.5, seven negative levels mirrored from 7 probabilities over the same range, and 0 itself, all
    divided by the largest. One half gets a level more so that 0 is a level exactly (4 bits give 16 codes; a
    symmetric set around an exact 0 would use only 15). Same construction as bitsandbytes' ``create_normal_map``.
    """
    ppf = NormalDist().inv_cdf
    positive = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    levels = np.sort(np.array(positive + [0.0] + negative))
    return levels / levels.max()


def quantised_levels(blocksize: int = 64, scale: float = 3.0) -> torch.Tensor:
    """What NF4 does to a ramp: the distinct dequantised values divided by ``absmax``, sorted (CPU, bitsandbytes).

    A ramp from ``-scale`` to ``scale`` in one block of ``blocksize`` values is quantised with
    ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")`` and dequantised; the ramp's steps (2 * scale /
    (blocksize - 1)) are finer than NF4's closest levels, so every level is hit.
    """
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    ramp = torch.linspace(-scale, scale, blocksize)
    packed, state = quantize_4bit(ramp, blocksize=blocksize, quant_type="nf4")
    back = dequantize_4bit(packed, state)
    return torch.unique(back / state.absmax.reshape(-1)[0])


def plot_nf4_levels(levels=None, offset: float = NF4_OFFSET, ax=None) -> Figure:
    """NF4's 16 levels on the normal density they were built from, with 16 evenly spaced levels below for contrast.

    The density is that of N(0, 1) in the levels' units: a weight ``z`` standard deviations from the mean sits at
    ``z / z_max``, with ``z_max`` the ``offset`` quantile (where the level 1 was put).

    Args:
        levels: the 16 levels; default :func:`nf4_levels` (bitsandbytes' own table).
        offset: the quantile mapped to 1 (:data:`NF4_OFFSET`).
        ax: draw into this Axes instead of a new figure.
    """
    levels = np.asarray(nf4_levels() if levels is None else levels, dtype=float)
    if ax is None:
        fig = Figure(figsize=(7.5, 3.8), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    z_max = NormalDist().inv_cdf(offset)
    x = np.linspace(-1.25, 1.25, 501)
    density = z_max * np.exp(-0.5 * (x * z_max) ** 2) / np.sqrt(2 * np.pi)  # N(0, 1) with z rescaled to z / z_max
    ax.fill_between(x, density, color="C0", alpha=0.15, lw=0)
    ax.plot(x, density, color="C0", lw=1.2, label="normal density of the weights (rescaled like the levels)")
    at = z_max * np.exp(-0.5 * (levels * z_max) ** 2) / np.sqrt(2 * np.pi)
    ax.vlines(levels, 0, at, color="C3", lw=1.4)
    ax.plot(levels, np.zeros_like(levels), "o", color="C3", ms=5, label=f"NF4: {len(levels)} levels")
    even = np.linspace(-1, 1, len(levels))
    low = -0.08 * density.max()
    ax.plot(even, np.full_like(even, low), "|", color="0.45", ms=10, mew=1.5,
            label=f"{len(levels)} evenly spaced levels, for contrast")
    zero = levels[np.argmin(np.abs(levels))]
    ax.annotate(f"an exact {zero:g}", (zero, 0), xytext=(0, -38), textcoords="offset points", ha="center",
                va="top", fontsize=8, color="C3", arrowprops=dict(arrowstyle="-", color="C3", lw=0.6))
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_xlim(-1.25, 1.25)
    ax.set_ylim(4.2 * low, density.max() * 1.08)
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= density.max() * 1.08])
    ax.set_xlabel("weight / absmax of its block of 64")
    ax.set_ylabel("density")
    ax.set_title("NF4: 16 levels at quantiles of N(0, 1), normalised to [-1, 1]")
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return fig
