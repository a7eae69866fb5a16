"""Plots the lessons show: the DPO loss and its gradient weight, the toy problem, token lengths.

Every function returns a ``matplotlib.figure.Figure`` built without ``pyplot``, so nothing
is shown twice in a notebook (the cell's last expression displays it once) and nothing
accumulates in pyplot's global state when tests call these in a loop. Save one with
:func:`save_figure`, which writes byte-identical PNGs for identical figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from matplotlib.figure import Figure

# Per-row counts come from templates (one implementation behind length_stats and these plots).
from .templates import LENGTH_KEYS, token_lengths  # noqa: F401 (token_lengths: re-exported)


def _margins(margins, span: float = 20.0) -> np.ndarray:
    return np.linspace(-span, span, 401) if margins is None else np.asarray(margins, dtype=float)


def _axes(ax, figsize=(5.5, 3.6)):
    """``(figure, ax)``: draw into ``ax`` when given, else into a fresh one-panel figure."""
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def dpo_loss_curve(margins, beta: float) -> np.ndarray:
    """``-log σ(βΔ)`` for log-ratio margins ``Δ`` (Eq. 7 of Rafailov et al., 2023), elementwise."""
    return np.logaddexp(0.0, -beta * np.asarray(margins, dtype=float))  # log(1 + e^{-βΔ}), stable


def gradient_weight_curve(margins, beta: float) -> np.ndarray:
    """``σ(-βΔ) = σ(r̂_l - r̂_w)``, the per-pair weight of the DPO gradient (Section 4), elementwise."""
    return 1.0 / (1.0 + np.exp(beta * np.asarray(margins, dtype=float)))


def plot_dpo_loss_curves(betas: Iterable[float], margins=None, ax=None) -> Figure:
    """DPO loss against the log-ratio margin, one curve per β.

    The x-axis is ``Δ = log π(y_w)/π_ref(y_w) - log π(y_l)/π_ref(y_l)``, how much more the
    policy has moved towards the chosen answer than towards the rejected one; the loss is
    ``-log σ(βΔ)``. Every curve passes through ``ln 2`` at ``Δ = 0`` (policy = reference).

    Args:
        betas: the β values to compare.
        margins: x values; default ``linspace(-20, 20, 401)``.
        ax: draw into this Axes instead of a new figure.
    """
    x = _margins(margins)
    fig, ax = _axes(ax)
    for beta in betas:
        ax.plot(x, dpo_loss_curve(x, beta), label=rf"$\beta$ = {beta:g}")
    ax.axhline(np.log(2), color="0.6", lw=0.8, ls="--")
    ax.annotate("ln 2 at step 0", (x[-1], np.log(2)), xytext=(0, 3), textcoords="offset points", fontsize=8,
                color="0.4", ha="right")
    ax.axvline(0, color="0.6", lw=0.8)
    # Steep β curves would hide the region around ln 2; what happens beyond 3.5 is a straight line.
    ax.set(xlabel=r"log-ratio margin $\Delta$ (chosen minus rejected)", ylabel=r"loss $-\log\sigma(\beta\Delta)$",
           title="DPO loss (Eq. 7)", ylim=(0, 3.5))
    ax.legend()
    return fig


def plot_gradient_weight(betas: Iterable[float], margins=None, ax=None) -> Figure:
    """Weight of a pair in the DPO gradient, ``σ(r̂_l - r̂_w) = σ(-βΔ)``, against ``Δ``, one curve per β.

    Near 1 when the implicit reward ranks the pair the wrong way (``Δ < 0``), near 0 once it
    ranks it right by a margin of a few ``1/β``. Same arguments as :func:`plot_dpo_loss_curves`.
    """
    x = _margins(margins)
    fig, ax = _axes(ax)
    for beta in betas:
        ax.plot(x, gradient_weight_curve(x, beta), label=rf"$\beta$ = {beta:g}")
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set(xlabel=r"log-ratio margin $\Delta$ (chosen minus rejected)", ylabel=r"weight $\sigma(\hat r_l - \hat r_w)$",
           title="How hard DPO pushes on a pair (Section 4)", ylim=(-0.02, 1.02))
    ax.legend()
    return fig


def plot_toy_fit(ref_probs, target, fits: Mapping[str, object], target_label: str = r"$\pi^*$ (Eq. 4)") -> Figure:
    """The toy problem of lesson 2: policies side by side, and how fast each fit reaches the target.

    Args:
        ref_probs: ``(K,)`` reference distribution.
        target: ``(K,)`` the closed-form optimum π*.
        fits: name -> :class:`course_utils.toy.Fit` (anything with ``.policy`` ``(K,)`` and
            ``.policies`` ``(steps + 1, K)``).
        target_label: legend entry for ``target``.

    Left: bars of π_ref, π* and each fitted policy per response. Right: ``KL(π_step || π*)``
    against the optimisation step, log scale.
    """
    from .toy import kl

    ref_probs, target = np.asarray(ref_probs, dtype=float), np.asarray(target, dtype=float)
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    bars, curves = fig.subplots(1, 2)
    series = {r"$\pi_{\mathrm{ref}}$": ref_probs, target_label: target, **{k: np.asarray(f.policy, dtype=float) for k, f in fits.items()}}
    k, width = len(ref_probs), 0.8 / len(series)
    for i, (name, probs) in enumerate(series.items()):
        bars.bar(np.arange(k) + (i - (len(series) - 1) / 2) * width, probs, width, label=name)
    bars.set(xticks=range(k), xticklabels=[f"y{j}" for j in range(k)], ylabel="probability",
             title="Policies over the responses")
    bars.legend(fontsize=8)
    for name, fit in fits.items():
        gaps = np.asarray(kl(fit.policies, np.asarray(target)), dtype=float)
        curves.semilogy(np.clip(gaps, 1e-16, None), label=name)
    curves.set(xlabel="optimisation step", ylabel=r"$\mathrm{KL}(\pi_{\mathrm{step}}\,\|\,\pi^*)$",
               title="Distance to the closed-form optimum")
    curves.legend(fontsize=8)
    return fig


def fraction_over(lengths: Mapping[str, list[int]], max_length: int) -> float:
    """Fraction of rows TRL would truncate: ``prompt + chosen`` or ``prompt + rejected`` over ``max_length``."""
    longest = np.maximum(lengths["prompt+chosen"], lengths["prompt+rejected"])
    return float(np.mean(longest > max_length)) if len(longest) else 0.0


def plot_length_histograms(stats_or_dataset, tokenizer=None, max_length: int | None = None, bins: int = 20) -> Figure:
    """Histograms of prompt, chosen and rejected token lengths, and of the whole sequences (2 x 2 panels).

    All panels share one set of bins from 0 to past ``max_length``, so their spreads compare at a glance.

    Args:
        stats_or_dataset: per-row lengths from :func:`token_lengths`, or preference rows (a
            ``datasets.Dataset`` or list of dicts), which are then counted with ``tokenizer``.
        tokenizer: needed only when rows are passed.
        max_length: ``DPOConfig.max_length``; drawn as a red line on every panel (it caps
            prompt + answer), and the share of rows over it goes in the last panel's title.
        bins: histogram bins per panel.
    """
    if isinstance(stats_or_dataset, Mapping) and "prompt+chosen" in stats_or_dataset:
        lengths = stats_or_dataset
    else:
        if tokenizer is None:
            raise ValueError("pass a tokenizer to count the tokens of a dataset, or lengths from token_lengths()")
        lengths = token_lengths(stats_or_dataset, tokenizer)
    longest = max([max(lengths[k], default=0) for k in LENGTH_KEYS] + [max_length or 0, 1])
    edges = np.linspace(0, 1.05 * longest, bins + 1)
    fig = Figure(figsize=(11, 6.2), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    panels = [("prompt", ["prompt"]), ("chosen answer", ["chosen"]), ("rejected answer", ["rejected"]),
              ("prompt + answer", ["prompt+chosen", "prompt+rejected"])]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            values = np.asarray(lengths[key])
            label = f"{key}: median {np.median(values):g}" if len(values) else key
            ax.hist(values, bins=edges, alpha=0.6 if len(keys) > 1 else 0.9, label=label)
        if max_length is not None:
            ax.axvline(max_length, color="tab:red", lw=1.5, label=f"max_length = {max_length}")
        ax.set(title=title, ylabel="rows")
        ax.legend(fontsize=8)
    for ax in axes[2:]:
        ax.set_xlabel("tokens (as TRL counts them: template and EOS included)")
    if max_length is not None:
        axes[-1].set_title(f"prompt + answer: {fraction_over(lengths, max_length):.0%} of pairs over max_length")
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG with no software or date metadata, so reruns give identical files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    return path


def optimal_policy_curves(ref_probs, rewards, betas) -> np.ndarray:
    """``π*_β(y) ∝ π_ref(y) exp(r(y)/β)`` (Eq. 4 of Rafailov et al., 2023) for each β: ``(B,)`` -> ``(B, K)``.

    One row per β, one column per response; every row is a distribution. As β → ∞ the rows tend to
    ``π_ref``, as β → 0 to all mass on the highest-reward response (among those ``π_ref`` can produce).
    """
    from .toy import optimal_policy

    return np.stack([np.asarray(optimal_policy(ref_probs, rewards, float(b)), dtype=float) for b in betas])


def plot_optimal_policy_vs_beta(ref_probs, rewards, betas=None, mark_beta: float | None = None, ax=None) -> Figure:
    """π*(y) of Eq. 4 against β on a log axis, one curve per response, with both limits marked.

    Left edge (β → 0): a marker at 1 for the highest-reward response and at 0 for the others. Right edge
    (β → ∞): a marker at ``π_ref(y)`` for every response. The curves run between the two.

    Args:
        ref_probs, rewards: ``(K,)`` the reference distribution and the reward of the toy problem.
        betas: x values; default ``logspace(-2, 2, 161)``.
        mark_beta: draw a vertical line at this β (the lesson's own), if given.
        ax: draw into this Axes instead of a new figure.
    """
    ref_probs, rewards = np.asarray(ref_probs, dtype=float), np.asarray(rewards, dtype=float)
    betas = np.logspace(-2, 2, 161) if betas is None else np.asarray(betas, dtype=float)
    curves = optimal_policy_curves(ref_probs, rewards, betas)  # (B, K)
    fig, ax = _axes(ax, figsize=(7.5, 4.0))
    lo, hi = betas.min() / 1.8, betas.max() * 1.8  # where the two limits are drawn, just outside the curves
    best = int(np.argmax(np.where(ref_probs > 0, rewards, -np.inf)))
    for k in range(len(ref_probs)):
        (line,) = ax.semilogx(betas, curves[:, k], label=f"y{k} (r = {rewards[k]:+.2f})")
        ax.plot([lo], [1.0 if k == best else 0.0], marker="<", color=line.get_color(), ms=7, clip_on=False)
        ax.plot([hi], [ref_probs[k]], marker="o", color=line.get_color(), ms=6, clip_on=False)
    ax.annotate(r"$\beta\to 0$: argmax $r$", (lo, 1.0), xytext=(6, -4), textcoords="offset points", fontsize=8,
                color="0.35", va="top")
    ax.annotate(r"$\beta\to\infty$: $\pi_{\mathrm{ref}}$", (hi, curves[-1].max()), xytext=(-4, 8),
                textcoords="offset points", fontsize=8, color="0.35", ha="right")
    if mark_beta is not None:
        ax.axvline(mark_beta, color="0.6", lw=0.8, ls="--")
        ax.annotate(rf"$\beta$ = {mark_beta:g}", (mark_beta, 1.0), xytext=(3, -4), textcoords="offset points",
                    fontsize=8, color="0.4", va="top")
    ax.set(xlabel=r"$\beta$ (log scale)", ylabel=r"$\pi^*(y)$", title=r"The optimum of Eq. 3 across $\beta$ (Eq. 4)",
           xlim=(lo, hi), ylim=(-0.02, 1.02))
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig
