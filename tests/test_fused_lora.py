"""course_utils/fused_lora.py: one bf16 function per LoRA linear changes the speed, not what is learned.

Speed is measured by ``make bench`` (the ``course_cpu_peft_lora`` ablation), not here.
"""

import math

import pytest
import torch
from peft import get_peft_model

from course_utils.cpu_autocast import FrozenBf16Weights
from course_utils.fused_lora import Bf16LoraLinears, LoraLinearBf16, RMSNormToBf16
from course_utils.models import load_model, lora_config
from course_utils.train import build_trainer

IDS = torch.randint(0, 1000, (3, 17), generator=torch.Generator().manual_seed(0))


def _lora_model(b_std=0.1, dropout=0.0):
    model, _ = load_model("tiny", seed=0)
    torch.manual_seed(0)
    model = get_peft_model(model, lora_config(r=4, alpha=8, dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and b_std:  # B = 0 (PEFT's init) would hide the adapter's path
                p.normal_(0, b_std)
    return model


def _step(model, autocast=True):
    """Logits ``[3, 17, V]`` (fp32) and the LoRA gradients of a smooth loss over them."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=IDS).logits.float()
    logits.logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _error(x, exact):
    return ((x - exact).norm() / exact.norm()).item()


def test_fused_lora_is_as_close_to_fp32_as_peft():
    """Against the all-fp32 model, the fused bf16 path's logits and LoRA gradients are no further off than PEFT's
    own bf16 path, and both are bf16-close. Its forward rounds the adapter's sum once instead of three times; its
    backward rounds as PEFT's does (a product's bf16 output), so its gradients are PEFT's up to kernel choice."""
    model = _lora_model()
    exact_logits, exact_grads = _step(model, autocast=False)
    with FrozenBf16Weights(model):
        peft_logits, peft_grads = _step(model)
        with Bf16LoraLinears(model) as fused:
            fused_logits, fused_grads = _step(model)
            switched = len(fused.layers), fused.norms
    n_lora = sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in model.modules())
    assert switched == (n_lora, 2 * model.config.num_hidden_layers) and n_lora == 7 * model.config.num_hidden_layers
    assert not torch.equal(fused_logits, peft_logits)  # the fused path really ran
    logit_error = {"peft": _error(peft_logits, exact_logits), "fused": _error(fused_logits, exact_logits)}
    assert logit_error["fused"] <= 1.25 * logit_error["peft"] < 0.02, logit_error
    # per tensor the two roundings differ by chance (either may be the closer); on average they must not
    errors = {path: [_error(grads[name], exact) for name, exact in exact_grads.items()]
              for path, grads in (("peft", peft_grads), ("fused", fused_grads))}
    mean = {path: sum(e) / len(e) for path, e in errors.items()}
    assert mean["fused"] <= 1.15 * mean["peft"] < 0.02, mean
    assert max(errors["fused"]) < 0.05, errors


def test_at_b_zero_the_forward_is_bit_identical_to_peft():
    """Step 1 (B = 0) and the reference pass (adapter disabled) give PEFT's logits bit for bit, so the step-1 policy
    still reproduces the cached reference."""
    model = _lora_model(b_std=0)
    with FrozenBf16Weights(model), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        peft = model(input_ids=IDS).logits
        with model.disable_adapter():
            peft_reference = model(input_ids=IDS).logits
        with Bf16LoraLinears(model):
            fused = model(input_ids=IDS).logits
            with model.disable_adapter():
                fused_reference = model(input_ids=IDS).logits
    assert torch.equal(fused, peft) and torch.equal(fused_reference, peft_reference) and torch.equal(fused, fused_reference)


def test_other_cases_run_peft_and_exit_restores(monkeypatch):
    """fp32 runs and active dropout go to PEFT's forward; on exit no patched forward and no hook is left."""
    calls = []
    apply = LoraLinearBf16.apply
    monkeypatch.setattr(LoraLinearBf16, "apply", lambda *a: calls.append(1) or apply(*a))
    model = _lora_model()
    exact = model(input_ids=IDS).logits
    with Bf16LoraLinears(model):
        assert torch.equal(model(input_ids=IDS).logits, exact) and not calls  # fp32: PEFT, bit for bit
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=IDS)
    assert len(calls) == 7 * model.config.num_hidden_layers
    dropping = _lora_model(dropout=0.5).train()
    calls.clear()
    with Bf16LoraLinears(dropping), torch.autocast("cpu", dtype=torch.bfloat16):
        dropping(input_ids=IDS)
    assert not calls
    for m in (model, dropping):
        assert not any("forward" in vars(x) or x._forward_hooks for x in m.modules())
        assert torch.equal(m.eval()(input_ids=IDS).logits, m(input_ids=IDS).logits)


def test_trainer_with_fused_lora_learns_as_peft_does(tiny_pairs, tiny_preset, tmp_path, monkeypatch):
    """bf16, 3 steps: step 1 is ln 2 and identical with and without the lever; later losses agree to bf16 rounding;
    the adapter trains and the base stays put."""
    monkeypatch.setenv("DPO_COURSE_REFERENCE_CACHE", str(tmp_path / "cache"))
    pairs = tiny_pairs[0]["train"]
    runs = {}
    for fused in (True, False):
        model, tokenizer = load_model("tiny", seed=0)
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        preset = tiny_preset.override(precompute_ref_log_probs=True, max_steps=3, logging_steps=1, seed=1,
                                      learning_rate=5e-3)
        trainer = build_trainer(preset, model, tokenizer, pairs, output_dir=tmp_path / str(fused), guard=False,
                                report_to=[], save_strategy="no", bf16=True, fused_lora=fused)
        assert trainer.fused_lora is fused
        trainer.train()
        runs[fused] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        trained = dict(trainer.model.named_parameters())
        assert any(p.requires_grad and "lora_B" in n and p.abs().sum() > 0 for n, p in trained.items())
        for name, p in trained.items():  # the frozen base never moves
            if not p.requires_grad:
                assert torch.equal(p, base[name.replace("base_model.model.", "").replace(".base_layer", "")])
    assert runs[True][0] == runs[False][0] == pytest.approx(math.log(2), abs=1e-6)
    assert runs[True][1:] == pytest.approx(runs[False][1:], abs=0.02)


def test_rms_norm_to_bf16_is_llamas_norm_rounded_once():
    """Forward: bit for bit transformers' LlamaRMSNorm followed by autocast's cast to bf16. Backward: as close to the
    fp64 gradient as autograd's through LlamaRMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    norm.weight.requires_grad_(False)
    x = (torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    grad = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ours = RMSNormToBf16.apply(x, norm.weight, norm.variance_epsilon)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    theirs = norm(x).to(torch.bfloat16)
    (their_grad,) = torch.autograd.grad(theirs, x, grad)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    x64 = x.detach().double().requires_grad_()
    y64 = norm.weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    (exact,) = torch.autograd.grad(y64, x64, grad.double())
    assert _error(ours_grad.double(), exact) <= 2 * _error(their_grad.double(), exact) + 1e-9 < 1e-6
