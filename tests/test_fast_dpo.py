"""The CPU speed levers (course_utils/fast_dpo.py) change the speed, not the numbers.

Speed itself is measured by ``make bench`` (benchmarks/bench_dpo.py), not here.
"""

import copy

import pytest
import torch

from course_utils.fast_dpo import completion_logprobs, cpu_supports_bf16, install_completion_head, reference_weights_hash
from course_utils.models import load_model
from course_utils.precision import rounding_bound
from course_utils.train import build_trainer, dpo_config

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _labels(seed=0, batch=4, length=40, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, :25] = -100  # the prompt
    labels[1, 33:] = -100  # a shorter completion followed by padding
    return ids, labels


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m"])
def test_completion_head_matches_trls_head(name):
    """Same per-token log-probs, metrics and gradients as TRL's fused head, in fp32."""
    from trl.trainer.utils import add_fused_lm_head

    model, _ = load_model(name)
    twin = copy.deepcopy(model)
    add_fused_lm_head(model, outputs=OUTPUTS)
    add_fused_lm_head(twin, outputs=OUTPUTS)
    install_completion_head(twin)
    install_completion_head(twin)  # idempotent
    ids, labels = _labels()
    results = []
    for m in (model, twin):
        out = m(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.0).backward()
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (trl, trl_grads), (ours, our_grads) = results
    torch.testing.assert_close(ours.log_probs, trl.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.entropy, trl.entropy, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.mean_logits, trl.mean_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.is_top1, trl.is_top1)
    assert torch.equal(ours.label_mask, labels[:, 1:] != -100)
    assert ours.loss.item() == pytest.approx(trl.loss.item(), rel=1e-6)
    assert ours.log_probs[:, :24].abs().sum() == 0  # the prompt is not scored
    assert our_grads.keys() == trl_grads.keys()
    for n, g in trl_grads.items():
        torch.testing.assert_close(our_grads[n], g, atol=1e-5 * g.abs().max().item(), rtol=1e-4, msg=n)
    # a plain forward (generation) still returns logits through the model's own head
    assert twin(input_ids=ids).logits.shape == (4, 40, model.config.vocab_size)


def test_completion_head_with_nothing_to_score_stays_differentiable():
    from trl.trainer.utils import add_fused_lm_head

    model, _ = load_model("tiny")
    add_fused_lm_head(model, outputs=OUTPUTS)
    install_completion_head(model)
    ids, _ = _labels()
    out = model(input_ids=ids, labels=torch.full_like(ids, -100), fused_lm_head=True)
    assert out.log_probs.abs().sum() == 0
    out.log_probs.sum().backward()  # an all-prompt micro-batch must not crash the step


def test_completion_logprobs_is_a_log_softmax_gather():
    """Hand check on a 2-token, 3-word vocabulary."""
    head = torch.nn.Linear(2, 3, bias=False)
    head.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [B=1, T=2, H=2]
    labels = torch.tensor([[-100, 2]])  # only position 1 is scored, target word 2
    log_probs, entropy, mean_logits, is_top1, mask = completion_logprobs(hidden, head, labels)
    logits = torch.tensor([0.0, 2.0, 2.0])  # hidden[0, 1] @ W.T
    expected = logits[2] - torch.logsumexp(logits, 0)
    assert log_probs[0, 0] == 0 and log_probs[0, 1].item() == pytest.approx(expected.item())
    assert mean_logits[0, 1].item() == pytest.approx(4 / 3)
    assert not is_top1[0, 1]  # word 1 ties with word 2 and comes first, as argmax reports
    assert mask.tolist() == [[False, True]]


def _trainer(preset, pairs, tmp_path, seed=0, **overrides):
    model, tokenizer = load_model("tiny", seed=0)
    preset = preset.override(precompute_ref_log_probs=True, max_steps=3, logging_steps=1, seed=seed)
    return build_trainer(preset, model, tokenizer, pairs, output_dir=tmp_path / f"run{seed}", guard=False,
                         report_to=[], save_strategy="no", **overrides)


def test_reference_cache_is_reused_across_runs_and_seeds(tiny_pairs, tiny_preset, tmp_path, monkeypatch):
    """The second run (another LoRA seed: the same reference) loads the reference from disk
    and trains to exactly the same losses as a run that computed it."""
    monkeypatch.setenv("DPO_COURSE_REFERENCE_CACHE", str(tmp_path / "cache"))
    pairs = tiny_pairs[0]["train"]
    first = _trainer(tiny_preset, pairs, tmp_path, seed=1)
    assert first.reference_cache_hits == []
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    second = _trainer(tiny_preset, pairs, tmp_path, seed=1)
    assert second.reference_cache_hits == ["train"]
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert first.train_dataset[column] == second.train_dataset[column]
    first.train()
    second.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (first, second)]
    assert losses[0] == losses[1]
    other_seed = _trainer(tiny_preset, pairs, tmp_path, seed=2)  # different LoRA init, same reference
    assert other_seed.reference_cache_hits == ["train"]


def test_reference_cache_key_follows_the_weights_and_rows(tiny_pairs, tiny_preset, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_COURSE_REFERENCE_CACHE", str(tmp_path / "cache"))
    pairs = tiny_pairs[0]["train"]
    base = _trainer(tiny_preset, pairs, tmp_path)
    fewer_rows = _trainer(tiny_preset, pairs.select(range(8)), tmp_path)
    assert fewer_rows.reference_cache_hits == []
    model, tokenizer = load_model("tiny", seed=0)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # another reference model
    moved = build_trainer(tiny_preset.override(precompute_ref_log_probs=True, max_steps=3), model, tokenizer, pairs,
                          output_dir=tmp_path / "moved", guard=False, report_to=[], save_strategy="no")
    assert moved.reference_cache_hits == []
    assert moved.train_dataset["ref_chosen_logps"] != base.train_dataset["ref_chosen_logps"]


def test_reference_hash_ignores_lora_but_not_base_weights():
    from peft import get_peft_model

    from course_utils.models import lora_config

    model, _ = load_model("tiny", seed=0)
    plain = reference_weights_hash(model)
    wrapped = get_peft_model(copy.deepcopy(model), lora_config(8, 16, 0.0))
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)  # a trained adapter: the reference (adapter disabled) is unchanged
    assert reference_weights_hash(wrapped) == plain
    other, _ = load_model("tiny", seed=1)
    assert reference_weights_hash(other) != plain


def test_cpu_preset_uses_bf16_only_where_native(monkeypatch, tmp_path):
    from course_utils import train
    from course_utils.presets import get_preset

    preset = get_preset("cpu")
    assert dpo_config(preset, tmp_path).bf16 == cpu_supports_bf16()
    monkeypatch.setattr(train, "cpu_supports_bf16", lambda: False)
    assert dpo_config(preset, tmp_path).bf16 is False
    assert dpo_config(get_preset("tiny"), tmp_path).bf16 is False  # CI's numbers stay fp32


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16; the cpu preset runs fp32 here")
def test_bf16_autocast_keeps_sequence_logprobs_and_preferences(tiny_pairs):
    """bf16 autocast against fp32 on SmolLM2: sequence log-probs within the bf16 rounding bound, and the ordering
    of chosen vs rejected unchanged wherever fp32 separates them by more than 1 nat.

    The bound (course_utils/precision.py): 2 u |log pi| with u = 2^-8, about 0.8% of |log pi|."""
    from course_utils.generation import sequence_logprobs

    model, tokenizer = load_model("smollm2-135m")
    rows = tiny_pairs[0]["train"].to_list()[:12]
    prompts = [r["prompt"] for r in rows] * 2
    text = lambda answer: answer if isinstance(answer, str) else answer[-1]["content"]  # conversational rows
    completions = [text(r["chosen"]) for r in rows] + [text(r["rejected"]) for r in rows]
    fp32 = sequence_logprobs(model, tokenizer, prompts, completions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = sequence_logprobs(model, tokenizer, prompts, completions)
    # one bf16 evaluation against (nearly) exact fp32: within the bf16 rounding bound of each |log pi|
    assert ((bf16 - fp32).abs() <= rounding_bound(torch.bfloat16, fp32, evaluations=1)).all()
    gap32, gap16 = fp32[:12] - fp32[12:], bf16[:12] - bf16[12:]
    clear = gap32.abs() > 1.0
    assert clear.sum() >= 6 and torch.equal(gap32[clear] > 0, gap16[clear] > 0)


def test_flop_count_knows_the_completion_head_keeps_its_logits():
    """TRL's head recomputes every logits tile in backward; ours keeps them: one head product less."""
    from course_utils.gpu_budget import SMOLLM2_135M, count_dpo_step_flops

    kw = dict(lora_r=8, gradient_checkpointing=False, reference="precomputed", lm_head_tokens_per_sequence=40)
    trl = count_dpo_step_flops(SMOLLM2_135M, 100, 8, head_recomputes=True, **kw)
    ours = count_dpo_step_flops(SMOLLM2_135M, 100, 8, head_recomputes=False, **kw)
    assert trl["backward"] - ours["backward"] == 2 * 8 * 40 * 576 * 49152
    assert trl["forward"] == ours["forward"] and ours["reference"] == 0
