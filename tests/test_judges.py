"""course_utils.judges on the tiny model and a tiny random reward model: real models, seconds on 2 cores."""

import numpy as np
import pytest
import torch

from course_utils.judges import (
    CRITERIA,
    ImplicitRewardJudge,
    JudgeLoadError,
    LLMPairwiseJudge,
    RewardModelJudge,
    SentimentJudge,
    judge_agreement,
    judged_win_rate,
    tiny_reward_model,
    verdicts_from_margins,
)

PROMPTS = [[{"role": "user", "content": "Continue this movie review: The plot"}], "What is 2 plus 2?",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]]


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    from course_utils.models import build_tiny_model

    return build_tiny_model(tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def rm_judge(tokenizer):
    return RewardModelJudge(tiny_reward_model(tokenizer, seed=1), tokenizer, batch_size=2)


def test_reward_model_scores_do_not_depend_on_batching(rm_judge):
    """Right padding and the last-token read: a row scores the same alone as in a padded batch (lengths differ)."""
    completions = ["A fine film.", "four", "Blue, like the sea on a bright and windy afternoon."]
    batched = rm_judge.score(PROMPTS, completions)
    alone = np.array([rm_judge.score([p], [c])[0] for p, c in zip(PROMPTS, completions)])
    assert batched.shape == (3,) and np.isfinite(batched).all()
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert len(set(np.round(batched, 6))) == 3  # the completion changes the score: it is read, not ignored


def test_reward_model_load_refuses_what_is_not_a_reward_model(tmp_path, tokenizer):
    from course_utils.models import tiny_model_dir

    with pytest.raises(JudgeLoadError, match="no such model folder"):
        RewardModelJudge.load(str(tmp_path / "missing"))
    with pytest.raises(JudgeLoadError, match="not a sequence classifier.*LlamaForCausalLM"):
        RewardModelJudge.load(str(tiny_model_dir(0)))
    saved = tmp_path / "rm"  # a saved tiny classifier loads and scores as the in-memory one does
    model = tiny_reward_model(tokenizer, seed=1)
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    loaded = RewardModelJudge.load(str(saved))
    np.testing.assert_allclose(loaded.score(PROMPTS[:1], ["ok"]),
                               RewardModelJudge(model, tokenizer).score(PROMPTS[:1], ["ok"]), atol=1e-6)


def test_pairwise_verdicts_from_both_orders():
    # (margin with first shown as A, margin with second shown as A) -> verdict
    v = verdicts_from_margins([2.0, -1.0, 0.5, -0.3, 0.0],
                              [-1.0, 3.0, 0.2, -0.1, -1.0])
    # row 0: first wins as A and as B -> +1; row 1: second wins both ways -> -1;
    # row 2: "A" wins both orders (position bias) -> tie; row 3: "B" wins both -> tie; row 4: indifferent as A -> tie
    assert v.prefer.tolist() == [1, -1, 0, 0, 0]
    assert v.consistency == pytest.approx(2 / 5)
    assert v.first_position_share == pytest.approx(4 / 10)  # A won in 0, 2 (ab) and 1, 2 (ba)


def test_llm_judge_swaps_consistently_and_reports_position_bias(tiny_lm, tokenizer):
    judge = LLMPairwiseJudge(tiny_lm, tokenizer, criterion=CRITERIA["sentiment"], batch_size=2)
    first, second = ["Wonderful and moving.", "4", "Red."], ["Dull.", "5", "It is green, I think."]
    forward, backward = judge.compare(PROMPTS, first, second), judge.compare(PROMPTS, second, first)
    # the same two renderings, in the other roles: margins swap exactly and verdicts flip sign
    np.testing.assert_allclose(forward.margin_ab, backward.margin_ba, atol=1e-5)
    np.testing.assert_array_equal(forward.prefer, -backward.prefer)
    out = judge_agreement(judge, PROMPTS, first, second)
    assert 0 <= out["first_position_share"] <= 1 and out["n"] == 3
    assert out["ci"][0] <= out["agreement"] <= out["ci"][1]


def test_agreement_with_the_ground_truth_and_win_rate(rm_judge):
    vader = SentimentJudge()
    good, bad = ["A wonderful, joyful film.", "I loved it."], ["A terrible, boring mess.", "I hated it."]
    assert judge_agreement(vader, PROMPTS[:2], good, bad)["agreement"] == 1.0
    assert judge_agreement(vader, PROMPTS[:2], bad, good)["agreement"] == 0.0
    out = judged_win_rate(rm_judge, PROMPTS[:2], good, bad)
    expected = (np.sign(np.array(out["policy_scores"]) - out["reference_scores"]) > 0).mean()
    assert out["win_rate"] == pytest.approx(expected) and out["wins"] + out["ties"] + out["losses"] == 2


def test_implicit_reward_judge_is_zero_before_training(tokenizer):
    from peft import get_peft_model

    from course_utils.models import build_tiny_model, lora_config

    model = get_peft_model(build_tiny_model(tokenizer, seed=0), lora_config(r=4, alpha=8, dropout=0.0))
    judge = ImplicitRewardJudge(model, tokenizer, beta=0.1)
    np.testing.assert_allclose(judge.score(PROMPTS, ["a", "b", "c"]), 0.0, atol=1e-6)  # LoRA B = 0: pi == pi_ref
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    assert np.abs(judge.score(PROMPTS, ["a", "b", "c"])).max() > 1e-3
