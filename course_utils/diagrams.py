"""Diagrams the lessons draw: LoRA's matrices to scale, and the RLHF pipeline beside DPO's.

Like :mod:`course_utils.plots`, every function returns a ``matplotlib.figure.Figure`` built without
``pyplot`` (nothing is shown twice, nothing piles up in pyplot's global state); save one with
:func:`course_utils.plots.save_figure`. Drawn with matplotlib patches only: no image files, nothing downloaded.

The shapes carry a ``gid`` (``"W"``, ``"B"``, ``"A"``; ``"rlhf:0"``, ``"dpo:2"``, ...) so that tests can
find them and check the geometry, not just that a figure came back.
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

FROZEN, TRAINED = "#c8d3e0", "#f4a259"  # grey-blue: left alone; orange: what the optimiser updates


def lora_parameter_counts(d: int, k: int, r: int) -> dict[str, int]:
    """Entries of the frozen ``W`` (d×k) and of LoRA's ``B`` (d×r) and ``A`` (r×k) (Hu et al., 2021, Eq. 3)."""
    if min(d, k, r) < 1:
        raise ValueError(f"d, k and r must be positive, got d={d}, k={k}, r={r}")
    return {"W": d * k, "B": d * r, "A": r * k}


def plot_lora(d: int, k: int, r: int, alpha: float | None = None, title: str | None = None) -> Figure:
    """LoRA on one weight matrix, to scale: ``W' = W + (alpha/r) · B · A``.

    One unit of length is one row or column, so each box's **area is its parameter count**: the frozen
    ``W`` (d×k) beside the trainable ``B`` (d×r, initialised to zero, so ``W' = W`` at step 0) and ``A``
    (r×k, random). ``B`` and ``A`` are drawn where their product ``B·A`` (d×k, rank ≤ r) would sit.

    Args:
        d, k: the weight's output and input sizes (e.g. a model's hidden size for an attention projection).
        r: the LoRA rank (``Preset.lora_r``).
        alpha: ``lora_alpha``; when given, the scale ``alpha/r`` is written in the formula.
        title: replaces the default title (which states the scale and the trainable fraction).
    """
    counts = lora_parameter_counts(d, k, r)
    trainable = counts["B"] + counts["A"]
    gap = 0.3 * k  # room for the "+" and the labels between W and B·A, in matrix units
    fig = Figure(figsize=(8.0, 8.0 * d / (2 * k + gap + r) * 0.75 + 1.6), layout="constrained")
    ax = fig.add_subplot()
    # Rows run downwards, as a matrix is written: W spans y in [-d, 0].
    boxes = {
        "W": Rectangle((0, -d), k, d, facecolor=FROZEN, edgecolor="black", gid="W"),
        "B": Rectangle((k + gap, -d), r, d, facecolor=TRAINED, edgecolor="black", gid="B"),
        "A": Rectangle((k + gap + r, -r), k, r, facecolor=TRAINED, edgecolor="black", gid="A"),
    }
    for box in boxes.values():
        ax.add_patch(box)
    # Where the product lands: B·A is d×k like W but is never stored; only B and A are.
    ax.add_patch(Rectangle((k + gap + r, -d), k, d - r, facecolor="none", edgecolor="0.5", linestyle="--", gid="BA"))
    ax.text(k + gap + r + k / 2, -d * 0.62, f"B · A: {d} × {k}, rank ≤ {r}\n(computed, never stored)", color="0.35",
            va="center", fontsize=9, ha="center")
    small = dict(fontsize=9, ha="center")
    ax.text(k / 2, -d / 2, f"W (frozen)\n{d} × {k}\n{counts['W']:,} parameters", va="center", **small)
    # B and A are thin at real ranks: their labels go outside the boxes, next to the edge they belong to.
    ax.text(k + gap - 0.03 * k, -d / 2, f"B (trained,\nstarts at 0)\n{d} × {r}\n{counts['B']:,}\nparameters",
            va="center", fontsize=9, ha="right")
    ax.text(k + gap + r + k / 2, -r - 0.04 * d, f"A (trained, random init)\n{r} × {k}\n{counts['A']:,} parameters",
            va="top", **small)
    scale = f"({alpha:g}/{r})" if alpha is not None else "(α/r)"
    ax.text(k + gap / 2 - 0.02 * k, d * 0.08, f"W' = W + {scale} · B · A", fontsize=11, ha="center", va="bottom")
    ax.set_xlim(-0.02 * k, 2 * k + gap + r + 0.02 * k)
    ax.set_ylim(-d * 1.02, d * 0.2)
    ax.set_aspect("equal")  # to scale: one row = one column = one unit
    ax.set_axis_off()
    ax.set_title(title or (f"LoRA, drawn to scale (area = parameters): trains d·r + r·k = {trainable:,}, "
                           f"{trainable / counts['W']:.1%} of W's d·k = {counts['W']:,}"), fontsize=10)
    return fig


# The two pipelines, left to right. A stage is (label, column): DPO's stages sit under the RLHF stage
# they replace, so the columns it leaves empty are what DPO does without.
RLHF_STAGES = [
    ("SFT model", 0),
    ("sample pairs\n(2 answers\nper prompt)", 1),
    ("human / judge\npreferences", 2),
    ("reward model\n(Bradley-Terry)", 3),
    ("PPO / RLOO:\nsample, score,\nupdate; KL to\nreference", 4),
    ("policy", 5),
]
DPO_STAGES = [
    ("SFT model", 0),
    ("preference pairs\n(the same data)", 2),
    ("DPO loss on\nthe pairs directly;\nKL to reference\nbuilt in", 4),
    ("policy", 5),
]


def plot_rlhf_vs_dpo() -> Figure:
    """The RLHF pipeline (top row) against DPO's (bottom row): boxes for the stages, arrows between them.

    DPO's boxes are placed under the RLHF stage they stand for, so the gap in its row is the reward model
    and the online RL loop that DPO does not need.
    """
    fig = Figure(figsize=(11.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    width, height, step = 1.5, 1.15, 1.85  # box size and column pitch, in axis units
    for row, (name, stages, y) in enumerate([("RLHF", RLHF_STAGES, 1.6), ("DPO", DPO_STAGES, 0.0)]):
        ax.text(-0.35, y + height / 2, name, fontsize=12, fontweight="bold", ha="right", va="center")
        centres = []
        for i, (label, column) in enumerate(stages):
            x = column * step
            learned = label.startswith(("reward model", "PPO", "DPO"))  # the stages that train something
            ax.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.04", gid=f"{name.lower()}:{i}",
                                        facecolor=TRAINED if learned else FROZEN, edgecolor="black", label=label))
            ax.text(x + width / 2, y + height / 2, label, fontsize=8.5, ha="center", va="center")
            centres.append(x)
        for i, (left, right) in enumerate(zip(centres, centres[1:])):
            ax.add_patch(FancyArrowPatch((left + width + 0.05, y + height / 2), (right - 0.05, y + height / 2),
                                         arrowstyle="-|>", mutation_scale=14, color="black",
                                         gid=f"{name.lower()}-arrow:{i}"))
    ax.set_xlim(-1.0, 5 * step + width + 0.1)
    ax.set_ylim(-0.15, 1.6 + height + 0.15)
    ax.set_axis_off()
    ax.set_title("RLHF trains a reward model, then runs RL against it; DPO trains the policy on the pairs "
                 "(orange: stages that train)", fontsize=10)
    return fig
