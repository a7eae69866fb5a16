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
    # another CPU thread count rounds differently: its step 1 would not reproduce this cache exactly
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert _trainer(tiny_preset, pairs, tmp_path).reference_cache_hits == []
    finally:
        torch.set_num_threads(threads)
    assert _trainer(tiny_preset, pairs, tmp_path).reference_cache_hits == ["train"]


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


def test_frozen_bf16_weights_are_bit_identical_to_autocast():
    """A bf16 copy of each frozen weight, made once, gives exactly autocast's products, forward and backward."""
    from peft import get_peft_model

    from course_utils.cpu_autocast import FrozenBf16Weights
    from course_utils.models import lora_config

    model, _ = load_model("tiny", seed=0)
    torch.manual_seed(0)
    model = get_peft_model(model, lora_config(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 would hide the adapter's path from the check
                p.normal_(0, 0.1)
    ids = torch.randint(0, 1000, (3, 17), generator=torch.Generator().manual_seed(0))
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    plain = step()
    with FrozenBf16Weights(model) as frozen:
        layers = len(frozen.layers)
        with FrozenBf16Weights(model) as inner:  # nested (evaluate inside train): the outer block keeps the copies
            assert inner.layers == []
        cached = step()
        fp32 = model(input_ids=ids).logits  # outside autocast the layers use their fp32 weights
    n_linear = sum(type(m) is torch.nn.Linear and not m.weight.requires_grad for m in model.modules())
    assert layers == n_linear > 0  # every frozen projection and the LM head
    assert torch.equal(plain[0], cached[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], cached[1]))
    assert fp32.dtype == torch.float32 and torch.allclose(fp32, model(input_ids=ids).logits)
    assert not any(hasattr(m, "_course_bf16_weight") or "forward" in vars(m) for m in model.modules()
                   if type(m) is torch.nn.Linear)  # restored on exit


def test_trainer_with_frozen_bf16_weights_trains_bit_identically(tiny_pairs, tiny_preset, tmp_path, monkeypatch):
    """Under bf16 autocast, the cached copies change no loss and no trained weight of a 3-step run."""
    monkeypatch.setenv("DPO_COURSE_REFERENCE_CACHE", str(tmp_path / "cache"))
    pairs = tiny_pairs[0]["train"]
    runs = {}
    for frozen in (True, False):
        trainer = _trainer(tiny_preset, pairs, tmp_path / str(frozen), seed=1, bf16=True, frozen_bf16=frozen)
        trainer.train()
        runs[frozen] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                        {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == 3
    assert all(torch.equal(runs[True][1][n], runs[False][1][n]) for n in runs[False][1])


def test_fp32_attention_is_closer_to_fp32_than_autocasts_bf16_attention():
    """Under bf16 autocast the attention runs in fp32: the logits move toward the all-fp32 model's, gradients flow,
    and the model's attention setting is restored on exit."""
    from course_utils.cpu_autocast import FP32_ATTENTION, Fp32Attention

    model, _ = load_model("tiny", seed=0)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 1000, (4, 33), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # a padded row: the masked kernel path
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(input_ids=ids, attention_mask=mask).logits.float()
            with Fp32Attention(model) as switch:
                assert switch.switched and model.config._attn_implementation == FP32_ATTENTION
                fp32_attention = model(input_ids=ids, attention_mask=mask).logits.float()
        assert model.config._attn_implementation == "sdpa"
        with Fp32Attention(model):  # outside autocast it is plain SDPA
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, exact)
    keep = mask.bool()
    error = {name: (x - exact)[keep].abs().mean().item() for name, x in (("bf16", bf16), ("fp32", fp32_attention))}
    assert not torch.equal(bf16, fp32_attention)
    assert error["fp32"] < error["bf16"], error
    with Fp32Attention(model), torch.autocast("cpu", dtype=torch.bfloat16):
        model.model.embed_tokens.weight.requires_grad_(True)
        model(input_ids=ids, attention_mask=mask).logits.float().logsumexp(-1).mean().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_fp32_attention_passes_grouped_kv_heads_to_sdpa_unrepeated(monkeypatch):
    """Under Fp32Attention the CPU's SDPA gets the 2 kv heads of the tiny model with ``enable_gqa`` even with a padding
    mask (transformers would repeat them), with the same outputs and gradients as the repeated heads."""
    import torch.nn.functional as F

    from course_utils import cpu_autocast
    from course_utils.cpu_autocast import Fp32Attention

    model, _ = load_model("tiny", seed=0)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = torch.randint(0, 1000, (4, 33), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.shape[1], k.shape[1], kw.get("enable_gqa"))) or sdpa(q, k, v, **kw))
    results = {}
    for grouped in (True, False):
        if not grouped:  # transformers' own choice: repeat the kv heads when there is a mask
            monkeypatch.setattr(cpu_autocast, "_use_gqa_in_sdpa", cpu_autocast._transformers_use_gqa_in_sdpa)
        model.zero_grad()
        with Fp32Attention(model), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logits.logsumexp(-1).mean().backward()
        results[grouped] = logits.detach(), model.model.layers[0].self_attn.k_proj.weight.grad
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    layers = model.config.num_hidden_layers
    assert seen == [(heads, kv, True)] * layers + [(heads, heads, None)] * layers
    keep = mask.bool()
    assert torch.equal(results[True][0][keep], results[False][0][keep])
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    with Fp32Attention(model):  # registering again restores the course's choice
        pass
    assert cpu_autocast._sdpa_module.use_gqa_in_sdpa is cpu_autocast._use_gqa_in_sdpa


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_completion_head_blocks_change_no_bit(dtype, monkeypatch):
    """The head's CPU blocks of rows give exactly what one block of all rows gives: log-probs, metrics, gradient."""
    from course_utils.fast_dpo import _TokenLogProbs

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 3000, generator=g) * 4).to(dtype)  # 37 rows: the last block is short
    targets = torch.randint(0, 3000, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    results = []
    for rows in (8, 37):
        monkeypatch.setattr(_TokenLogProbs, "CPU_ROWS", rows)
        z = logits.clone().requires_grad_()
        outputs = _TokenLogProbs.apply(z, targets)
        outputs[0].backward(upstream)
        results.append([o.detach() for o in outputs] + [z.grad])
    assert len(_TokenLogProbs._blocks(logits)) == 1
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert results[0][-1].dtype == dtype
