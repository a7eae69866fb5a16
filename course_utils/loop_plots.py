"""The curves of lesson 2's from-scratch DPO loop (:mod:`course_utils.dpo_loop`): training pairs against held-out pairs.

Like :mod:`course_utils.plots`, the figure is built without ``pyplot`` and returned, so a notebook
cell displays it once; save it with :func:`course_utils.plots.save_figure`.
"""

from __future__ import annotations

from matplotlib.figure import Figure


def plot_loop_curves(history, title: str = ""):
    """Training vs held-out curves of a :class:`~course_utils.dpo_loop.DPOLoop` run (its ``history``), 2 x 2 panels.

    Top: the reward margin on each step's training batch (scored before its update, so noisy:
    each step sees other pairs), and on all held-out pairs at the steps they were scored, each on
    its own scale (a memorised training set's margin dwarfs the held-out one), the best held-out
    step marked. Bottom: reward accuracy of both, and the held-out answers' log-probs against the
    reference's (step 0).
    """
    steps, evals = history.frames()
    fig = Figure(figsize=(11, 6.4), layout="constrained")
    (train, held), (accuracy, logps) = fig.subplots(2, 2, sharex=True)
    train.plot(steps.index, steps["margin"], color="tab:blue")
    train.set(ylabel=r"reward margin $\hat r_w - \hat r_l$", title="Margin, training batches")
    held.plot(evals.index, evals["margin"], "o-", color="tab:orange")
    best = evals["margin"].idxmax()
    held.annotate(f"best: step {best}", (best, evals["margin"][best]), xytext=(0, 8), textcoords="offset points",
                  ha="center", fontsize=8)
    held.margins(y=0.25)  # room for the label above the best point
    held.set(ylabel=r"reward margin $\hat r_w - \hat r_l$", title="Margin, held-out pairs")
    accuracy.plot(steps.index, steps["accuracy"], label="training batch", color="tab:blue")
    accuracy.plot(evals.index, evals["accuracy"], "o-", label="held-out pairs", color="tab:orange")
    accuracy.set(xlabel="step", ylabel="pairs with margin > 0", title="Reward accuracy", ylim=(-0.05, 1.05))
    accuracy.legend(fontsize=8)
    for key, label in (("logps_chosen", "chosen"), ("logps_rejected", "rejected")):
        logps.plot(evals.index, evals[key] - evals[key].iloc[0], "o-", label=label)
    logps.set(xlabel="step", ylabel=r"$\log\pi(y|x) - \log\pi_{\mathrm{ref}}(y|x)$, nats",
              title="Held-out answers against the reference")
    logps.legend(fontsize=8)
    for ax in (train, held, logps):
        ax.axhline(0, color="0.6", lw=0.8)
    if title:
        fig.suptitle(title)
    return fig
