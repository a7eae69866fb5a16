"""LoRA layers in one bf16 step under CPU autocast: fewer fp32 round trips in a training step.

A LoRA linear computes ``y = x W^T + s (x A^T) B^T`` (Hu et al., 2021, Eq. 3: ``h = W0 x + B A x``, scaled by
``s = alpha / r``) with ``W`` frozen and ``A [r, in]``, ``B [out, r]`` trained. Under CPU bf16 autocast, PEFT's
``lora.Linear`` does it in seven to nine operations, and a profile of a ``cpu``-preset step on a 2-core Intel Xeon
with AMX (``docs/performance.md``) found them costing more than their FLOPs:

- the residual stream is fp32, so each of ``q, k, v`` (and ``gate, up``) casts the same norm output to bf16, twice
  (the base product and the adapter's); a bf16 input (``o``, ``down``) is cast *up* to fp32 by PEFT and back down
  by autocast; and each cast has a backward that casts the gradient back;
- the adapter's ``[N, r] @ [r, out]`` expansion, its ``* s`` and the ``+`` onto the base output are three passes
  over an ``[N, out]`` tensor.

:class:`Bf16LoraLinears` (a context manager, like :mod:`course_utils.cpu_autocast`'s levers) does two things under
CPU bf16 autocast only:

1. **The decoder's norm outputs are cast to bf16 once**, where they enter the projections (a forward hook on
   ``input_layernorm`` and ``post_attention_layernorm``). Autocast would round them the same way in each
   projection, so the forward is bit-identical; in the backward, the gradients of ``q, k, v`` (or ``gate, up``)
   meet in bf16 before the cast to fp32, one more bf16 rounding.
2. **Each LoRA linear is one autograd function**, :class:`LoraLinearBf16`: the input cast to bf16 once, the base
   product, and ``addmm(base, x A^T, (s B)^T)``: the expansion, the scale and the sum in one product with fp32
   accumulation, rounded once to bf16 (PEFT rounds three times). At ``B = 0`` (step 1) it returns the base product
   bit for bit, so the step-1 policy still reproduces the cached reference. Its backward is written out:
   ``∂x = g W + (g (sB)) A``, ``∂A = (g (sB))^T x``, ``∂B = s g^T (x A^T)``.

Anything else (fp32 runs, GPUs, DoRA, a LoRA bias, dropout that is not off, several adapters, a merged adapter,
an adapter switched off for the reference pass) runs PEFT's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .cpu_autocast import cpu_bf16_autocast

NORMS_INTO_PROJECTIONS = ("input_layernorm", "post_attention_layernorm")  # Llama/Mistral/Qwen2 decoder layers


class LoraLinearBf16(torch.autograd.Function):
    """``y = x W^T + s (x A^T) B^T`` in bf16 with fp32 accumulation (module docstring, 2).

    Shapes: ``x`` ``[..., in]`` (fp32 or bf16), ``weight`` ``[out, in]`` bf16 (frozen), ``bias`` ``[out]`` or None
    (frozen), ``lora_a`` ``[r, in]`` and ``lora_b`` ``[out, r]`` fp32 parameters, ``scaling`` a float. Returns
    ``[..., out]`` in bf16, as autocast's ``linear`` would. Gradients flow to ``x`` (in its own dtype), ``lora_a``
    and ``lora_b`` (fp32, like their parameters).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        bf16 = torch.bfloat16
        xb = x.to(bf16)  # no copy when x is already bf16
        a, sb = lora_a.to(bf16), (lora_b * scaling).to(bf16)  # [r, in], [out, r]: tiny
        base = F.linear(xb, weight, bias)  # exactly the product FrozenBf16Weights / autocast computes
        x2 = xb.reshape(-1, xb.shape[-1])  # [N, in]
        xa = x2 @ a.t()  # [N, r]
        y = torch.addmm(base.reshape(-1, base.shape[-1]), xa, sb.t())  # base + s (x A^T) B^T, one rounding
        ctx.save_for_backward(x2, xa, weight, a, sb)
        ctx.scaling, ctx.x_dtype, ctx.x_shape = scaling, x.dtype, x.shape
        return y.view(*base.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, xa, weight, a, sb = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(torch.bfloat16)  # [N, out]
        gb = g @ sb  # [N, r]: the gradient at x A^T
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addmm(g @ weight, gb, a).to(ctx.x_dtype).view(ctx.x_shape)  # g W + g (sB) A
        if ctx.needs_input_grad[3]:
            grad_a = (gb.t() @ x2).float()  # [r, in]
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ xa).float() * ctx.scaling  # [out, r]
        return grad_x, None, None, grad_a, grad_b, None


def _plain_adapter(layer):
    """``(lora_A, lora_B, scaling)`` when ``layer`` is a vanilla, unmerged, enabled, single-adapter LoRA linear whose
    dropout is off, else None (PEFT's forward then runs)."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if lora_b.bias is not None or lora_a.bias is not None:
        return None
    if not (isinstance(dropout, torch.nn.Identity) or (isinstance(dropout, torch.nn.Dropout)
                                                       and (dropout.p == 0 or not dropout.training))):
        return None
    return lora_a, lora_b, layer.scaling[name]


def _fused_forward(self, x, *args, **kwargs):
    base = self.base_layer
    adapter = None if args or kwargs or not cpu_bf16_autocast() else _plain_adapter(self)
    if adapter is None or type(base) is not torch.nn.Linear:
        return self._course_peft_forward(x, *args, **kwargs)
    lora_a, lora_b, scaling = adapter
    weight = getattr(base, "_course_bf16_weight", None)  # FrozenBf16Weights' copy, when that lever is on
    weight = base.weight.to(torch.bfloat16) if weight is None else weight
    bias = None if base.bias is None else base.bias.to(torch.bfloat16)
    with torch.autocast("cpu", enabled=False):  # the function chooses its own dtypes
        return LoraLinearBf16.apply(x, weight, bias, lora_a.weight, lora_b.weight, scaling)


def _bf16_output(module, inputs, output):
    return output.to(torch.bfloat16) if cpu_bf16_autocast() and output.dtype == torch.float32 else None


class Bf16LoraLinears:
    """Context manager: under CPU bf16 autocast, ``model``'s LoRA linears run as :class:`LoraLinearBf16` and its
    decoder norms hand the projections bf16 (module docstring). Undone on exit; nothing changes elsewhere.

    Enter it inside :class:`course_utils.cpu_autocast.FrozenBf16Weights` to reuse its bf16 weight copies (else each
    call casts the frozen weight, as autocast does). ``layers`` and ``norms`` count what was switched.
    """

    def __init__(self, model):
        self.model, self.layers, self.hooks = model, [], []

    def __enter__(self):
        from peft.tuners.lora import Linear as LoraLinear

        for name, module in self.model.named_modules():
            if type(module) is LoraLinear and "_course_peft_forward" not in module.__dict__:
                module._course_peft_forward = module.forward  # PEFT's bound forward, for every other case
                module.forward = types.MethodType(_fused_forward, module)
                self.layers.append(module)
            elif name.rsplit(".", 1)[-1] in NORMS_INTO_PROJECTIONS:
                self.hooks.append(module.register_forward_hook(_bf16_output))
        return self

    @property
    def norms(self) -> int:
        return len(self.hooks)

    def __exit__(self, *exc):
        for module in self.layers:
            del module.forward, module._course_peft_forward  # back to PEFT's class forward
        for hook in self.hooks:
            hook.remove()
        self.layers, self.hooks = [], []
        return False
