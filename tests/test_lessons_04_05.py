"""Lessons 4 (DPO training) and 5 (evaluation) under papermill on the tiny preset, plus their helpers.

The notebooks assert their own invariants in `# Check:` cells (a failing check fails the
run); here we assert on the numbers they record. On `tiny` the model is random: the held-out
numbers are noise, so only the code path and the training-set numbers are asserted.
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from course_utils.checkpoints import run_dir
from course_utils.curves import curve_summary, event_files, plot_training_curves, read_scalars, smooth
from course_utils.precision import rounding_bound
from course_utils.presets import get_preset
from course_utils.report import (
    length_bias,
    plot_reward_histograms,
    plot_reward_vs_kl,
    plot_reward_vs_length,
    plot_win_rates,
    prompt_bootstrap_ci,
    side_by_side,
    win_rate_by_length,
)

# ---------------------------------------------------------------------------------------------
# Lesson 4
# ---------------------------------------------------------------------------------------------


def test_lesson_04_step_one_loss_is_ln2_and_loss_falls(lesson_04):
    assert lesson_04["first_loss_step"] == 1  # logged on its own (LOGGING_STEPS = 1)
    # fp32 (tiny): the policy at step 1 is the reference to fp32 rounding (course_utils/precision.py)
    assert lesson_04["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    agreement = lesson_04["reference_agreement"]
    assert agreement["dtype"] == "float32" and agreement["sequences"] > 0
    assert agreement["max"] <= rounding_bound(torch.float32, agreement["logp_magnitude"])
    assert lesson_04["last_loss"] < lesson_04["first_loss"]
    assert lesson_04["steps"] == 20 and lesson_04["preset"] == "tiny"


def test_lesson_04_learned_its_training_pairs(lesson_04):
    assert lesson_04["final_reward_accuracy"] >= 0.75  # mean over the last quarter of steps
    assert lesson_04["final_reward_margin"] > 0
    assert 0.0 <= lesson_04["last_reward_accuracy"] <= 1.0


def test_lesson_04_fresh_run_with_a_quiet_guard(lesson_04):
    assert lesson_04["resumed_from_step"] == 0  # a fresh OUTPUT_DIR: nothing to resume
    assert lesson_04["guard_diagnoses"] == []  # the healthy tiny run raises no alarm


def test_lesson_04_timings_and_adapter(lesson_04, course_dir):
    assert lesson_04["train_seconds"] > 0 and lesson_04["seconds_per_step"] > 0 and lesson_04["pairs_per_second"] > 0
    assert lesson_04["trainable_params"] < lesson_04["total_params"]
    adapter = Path(lesson_04["adapter_dir"])
    assert adapter == course_dir / "dpo" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert json.loads((course_dir / "dpo" / "preset.json").read_text())["name"] == "tiny"
    assert lesson_04["checkpoints"] == ["checkpoint-10", "checkpoint-20"]  # save_steps=10, save_total_limit=2
    assert lesson_04["dataset"] == "sentiment" and lesson_04["pairs_on_policy"] is False  # tiny: SmolLM2's pairs


def test_lesson_04_event_files_hold_every_step(lesson_04, course_dir):
    curves = read_scalars(run_dir(course_dir, get_preset("tiny")) / "runs")  # newest run
    assert len(curves) == lesson_04["steps"]
    assert curves["loss"].iloc[0] == pytest.approx(lesson_04["first_loss"], abs=1e-6)
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm"} <= set(curves.columns)


# ---------------------------------------------------------------------------------------------
# Lesson 5
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lesson_05(lesson_04, run_lesson):
    return run_lesson("05")


def test_lesson_05_win_rate_and_interval(lesson_05):
    lo, hi = lesson_05["win_rate_ci"]
    assert 0.0 <= lo <= lesson_05["win_rate"] <= hi <= 1.0
    plo, phi = lesson_05["win_rate_prompt_ci"]
    assert 0.0 <= plo <= phi <= 1.0
    assert sum(lesson_05["wins_ties_losses"]) == lesson_05["samples"] == 8 * 2  # 8 held-out prompts x NUM_SAMPLES
    assert lesson_05["beats_reference"] == (lo > 0.5)
    assert "win rate" in lesson_05["verdict"]


def test_lesson_05_kl_lengths_and_rewards(lesson_05):
    assert math.isfinite(lesson_05["kl"]) and lesson_05["kl_stderr"] >= 0
    assert lesson_05["kl"] > -0.5  # Monte-Carlo estimate of a non-negative quantity
    assert lesson_05["policy_tokens"] > 0 and lesson_05["reference_tokens"] > 0
    assert -1.0 <= lesson_05["policy_reward"] <= 1.0 and -1.0 <= lesson_05["reference_reward"] <= 1.0
    assert 0 <= lesson_05["length_controlled_pairs"] <= lesson_05["samples"]
    if lesson_05["length_controlled_pairs"]:
        lo, hi = lesson_05["length_controlled_ci"]
        assert lo <= lesson_05["length_controlled_win_rate"] <= hi


def test_lesson_05_tiny_model_learned_its_training_pairs(lesson_05):
    # held-out accuracy on a random model is noise: only its range is checked
    assert lesson_05["train_reward_accuracy"] >= 0.75 and lesson_05["train_reward_margin"] > 0
    assert 0.0 <= lesson_05["held_out_reward_accuracy"] <= 1.0 and math.isfinite(lesson_05["held_out_reward_margin"])


def test_lesson_05_reads_lesson_4_cost(lesson_04, lesson_05):
    assert lesson_05["train_seconds"] == pytest.approx(lesson_04["train_seconds"])
    assert lesson_05["eval_seconds"] > 0


def test_lesson_05_checks_its_judges_against_vader(lesson_05):
    """The judge-validity table: every judge scored on the 8 held-out sentiment pairs, the LLM judge in both orders."""
    validity = lesson_05["judge_validity"]
    assert set(validity) == {"reward model", "LLM judge", "implicit reward"}  # tiny: a random classifier, SmolLM2
    for row in validity.values():
        assert row["n"] == lesson_05["held_out_pairs"] and row["ci"][0] <= row["agreement"] <= row["ci"][1]
    assert 0.0 <= lesson_05["llm_judge_position_bias"] <= 1.0
    assert lesson_05["llm_judge_position_bias"] == validity["LLM judge"]["first_position_share"]


def test_lesson_05_reward_model_judge_and_benchmarks(lesson_05):
    """The chat path's code on tiny: a random reward model rescores section 4's pairs; lm-eval runs the local task."""
    assert lesson_05["rm_judge"] == "tiny random reward model" and lesson_05["rm_pairs"] == lesson_05["samples"]
    lo, hi = lesson_05["rm_win_rate_ci"]
    assert 0.0 <= lo <= lesson_05["rm_win_rate"] <= hi <= 1.0
    assert lesson_05["rm_policy_tokens"] == pytest.approx(lesson_05["policy_tokens"])  # the same completions
    assert math.isfinite(lesson_05["rm_win_rate_at_equal_length"])
    bench = lesson_05["benchmarks"]
    assert set(bench) == {"policy", "reference"} and all(set(side) == {"course_mc"} for side in bench.values())
    assert all(0.0 <= side["course_mc"]["acc"] <= 1.0 for side in bench.values())
    assert lesson_05["verdict_judge"] == "VADER"  # the sentiment task keeps its ground truth


def test_lesson_05_without_an_adapter_says_run_lesson_4(tmp_path):
    import papermill as pm

    from course_utils.lessons import execute_lesson, lesson_paths

    with pytest.raises(pm.PapermillExecutionError, match="run lesson 4"):
        execute_lesson(lesson_paths(["05"])[0], tmp_path, {"PRESET": "tiny", "OUTPUT_DIR": str(tmp_path)}, html=False)


# ---------------------------------------------------------------------------------------------
# course_utils.curves
# ---------------------------------------------------------------------------------------------


def _write_events(logdir, rows):
    """rows: (step, {tag: value}); written the way the Trainer's TensorBoardCallback does."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(logdir))
    writer.add_text("args", "{}")  # text is ignored by read_scalars
    for step, values in rows:
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
    writer.close()


def test_read_scalars_round_trip(tmp_path):
    run = tmp_path / "runs" / "run1"
    _write_events(run, [(1, {"train/loss": 0.6931, "train/rewards/margins": 0.0, "eval/loss": 0.7}),
                        (2, {"train/loss": 0.60, "train/rewards/margins": 0.2}),
                        (3, {"train/loss": 0.50, "train/rewards/margins": 0.5, "train/train_runtime": 9.0})])
    df = read_scalars(run)
    assert list(df.index) == [1, 2, 3]
    assert sorted(df.columns) == ["loss", "rewards/margins", "train_runtime"]  # eval/ dropped, prefix stripped
    assert df["loss"].tolist() == pytest.approx([0.6931, 0.60, 0.50], abs=1e-6)
    assert math.isnan(df.loc[1, "train_runtime"]) and df.loc[3, "train_runtime"] == 9.0
    assert "eval/loss" in read_scalars(run, prefix=None).columns


def test_read_scalars_picks_the_newest_run_and_later_writes_win(tmp_path):
    import os

    old, new = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    _write_events(old, [(1, {"train/loss": 9.0})])
    _write_events(new, [(1, {"train/loss": 1.0}), (2, {"train/loss": 0.5})])
    os.utime(next(old.iterdir()), (1, 1))  # make run a clearly older
    assert read_scalars(tmp_path / "runs")["loss"].tolist() == pytest.approx([1.0, 0.5])
    assert len(event_files(new)) == 1
    with pytest.raises(FileNotFoundError):
        read_scalars(tmp_path / "nothing")


def test_smooth_is_a_debiased_ema():
    assert smooth([1.0, 1.0, 1.0], 0.9).tolist() == pytest.approx([1.0, 1.0, 1.0])  # debiased: no ramp from 0
    out = smooth([0.0, 1.0, float("nan"), 1.0], 0.5)
    assert out[0] == 0.0 and out[1] == pytest.approx(2 / 3) and math.isnan(out[2])
    assert smooth([3.0, 5.0], 0.0).tolist() == [3.0, 5.0]


def test_curve_summary_and_plot_panels():
    df = pd.DataFrame({"loss": np.linspace(0.69, 0.3, 8), "rewards/chosen": np.linspace(0, -0.1, 8),
                       "rewards/rejected": np.linspace(0, -0.5, 8)}, index=range(1, 9))
    summary = curve_summary(df, ["loss", "rewards/chosen", "grad_norm"])
    assert list(summary.index) == ["loss", "rewards/chosen"]  # unlogged metrics are skipped
    assert summary.loc["loss", "start_mean"] == pytest.approx(df["loss"].iloc[:2].mean())
    assert summary.loc["loss", "change"] < 0
    fig = plot_training_curves(df, ["loss", ("rewards/chosen", "rewards/rejected")], ncols=3)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 2 and len(visible[1].get_legend().get_texts()) == 2
    with pytest.raises(KeyError, match="grad_norm"):
        plot_training_curves(df, ["grad_norm"])


# ---------------------------------------------------------------------------------------------
# course_utils.report
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def frame():
    """Eight hand-built pairs over four prompts; d = policy_tokens - reference_tokens."""
    rows = [
        # prompt, policy score, reference score, policy tokens, reference tokens
        ("p1", 0.9, 0.1, 40, 20),  # longer (d=+20), win
        ("p1", 0.8, 0.0, 38, 20),  # longer (d=+18), win
        ("p2", 0.5, 0.5, 30, 29),  # similar (d=+1), tie
        ("p2", 0.6, 0.2, 31, 30),  # similar (d=+1), win
        ("p3", 0.0, 0.4, 25, 28),  # similar (d=-3), loss
        ("p3", 0.3, 0.1, 27, 27),  # similar (d=0), win
        ("p4", -0.2, 0.3, 10, 30),  # shorter (d=-20), loss
        ("p4", 0.1, 0.0, 12, 30),  # shorter (d=-18), win
    ]
    df = pd.DataFrame(rows, columns=["prompt", "policy_score", "reference_score", "policy_tokens", "reference_tokens"])
    df["policy"] = [f"policy text {i}" for i in range(8)]
    df["reference"] = [f"reference text {i}" for i in range(8)]
    df["prompt"] = "Continue this movie review.\n\nOpening " + df["prompt"]
    return df


def test_win_rate_by_length_buckets(frame):
    table = win_rate_by_length(frame, tolerance=4)
    assert table["pairs"].to_dict() == {"all": 8, "shorter": 2, "similar": 4, "longer": 2}
    assert table.loc["all", "win_rate"] == pytest.approx(5.5 / 8)  # 5 wins, 1 tie
    assert table.loc["similar", "win_rate"] == pytest.approx(2.5 / 4)  # win, tie, loss, win
    assert table.loc["longer", "win_rate"] == 1.0 and table.loc["shorter", "win_rate"] == 0.5
    assert table["share"].loc[["shorter", "similar", "longer"]].sum() == pytest.approx(1.0)
    for _, row in table.iterrows():
        assert row["ci_low"] <= row["win_rate"] <= row["ci_high"]
    empty = win_rate_by_length(frame, tolerance=100)
    assert empty.loc["longer", "pairs"] == 0 and math.isnan(empty.loc["longer", "win_rate"])


def test_length_bias_means_cap_and_correlation(frame):
    bias = length_bias(frame, max_new_tokens=40)
    assert bias.loc["policy", "mean_tokens"] == pytest.approx(frame["policy_tokens"].mean())
    assert bias.loc["policy", "at_cap"] == pytest.approx(1 / 8) and bias.loc["reference", "at_cap"] == 0.0
    assert bias.loc["policy", "reward_length_spearman"] > 0.5  # longer policy samples scored higher here
    constant = frame.assign(reference_tokens=30)
    assert math.isnan(length_bias(constant).loc["reference", "reward_length_spearman"])
    assert "at_cap" not in length_bias(frame).columns


def test_prompt_bootstrap_is_wider_when_samples_cluster(frame):
    clustered = frame.assign(policy_score=[1, 1, 0, 0, 1, 1, 0, 0], reference_score=0.5)  # prompts win or lose whole
    lo, hi = prompt_bootstrap_ci(clustered, seed=0)
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    every = prompt_bootstrap_ci(frame.assign(policy_score=1.0, reference_score=0.0))
    assert every == (1.0, 1.0)


def test_side_by_side_and_plots(frame):
    table = side_by_side(frame, n=3)
    assert len(table) == 3 and table["opening"].tolist() == ["Opening p1", "Opening p2", "Opening p3"]
    assert table["DPO score"].tolist() == [0.9, 0.5, 0.0]
    import matplotlib.pyplot as plt

    figs = [plot_reward_histograms(frame), plot_reward_vs_length(frame, max_new_tokens=40),
            plot_win_rates(win_rate_by_length(frame)), plot_reward_vs_kl(2.0, 0.3, 0.5, 0.05, 0.2, 0.05)]
    assert all(len(f.axes) == 1 for f in figs)
    assert len(figs[2].axes[0].patches) == 4  # all, shorter, similar, longer
    for f in figs:
        plt.close(f)
