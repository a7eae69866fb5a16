"""Lesson 1 (RLHF background): the notebook on the tiny preset, and the pieces of ``course_utils/rlhf.py``."""

import math

import numpy as np
import pytest
import torch

from course_utils import rlhf

SEEDS, LRS = [0, 1], [1e-3, 1e-2]  # the notebook's tiny defaults


# --- the notebook ------------------------------------------------------------------------------


def test_notebook_follows_the_conventions():
    import nbformat

    from course_utils.lessons import NOTEBOOK_DIR

    nb = nbformat.read(NOTEBOOK_DIR / "01_rlhf_background.ipynb", as_version=4)
    assert nb.metadata.kernelspec.name == "python3" and nb.metadata.language_info.name == "python"
    assert nb.cells[0].source.startswith("# Lesson 1:") and "colab-badge" in nb.cells[0].source
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and 'PRESET = "auto"' in tagged[0].source and "SEED = 0" in tagged[0].source
    assert sum(c.source.startswith("# Check:") for c in nb.cells) >= 6
    assert any("# TODO" in c.source for c in nb.cells) and "## Questionnaire" in nb.cells[-2].source
    assert nb.cells[-1].source.startswith("### Answers")  # the questionnaire's collapsed answers close the lesson


@pytest.fixture(scope="module")
def lesson_01(run_lesson):
    return run_lesson("01")


def test_lesson_1_saves_its_reward_model_for_lesson_5(lesson_01, course_dir):
    """Lesson 5 judges with it: it loads as a reward-model judge and scores a pair (judges.reward_model_judge)."""
    from course_utils.judges import reward_model_judge

    judge = reward_model_judge("lesson-1", course_dir)
    scores = judge.score([[{"role": "user", "content": "Continue: The film"}]] * 2, ["was wonderful.", "was awful."])
    assert judge.name == "lesson-1 reward model" and scores.shape == (2,) and np.isfinite(scores).all()


def test_reward_model_numbers_are_recorded(lesson_01):
    assert 0.0 <= lesson_01["rm_held_out_accuracy"] <= 1.0
    lo, hi = lesson_01["rm_held_out_accuracy_ci"]
    assert 0.0 <= lo <= lesson_01["rm_held_out_accuracy"] <= hi <= 1.0
    assert lesson_01["rm_held_out_pairs"] == 8  # the tiny preset's held-out pairs
    assert -1.0 <= lesson_01["rm_judge_pearson"] <= 1.0 and -1.0 <= lesson_01["rm_judge_spearman"] <= 1.0
    assert lesson_01["rm_first_loss"] == pytest.approx(math.log(2), abs=1e-4)  # zero head: every reward 0
    assert lesson_01["rm_steps"] == 8 and lesson_01["rm_seconds"] > 0


def test_bradley_terry_and_kl_examples(lesson_01):
    assert lesson_01["bt_prob_example"] == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert lesson_01["kl_shaped_rewards_example"] == pytest.approx([-0.03, -0.02, 0.04, 0.8])
    assert lesson_01["kl_shaped_return_example"] == pytest.approx(0.8 - 0.1 * (0.3 + 0.2 - 0.4 + 0.0))


def test_ppo_example_matches_hand_computation(lesson_01):
    # ratio, A -> min(ratio * A, clip(ratio, 0.8, 1.2) * A)
    assert lesson_01["ppo_example_objective"] == pytest.approx([
        1.0,  # 1.0, +1: inside the clip range
        1.2,  # 1.5, +1: clipped at 1.2
        -0.8,  # 0.5, -1: clipped at 0.8 (pessimistic side)
        0.5,  # 0.5, +1: unclipped (the min keeps the lower value)
        -3.0,  # 1.5, -2: unclipped
    ])
    assert lesson_01["ppo_example_mean"] == pytest.approx(-0.22)


def test_sweep_has_every_seed_and_learning_rate(lesson_01):
    rewards = lesson_01["rloo_final_rewards"]
    assert len(rewards) == len(SEEDS) * len(LRS) and all(math.isfinite(r) for r in rewards)
    assert sorted(zip(lesson_01["rloo_learning_rates"], lesson_01["rloo_seeds"])) == [(lr, s) for lr in LRS for s in SEEDS]
    stds = lesson_01["rloo_std_by_lr"]
    assert set(stds) == {f"{lr:g}" for lr in LRS} and all(s is not None and s >= 0 for s in stds.values())
    for lr in LRS:  # the recorded std is the std of that learning rate's recorded rewards
        mine = [r for r, l in zip(rewards, lesson_01["rloo_learning_rates"]) if l == lr]
        assert stds[f"{lr:g}"] == pytest.approx(np.std(mine, ddof=1), abs=1e-12)
    assert -1.0 <= lesson_01["rloo_reference_reward"] <= 1.0 and lesson_01["rloo_eval_noise_std"] >= 0
    assert all(s > 0 for s in lesson_01["rloo_run_seconds"]) and lesson_01["rloo_sweep_seconds"] > 0


def test_lesson_runs_within_the_tiny_budget(lesson_01):
    assert lesson_01["wall_seconds"] < 180  # the budget is ~90 s on a quiet 2-core machine; CI machines are shared


# --- Bradley-Terry and reward accuracy ---------------------------------------------------------


def test_bradley_terry_properties():
    a, b = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([1.0, 0.5, 0.3])
    p = rlhf.bradley_terry_prob(a, b)
    assert torch.allclose(p + rlhf.bradley_terry_prob(b, a), torch.ones(3, dtype=torch.float64))  # two orders sum to 1
    assert torch.allclose(rlhf.bradley_terry_prob(a + 7.0, b + 7.0), p)  # only differences matter
    assert p[2].item() == 0.5  # equal rewards: a coin flip
    assert p[0].item() == pytest.approx(1 / (1 + math.exp(-1)))
    assert rlhf.bradley_terry_prob(3.0, 0.0) > rlhf.bradley_terry_prob(2.0, 0.0)  # monotone in the margin
    assert rlhf.bradley_terry_loss([0.4, -2.0], [0.4, -2.0]).item() == pytest.approx(math.log(2))
    assert rlhf.bradley_terry_loss([2.0], [1.0]).item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))))


def test_reward_accuracy_on_hand_built_pairs():
    chosen = [1.0, 2.0, 3.0, 0.0]
    rejected = [0.0, 2.0, 4.0, -1.0]  # right, tie (a miss), wrong, right
    assert rlhf.reward_accuracy(chosen, rejected) == 0.5
    with pytest.raises(ValueError):
        rlhf.reward_accuracy([1.0], [1.0, 2.0])


@pytest.mark.parametrize("p,n", [(0.0, 10), (0.5, 64), (0.75, 8), (1.0, 3)])
def test_wilson_interval_brackets_the_estimate(p, n):
    lo, hi = rlhf.wilson_interval(p, n)
    assert 0.0 <= lo <= p <= hi <= 1.0 and hi - lo > 0


# --- the RLHF objective and PPO ----------------------------------------------------------------


def test_kl_shaped_rewards_hand_values():
    shaped = rlhf.kl_shaped_rewards(0.8, [-1.2, -0.7, -2.0], [-1.5, -0.9, -1.6], beta=0.1)
    # -β log ratio on every token: -0.1 * [0.3, 0.2, -0.4]; the score is added on the last one
    assert shaped.tolist() == pytest.approx([-0.03, -0.02, 0.04 + 0.8])


@pytest.mark.parametrize("clip", [0.2, 0.1])
def test_ppo_clipped_objective_hand_values(clip):
    ratio = torch.tensor([1.0, 1.5, 0.5, 0.5, 1.5, 1.05], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0, -2.0, 3.0], dtype=torch.float64)
    logp_old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0, -0.1], dtype=torch.float64)
    out = rlhf.ppo_clipped_objective(logp_old + ratio.log(), logp_old, adv, clip=clip)
    expected = [
        1.0,  # ratio 1: the objective is A
        (1 + clip) * 1.0,  # A > 0, ratio above 1 + clip: capped
        -(1 - clip),  # A < 0, ratio below 1 - clip: capped at (1 - clip) * A
        0.5,  # A > 0, ratio below 1 - clip: the unclipped, lower value
        -3.0,  # A < 0, ratio above 1 + clip: the unclipped, lower value
        1.05 * 3.0,  # A > 0, ratio 1.05: inside both clip ranges
    ]
    assert out.tolist() == pytest.approx(expected)


def test_ppo_gradient_is_zero_where_the_clip_binds():
    logp_old = torch.zeros(4, dtype=torch.float64)
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.5], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    logp_new = ratio.log().requires_grad_()
    rlhf.ppo_clipped_objective(logp_new, logp_old, adv).sum().backward()
    # d(ratio * A)/d logp_new = ratio * A where unclipped, 0 where the clipped term wins
    assert logp_new.grad.tolist() == pytest.approx([0.0, 0.0, 1.1, 0.5])


def test_ppo_objective_keeps_batch_shapes():
    out = rlhf.ppo_clipped_objective(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 1))
    assert out.shape == (2, 3) and torch.equal(out, torch.ones(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("name", ["cpu", "tiny", "t4", "a100"])
def test_rloo_precision_is_what_rloo_config_sets(name, tmp_path, monkeypatch):
    """Lesson 1 prints rloo_precision; it must be the precision TRL is told to train in, on a CPU and a GPU."""
    from course_utils.presets import get_preset

    preset = get_preset(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rlhf.rloo_precision(preset) == "float32"
    config = rlhf.rloo_config(preset, tmp_path, seed=0, learning_rate=1e-4, steps=1, beta=0.05)
    assert not config.bf16 and not config.fp16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the precision rule; TRL's config needs a real GPU
    assert rlhf.rloo_precision(preset) == (preset.dtype if preset.dtype != "float32" else "float32")


def test_judge_reward_accepts_trl_keyword_arguments():
    judge = lambda texts: [float(len(t)) for t in texts]
    reward = rlhf.judge_reward(judge)
    conversational = [[{"role": "assistant", "content": "abc"}], [{"role": "assistant", "content": "de"}]]
    # RLOOTrainer passes prompts, completions, completion_ids, extra columns, trainer_state, log_extra, log_metric
    out = reward(prompts=[[], []], completions=conversational, completion_ids=[[1], [2]], opening=["x", "y"],
                 trainer_state=None, log_extra=print, log_metric=print)
    assert out == [3.0, 2.0]
    assert reward(completions=["four"]) == [4.0]  # plain-text prompts give plain-text completions


# --- a reward model trained a few steps on tiny ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_pairs, tiny_preset, tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        untrained, _ = rlhf.load_reward_model(tiny_preset)
        model, tokenizer, metrics = rlhf.train_reward_model(tiny_preset, tiny_pairs[0]["train"],
                                                            tmp_path_factory.mktemp("rm"), steps=6, learning_rate=1e-2)
    finally:
        torch.set_num_threads(before)
    return dict(model=model, tokenizer=tokenizer, metrics=metrics, untrained=untrained)


def test_reward_model_trains_from_ln2_and_moves(tiny_reward_model):
    log = tiny_reward_model["metrics"]["log"]
    assert log[0]["step"] == 1 and log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert len(log) >= 2 and all(math.isfinite(h["loss"]) for h in log)
    assert tiny_reward_model["metrics"]["steps"] == 6
    before, after = tiny_reward_model["untrained"].state_dict(), tiny_reward_model["model"].state_dict()
    assert torch.count_nonzero(before["score.weight"]) == 0 and torch.count_nonzero(after["score.weight"]) > 0
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_reward_model_scores_are_finite_and_padding_invariant(tiny_reward_model, tiny_pairs, one_thread):
    model, tokenizer = tiny_reward_model["model"], tiny_reward_model["tokenizer"]
    test = tiny_pairs[0]["test"]
    prompts, texts = list(test["prompt"]), [m[-1]["content"] for m in test["chosen"]]
    batched = rlhf.score_completions(model, tokenizer, prompts, texts, batch_size=4)
    one_by_one = torch.cat([rlhf.score_completions(model, tokenizer, [p], [t]) for p, t in zip(prompts, texts)])
    assert batched.shape == (len(test),) and torch.isfinite(batched).all()
    assert torch.allclose(batched, one_by_one, atol=1e-5)  # right padding and length sorting change nothing


def test_evaluate_reward_model_accuracy_is_computed_from_its_rewards(tiny_reward_model, tiny_pairs, one_thread):
    ev = rlhf.evaluate_reward_model(tiny_reward_model["model"], tiny_reward_model["tokenizer"], tiny_pairs[0]["test"])
    n = len(tiny_pairs[0]["test"])
    assert ev["pairs"] == n and len(ev["rewards"]) == len(ev["judge"]) == 2 * n
    assert ev["accuracy"] == np.mean(np.array(ev["r_chosen"]) > np.array(ev["r_rejected"]))
    assert ev["judge"][:n] == pytest.approx(list(tiny_pairs[0]["test"]["chosen_score"]))
    assert -1 <= ev["pearson"] <= 1 and -1 <= ev["spearman"] <= 1


def test_frozen_backbone_trains_only_the_head(tiny_preset):
    model, _ = rlhf.load_reward_model(tiny_preset, trainable_layers=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"score.weight", "model.norm.weight"}
    model, _ = rlhf.load_reward_model(tiny_preset, trainable_layers=1)
    assert any(n.startswith("model.layers.1.") for n, p in model.named_parameters() if p.requires_grad)
    assert not any(n.startswith("model.layers.0.") for n, p in model.named_parameters() if p.requires_grad)


# --- one RLOO run on tiny ----------------------------------------------------------------------


def test_rloo_run_leaves_the_base_model_untouched(tiny_pairs, tiny_preset, tmp_path, one_thread):
    from course_utils.models import load_model
    from course_utils.sentiment import SentimentJudge, sentiment_prompt

    base = load_model("tiny", seed=tiny_preset.seed)
    before = {n: p.detach().clone() for n, p in base[0].named_parameters()}
    splits, held_out, _ = tiny_pairs
    run = rlhf.run_rloo(tiny_preset, base, list(splits["train"]["prompt"]), [sentiment_prompt(held_out[0])],
                        SentimentJudge(), seed=0, learning_rate=1e-2, steps=2, output_dir=tmp_path,
                        max_completion_length=8, eval_samples=2)
    assert math.isfinite(run["final_reward"]) and len(run["train_rewards"]) == 2
    assert run["kl"][0] == 0.0  # LoRA's B starts at zero: at step 1 the policy is the reference
    assert run["clip_ratio"] == [0.0, 0.0]  # one update per batch: the ratio is 1
    after = dict(base[0].named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())  # every run trains its own copy
    assert not any("lora_" in n for n in after)


def test_rloo_reports_the_clip_of_every_optimiser_step(tiny_pairs, tiny_preset, tmp_path, one_thread):
    """num_iterations=2 (exercise level 3): the second pass over a batch logs its clip but no reward; it must not be lost."""
    from course_utils.models import load_model
    from course_utils.sentiment import SentimentJudge

    base = load_model("tiny", seed=tiny_preset.seed)
    run = rlhf.run_rloo(tiny_preset, base, list(tiny_pairs[0]["train"]["prompt"]), None, SentimentJudge(), seed=0,
                        learning_rate=1e-2, steps=2, output_dir=tmp_path, max_completion_length=8,
                        config_overrides={"num_iterations": 2})
    assert len(run["train_rewards"]) == 1  # one batch sampled, used for both steps
    assert len(run["clip_ratio"]) == 2 and run["clip_ratio"][0] == 0.0  # first pass: ratio 1; second: measured
    assert 0.0 <= run["clip_ratio"][1] <= 1.0
