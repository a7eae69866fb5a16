"""What runs in which precision under CPU bf16 autocast, and two places where autocast's choice is slow.

The ``cpu`` preset trains under ``torch.autocast("cpu", dtype=torch.bfloat16)`` where the CPU multiplies bf16
natively (``course_utils.cpu``). Autocast casts the inputs of listed ops (linear, matmul, attention) to bf16 on
every call. A profile of a cpu-preset step on a 2-core Intel Xeon with AMX (``docs/performance.md``, "Training
profile") found two costs that autocast's choices add and that the course removes during training:

1. :class:`Fp32Attention`: **attention in fp32.** torch's CPU flash-attention kernel is fast in fp32 but its
   bf16 *backward* is not: 26 ms a layer against 9 ms for fp32 forward + backward at ``[8, 9, 112, 64]``
   (24% of the whole step in bf16). Attention's FLOPs are ~1% of the step, so fp32 costs nothing in product
   speed, and fp32 probabilities are the more accurate choice anyway. Grouped kv heads go to the kernel as they are
   (``enable_gqa``) instead of being repeated to the query heads' count first.
2. :class:`FrozenBf16Weights`: **frozen weights cast once.** Autocast caches its casts only for leaf tensors that
   require a gradient, so the frozen base of a LoRA model is re-cast from fp32 in every forward. A bf16 copy made
   once gives bit-identical products.

Both are context managers that change nothing outside CPU bf16 autocast (fp32 runs, GPUs) and undo themselves
on exit. ``fast_dpo.CachingDPOTrainer`` enters them around the reference pass and around training, so the
step-1 policy still reproduces the cached reference bit for bit.
"""

from __future__ import annotations

import threading
import types

import torch
import torch.nn.functional as F
import transformers.integrations.sdpa_attention as _sdpa_module
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FP32_ATTENTION = "sdpa_fp32_on_cpu"  # the name registered with transformers' attention and mask interfaces


def cpu_bf16_autocast() -> bool:
    """True inside ``torch.autocast("cpu", dtype=torch.bfloat16)``."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


# --------------------------------------------------------------------------------------------
# 1) Attention in fp32
# --------------------------------------------------------------------------------------------

_grouped = threading.local()  # .cpu: inside sdpa_fp32_attention's fp32 call


def sdpa_fp32_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with q, k, v in fp32 when called under CPU bf16 autocast.

    Shapes as transformers passes them: ``query`` ``[B, heads, T, D]``, ``key``/``value`` ``[B, kv_heads, T, D]``.
    Returns ``(out [B, T, heads, D], None)``; ``out`` stays fp32 (the output projection's autocast casts it).
    Grouped kv heads (GQA) go to SDPA as they are (``enable_gqa``), not repeated (:func:`_use_gqa_in_sdpa`).
    """
    if not cpu_bf16_autocast():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast("cpu", enabled=False):
        _grouped.cpu = True
        try:
            return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
        finally:
            _grouped.cpu = False


def _use_gqa_in_sdpa(attention_mask, key, value) -> bool:
    """transformers' choice, except inside :func:`sdpa_fp32_attention` on a CPU: there grouped kv heads go to SDPA
    with ``enable_gqa``. transformers repeats them (``repeat_kv``) whenever a padding mask is given, because CUDA's
    fast kernels take no mask with GQA; torch's CPU kernels do. Measured at ``[8, 9, 112, 64]`` with 3 kv heads and
    a padding mask, fp32 forward + backward: 9.4 ms against 11.6 ms with the repeat, identical outputs."""
    if getattr(_grouped, "cpu", False) and key.device.type == "cpu":
        return True
    return _transformers_use_gqa_in_sdpa(attention_mask, key, value)


_transformers_use_gqa_in_sdpa = _sdpa_module.use_gqa_in_sdpa


def _register_fp32_attention() -> None:
    AttentionInterface.register(FP32_ATTENTION, sdpa_fp32_attention)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)  # the same masks as "sdpa"
    _sdpa_module.use_gqa_in_sdpa = _use_gqa_in_sdpa  # read by sdpa_attention_forward at each call


class Fp32Attention:
    """Context manager: the model's SDPA attention runs in fp32 under CPU bf16 autocast (module docstring, 1).

    Only a model whose attention is ``"sdpa"`` is switched (``switched`` says whether it was); eager, flash or
    custom kernels are left as they are. Outside autocast the registered function is plain SDPA.
    """

    def __init__(self, model):
        self.model, self.configs = model, []

    def __enter__(self):
        _register_fp32_attention()
        for module in self.model.modules():
            config = getattr(module, "config", None)
            if config is not None and getattr(config, "_attn_implementation", None) == "sdpa" and all(
                    config is not c for c in self.configs):
                config._attn_implementation = FP32_ATTENTION  # layers read it on every call
                self.configs.append(config)
        return self

    @property
    def switched(self) -> bool:
        return bool(self.configs)

    def __exit__(self, *exc):
        for config in self.configs:
            config._attn_implementation = "sdpa"
        self.configs = []
        return False


# --------------------------------------------------------------------------------------------
# 2) Frozen weights cast to bf16 once, not in every forward
# --------------------------------------------------------------------------------------------

class FrozenBf16Weights:
    """Context manager: under CPU bf16 autocast, frozen ``nn.Linear`` layers multiply by a bf16 copy of their
    weight made on entry, instead of the copy autocast makes in every forward (module docstring, 2).

    ``Tensor.to(bfloat16)`` rounds exactly as autocast does, so every product, and so the whole loss trajectory,
    is bit-identical (``tests/test_fast_dpo.py``); the price is the copies' memory (2 bytes a weight) while the
    block runs. Outside bf16 autocast the layers use their own weights. The copies are dropped and the layers
    restored on exit: frozen weights must not change inside the block (training a LoRA adapter never writes
    them; merging one happens outside training).
    """

    def __init__(self, model):
        self.model, self.layers = model, []

    def __enter__(self):
        for module in self.model.modules():
            weight = getattr(module, "weight", None)
            if (type(module) is torch.nn.Linear and weight is not None and not weight.requires_grad
                    and weight.dtype == torch.float32 and weight.device.type == "cpu"
                    and not hasattr(module, "_course_bf16_weight")):  # nested: the outer block owns it
                module._course_bf16_weight = weight.detach().to(torch.bfloat16)
                module.forward = types.MethodType(_linear_with_bf16_copy, module)
                self.layers.append(module)
        return self

    def __exit__(self, *exc):
        for module in self.layers:
            del module.forward, module._course_bf16_weight  # back to nn.Linear.forward
        self.layers = []
        return False


def _linear_with_bf16_copy(self, x):
    if cpu_bf16_autocast():
        # exactly what autocast computes: bf16 input, bf16 weight (and bias), bf16 output
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), self._course_bf16_weight, bias)
    return F.linear(x, self.weight, self.bias)
