"""Lesson 6's picture of merge quality: how far each merged model's logits are from the unmerged model.

A merge is right when the merged model computes what base + adapter computed. Lesson 6 measures that on the
same prompts for every way of merging it tries (``export.prompt_logits``: one float32 row of vocabulary size
per real token) and summarises each comparison by two numbers, the largest and the mean ``|Δlogit|``
(:func:`logit_gap`). :func:`plot_logit_gaps` draws them side by side on a log axis, where a factor of ten is one
step, next to the adapter's own effect (adapter on vs off): the scale a merge error is small or large against.

The figure is built without ``pyplot`` (as in ``plots.py``), so a notebook shows it once; save it with
``plots.save_figure``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from matplotlib.figure import Figure

STATS = ("max", "mean")  # the two bars of every method, in this order
COLORS = {"max": "#c0504d", "mean": "#4f81bd"}


def logit_gap(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(max, mean)`` of ``|logits - reference|`` over every entry.

    Both are ``(tokens, vocab)`` logits of the same prompts, as ``export.prompt_logits`` returns them.
    """
    if logits.shape != reference.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} and {tuple(reference.shape)}: not the same prompts")
    diff = (logits.float() - reference.float()).abs()
    return diff.max().item(), diff.mean().item()


def plot_logit_gaps(gaps: Mapping[str, tuple[float, float]], *, tolerance: float | None = None,
                    title: str = "Merged vs unmerged: |Δlogit| on the same prompts") -> Figure:
    """Horizontal bars of the max and mean ``|Δlogit|`` of every method in ``gaps`` (label -> (max, mean)).

    The x axis is logarithmic; each bar is labelled with its value. A value of exactly 0 cannot sit on a log
    axis: its bar is drawn at a tenth of the smallest positive value and labelled "0". ``tolerance`` adds a
    dashed line at the lesson's check threshold. Methods are drawn top to bottom in the order given.
    """
    if not gaps:
        raise ValueError("nothing to plot: no method was measured")
    labels = list(gaps)
    values = np.array([[float(gaps[k][0]), float(gaps[k][1])] for k in labels])  # (methods, 2)
    if (values < 0).any() or not np.isfinite(values).all():
        raise ValueError(f"|Δlogit| must be finite and >= 0, got {values.tolist()}")
    positive = values[values > 0]
    floor = (positive.min() if positive.size else 1.0) / 10  # where a zero is drawn
    fig = Figure(figsize=(8, 0.55 * len(labels) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(labels))[::-1]  # first method on top
    height = 0.38
    for j, stat in enumerate(STATS):
        widths = np.where(values[:, j] > 0, values[:, j], floor)
        bars = ax.barh(y + (0.5 - j) * height, widths, height=height, color=COLORS[stat], label=f"{stat} |Δlogit|")
        for bar, value in zip(bars, values[:, j]):
            ax.annotate(f"{value:.1e}" if value > 0 else "0", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    if tolerance is not None:
        ax.axvline(tolerance, color="0.3", linestyle="--", linewidth=1, label=f"tolerance of the checks ({tolerance:g})")
    ax.set_xscale("log")
    low, high = floor / 2, values.max() * 30  # room for the value labels on the right
    if tolerance is not None:
        low, high = min(low, tolerance / 2), max(high, tolerance * 2)
    ax.set_xlim(low, high)
    ax.set_yticks(y, labels)
    ax.set_xlabel("|logit difference| (log scale)")
    ax.set_title(title, fontsize=10)
    fig.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    ax.grid(axis="x", which="major", alpha=0.3)
    return fig
