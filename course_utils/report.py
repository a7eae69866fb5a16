"""Reading an evaluation: side-by-side tables, a length-bias analysis, and the plots of lesson 5.

:func:`course_utils.evaluate.evaluate_against_reference` returns, besides its summary
numbers, ``examples``: one dict per (prompt, sample) with the policy's and the
reference's completion and their ground-truth scores. Everything here starts from
those examples, turned into a DataFrame by :func:`examples_frame`:

    frame = examples_frame(result["examples"], tokenizer)   # (N, 7): texts, scores, token lengths
    bias = length_bias(frame)                               # does DPO just write longer?
    by_len = win_rate_by_length(frame, tolerance=4)         # win rate when lengths are comparable

Why length: preference data often prefers the longer answer, and DPO can learn "longer
wins" instead of the property the data was about (Park et al., 2024, "Disentangling
Length from Quality in DPO"). Here the judge scores sentiment, so a policy that only wrote
more would not win by VADER alone - but the check is cheap and the habit matters.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .evaluate import win_rate

SIDES = ("policy", "reference")
COLORS = {"policy": "C1", "reference": "C0"}


def token_lengths(tokenizer, texts) -> np.ndarray:
    """``(N,)`` int array: tokens in each text, without special tokens (what ``max_new_tokens`` caps)."""
    return np.array([len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts], dtype=int)


def examples_frame(examples: list[dict], tokenizer) -> pd.DataFrame:
    """The ``examples`` of ``evaluate_against_reference`` as an ``(N, 7)`` DataFrame.

    Columns: ``prompt``, ``policy``, ``reference`` (texts), ``policy_score``,
    ``reference_score`` (judge, -1..1), ``policy_tokens``, ``reference_tokens``; one row per
    paired sample (same prompt, same seed for both models).
    """
    frame = pd.DataFrame(examples)[["prompt", "policy", "reference", "policy_score", "reference_score"]]
    for side in SIDES:
        frame[f"{side}_tokens"] = token_lengths(tokenizer, frame[side])
    return frame


def _spearman(x, y) -> float:
    """Rank correlation (ties get their mean rank); NaN when either side is constant."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def length_bias(frame: pd.DataFrame, max_new_tokens: int | None = None) -> pd.DataFrame:
    """Per model: mean and median length, share cut at the cap, and how reward tracks length.

    Args:
        frame: from :func:`examples_frame`.
        max_new_tokens: the generation cap; completions this long were cut off, so their
            length says little (omit to skip that column).

    Returns:
        ``(2, k)`` DataFrame indexed by ``policy`` / ``reference``: ``mean_tokens``,
        ``median_tokens``, (``at_cap``), ``reward_length_spearman`` (rank correlation of
        score and length; NaN when all lengths or scores are equal) and ``mean_reward``.
    """
    rows = {}
    for side in SIDES:
        lengths, scores = frame[f"{side}_tokens"].to_numpy(), frame[f"{side}_score"].to_numpy()
        row = {"mean_tokens": lengths.mean(), "median_tokens": float(np.median(lengths))}
        if max_new_tokens is not None:
            row["at_cap"] = float((lengths >= max_new_tokens).mean())
        row["reward_length_spearman"] = _spearman(scores, lengths)
        row["mean_reward"] = scores.mean()
        rows[side] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def win_rate_by_length(frame: pd.DataFrame, tolerance: int = 4, seed: int = 0) -> pd.DataFrame:
    """Win rate of the policy split by how its length compares with its paired reference sample.

    Each pair falls in one bucket by ``d = policy_tokens - reference_tokens``:
    ``shorter`` (d < -tolerance), ``similar`` (|d| <= tolerance), ``longer`` (d > tolerance).
    If DPO won only by writing more, its wins would sit in ``longer`` and ``similar`` would
    be near 50%. ``similar`` is the length-controlled win rate.

    Returns:
        ``(4, 5)`` DataFrame indexed by ``all``, ``shorter``, ``similar``, ``longer`` with
        ``pairs``, ``win_rate``, ``ci_low``, ``ci_high`` (bootstrap 95%, ties count half) and
        ``share`` of all pairs; NaN rates for empty buckets.
    """
    d = frame["policy_tokens"].to_numpy() - frame["reference_tokens"].to_numpy()
    buckets = {"all": np.ones_like(d, dtype=bool), "shorter": d < -tolerance,
               "similar": np.abs(d) <= tolerance, "longer": d > tolerance}
    rows = {}
    for name, mask in buckets.items():
        n = int(mask.sum())
        if n == 0:
            rows[name] = {"pairs": 0, "win_rate": np.nan, "ci_low": np.nan, "ci_high": np.nan, "share": 0.0}
            continue
        wr = win_rate(frame["policy_score"].to_numpy()[mask], frame["reference_score"].to_numpy()[mask], seed=seed)
        rows[name] = {"pairs": n, "win_rate": wr.rate, "ci_low": wr.ci_low, "ci_high": wr.ci_high,
                      "share": n / len(d)}
    return pd.DataFrame.from_dict(rows, orient="index")


def prompt_bootstrap_ci(frame: pd.DataFrame, seed: int = 0, resamples: int = 10_000) -> tuple[float, float]:
    """95% CI of the win rate resampling *prompts* (with all their samples), not single pairs.

    With several samples per prompt the pairs are not independent (an easy prompt makes
    every sample win), so the pair-level bootstrap of ``evaluate.win_rate`` is a little too
    narrow. This cluster bootstrap draws prompts with replacement. Returns ``(low, high)``.
    """
    p, r = frame["policy_score"].to_numpy(), frame["reference_score"].to_numpy()
    outcome = np.where(p > r, 1.0, np.where(p < r, 0.0, 0.5))
    codes, _ = pd.factorize(frame["prompt"])
    wins = np.bincount(codes, weights=outcome)  # (P,) summed outcomes per prompt
    counts = np.bincount(codes).astype(float)  # (P,) samples per prompt
    draw = np.random.default_rng(seed).integers(0, len(counts), size=(resamples, len(counts)))
    boot = wins[draw].sum(axis=1) / counts[draw].sum(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(low), float(high)


def side_by_side(frame: pd.DataFrame, n: int = 5, width: int = 160) -> pd.DataFrame:
    """The first sample of the first ``n`` prompts: reference and DPO completions next to each other.

    Returns an ``(n, 5)`` DataFrame (opening, reference, its score, policy, its score) with
    texts shortened to ``width`` characters, for display.
    """
    first = frame.drop_duplicates("prompt").head(n)
    cut = lambda s: s if len(s) <= width else s[: width - 1] + "…"
    opening = first["prompt"].str.split("\n\n").str[-1]  # drop the instruction, keep the review opening
    return pd.DataFrame({
        "opening": opening.map(cut).to_numpy(),
        "reference (adapter off)": first["reference"].map(cut).to_numpy(),
        "ref score": first["reference_score"].round(2).to_numpy(),
        "DPO policy": first["policy"].map(cut).to_numpy(),
        "DPO score": first["policy_score"].round(2).to_numpy(),
    })


# ---------------------------------------------------------------------------------------------
# Plots (each returns its matplotlib Figure)
# ---------------------------------------------------------------------------------------------


def plot_reward_histograms(frame: pd.DataFrame, bins: int = 21):
    """Overlaid histograms of the judge's score, policy vs reference, means dashed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    edges = np.linspace(-1, 1, bins + 1)
    for side in SIDES:
        scores = frame[f"{side}_score"]
        label = "DPO policy" if side == "policy" else "reference"
        ax.hist(scores, bins=edges, alpha=0.35, color=COLORS[side], label=f"{label} (mean {scores.mean():+.2f})")
        ax.hist(scores, bins=edges, histtype="step", linewidth=1.5, color=COLORS[side])  # outline: overlaps
        ax.axvline(scores.mean(), color=COLORS[side], linestyle="--")
    ax.set_xlabel("ground-truth reward (VADER compound sentiment)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=9)
    ax.set_title("Reward distribution on held-out prompts")
    fig.tight_layout()
    return fig


def plot_reward_vs_length(frame: pd.DataFrame, max_new_tokens: int | None = None):
    """Scatter of reward against completion length for both models (jittered), the cap dotted."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    rng = np.random.default_rng(0)
    for side in SIDES:
        x = frame[f"{side}_tokens"] + rng.uniform(-0.3, 0.3, len(frame))  # jitter: many share a length
        ax.scatter(x, frame[f"{side}_score"], s=14, alpha=0.6, color=COLORS[side],
                   label="DPO policy" if side == "policy" else "reference")
    if max_new_tokens is not None:
        ax.axvline(max_new_tokens, color="grey", linestyle=":", linewidth=1, label=f"max_new_tokens = {max_new_tokens}")
    ax.set_xlabel("completion tokens")
    ax.set_ylabel("ground-truth reward")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize=9)
    ax.set_title("Reward vs length")
    fig.tight_layout()
    return fig


def plot_win_rates(by_length: pd.DataFrame):
    """Bars of the win rate with 95% CI error bars for each bucket of :func:`win_rate_by_length`."""
    import matplotlib.pyplot as plt

    rows = by_length[by_length["pairs"] > 0]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    x = np.arange(len(rows))
    rate = rows["win_rate"].to_numpy()
    err = np.vstack([rate - rows["ci_low"].to_numpy(), rows["ci_high"].to_numpy() - rate])
    colors = ["C2" if lo > 0.5 else "C3" if hi < 0.5 else "C7" for lo, hi in zip(rows["ci_low"], rows["ci_high"])]
    ax.bar(x, rate, yerr=err, capsize=6, color=colors, alpha=0.8)
    for xi, (r, hi) in enumerate(zip(rate, rows["ci_high"])):
        ax.annotate(f"{r:.0%}", (xi, hi), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=9)
    ax.axhline(0.5, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(x, [f"{name}\n(n={int(n)})" for name, n in zip(rows.index, rows["pairs"])])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("win rate of DPO over reference")
    ax.set_title("Win rate, all pairs and by length difference (95% CI)")
    fig.tight_layout()
    return fig


def plot_reward_vs_kl(kl: float, kl_stderr: float, policy_reward: float, policy_stderr: float,
                      reference_reward: float, reference_stderr: float):
    """The DPO paper's Fig. 2 axes for one run: reward against KL(pi || pi_ref), ±1 standard error.

    The reference sits at KL = 0 by definition; a good run moves up (reward) for little
    rightward travel (KL). Sweeping beta traces the reward-KL frontier (an exercise).
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.errorbar([0.0], [reference_reward], yerr=[reference_stderr], fmt="o", color=COLORS["reference"],
                capsize=4, label="reference (adapter off)")
    ax.errorbar([kl], [policy_reward], xerr=[kl_stderr], yerr=[policy_stderr], fmt="o", color=COLORS["policy"],
                capsize=4, label="DPO policy")
    ax.annotate("", (kl, policy_reward), (0.0, reference_reward),
                arrowprops=dict(arrowstyle="->", color="grey", linewidth=1))
    ax.set_xlabel("KL(pi || pi_ref), nats per completion")
    ax.set_ylabel("mean ground-truth reward")
    ax.set_xlim(left=min(-0.1, kl - 2 * kl_stderr), right=max(1.0, (kl + kl_stderr) * 1.25))
    ax.legend(fontsize=9, loc="lower right")
    ax.set_title("Reward gained per nat of KL")
    fig.tight_layout()
    return fig
