"""The T4's fp16 path, emulated on CPU: fp32 adapters on a 4-bit base, a real GradScaler step, CUDA-only config.

What runs for real here: the tiny Mistral quantised to NF4 by bitsandbytes, TRL's DPOTrainer
(which casts a quantised model's adapters to bf16 in ``__init__``), fp16 autocast, and
``torch.amp.GradScaler`` with its unscale kernel. What is emulated: the GPU. On CPU accelerate
ignores ``fp16=True``, so the autocast + scaler step is written out here exactly as accelerate
does it on CUDA, and the dtypes handed to ``torch._amp_foreach_non_finite_check_and_unscale_``
(the kernel with no CUDA bf16 version, pytorch#127176) are recorded.
"""

import math

import pytest
import torch

from course_utils.models import load_model, tiny_model_dir
from course_utils.presets import get_preset
from course_utils.train import build_trainer, dpo_config


@pytest.fixture(scope="module")
def t4_trainer(tiny_pairs, tmp_path_factory):
    model, tokenizer = load_model(str(tiny_model_dir(0, "mistral")), dtype="float16", load_in_4bit=True)
    preset = get_preset("t4").override(max_length=128, max_steps=2, gradient_checkpointing=False)
    return build_trainer(preset, model, tokenizer, tiny_pairs[0]["train"].select(range(8)),
                         output_dir=tmp_path_factory.mktemp("t4"), guard=False, report_to=[], save_strategy="no",
                         fp16=True, completion_head=False)  # fp16 passed through, as dpo_config sets it on a T4


def test_fp16_leaves_only_fp32_trainable_tensors_on_a_4bit_base(t4_trainer):
    assert t4_trainer.args.fp16 and getattr(t4_trainer.model, "is_loaded_in_4bit", False)
    trainable = {n: p.dtype for n, p in t4_trainer.model.named_parameters() if p.requires_grad}
    assert len(trainable) > 0 and all("lora_" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}, {n: d for n, d in trainable.items() if d != torch.float32}


def test_without_the_upcast_trl_would_hand_bf16_to_the_scaler(tiny_pairs, tmp_path):
    """The bug itself, so the test above means something: TRL's own cast leaves bf16 adapters."""
    from course_utils import train

    model, tokenizer = load_model(str(tiny_model_dir(0, "mistral")), dtype="float16", load_in_4bit=True)
    original, train.upcast_trainable_to_fp32 = train.upcast_trainable_to_fp32, lambda model: []
    try:
        trainer = build_trainer(get_preset("t4").override(max_length=128, gradient_checkpointing=False), model,
                                tokenizer, tiny_pairs[0]["train"].select(range(4)), output_dir=tmp_path, guard=False,
                                report_to=[], save_strategy="no", fp16=True, completion_head=False)
    finally:
        train.upcast_trainable_to_fp32 = original
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}


def test_emulated_fp16_autocast_and_grad_scaler_step_unscales_fp32(t4_trainer, monkeypatch):
    seen = []
    unscale = torch._amp_foreach_non_finite_check_and_unscale_

    def recording(grads, found_inf, inv_scale):
        seen.extend(g.dtype for g in grads)
        return unscale(grads, found_inf, inv_scale)

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", recording)
    model = t4_trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # accelerate's CUDA scaler, on the CPU
    batch = next(iter(t4_trainer.get_train_dataloader()))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = t4_trainer.compute_loss(model, batch)
    assert math.isfinite(loss.item())
    before = [p.detach().clone() for p in params]
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # unscales first: the kernel the T4 crashed in
    scaler.update()
    assert seen and set(seen) == {torch.float32}
    # either the step was taken, or the scaler skipped it on overflow and lowered the scale: both are healthy
    moved = any(not torch.equal(a, p) for a, p in zip(before, params))
    assert moved or scaler.get_scale() < 2.0**16


@pytest.mark.parametrize("name, fp16, bf16", [("t4", True, False), ("a100", False, True), ("cuda", True, False)])
def test_dpo_config_with_cuda_reported_present(name, fp16, bf16, tmp_path, monkeypatch):
    """Only configuration is checked here, so CUDA is reported present by patching torch's check."""
    from transformers import TrainingArguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(TrainingArguments, "__post_init__", lambda self: None)  # it would look for a real GPU
    preset = get_preset(name)
    args = dpo_config(preset, tmp_path, pad_to_multiple_of=None)  # "auto" would ask the (absent) device
    assert (args.fp16, args.bf16) == (fp16, bf16)
    assert args.optim == "paged_adamw_8bit" and args.activation_checkpointing is True and args.use_cpu is False
