import math

import pytest
import torch

from course_utils.evaluate import (evaluate_against_reference, implicit_reward_accuracy, kl_k3_on_samples, kl_on_samples,
                                   win_rate)
from course_utils.generation import sequence_logprobs
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


def test_k3_and_per_token_log_probs(fresh_lora, tokenizer, tiny_pairs):
    """Per-token terms sum to the sequence log-probs; k3 is 0 for an untrained adapter and >= 0, near k1, once it moves."""
    prompts = [sentiment_prompt(o) for o in tiny_pairs[1][:6]]
    completions = ["It was a good film.", "Bad.", "I liked the actors and the music a lot", "no", "Fine", "ok then"]
    terms = sequence_logprobs(fresh_lora, tokenizer, prompts, completions, per_token=True, batch_size=4)
    sums = sequence_logprobs(fresh_lora, tokenizer, prompts, completions, batch_size=4)
    assert [len(t) for t in terms] == [len(tokenizer(c + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
                                       for c in completions]  # every completion token and the end-of-turn token
    assert torch.allclose(torch.stack([t.sum() for t in terms]), sums, atol=1e-5)
    assert kl_k3_on_samples(fresh_lora, tokenizer, prompts, completions)[0] == pytest.approx(0.0, abs=1e-6)  # B = 0
    with torch.no_grad():
        for name, p in fresh_lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    k3, k3_se = kl_k3_on_samples(fresh_lora, tokenizer, prompts, completions)
    pol = sequence_logprobs(fresh_lora, tokenizer, prompts, completions, per_token=True)
    ref = sequence_logprobs(fresh_lora, tokenizer, prompts, completions, per_token=True, disable_adapter=True)
    by_hand = [((r - p).exp() - 1 - (r - p)).sum().item() for p, r in zip(pol, ref)]  # one value per completion
    assert all(v > 0 for v in by_hand)  # every term (r - 1) - log r is >= 0, and the adapter moved every token
    assert k3 == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5) and k3_se > 0


@pytest.mark.parametrize("disable_adapter", [False, True])
def test_completion_only_scoring_equals_full_logits(fresh_lora, tokenizer, tiny_pairs, disable_adapter):
    """The vocabulary product at completion positions only gives the log-probs of the full (B, T, V) logits."""
    from course_utils.generation import completion_token_logps, decoder_and_head, encode_prompts
    from course_utils.losses import token_logps

    with torch.no_grad():
        for name, p in fresh_lora.named_parameters():
            if "lora_B" in name:  # a policy that differs from the reference, so the adapter switch matters
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    prompts = encode_prompts(tokenizer, [sentiment_prompt(o) for o in tiny_pairs[1][:3]])
    completions = [[11, 12, 13], [14], [15, 16, 17, 18, 19]]  # rows of different lengths: padding in between
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids, attn, mask = (torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long),
                       torch.zeros(3, width, dtype=torch.bool))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)], attn[i, : len(p) + len(c)] = torch.tensor(p + c), 1
        mask[i, len(p) : len(p) + len(c)] = True
    context = fresh_lora.disable_adapter() if disable_adapter else torch.no_grad()
    with torch.no_grad(), context:
        full = token_logps(fresh_lora(input_ids=ids, attention_mask=attn).logits, ids, mask)
        fast = completion_token_logps(*decoder_and_head(fresh_lora), ids, attn, mask)
    assert fast.shape == full.shape == (3, width - 1)
    assert torch.equal(fast != 0, mask[:, 1:])  # scored exactly at the completion tokens
    assert torch.allclose(fast, full, atol=1e-5, rtol=0)
    assert (fast[mask[:, 1:]] < 0).all()  # real log-probabilities, not zeros
