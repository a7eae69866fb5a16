import math

import pytest
import torch

from course_utils.evaluate import evaluate_against_reference, implicit_reward_accuracy, win_rate
from course_utils.sentiment import SentimentJudge, sentiment_prompt


def test_win_rate_counts_ties_half_and_brackets_the_rate():
    wr = win_rate([1, 2, 3, 0], [0, 2, 1, 5])  # win, tie, win, loss
    assert (wr.wins, wr.ties, wr.losses) == (2, 1, 1)
    assert wr.rate == pytest.approx(2.5 / 4)
    assert wr.ci_low <= wr.rate <= wr.ci_high and 0 <= wr.ci_low and wr.ci_high <= 1
    assert win_rate([1] * 50, [0] * 50).ci_low == 1.0
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])


@pytest.fixture
def fresh_lora(tokenizer):
    from peft import get_peft_model

    from course_utils.models import load_model, lora_config

    model, _ = load_model("tiny", seed=0)
    with torch.random.fork_rng(devices=[]):  # LoRA's A is drawn from the global RNG: fix it, whatever ran before
        torch.manual_seed(0)
        return get_peft_model(model, lora_config(r=4, alpha=8, dropout=0.0))


def test_untrained_adapter_equals_reference(fresh_lora, tokenizer, tiny_pairs):
    """LoRA starts with B = 0: policy == reference, so KL is 0, rewards are 0, win rate is 1/2."""
    prompts = [sentiment_prompt(o) for o in tiny_pairs[1][:4]]
    out = evaluate_against_reference(fresh_lora, tokenizer, prompts, SentimentJudge(), num_samples=2,
                                     max_new_tokens=8, seed=3)
    assert out["kl"] == pytest.approx(0.0, abs=1e-5)
    assert out["win_rate"] == 0.5 and out["win_rate_detail"]["ties"] == 8
    assert out["policy_reward"] == out["reference_reward"]
    acc = implicit_reward_accuracy(fresh_lora, tokenizer, tiny_pairs[0]["test"], beta=0.1)
    assert acc["reward_margin"] == pytest.approx(0.0, abs=1e-5) and acc["reward_accuracy"] == 0.0


def test_kl_is_positive_once_the_policy_moves(fresh_lora, tokenizer, tiny_pairs):
    with torch.no_grad():
        for name, p in fresh_lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    prompts = [sentiment_prompt(o) for o in tiny_pairs[1][:4]]
    out = evaluate_against_reference(fresh_lora, tokenizer, prompts, SentimentJudge(), num_samples=4,
                                     max_new_tokens=8, seed=3)
    assert out["kl"] > 0.01 and math.isfinite(out["kl"])
    assert len(out["examples"]) == 16
