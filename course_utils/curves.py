"""Training curves: TensorBoard event files -> a pandas DataFrame -> one matplotlib panel per metric.

The Trainer's ``TensorBoardCallback`` writes every logged number as a scalar named
``train/<metric>`` (``train/loss``, ``train/rewards/margins``, ...) into
``<output_dir>/runs/<date>_<host>/events.out.tfevents.*``. Lesson 4 shows the same
files twice: live in TensorBoard (``%tensorboard --logdir ...``, only where a notebook
frontend can display it) and as static matplotlib figures that survive in the executed
notebook and its HTML copy.

    df = read_scalars(tensorboard_logdir(trainer))        # (steps, metrics) DataFrame
    fig = plot_training_curves(df, ["loss", ("rewards/chosen", "rewards/rejected")])
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

EVENT_GLOB = "events.out.tfevents.*"
# What TRL's DPOTrainer logs, in the order lesson 4 explains them.
DPO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected", "grad_norm")
# Deterministic curves: smoothing them would only add lag.
UNSMOOTHED = ("learning_rate", "epoch", "num_tokens")


# ---------------------------------------------------------------------------------------------
# Where the curves are, and whether a live TensorBoard can be shown
# ---------------------------------------------------------------------------------------------


def live_notebook_frontend() -> bool:
    """True when a person is looking at this kernel (Colab, Jupyter, VS Code), False when headless.

    papermill, ``nbconvert --execute`` and nbval all run notebooks through nbclient, which
    starts ipykernel with ``--HistoryManager.hist_file=:memory:``; no browser will ever load
    an embedded TensorBoard there, and the server it starts would outlive the run.
    """
    if "google.colab" in sys.modules:
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":  # plain python or terminal IPython
        return False
    return not any("HistoryManager.hist_file=:memory:" in arg for arg in sys.argv)


def tensorboard_logdir(trainer) -> Path:
    """The directory the trainer's ``TensorBoardCallback`` wrote this run's events to.

    Read from the callback itself rather than globbed, because every rerun into the same
    ``output_dir`` adds another ``runs/<date>_<host>`` folder.
    """
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir:
            return Path(callback.logging_dir)
    raise ValueError("the trainer has no TensorBoardCallback that has logged yet; was report_to=['tensorboard'] set "
                     "and has train() run?")


def event_files(path: str | Path) -> list[Path]:
    """Event files of one run: ``path`` itself, the files in it, or those of its newest sub-run.

    ``path`` may be an event file, a run directory (``runs/<date>_<host>``) or the ``runs``
    directory above several runs, in which case the most recently written run is used.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; train first (lesson 4) or pass the run directory")
    files = sorted(path.glob(EVENT_GLOB))
    if files:
        return files
    runs = [p.parent for p in path.rglob(EVENT_GLOB)]
    if not runs:
        raise FileNotFoundError(f"no TensorBoard event files ({EVENT_GLOB}) under {path}")
    newest = max(runs, key=lambda run: max(f.stat().st_mtime for f in run.glob(EVENT_GLOB)))
    return sorted(newest.glob(EVENT_GLOB))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_scalars(path: str | Path, prefix: str | None = "train/") -> pd.DataFrame:
    """All scalars of one run as a wide DataFrame: index ``step``, one column per tag.

    Args:
        path: see :func:`event_files`.
        prefix: keep only tags starting with it and drop it from the column names
            (``"train/rewards/margins"`` -> ``"rewards/margins"``); ``None`` keeps every tag.

    Returns:
        ``(S, M)`` float DataFrame for ``S`` logged steps and ``M`` tags, sorted by step. A
        tag not logged at some step is NaN there (the Trainer's end-of-run summary, for
        example, appears only at the last step). When a resumed run wrote the same step to
        two files, the later write wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = []
    for file in event_files(path):
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})  # 0 = keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if prefix is not None and not tag.startswith(prefix):
                continue
            name = tag[len(prefix):] if prefix else tag
            records += [(e.step, e.wall_time, name, e.value) for e in acc.Scalars(tag)]
    if not records:
        raise ValueError(f"no scalars{f' starting with {prefix!r}' if prefix else ''} in {path}")
    long = pd.DataFrame(records, columns=["step", "wall_time", "tag", "value"]).sort_values("wall_time")
    wide = long.drop_duplicates(["step", "tag"], keep="last").pivot(index="step", columns="tag", values="value")
    wide.columns.name = None
    return wide.sort_index().astype(float)


def smooth(values, weight: float = 0.6) -> np.ndarray:
    """TensorBoard's smoothing slider: a debiased exponential moving average, NaNs skipped.

    Args:
        values: ``(S,)`` numbers in step order.
        weight: 0 = raw, 0.99 = very smooth.

    Returns:
        ``(S,)`` array; ``out[i]`` averages ``values[:i+1]`` with weights ``weight**(i-j)``.
    """
    values = np.asarray(values, dtype=float)
    out = np.full_like(values, np.nan)
    last, norm = 0.0, 0.0
    for i, v in enumerate(values):
        if math.isnan(v):
            continue
        last, norm = weight * last + (1 - weight) * v, weight * norm + (1 - weight)
        out[i] = last / norm
    return out


def curve_summary(df: pd.DataFrame, metrics=DPO_METRICS, tail: float = 0.25) -> pd.DataFrame:
    """One row per metric: first value, mean over the first and last ``tail`` of steps, last value.

    Single steps are noisy (a batch of 4 pairs gives accuracies in steps of 0.25), so
    start/end are compared as means over a quarter of the run. Returns a ``(M, 5)``
    DataFrame indexed by metric; metrics the run did not log are skipped.
    """
    rows = {}
    for name in metrics:
        if name not in df:
            continue
        s = df[name].dropna()
        k = max(1, int(len(s) * tail))
        rows[name] = {"first": s.iloc[0], "start_mean": s.iloc[:k].mean(), "end_mean": s.iloc[-k:].mean(),
                      "last": s.iloc[-1], "change": s.iloc[-k:].mean() - s.iloc[:k].mean()}
    return pd.DataFrame.from_dict(rows, orient="index")


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def plot_training_curves(df: pd.DataFrame, metrics=DPO_METRICS, *, smoothing: float = 0.6, ncols: int | None = None,
                         panel_size=(4.2, 3.0), title: str | None = None):
    """One panel per metric, raw points faint and the smoothed curve on top; returns the Figure.

    Args:
        df: ``(S, M)`` DataFrame from :func:`read_scalars` (index = step).
        metrics: column names; a tuple of names shares one panel (``("logps/chosen",
            "logps/rejected")``) so the pair can be compared on one axis.
        smoothing: weight of :func:`smooth`; 0 draws the raw curve only.
        ncols: panels per row (default: up to 4).
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(m,) if isinstance(m, str) else tuple(m) for m in metrics]
    missing = [m for panel in panels for m in panel if m not in df]
    if missing:
        raise KeyError(f"metric(s) {missing} not logged; logged: {sorted(df.columns)}")
    ncols = ncols or min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for i, name in enumerate(panel):
            s = df[name].dropna()
            color = f"C{i}"
            if smoothing > 0 and len(s) > 2 and name not in UNSMOOTHED:
                ax.plot(s.index, s.values, color=color, alpha=0.25, linewidth=1)
                ax.plot(s.index, smooth(s.values, smoothing), color=color, linewidth=2, label=name)
            else:
                ax.plot(s.index, s.values, color=color, marker=".", linewidth=1.5, label=name)
        ax.set_title(" vs ".join(panel), fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(panel) > 1:
            ax.legend(fontsize=8)
        if panel == ("loss",):
            ax.axhline(math.log(2), color="grey", linestyle=":", linewidth=1)
            ax.annotate("ln 2", (s.index[0], math.log(2)), fontsize=8, color="grey",
                        xytext=(2, 2), textcoords="offset points")
        if panel == ("rewards/accuracies",):
            ax.set_ylim(-0.05, 1.05)
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        if any(name.startswith("rewards/") for name in panel) and panel != ("rewards/accuracies",):
            ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
