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

1. **The decoder's norms hand the projections bf16, once** (``input_layernorm``, ``post_attention_layernorm``):
   :class:`RMSNormToBf16` computes the RMSNorm (Zhang & Sennrich, 2019) in fp32 with the same operations as
   transformers' ``LlamaRMSNorm`` and stores the product straight into bf16, which is how autocast would round it
   in each projection: the forward is bit-identical. Its backward is written out in fewer passes (measured 2.6 →
   1.3 ms forward + backward at ``[8, 112, 576]``), and the gradients of ``q, k, v`` (or ``gate, up``) meet in bf16
   before it, one more bf16 rounding. Norms of another formula only get their output cast (a forward hook).
2. **Each LoRA linear is one autograd function**, :class:`LoraLinearBf16`: the input cast to bf16 once, the base
   product, and ``base.addmm_(x A^T, (s B)^T)``: the expansion, the scale and the sum in one product with fp32
   accumulation, in place, rounded once to bf16 (PEFT rounds three times). At ``B = 0`` (step 1) it returns the base product
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
# norms whose forward is exactly ``weight * (x * rsqrt(mean(x²) + eps))`` in fp32 (transformers' LlamaRMSNorm code)
LLAMA_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class RMSNormToBf16(torch.autograd.Function):
    """RMSNorm ``y = w ⊙ x / sqrt(mean(x²) + eps)`` of fp32 ``x`` ``[..., H]`` with a frozen ``w`` ``[H]``, returned
    in bf16 (module docstring, 1). Backward, with ``x̂ = x r``, ``r = (mean(x²) + eps)^-1/2`` and ``g = w ⊙ ∂y``:
    ``∂x = r (g - x̂ mean(g ⊙ x̂))``, three passes where autograd makes about ten."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1], as LlamaRMSNorm computes it
        x_hat = x * r
        y = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
        torch.mul(weight, x_hat, out=y)  # computed in fp32, rounded once on the store
        ctx.save_for_backward(x_hat, r, weight)
        return y

    @staticmethod
    def backward(ctx, grad):
        x_hat, r, weight = ctx.saved_tensors
        g = grad * weight  # fp32 [..., H]
        mean = torch.linalg.vecdot(g, x_hat).unsqueeze(-1) / x_hat.shape[-1]  # [..., 1]
        return torch.addcmul(g, x_hat, mean, value=-1).mul_(r), None, None


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
        y = base.reshape(-1, base.shape[-1]).addmm_(xa, sb.t())  # base + s (x A^T) B^T, one rounding, in place
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
            grad_x = (g @ weight).addmm_(gb, a).to(ctx.x_dtype).view(ctx.x_shape)  # g W + g (sB) A
        if ctx.needs_input_grad[3]:
            grad_a = (gb.t() @ x2).float()  # [r, in]
        if ctx.needs_input_grad[4]:
            grad_b = (xa.t() @ g).t().float() * ctx.scaling  # [out, r]; g^T xa, 20% faster with g untransposed
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


def _bf16(output):
    """``output`` in bf16 under CPU bf16 autocast (as each projection's autocast would cast it), else as it is."""
    return output.to(torch.bfloat16) if cpu_bf16_autocast() and output.dtype == torch.float32 else output


def _bf16_output(module, inputs, output):  # forward hook on a norm of another formula
    return _bf16(output)


def _norm_to_bf16(self, x):
    if cpu_bf16_autocast() and x.dtype == torch.float32 and not self.weight.requires_grad:
        return RMSNormToBf16.apply(x, self.weight, self.variance_epsilon)
    return _bf16(self._course_norm_forward(x))


class Bf16LoraLinears:
    """Context manager: under CPU bf16 autocast, ``model``'s LoRA linears run as :class:`LoraLinearBf16` and its
    decoder norms hand the projections bf16 (module docstring). Undone on exit; nothing changes elsewhere.

    Enter it inside :class:`course_utils.cpu_autocast.FrozenBf16Weights` to reuse its bf16 weight copies (else each
    call casts the frozen weight, as autocast does). ``layers`` and ``norms`` count what was switched.
    """

    def __init__(self, model):
        self.model, self.layers, self.norm_modules, self.hooks = model, [], [], []

    def __enter__(self):
        from peft.tuners.lora import Linear as LoraLinear

        for name, module in self.model.named_modules():
            if type(module) is LoraLinear and "_course_peft_forward" not in module.__dict__:
                module._course_peft_forward = module.forward  # PEFT's bound forward, for every other case
                module.forward = types.MethodType(_fused_forward, module)
                self.layers.append(module)
            elif name.rsplit(".", 1)[-1] in NORMS_INTO_PROJECTIONS and "forward" not in module.__dict__:
                if type(module).__name__ in LLAMA_RMS_NORMS and hasattr(module, "variance_epsilon"):
                    module._course_norm_forward = module.forward
                    module.forward = types.MethodType(_norm_to_bf16, module)
                    self.norm_modules.append(module)
                else:  # another formula: keep it, cast its output once
                    self.hooks.append(module.register_forward_hook(_bf16_output))
        return self

    @property
    def norms(self) -> int:
        return len(self.norm_modules) + len(self.hooks)

    def __exit__(self, *exc):
        for module in self.layers:
            del module.forward, module._course_peft_forward  # back to PEFT's class forward
        for module in self.norm_modules:
            del module.forward, module._course_norm_forward
        for hook in self.hooks:
            hook.remove()
        self.layers, self.norm_modules, self.hooks = [], [], []
        return False
