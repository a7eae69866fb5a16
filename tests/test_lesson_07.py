"""Lesson 7 (DPO vs RLOO vs best-of-N on the reward-KL frontier) under papermill on tiny, and its pure functions.

The notebook asserts its own invariants in `# Check:` cells; here we assert on the `frontier.json` it writes.
On `tiny` the model is random, so only what holds for any model is asserted: structure, closed forms, the link
between best-of-1 and the reference, Monte-Carlo KL near or above 0, and the FLOP bookkeeping. The lesson needs no
earlier lesson's output (it trains its own policies), so it runs on its own.
"""

import json
import math

import numpy as np
import pytest

from course_utils import frontier
from course_utils import frontier_report as report
from course_utils.gpu_budget import ModelShape

# KL estimates of trained policies may fall below 0 by Monte-Carlo noise: at most 3 standard errors of their own
KL_NOISE_SE = 3.0

# ---------------------------------------------------------------------------------------------
# The notebook on tiny
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lesson_07(run_lesson, course_dir):
    results = run_lesson("07")
    return results, json.loads((course_dir / "frontier.json").read_text())


def test_every_method_ran_every_setting_with_three_seeds(lesson_07):
    _, saved = lesson_07
    grid = frontier.GRIDS["tiny"]
    assert saved["preset"] == "tiny"
    assert {r["method"] for r in saved["runs"]} == {"bon", "dpo", "rloo"}
    expected = {("bon", n) for n in grid.bon_ns} | {("dpo", b) for b in grid.dpo_betas} | {("rloo", b) for b in grid.rloo_betas}
    assert {(r["method"], r["value"]) for r in saved["summary"]} == expected
    for row in saved["summary"]:
        seeds = [r["seed"] for r in saved["runs"] if (r["method"], r["value"]) == (row["method"], row["value"])]
        assert len(seeds) == len(set(seeds)) == row["n_seeds"] >= 3
    assert len(saved["runs"]) == 3 * (len(grid.bon_ns) + len(grid.dpo_betas) + len(grid.rloo_betas))


def test_rewards_finite_and_kl_non_negative_up_to_noise(lesson_07):
    _, saved = lesson_07
    for run in saved["runs"]:
        assert run["reward"] is not None and -1.0 <= run["reward"] <= 1.0
        assert run["seconds"] > 0
        if run["method"] in ("dpo", "rloo"):
            assert run["kl_source"] == "monte_carlo" and run["kl_stderr"] > 0
            assert run["kl"] >= -KL_NOISE_SE * run["kl_stderr"], run
    dpo = [r for r in saved["runs"] if r["method"] == "dpo"]
    assert all(abs(r["first_loss"] - math.log(2)) <= r["first_loss_bound"] for r in dpo)
    assert all(r["first_loss_bound_dtype"] == "float32" for r in dpo)  # tiny trains in fp32: the fp32 bound


def test_best_of_n_kl_is_the_closed_form_and_best_of_1_is_the_reference(lesson_07):
    _, saved = lesson_07
    bon = [r for r in saved["runs"] if r["method"] == "bon"]
    for run in bon:
        n = run["value"]
        assert run["kl_source"] == "closed_form" and run["kl"] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
    for seed in {r["seed"] for r in bon}:  # nested candidate sets: more candidates never lose reward
        rewards = [r["reward"] for r in sorted((r for r in bon if r["seed"] == seed), key=lambda r: r["value"])]
        assert rewards == sorted(rewards)
    ones = [r for r in bon if r["value"] == 1]
    ref = saved["reference"]
    se = math.sqrt(ref["reward_stderr"] ** 2 + np.mean([r["reward_stderr"] for r in ones]) ** 2 / len(ones))
    assert abs(np.mean([r["reward"] for r in ones]) - ref["reward"]) <= 3 * se + 1e-9


def test_flops_positive_and_ordered(lesson_07):
    _, saved = lesson_07
    assert all(r["flops"] > 0 for r in saved["runs"])
    bon = {r["value"]: r["flops_mean"] for r in saved["summary"] if r["method"] == "bon"}
    for n, flops in bon.items():  # generation FLOPs are linear in the number of candidates
        assert flops == pytest.approx(n * bon[1], rel=1e-12)
    dpo = {r["flops"] for r in saved["runs"] if r["method"] == "dpo"}
    assert len(dpo) == 1  # same steps, same data, any beta
    # one RLOO step (generate 4, three forwards, one backward on 4 short sequences) costs less than one DPO step
    # on 4 pairs (8 longer sequences); the run totals follow the step counts of the tiny grid
    grid = frontier.GRIDS["tiny"]
    rloo_per_step = max(r["flops"] for r in saved["runs"] if r["method"] == "rloo") / grid.rloo_steps
    assert rloo_per_step < dpo.pop() / grid.dpo_steps


def test_recorded_numbers_and_conclusions(lesson_07):
    results, saved = lesson_07
    for m in ("bon", "dpo", "rloo"):
        best = max((r for r in saved["summary"] if r["method"] == m), key=lambda r: r["reward_mean"])
        assert results[f"{m}_best_reward"] == pytest.approx(best["reward_mean"])
    assert results["dpo_dominates_rloo"] in (True, False, None)
    assert results["num_runs"] == len(saved["runs"]) and results["grid_seconds"] > 0
    assert any("dominate" in line for line in saved["conclusions"])
    assert saved["frontier"] and all("kl_budget" in row for row in saved["frontier"])


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def test_bon_kl_closed_form():
    assert frontier.bon_kl(1) == 0.0
    assert frontier.bon_kl(4) == pytest.approx(math.log(4) - 0.75)  # 0.636
    assert frontier.bon_kl(16) == pytest.approx(math.log(16) - 15 / 16)  # 1.835
    values = [frontier.bon_kl(n) for n in range(1, 65)]
    assert values == sorted(values) and all(v < math.log(n) for n, v in enumerate(values[1:], start=2))
    with pytest.raises(ValueError):
        frontier.bon_kl(0)


def test_spread_statistics():
    assert report.spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}  # ddof=1
    assert report.spread([0.5])["std"] == 0.0
    with pytest.raises(ValueError):
        report.spread([])


def _run(method, value, seed, reward, kl, flops=1.0):
    return {"method": method, "param": "n" if method == "bon" else "beta", "value": value, "seed": seed,
            "reward": reward, "kl": kl, "seconds": 1.0, "flops": flops}


def _summary(dpo_rewards, rloo_rewards):
    """Two settings per method, beta 1.0 at mean KL 1 and beta 0.1 at mean KL 2; ``*_rewards`` are the mean rewards
    at KL 1 and KL 2. Three seeds per setting, at -0.1, 0, +0.1 around both means."""
    runs = []
    for method, rewards in (("dpo", dpo_rewards), ("rloo", rloo_rewards)):
        for (value, kl), reward in zip(((1.0, 1.0), (0.1, 2.0)), rewards):
            runs += [_run(method, value, s, reward + d, kl + d) for s, d in enumerate((-0.1, 0.0, 0.1))]
    return report.summarize(runs, reference_reward=0.0)


def test_summarize_groups_seeds_in_method_order():
    runs = [_run("rloo", 0.5, 0, 0.2, 1.0), _run("dpo", 0.1, 1, 0.4, 3.0), _run("dpo", 0.1, 0, 0.2, 1.0),
            _run("bon", 4, 0, 0.3, frontier.bon_kl(4))]
    rows = report.summarize(runs, reference_reward=0.1)
    assert [(r["method"], r["value"]) for r in rows] == [("bon", 4), ("dpo", 0.1), ("rloo", 0.5)]
    dpo = rows[1]
    assert dpo["seeds"] == [0, 1] and dpo["n_seeds"] == 2
    assert dpo["reward_mean"] == pytest.approx(0.3) and dpo["reward_std"] == pytest.approx(math.sqrt(0.02))
    assert (dpo["kl_min"], dpo["kl_max"]) == (1.0, 3.0) and dpo["gain_mean"] == pytest.approx(0.2)


def test_frontier_and_dominance():
    # DPO above RLOO at both budgets: (KL 1 -> 0.5 vs 0.3), (KL 2 -> 0.6 vs 0.3)
    ahead = _summary(dpo_rewards=(0.5, 0.6), rloo_rewards=(0.3, 0.3))
    assert report.dominates(ahead, "dpo", "rloo", 0.0) is True
    assert report.dominates(ahead, "rloo", "dpo", 0.0) is False
    table = report.frontier_table(ahead, 0.0, ("dpo", "rloo"))
    assert [row["kl_budget"] for row in table] == [0.0, 1.0, 2.0] and [row["leader"] for row in table] == [None, "dpo", "dpo"]
    hull = report.achievable_frontier(ahead, "dpo", 0.0)
    assert hull == [(0.0, 0.0), (1.0, 0.5), (2.0, 0.6)]
    assert report.reward_at_kl(hull, 0.5) == pytest.approx(0.25)  # halfway along the chord from the reference
    assert report.reward_at_kl(hull, 9.0) == pytest.approx(0.6)  # flat beyond the last point
    # only the reference stands at KL 0: best-of-1 (the reference re-sampled) never lifts the frontier
    bon = report.summarize([_run("bon", n, s, 0.3 if n == 1 else 0.5, frontier.bon_kl(n)) for n in (1, 4) for s in range(3)],
                           reference_reward=0.0)
    assert report.achievable_frontier(bon, "bon", 0.0) == [(0.0, 0.0), (pytest.approx(frontier.bon_kl(4)), 0.5)]
    # a point under a chord is not a corner: (1, 0.2) lies below the line from (0, 0) to (2, 0.6)
    assert report.achievable_frontier(_summary((0.2, 0.6), (0.3, 0.3)), "dpo", 0.0) == [(0.0, 0.0), (2.0, 0.6)]
    # crossing: RLOO ahead within KL 1 (0.4 vs 0.3 on DPO's chord), DPO ahead at KL 2 -> neither dominates
    crossing = _summary(dpo_rewards=(0.2, 0.6), rloo_rewards=(0.4, 0.45))
    assert report.dominates(crossing, "dpo", "rloo", 0.0) is False and report.dominates(crossing, "rloo", "dpo", 0.0) is False
    lines = report.conclusions(crossing, 0.0)
    assert any(line.startswith("Neither DPO nor RLOO") for line in lines)


def test_conclusions_and_paper_comparison_follow_the_numbers():
    context = dict(preset="cpu", model="smollm2-135m", parameters=135e6, dpo_pairs_seen=32, train_pairs=255,
                   rloo_samples_seen=24, chosen_mean=0.6, rejected_mean=-0.2, bon_saturated=0.5, dpo_saturated=0.1)
    ahead = _summary(dpo_rewards=(0.5, 0.6), rloo_rewards=(0.3, 0.3))
    assert "As in Figure 2" in " ".join(report.paper_comparison(ahead, 0.0, context))
    behind = _summary(dpo_rewards=(0.1, 0.2), rloo_rewards=(0.4, 0.5))
    text = " ".join(report.paper_comparison(behind, 0.0, context))
    assert "does NOT dominate" in text and "off-policy" in text and "saturates: 50%" in text
    # DPO's narrowest lead over RLOO is 0.2 within 1 nat (0.5 vs 0.3), above the seed std of 0.1
    assert "narrowest lead, +0.200 within 1.00 nats, is larger than" in " ".join(report.conclusions(ahead, 0.0))
    assert "random" not in text  # the tiny-model reason only on tiny
    # larger beta, smaller KL (see _summary)
    assert any("a larger β ended nearer the reference" in line for line in report.conclusions(ahead, 0.0))


def test_flop_estimates_against_a_hand_count():
    # h=4, i=8, one layer, 2 query heads of dim 2, one K/V head, vocabulary 10. Linears per layer (in x out):
    # q 4x4, k 4x2, v 4x2, o 4x4, gate 4x8, up 4x8, down 8x4 -> sum in*out = 144, sum (in+out) = 64
    shape = ModelShape(4, 8, 1, 2, 1, 10, tie_embeddings=True)
    # generation: 5 sequences of 3 prompt + 2 completion tokens (T = 25 tokens):
    #   linears 2*25*144 = 7200; attention 2*2*s^2*h per sequence = 4*25*4*5 = 2000; LM head on the 2 drawn
    #   positions only, 2*5*2*4*10 = 800 -> 10000
    assert frontier.generation_flops(shape, prompt_tokens=3, completion_tokens=2, sequences=5) == 10_000
    # DPO step, 2 pairs = 4 sequences of 5 tokens (T = 20), LoRA r=1:
    #   forward  = linears 5760 + attention 1600 + LoRA 2*20*1*64 = 2560 + head 2*4*5*4*10 = 1600  = 11520
    #   backward = 5760 + 2.5*1600 + 2*2560 + 2*1600                                               = 18080
    #   reference forward (adapter off) = 5760 + 1600 + 1600                                       =  8960
    # 3 steps: 3 * 38560 = 115680
    assert frontier.dpo_run_flops(shape, steps=3, pairs_per_step=2, prompt_tokens=3, completion_tokens=2,
                                  lora_r=1) == 115_680
    # RLOO step, 4 sequences of 3 + 2 tokens, head on the 2 completion positions (2*4*2*4*10 = 640):
    #   forward 5760 + 1600 + 2560 + 640 = 10560, backward 5760 + 4000 + 5120 + 1280 = 16160,
    #   reference 5760 + 1600 + 640 = 8000; generation + old log-probs = 2 forwards -> 45280 per step
    assert frontier.rloo_run_flops(shape, steps=2, sequences_per_step=4, prompt_tokens=3, completion_tokens=[2, 2],
                                   lora_r=1) == 90_560
    # about 2 x parameters per token: on SmolLM2's shape the rule and the count agree within a third
    smol = frontier.SHAPES["smollm2-135m"]
    rule = 2 * smol.num_parameters() * 60 * 100
    assert 0.67 < frontier.generation_flops(smol, prompt_tokens=50, completion_tokens=10, sequences=100) / rule < 1.33


def test_grid_for_overrides_and_gpu_fallback():
    assert frontier.grid_for("tiny", dpo_steps=None) == frontier.GRIDS["tiny"]  # None: the preset decides
    g = frontier.grid_for("cpu", dpo_betas=[0.05, 0.1], num_seeds=4)
    assert g.dpo_betas == (0.05, 0.1) and g.num_seeds == 4 and g.rloo_steps == frontier.GRIDS["cpu"].rloo_steps
    assert frontier.grid_for("t4") == frontier.grid_for("a100") == frontier.GRIDS["gpu"]
    with pytest.raises(TypeError):
        frontier.grid_for("tiny", no_such_field=1)
