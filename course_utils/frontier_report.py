"""Lesson 7's read-out: per-configuration summaries, the frontier at a KL budget, conclusions
written from the numbers, the two plots and ``frontier.json``.

Everything here is a pure function of the run dicts :mod:`course_utils.frontier` returns
(``method``, ``value``, ``seed``, ``reward``, ``kl``, ``seconds``, ``flops``, ...), so it is
unit-tested without training anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .frontier import METHODS

LABELS = {"reference": "reference", "bon": "best-of-N", "dpo": "DPO", "rloo": "RLOO (online RL)"}
COLORS = {"reference": "black", "bon": "tab:green", "dpo": "tab:blue", "rloo": "tab:orange"}
PARAM_NAMES = {"bon": "N", "dpo": "β", "rloo": "β"}
# Why a short run may not show "larger beta, smaller KL", per method
WHY_BETA_IDLE = {
    "dpo": "In a short run β hardly acts: Adam divides out the gradient's scale, and β changes only the weighting "
           "sigma(-β margin), which stays near 1/2 until the margins grow.",
    "rloo": "In a short run the penalty hardly acts: β multiplies each sample's log-ratio log(pi/pi_ref), which is 0 "
            "at the first step and small for the first few, so both β give nearly the same advantages.",
}
SATURATION_WORTH_SAYING = 0.25  # share of outputs at VADER >= 0.9 above which saturation is named as a reason


def spread(values) -> dict:
    """Mean, sample std (ddof=1; 0 for a single value), min and max of a list of numbers."""
    v = np.asarray(list(values), float)
    if v.size == 0:
        raise ValueError("no values to summarise")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def summarize(runs: list[dict], reference_reward: float) -> list[dict]:
    """One row per configuration (method, setting) over its seeds, in :data:`METHODS` order.

    Reward, KL, seconds and FLOPs each get mean / std / min / max over the seeds; ``gain`` is
    the mean reward minus the reference's.
    """
    rows = []
    keys = sorted({(r["method"], r["value"]) for r in runs if r["method"] != "reference"},
                  key=lambda k: (METHODS.index(k[0]), k[1]))
    for method, value in keys:
        group = [r for r in runs if r["method"] == method and r["value"] == value]
        row = {"method": method, "param": group[0]["param"], "value": value, "seeds": sorted(r["seed"] for r in group)}
        for key in ("reward", "kl", "seconds", "flops"):
            for stat, number in spread(r[key] for r in group).items():
                if stat != "n":
                    row[f"{key}_{stat}"] = number
        row["n_seeds"] = len(group)
        row["gain_mean"] = row["reward_mean"] - reference_reward
        rows.append(row)
    return rows


def config_name(row: dict) -> str:
    return f"{LABELS[row['method']]} {PARAM_NAMES[row['method']]}={row['value']:g}"


def achievable_frontier(summary: list[dict], method: str, reference_reward: float) -> list[tuple[float, float]]:
    """Vertices ``(KL, reward)`` of a method's achievable frontier: the upper concave hull of the reference
    ``(0, reference_reward)`` and its settings' ``(kl_mean, reward_mean)``, by increasing KL.

    Why a hull: answering each prompt at random with one of two policies earns the mixed reward at no more
    than the mixed KL, since KL(pi || pi_ref) is convex in pi. So every point on a chord between two measured
    policies (or between one and the reference) is reachable, and the hull is the best of them.

    Only the reference measurement stands at KL 0. A setting with mean KL <= 0 (best-of-1, or a Monte-Carlo
    estimate below 0) is the reference up to noise, and its reward differs from the reference's only by
    evaluation noise, so it is left out: it would lift the whole frontier by that noise.
    """
    points = sorted({(0.0, reference_reward)} | {(r["kl_mean"], r["reward_mean"]) for r in summary
                                                 if r["method"] == method and r["kl_mean"] > 0})
    hull: list[tuple[float, float]] = []
    for p in points:  # Andrew's monotone chain, upper half: drop the middle point of every non-right turn
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) >= 0:
            hull.pop()
        hull.append(p)
    return hull


def reward_at_kl(hull: list[tuple[float, float]], budget: float) -> float:
    """The best reward on an achievable frontier with KL <= ``budget``: interpolated on the hull, and flat
    beyond its highest vertex (a policy with less KL than the budget is always allowed)."""
    best = max(y for x, y in hull if x <= budget)
    for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
        if x0 <= budget < x1:
            best = max(best, y0 + (y1 - y0) * (budget - x0) / (x1 - x0))
    return best


def frontier_table(summary: list[dict], reference_reward: float, methods=("bon", "dpo", "rloo")) -> list[dict]:
    """Each method's achievable reward at every KL budget where some method's frontier has a vertex.

    One row per budget (sorted): ``{"kl_budget", <method>: reward, "leader": method or None}``; the
    leader is None where every method is still at the reference. The frontiers are piecewise linear,
    so comparing them at every vertex compares them everywhere up to the largest budget.
    """
    hulls = {m: achievable_frontier(summary, m, reference_reward) for m in methods}
    budgets = sorted({x for hull in hulls.values() for x, _ in hull})
    table = []
    for b in budgets:
        entry = {"kl_budget": b, **{m: reward_at_kl(hulls[m], b) for m in methods}}
        top = max(methods, key=lambda m: entry[m])
        entry["leader"] = top if entry[top] > reference_reward + 1e-12 else None
        table.append(entry)
    return table


def dominates(summary: list[dict], a: str, b: str, reference_reward: float) -> bool | None:
    """True if method ``a``'s achievable frontier is >= ``b``'s at every KL budget where either has left
    the reference, and > at one at least; False if ``b`` is ahead somewhere; None with nothing to compare."""
    rows = [r for r in frontier_table(summary, reference_reward, (a, b)) if r["leader"] is not None]
    if not rows:
        return None
    return all(r[a] >= r[b] for r in rows) and any(r[a] > r[b] for r in rows)


def seed_noise(summary: list[dict], *methods: str) -> float:
    """The typical seed-to-seed std of reward: the mean of ``reward_std`` over the methods' settings."""
    return float(np.mean([r["reward_std"] for r in summary if r["method"] in methods]))


def _narrowest_lead(summary: list[dict], win: str, lose: str, reference_reward: float) -> str:
    """A clause saying where ``win``'s lead over ``lose`` is smallest, and whether it is within seed noise."""
    rows = [r for r in frontier_table(summary, reference_reward, (win, lose)) if r["leader"] is not None]
    gap, budget = min((r[win] - r[lose], r["kl_budget"]) for r in rows)
    noise = seed_noise(summary, win, lose)
    within = "smaller than" if gap < noise else "larger than"
    return (f" Its narrowest lead, {gap:+.3f} within {budget:.2f} nats, is {within} the typical seed std of the "
            f"two ({noise:.3f})" + (": there they cannot be told apart." if gap < noise else "."))


def conclusions(summary: list[dict], reference_reward: float, eval_noise_std: float | None = None) -> list[str]:
    """Sentences written from the numbers: each method's best setting, who leads at each KL budget,
    how much the seed moves each method, and the compute each spent."""
    lines = []
    present = [m for m in ("bon", "dpo", "rloo") if any(r["method"] == m for r in summary)]
    for m in present:
        rows = [r for r in summary if r["method"] == m]
        best = max(rows, key=lambda r: r["reward_mean"])
        lines.append(
            f"{LABELS[m]}: best at {PARAM_NAMES[m]}={best['value']:g} with reward {best['reward_mean']:+.3f} "
            f"(std {best['reward_std']:.3f} over {best['n_seeds']} seeds, min {best['reward_min']:+.3f}, max "
            f"{best['reward_max']:+.3f}; {best['gain_mean']:+.3f} vs the reference) at KL {best['kl_mean']:.2f} "
            f"± {best['kl_std']:.2f} nats, {best['seconds_mean']:.0f} s and {best['flops_mean']:.2g} FLOPs per run.")
    for entry in frontier_table(summary, reference_reward, present):
        if entry["leader"] is None:
            continue
        scores = ", ".join(f"{LABELS[m]} {entry[m]:+.3f}" for m in present)
        lines.append(f"Within a KL budget of {entry['kl_budget']:.2f} nats the achievable rewards are: {scores}; "
                     f"{LABELS[entry['leader']]} leads.")
    for a, b in (("dpo", "rloo"), ("dpo", "bon"), ("rloo", "bon")):
        if a in present and b in present:
            verdict = dominates(summary, a, b, reference_reward)
            back = dominates(summary, b, a, reference_reward)
            if verdict or back:
                win, lose = (a, b) if verdict else (b, a)
                lines.append(f"{LABELS[win]} dominates {LABELS[lose]}: at least as high at every KL budget measured."
                             + _narrowest_lead(summary, win, lose, reference_reward))
            elif verdict is not None:
                lines.append(f"Neither {LABELS[a]} nor {LABELS[b]} dominates: each leads at some KL budget.")
    for m in ("dpo", "rloo"):
        rows = sorted((r for r in summary if r["method"] == m), key=lambda r: r["value"])
        if len(rows) > 1:
            kls = [r["kl_mean"] for r in rows]
            by = ", ".join(f"β={r['value']:g}: {r['kl_mean']:.2f}" for r in rows)
            widest = max(r["kl_std"] for r in rows)
            if all(a > b for a, b in zip(kls, kls[1:])):
                lines.append(f"{LABELS[m]}: a larger β ended nearer the reference, as the objective says it should "
                             f"(mean KL {by} nats).")
            else:
                lines.append(f"{LABELS[m]}: a larger β did NOT end at a smaller KL here (mean KL {by} nats; seed std "
                             f"up to {widest:.2f}). {WHY_BETA_IDLE[m]}")
        if not rows:
            continue
        seed_std = float(np.mean([r["reward_std"] for r in rows]))
        setting_range = max(r["reward_mean"] for r in rows) - min(r["reward_mean"] for r in rows)
        noise = f"; re-sampling the reference alone moves it by std {eval_noise_std:.3f}" if eval_noise_std else ""
        lines.append(f"Seed sensitivity of {LABELS[m]}: reward std {seed_std:.3f} across seeds on average over its "
                     f"settings (KL std {np.mean([r['kl_std'] for r in rows]):.2f}); its settings' means span "
                     f"{setting_range:.3f}{noise}.")
    return lines


def paper_comparison(summary: list[dict], reference_reward: float, context: dict) -> list[str]:
    """Fig. 2 (left) of the DPO paper against these numbers, and if DPO does not dominate RLOO here,
    the likely reasons, each with the number behind it.

    ``context`` keys: ``preset``, ``model``, ``parameters``, ``dpo_pairs_seen``, ``train_pairs``,
    ``rloo_samples_seen``, ``chosen_mean``, ``rejected_mean`` (VADER of the training pairs),
    ``bon_saturated`` (share of the largest best-of-N's outputs at VADER >= 0.9), ``dpo_saturated``.
    """
    verdict = dominates(summary, "dpo", "rloo", reference_reward)
    dpo = [r for r in summary if r["method"] == "dpo"]
    rloo = [r for r in summary if r["method"] == "rloo"]
    if not dpo or not rloo:
        return ["DPO or RLOO did not run: nothing to compare with the paper."]
    best_d, best_r = max(dpo, key=lambda r: r["reward_mean"]), max(rloo, key=lambda r: r["reward_mean"])
    lines = [f"Best DPO {best_d['reward_mean']:+.3f} at KL {best_d['kl_mean']:.2f}; best RLOO {best_r['reward_mean']:+.3f} "
             f"at KL {best_r['kl_mean']:.2f}; reference {reference_reward:+.3f}."]
    if verdict:
        lines.append("As in Figure 2 (left) of the paper, DPO's frontier is at or above RLOO's at every KL budget "
                     "measured here." + _narrowest_lead(summary, "dpo", "rloo", reference_reward))
    else:
        lines.append("Unlike Figure 2 (left) of the paper, DPO does NOT dominate online RL here. Likely reasons, "
                     "with the numbers behind them:")
        if context.get("preset") == "tiny":
            lines.append("- the tiny preset's model is random: it writes gibberish, VADER scores most of it 0, "
                         "and every difference between methods is noise.")
        lines.append(f"- scale and training length: {context.get('model')} ({context.get('parameters', 0) / 1e6:.0f} M "
                     f"parameters); each DPO run saw {context.get('dpo_pairs_seen')} of {context.get('train_pairs')} pairs, "
                     f"each RLOO run {context.get('rloo_samples_seen')} samples. The paper trains GPT-2-large to "
                     "convergence on thousands of IMDb prompts.")
        if "chosen_mean" in context:
            lines.append(f"- off-policy pairs: DPO learns from completions sampled once from the reference (chosen "
                         f"average VADER {context['chosen_mean']:+.2f}, rejected {context['rejected_mean']:+.2f}), "
                         "while RLOO is rewarded by VADER itself on its own fresh samples at every step.")
        if max(context.get("bon_saturated") or 0, context.get("dpo_saturated") or 0) >= SATURATION_WORTH_SAYING:
            lines.append(f"- VADER saturates: {context['bon_saturated']:.0%} of the largest best-of-N's outputs "
                         f"already score >= 0.9 (DPO's best setting: {context.get('dpo_saturated', 0):.0%}), so "
                         "rewards bunch up near the ceiling where methods cannot be told apart.")
        noise = max(best_d["reward_std"], best_r["reward_std"])
        gap = abs(best_d["reward_mean"] - best_r["reward_mean"])
        if gap < 2 * noise:
            lines.append(f"- seed noise: the best DPO and RLOO settings differ by {gap:.3f} in mean reward, less than "
                         f"twice the larger seed std ({noise:.3f}); more seeds or prompts would be needed to call it.")
    if any(r["method"] == "bon" for r in summary) and dominates(summary, "bon", "dpo", reference_reward):
        best_b = max((r for r in summary if r["method"] == "bon"), key=lambda r: r["reward_mean"])
        lines.append(f"Best-of-N, which Figure 2 (left) does not show, is ahead of DPO at every KL budget here (N="
                     f"{best_b['value']:g}: {best_b['reward_mean']:+.3f} at {best_b['kl_mean']:.2f} nats). Its KL is an "
                     "upper bound, so its true points lie further left, which only widens the lead; it pays instead "
                     "at inference, with N samples and N judge calls for every prompt.")
    return lines


# --- Plots -----------------------------------------------------------------------------------


def _label(ax, method: str, rows: list[dict], x: str, y: str) -> None:
    """Name each point by its setting; alternate above and below, so coinciding points stay readable."""
    for j, r in enumerate(rows):
        ax.annotate(f"{PARAM_NAMES[method]}={r['value']:g}", (r[x], r[y]), xytext=(4, 4 if j % 2 == 0 else -10),
                    textcoords="offset points", fontsize=7, color=COLORS[method])


def plot_frontier(runs: list[dict], summary: list[dict], reference_reward: float) -> Figure:
    """Reward against KL(pi || pi_ref), as in Fig. 2 (left) of the DPO paper.

    A faint dot per run (seed), and per configuration the mean with error bars of one std over
    seeds on both axes; the dashed line is each method's achievable frontier (:func:`achievable_frontier`).
    Best-of-N sits at its closed-form KL (an upper bound), so it has no horizontal bar.
    """
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter([0.0], [reference_reward], marker="*", s=160, color=COLORS["reference"], zorder=5, label="reference")
    for m in ("bon", "dpo", "rloo"):
        rows = sorted((r for r in summary if r["method"] == m), key=lambda r: r["kl_mean"])
        if not rows:
            continue
        pts = [r for r in runs if r["method"] == m]
        ax.scatter([r["kl"] for r in pts], [r["reward"] for r in pts], s=12, alpha=0.35, color=COLORS[m])
        hull = achievable_frontier(summary, m, reference_reward)
        ax.plot([x for x, _ in hull], [y for _, y in hull], color=COLORS[m], lw=1.2, ls="--", alpha=0.7)
        ax.errorbar([r["kl_mean"] for r in rows], [r["reward_mean"] for r in rows],
                    xerr=[r["kl_std"] for r in rows], yerr=[r["reward_std"] for r in rows], fmt="o", ms=6,
                    capsize=3, color=COLORS[m], label=LABELS[m])
        _label(ax, m, rows, "kl_mean", "reward_mean")
    ax.axhline(reference_reward, color="0.6", lw=0.8, ls=":")
    ax.set(xlabel=r"KL($\pi\,\|\,\pi_{ref}$), nats per completion", ylabel="mean ground-truth reward (VADER)",
           title="Reward-KL frontier (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_reward_per_compute(summary: list[dict]) -> Figure:
    """Reward gain over the reference against FLOPs spent (log x): training for DPO and RLOO,
    sampling the N candidates for best-of-N (paid again for every prompt it answers)."""
    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for m in ("bon", "dpo", "rloo"):
        rows = [r for r in summary if r["method"] == m and r["flops_mean"] > 0]
        if not rows:
            continue
        ax.errorbar([r["flops_mean"] for r in rows], [r["gain_mean"] for r in rows],
                    yerr=[r["reward_std"] for r in rows], fmt="o", capsize=3, color=COLORS[m], label=LABELS[m])
        _label(ax, m, rows, "flops_mean", "gain_mean")
    ax.axhline(0.0, color="0.6", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set(xlabel="FLOPs (estimated): training, or sampling N candidates on the held-out prompts",
           ylabel="reward gain over the reference", title="Reward per compute (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="best")
    return fig


# --- frontier.json ---------------------------------------------------------------------------


def _clean(value):
    """JSON-safe: NaN/inf become None, tuples lists, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_frontier(path, *, preset: str, grid: dict, runs: list[dict], summary: list[dict], reference: dict,
                  conclusions: list[str], extra: dict | None = None) -> Path:
    """Write every run (config, seed, reward, KL, seconds, FLOPs), the per-configuration summaries
    and the conclusions to ``path`` (``OUTPUT_DIR/frontier.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"preset": preset, "grid": grid, "reference": reference, "runs": runs, "summary": summary,
              "frontier": frontier_table(summary, reference["reward"]), "conclusions": conclusions, **(extra or {})}
    path.write_text(json.dumps(_clean(record), indent=2))
    return path
