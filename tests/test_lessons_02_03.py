"""Lessons 2 and 3 end to end on the tiny preset, lesson 2's stored outputs under nbval, and the
helpers they use (``course_utils.toy``, ``course_utils.plots``).

The lesson tests assert on the numbers each notebook records (papermill only proves the cells ran).
Lesson 2 is also committed with its outputs; ``test_lesson_02_outputs_match_nbval`` re-runs it with
``pytest --nbval`` in a subprocess and requires every text output to match.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from course_utils import toy
from course_utils.plots import (
    dpo_loss_curve,
    fraction_over,
    gradient_weight_curve,
    plot_dpo_loss_curves,
    plot_gradient_weight,
    plot_length_histograms,
    plot_toy_fit,
    save_figure,
    token_lengths,
)

LN2 = math.log(2)
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
LESSON_02 = NOTEBOOKS / "02_dpo_loss_derivation.ipynb"

# TRL 1.16 / transformers 5 deprecation notices are theirs, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# ---------------------------------------------------------------------------------------------
# The lessons, run once each on the tiny preset
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lesson_02(run_lesson):
    return run_lesson("02")


@pytest.fixture(scope="module")
def lesson_03(run_lesson):
    return run_lesson("03")


def test_lesson_02_derivation_checks_out(lesson_02):
    r = lesson_02
    assert r["toy_kl_ascent_to_optimum"] < 1e-6  # gradient ascent on Eq. 3 finds the closed form of Eq. 4
    assert r["toy_dpo_step0_loss"] == pytest.approx(LN2, abs=1e-12)  # π = π_ref at the start
    assert r["toy_dpo_final_loss"] < r["toy_dpo_step0_loss"]
    assert r["toy_kl_dpo_to_optimum"] < 1e-3  # DPO on sampled pairs lands on π*
    assert r["toy_pairs"] > 100_000
    # 5.4: pairs from another model miss π* by far more than pairs from π_ref; SFT on the chosen answers first
    # brings DPO back near its own optimum
    assert r["toy_kl_dpo_off_policy"] > 10 * r["toy_kl_dpo_to_optimum"]
    assert r["toy_kl_dpo_sft_first"] < r["toy_kl_dpo_off_policy"] / 10


def test_lesson_02_loss_matches_trl(lesson_02):
    r = lesson_02
    assert r["batch_loss_diff_trl"] < 1e-5
    assert r["batch_loss_diff_course_utils"] < 1e-6
    assert r["batch_loss_lesson"] == pytest.approx(r["batch_loss_trl"], abs=1e-5)
    assert r["batch_loss_lesson"] != pytest.approx(LN2, abs=1e-3)  # two different models: not the step-0 value
    assert r["trl_step0_loss"] == pytest.approx(LN2, abs=1e-6)
    assert r["wall_seconds"] < 120  # budget 60 s on tiny; twice that before failing on a busy machine


def test_lesson_02_scratch_loop(lesson_02):
    """Section 8: the from-scratch loop takes TRL's steps, and learns its training pairs beyond the held-out ones."""
    r = lesson_02
    assert r["loop_vs_trl_max_loss_diff"] < 1e-4  # the lesson's LOOP_TOLERANCE (measured on tiny: under 1e-6)
    assert r["loop_vs_trl_max_margin_diff"] < 1e-4
    assert r["loop_final_train_margin"] > 0
    assert r["loop_final_train_margin"] > r["loop_final_held_out_margin"]
    # per-token margins are the summed ones divided by ~25 tokens: smaller, same sign on average
    assert 0 < r["loop_per_token_margin_mean"] < r["loop_summed_margin_mean"]
    assert r["loop_section_seconds"] < 60  # budget 15 s on tiny; four times that before failing on a busy machine


def test_lesson_03_pairs_and_validation(lesson_03):
    r = lesson_03
    assert r["train_pairs"] > 0 and r["test_pairs"] > 0
    assert r["orca_local_pairs"] == 4  # the four orca-style rows, through load_orca_dpo_pairs offline
    assert "orca_pairs" not in r  # the hub dataset is loaded on GPU presets only
    assert r["bad_rows_injected"] == 4
    assert r["dropped_rows"] == r["bad_rows_injected"]
    assert r["dropped_by_kind"] == {"missing_field": 1, "empty_text": 1, "identical": 1, "bad_message": 1}
    assert r["file_rows_kept"] == 3  # the good rows of the JSONL file; the bad ones and a cut line dropped
    assert r["median_score_gap"] >= 0.1
    assert sum(r["skipped_prompts"].values()) >= 0


def test_lesson_03_lengths_and_split(lesson_03):
    r = lesson_03
    assert r["max_length"] == 128  # the tiny preset's
    for key in ("prompt", "chosen", "rejected"):
        assert r[f"median_{key}_tokens"] > 0
    assert r["median_prompt_tokens"] + r["median_chosen_tokens"] <= r["max_sequence_tokens"]
    assert 0.0 <= r["fraction_over_max_length"] <= 1.0
    assert (r["fraction_over_max_length"] > 0) == (r["max_sequence_tokens"] > r["max_length"])
    assert r["overlap_openings"] == 0
    # at the median prompt+chosen length, roughly half the pairs are cut; each is counted, none vanishes
    assert r["prepare_truncated_at_median_length"] + r["prepare_dropped_at_median_length"] >= 1
    assert r["wall_seconds"] < 120  # budget 60 s


def test_lesson_02_outputs_match_nbval(tmp_path):
    """The committed outputs of lesson 2 are what the notebook prints today (text outputs; nbval skips PNGs).

    Run on a copy, so the kernel's working directory (and its OUTPUT_DIR, build/course) is tmp_path.
    """
    notebook = tmp_path / LESSON_02.name
    shutil.copy(LESSON_02, notebook)
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", str(notebook), "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_lesson_02_is_committed_with_tiny_outputs():
    import nbformat

    nb = nbformat.read(LESSON_02, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'PRESET = "tiny"' in injected[0].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert sum(bool(c.outputs) for c in code) > 20
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    assert not any(o.get("name") == "stderr" for c in code for o in c.outputs)  # no warnings stored
    assert not any("papermill" in c.metadata or "execution" in c.metadata for c in nb.cells)  # no timings stored


# ---------------------------------------------------------------------------------------------
# course_utils.toy
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def problem():
    return toy.random_problem(6, seed=3)


def test_kl_basics():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    assert toy.kl(p, p).item() == 0.0
    assert toy.kl(p, q).item() == pytest.approx(math.log(2))  # 0.5 ln 2 + 0.5 ln 2; the 0 · log 0 term is 0
    assert toy.kl(torch.stack([p, q]), q).tolist() == pytest.approx([math.log(2), 0.0])


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_optimal_policy_is_the_maximum_of_eq3(problem, beta):
    ref, rewards = problem
    star = toy.optimal_policy(ref, rewards, beta)
    assert star.sum().item() == pytest.approx(1.0, abs=1e-12)
    # Eq. 4 by hand: π_ref e^{r/β} / Z
    z = toy.partition_function(ref, rewards, beta)
    torch.testing.assert_close(star, ref * torch.exp(rewards / beta) / z)
    value = toy.kl_objective(star, ref, rewards, beta)
    assert value.item() == pytest.approx(beta * math.log(z.item()), abs=1e-12)
    others = toy.perturbed_policies(star, num=200, seed=1)
    gaps = value - toy.kl_objective(others, ref, rewards, beta)
    assert (gaps > 0).all()
    torch.testing.assert_close(gaps, beta * toy.kl(others, star))  # J(π*) - J(π) = β KL(π || π*)


def test_optimal_policy_limits(problem):
    ref, rewards = problem
    torch.testing.assert_close(toy.optimal_policy(ref, rewards, 1e4), ref, atol=1e-3, rtol=0)  # β → ∞: stay
    greedy = toy.optimal_policy(ref, rewards, 1e-3)  # β → 0: all mass on the best response
    assert greedy.argmax() == rewards.argmax() and greedy.max() > 0.999


def test_implied_reward_and_bradley_terry(problem):
    ref, rewards = problem
    beta = 0.5
    star = toy.optimal_policy(ref, rewards, beta)
    log_z = torch.log(toy.partition_function(ref, rewards, beta))
    r_hat = toy.implied_reward(star, ref, beta)
    torch.testing.assert_close(rewards - r_hat, torch.full_like(rewards, beta * log_z.item()))  # Eq. 5
    torch.testing.assert_close(toy.implied_reward(star, ref, beta, log_z=log_z), rewards)
    P = toy.preference_matrix(rewards)
    torch.testing.assert_close(toy.preference_matrix(r_hat), P)  # Eq. 6: Z cancels
    torch.testing.assert_close(P + P.T, torch.ones_like(P))  # p(i ≻ j) + p(j ≻ i) = 1
    torch.testing.assert_close(P.diagonal(), torch.full((6,), 0.5, dtype=torch.float64))
    assert toy.bradley_terry(torch.tensor(1.0), torch.tensor(0.0)).item() == pytest.approx(1 / (1 + math.exp(-1)))


def test_sample_preferences_follow_bradley_terry():
    ref = torch.tensor([0.5, 0.5], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    prefs = toy.sample_preferences(ref, rewards, 40_000, seed=0)
    assert len(prefs.winners) + prefs.dropped_ties == 40_000
    assert (prefs.winners != prefs.losers).all()
    n = len(prefs.winners)
    share = (prefs.winners == 0).double().mean().item()
    expected = 1 / (1 + math.exp(-1))  # σ(r0 - r1)
    assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    again = toy.sample_preferences(ref, rewards, 40_000, seed=0)
    assert torch.equal(prefs.winners, again.winners) and torch.equal(prefs.losers, again.losers)


def test_dpo_loss_on_counts_equals_per_pair_loss(problem):
    ref, rewards = problem
    prefs = toy.sample_preferences(ref, rewards, 5_000, seed=2)
    theta = torch.log(ref) + 0.3 * torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    per_pair = toy.dpo_loss_on_policy(theta, ref, prefs.winners, prefs.losers, beta=0.5)
    counts = toy.pair_counts(prefs, 6)
    assert counts.sum().item() == len(prefs.winners) and counts.diagonal().sum().item() == 0
    assert toy.dpo_loss_on_counts(theta, ref, counts, beta=0.5).item() == pytest.approx(per_pair.item(), abs=1e-12)
    # and both are course_utils.losses.preference_loss on the toy's log-probs
    from course_utils.losses import preference_loss

    logp, logp_ref = torch.log_softmax(theta, -1), torch.log(ref)
    w, l = prefs.winners, prefs.losers
    losses, _, _ = preference_loss(logp[w], logp[l], logp_ref[w], logp_ref[l], beta=0.5)
    assert losses.mean().item() == pytest.approx(per_pair.item(), abs=1e-12)


def test_fit_dpo_and_ascent_reach_the_closed_form(problem):
    ref, rewards = problem
    beta = 1.0
    star = toy.optimal_policy(ref, rewards, beta)
    ascent = toy.maximize_kl_objective(ref, rewards, beta, steps=800)
    assert toy.kl(ascent.policy, star).item() < 1e-6
    assert ascent.losses[-1] > ascent.losses[0]  # J rises
    prefs = toy.sample_preferences(ref, rewards, 200_000, seed=0)
    fit = toy.fit_dpo(ref, prefs, beta, steps=800)
    assert fit.losses[0] == pytest.approx(LN2, abs=1e-12)
    assert fit.policies.shape == (801, 6)
    torch.testing.assert_close(fit.policies[0], ref)  # starts at the reference
    assert toy.kl(fit.policy, star).item() < 1e-3
    assert torch.get_num_threads() >= 1  # the one-thread context restored a valid setting


# ---------------------------------------------------------------------------------------------
# course_utils.plots
# ---------------------------------------------------------------------------------------------


def test_loss_and_weight_curves():
    margins = np.array([-4.0, 0.0, 4.0])
    np.testing.assert_allclose(dpo_loss_curve(margins, 0.5), [math.log1p(math.e ** 2), LN2, math.log1p(math.e ** -2)])
    w = gradient_weight_curve(margins, 0.5)
    np.testing.assert_allclose(w + w[::-1], 1.0)  # σ(-x) + σ(x) = 1
    assert w[1] == 0.5 and w[0] > w[2]
    # the weight is minus the derivative of the loss with respect to βΔ
    eps, x = 1e-6, np.array([1.3])
    slope = (dpo_loss_curve(x + eps, 1.0) - dpo_loss_curve(x - eps, 1.0)) / (2 * eps)
    np.testing.assert_allclose(-slope, gradient_weight_curve(x, 1.0), rtol=1e-6)
    assert np.isfinite(dpo_loss_curve(np.array([-1e4]), 1.0)).all()  # no overflow


@pytest.mark.parametrize("plot", [plot_dpo_loss_curves, plot_gradient_weight])
def test_beta_plots(plot, tmp_path):
    from matplotlib.figure import Figure

    fig = plot((0.1, 0.5, 1.0))
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert len(fig.axes[0].get_legend().get_texts()) == 3
    first = save_figure(fig, tmp_path / "a.png").read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    assert save_figure(plot((0.1, 0.5, 1.0)), tmp_path / "b.png").read_bytes() == first  # reproducible files
    # drawing into a caller's axes returns the caller's figure
    host = Figure()
    ax = host.add_subplot()
    assert plot((0.1,), ax=ax) is host


def test_plot_toy_fit(problem):
    ref, rewards = problem
    star = toy.optimal_policy(ref, rewards, 0.5)
    fit = toy.maximize_kl_objective(ref, rewards, 0.5, steps=20)
    fig = plot_toy_fit(ref, star, {"ascent": fit})
    bars, curves = fig.axes
    assert len(bars.patches) == 3 * 6  # π_ref, π*, the fit, six responses each
    assert len(curves.get_lines()) == 1 and len(curves.get_lines()[0].get_ydata()) == 21


def test_token_lengths_match_length_stats(tiny_pairs, tokenizer):
    from course_utils.templates import length_stats

    train = tiny_pairs[0]["train"]
    lengths = token_lengths(train, tokenizer)
    stats = length_stats(train, tokenizer)
    for key, values in lengths.items():
        assert len(values) == len(train)
        assert np.median(values) == stats[key]["median"] and max(values) == stats[key]["max"]
    np.testing.assert_array_equal(np.add(lengths["prompt"], lengths["chosen"]), lengths["prompt+chosen"])


def test_fraction_over():
    lengths = {"prompt+chosen": [10, 50, 30, 20], "prompt+rejected": [12, 20, 31, 20]}
    assert fraction_over(lengths, 30) == 0.5  # rows 1 (50) and 2 (31): either sequence over counts
    assert fraction_over(lengths, 50) == 0.0
    assert fraction_over({"prompt+chosen": [], "prompt+rejected": []}, 10) == 0.0


def test_plot_length_histograms(tiny_pairs, tokenizer):
    train = tiny_pairs[0]["train"]
    with pytest.raises(ValueError, match="tokenizer"):
        plot_length_histograms(train)
    fig = plot_length_histograms(train, tokenizer, max_length=64, bins=10)
    assert len(fig.axes) == 4
    over = fraction_over(token_lengths(train, tokenizer), 64)
    assert f"{over:.0%} of pairs over max_length" in fig.axes[-1].get_title()
    # the red max_length line is on every panel
    assert all(any(list(line.get_xdata()) == [64, 64] for line in ax.get_lines()) for ax in fig.axes)
    no_limit = plot_length_histograms(token_lengths(train, tokenizer))
    assert not any(ax.get_lines() for ax in no_limit.axes)
