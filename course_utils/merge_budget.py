"""What each step of lesson 6 keeps on the GPU, predicted from model shapes, and what the lesson frees.

Lesson 6 loads the trained policy (base + adapter), merges the adapter into a float copy of the
base, reloads the merged checkpoint, can run an NF4 demo, generates with a pipeline and serves a
chat page. Merged, Mistral-7B is 13.5 GiB in float16 (14.5 GB): on a 16 GB T4 (15 GiB usable) it
cannot share the GPU with a second copy of the model, nor wait in free Colab's ~12.7 GB of RAM.
:func:`lesson6_plan` adds up the bytes on the GPU at each step's peak and decides what to free::

    from course_utils.merge_budget import lesson6_plan
    from course_utils.presets import get_preset
    print(lesson6_plan(get_preset("t4"), "T4").table())

Weights are counted exactly from :class:`~course_utils.gpu_budget.ModelShape` (checked against
real models and a real bitsandbytes ``Linear4bit`` in ``tests/test_gpu_budget.py``). The CUDA
context, the working sets and accelerate's placement are assumptions until measured: on a GPU,
:meth:`Lesson6Plan.print_measured` puts torch's own peak next to the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .gpu_budget import _BYTES, CUDA_CONTEXT_GIB, FRAGMENTATION, GIB, GPU, GPUS, SHAPES, ModelShape, nf4_bytes, shape_of

STEPS = ("load policy", "merge", "reload merged", "NF4 demo", "pipeline", "chat page")
PLAN_FRACTION = 0.9  # the lesson plans with 90% of the free memory, the share accelerate's device_map="auto" fills
PROMPTS, PROMPT_TOKENS = 3, 256  # ASSUMED: lesson 6's 3 prompts, each at most 256 tokens with the chat template
ADAPTER_BYTES = 4  # peft upcasts fp16/bf16 LoRA weights to fp32 when it loads them (autocast_adapter_dtype=True)


def base_bytes(shape: ModelShape, dtype: str, nf4: bool) -> float:
    """A base model's weights: linears NF4-packed (bitsandbytes) or in ``dtype``; embeddings, head, norms in ``dtype``."""
    c = _BYTES[dtype]
    linears = shape.linear_parameters() * c if not nf4 else \
        shape.num_layers * sum(nf4_bytes(a * b) for a, b in shape.linears().values())
    return linears + shape.other_parameters() * c


def adapter_bytes(shape: ModelShape, r: int, targets="all-linear") -> float:
    return shape.lora_parameters(r, targets) * ADAPTER_BYTES


def forward_bytes(shape: ModelShape, tokens: int, dtype: str, nf4: bool) -> float:
    """Working set of one no-grad forward over ``tokens`` tokens that keeps every logit (``prompt_logits``).

    Logits ``(tokens, V)`` in ``dtype`` plus their fp32 copy; one layer's intermediates at a time
    (q, k, v, attention output: ~4h; gate, up, SiLU: 3i); under NF4 one dequantised weight.
    """
    c = _BYTES[dtype]
    logits = tokens * shape.vocab_size * (c + (4 if c != 4 else 0))
    layer = tokens * (4 * shape.hidden_size + 3 * shape.intermediate_size) * c
    return logits + layer + (shape.hidden_size * shape.intermediate_size * c if nf4 else 0)


def kv_cache_bytes(shape: ModelShape, tokens: int, dtype: str) -> float:
    """Keys and values of every layer for ``tokens`` positions (grouped-query: kv heads only)."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * _BYTES[dtype] * tokens


def merge_working_bytes(shape: ModelShape, dtype: str) -> float:
    """One linear being merged: its weight in ``dtype`` plus peft's fp32 ``B @ A`` and its scaled copy."""
    return max(a * b for a, b in shape.linears().values()) * (_BYTES[dtype] + 8)


def device_map_offload(shape: ModelShape, dtype: str, free_bytes: float) -> tuple[float, float]:
    """``(bytes on the GPU, bytes on the CPU)`` of a float model loaded with ``device_map="auto"`` on one GPU.

    As transformers 5 places it (``get_balanced_memory``, ``infer_auto_device_map``): weights fill at
    most 90% of the free memory, less room kept for the largest module (to bring an offloaded one
    back); modules go on the GPU in order (embeddings, layers, final norm, LM head) until one does
    not fit, and the rest on the CPU.
    """
    embed, layer = _module_bytes(shape, dtype)
    modules = [embed] + [layer] * shape.num_layers + [shape.hidden_size * _BYTES[dtype]]
    modules += [] if shape.tie_embeddings else [embed]
    room, used = PLAN_FRACTION * free_bytes - max(layer, embed), 0.0
    for k, size in enumerate(modules):
        if used + size > room:
            return used, sum(modules[k:])
        used += size
    return used, 0.0


def _module_bytes(shape: ModelShape, dtype: str) -> tuple[int, int]:
    """Bytes of the embedding matrix and of one decoder layer (its linears and two norms) in ``dtype``."""
    c = _BYTES[dtype]
    return shape.vocab_size * shape.hidden_size * c, (shape.linear_parameters() // shape.num_layers
                                                      + 2 * shape.hidden_size) * c


@dataclass(frozen=True)
class StepMemory:
    """One step of lesson 6: what is on the device at its peak."""

    step: str
    parts: dict[str, float]  # GiB by what holds it
    peak_gib: float  # weights + FRAGMENTATION x working sets + the CUDA context (on a GPU)
    fits: bool | None  # None on the CPU: nothing is fitted there
    offload_gib: float = 0.0  # weights device_map="auto" puts on the CPU because the GPU is full


@dataclass
class Lesson6Plan:
    """Predicted memory of every step of lesson 6, and what the lesson frees so that each one fits."""

    preset: str
    device: str  # a GPU's name, or "CPU"
    usable_gib: float | None  # the GPU's memory; None on the CPU
    limit_gib: float | None  # what the lesson plans with: context + 90% of the rest (accelerate's share)
    keep_policy: bool  # False: the policy is freed before the merge (its logits are kept)
    merge_by_layer: bool  # True: merge_adapter(by_layer=True); the merged model is never whole in memory
    demo_fits: bool  # the NF4 demo fits next to what the lesson keeps loaded
    demo_frees_merged: bool  # a demo that runs anyway first sets the merged model aside
    free_merged_before_chat: bool  # the merged model is freed (and the policy loaded again) for the chat page
    steps: dict[str, StepMemory]
    reasons: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    def table(self) -> str:
        where = (f"{self.device}: {self.usable_gib:.1f} GiB, planned to {self.limit_gib:.1f} GiB" if self.usable_gib
                 else "CPU (no GPU): the same counts are bytes in RAM, no CUDA context")
        lines = [f"Lesson 6, preset {self.preset!r} on {where}. PREDICTED peak per step, not measured:",
                 f"  {'step':<14}{'GiB':>6}  {'fits':<5} largest parts (GiB)"]
        for s in self.steps.values():
            parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(s.parts.items(), key=lambda kv: -kv[1])[:3] if v > 0.005)
            fits = "-" if s.fits is None else "yes" if s.fits else "NO"
            off = f"; {s.offload_gib:.2f} on the CPU" if s.offload_gib > 0.005 else ""
            lines.append(f"  {s.step:<14}{s.peak_gib:6.2f}  {fits:<5} {parts or 'nothing on the GPU'}{off}")
        return "\n".join(lines + [f"  -> {r}" for r in self.reasons] + [f"  assumed: {a}" for a in self.assumptions])

    @property
    def demo_reason(self) -> str:
        """The plan's line about section 4's NF4 demo ("" on a CPU, where it always fits)."""
        return next((r for r in self.reasons if r.startswith("NF4 demo")), "")

    def print_measured(self, step: str) -> None:
        """On a GPU: torch's peak reserved memory since the last call, next to the prediction. Silent on a CPU."""
        import torch

        if not torch.cuda.is_available():
            return
        peak = torch.cuda.max_memory_reserved() / GIB
        torch.cuda.reset_peak_memory_stats()
        print(f"{step}: measured {peak:.2f} GiB reserved by torch; predicted {self.steps[step].peak_gib:.2f} GiB "
              f"including an assumed {CUDA_CONTEXT_GIB} GiB CUDA context, which torch does not count")


def _device(gpu) -> tuple[str, float | None]:
    """``(name, usable GiB)`` of a GPU given as a GPUS key, a ``GPU``, a ``Runtime`` or GiB; ``("CPU", None)``."""
    if gpu is None:
        return "CPU", None
    if isinstance(gpu, str):
        gpu = GPUS[gpu]
    if isinstance(gpu, GPU):
        return gpu.name, gpu.memory_gib
    if hasattr(gpu, "cuda"):  # a presets.Runtime
        return (gpu.device_name, gpu.memory_gb) if gpu.cuda else ("CPU", None)
    return "GPU", float(gpu)


def lesson6_plan(preset, gpu=None, *, dtype: str | None = None, low_memory: bool | None = None,
                 shape: ModelShape | None = None) -> Lesson6Plan:
    """The plan lesson 6 follows for ``preset`` on ``gpu`` (None: a CPU), merging into ``dtype`` (default: the preset's).

    Where things live (``export.load_base`` and the lesson's reload): a 4-bit base goes to the GPU,
    a float base stays on the CPU; the merged checkpoint and the demo's NF4 copies go to the GPU.
    ``low_memory``: None decides from the predictions; True frees everything it can (what a T4
    needs: CI runs it on tiny to exercise that path); False keeps everything loaded.
    """
    shape = shape or shape_of(preset.model_name)
    if shape is None:
        raise KeyError(f"no shape known for model {preset.model_name!r}; pass shape=ModelShape.from_config(...)")
    dtype, t, nf4 = dtype or preset.dtype, preset.dtype, preset.load_in_4bit
    device, usable = _device(gpu)
    on_gpu, ctx = usable is not None, CUDA_CONTEXT_GIB if usable is not None else 0.0
    limit = ctx + PLAN_FRACTION * (usable - ctx) if on_gpu else None
    ad = adapter_bytes(shape, preset.lora_r)
    merged = base_bytes(shape, dtype, False)
    nf4_copy = base_bytes(shape, t, True) + ad  # base + adapter in NF4: the demo's models

    def gpu_only(x, placed_on_gpu=True):  # bytes on the device the table is about
        return x if not on_gpu or placed_on_gpu else 0.0

    policy = gpu_only(base_bytes(shape, t, nf4) + ad, nf4)
    free = (usable - ctx) * GIB if on_gpu else float("inf")
    reserve = max(_module_bytes(shape, dtype))  # accelerate keeps room to bring back the largest offloaded module
    gen = kv_cache_bytes(shape, PROMPT_TOKENS + preset.max_new_tokens, dtype) + \
        forward_bytes(shape, PROMPT_TOKENS, dtype, False)
    fwd = PROMPTS * PROMPT_TOKENS

    def step(name, weights: dict, working: dict, offload=0.0) -> StepMemory:
        parts = {k: v / GIB for k, v in {**weights, **working}.items()}
        peak = ctx + (sum(weights.values()) + FRAGMENTATION * sum(working.values())) / GIB
        return StepMemory(name, parts, peak, None if not on_gpu else peak <= usable, offload / GIB)

    def ok(s: StepMemory) -> bool:
        return not on_gpu or s.peak_gib <= limit

    def merged_on_gpu(kept: bool) -> tuple[dict, float]:
        """The reloaded merged model's parts on the GPU, and the bytes device_map="auto" leaves on the CPU."""
        if not on_gpu:
            return {"merged model": merged}, 0.0
        there, cpu = device_map_offload(shape, dtype, free - (policy if kept else 0.0))
        return {"merged model": there, "room for an offloaded layer": reserve if cpu else 0.0}, cpu

    def kept_policy(kept: bool) -> dict:
        return {"policy (kept)": policy if kept else 0.0}

    def merge_step(kept, by_layer):
        if by_layer:
            return step("merge", {**kept_policy(kept), "base (as trained)": gpu_only(base_bytes(shape, dtype, nf4), nf4),
                                  "adapter": gpu_only(ad, nf4)},
                        {"one layer being merged": gpu_only(merge_working_bytes(shape, dtype), nf4)})
        return step("merge", {**kept_policy(kept), "merged model": gpu_only(merged, nf4), "adapter": gpu_only(ad, nf4)},
                    {"merge / check working set": gpu_only(max(merge_working_bytes(shape, dtype),
                                                               forward_bytes(shape, fwd, dtype, False)), nf4)})

    def demo_step(kept, merged_kept):
        qlora = 0.0 if nf4 and kept else nf4_copy  # on a 4-bit preset the policy is the QLoRA model
        extra = nf4_copy if nf4 else max(merged + ad, nf4_copy)  # float presets: a dequantised copy, then the naive one
        return step("NF4 demo", {**kept_policy(kept), **(merged_on_gpu(kept)[0] if merged_kept else {}),
                                 "QLoRA model (NF4 + adapter)": gpu_only(qlora), "the demo's merged copy": gpu_only(extra)},
                    {"forward over the prompts": gpu_only(forward_bytes(shape, fwd, t, True))})

    def chat_step(kept, merged_kept):
        return step("chat page", {"policy": policy, **(merged_on_gpu(kept)[0] if merged_kept else {})},
                    {"generation: KV cache + forward": gpu_only(gen, nf4)})

    if low_memory is None and on_gpu:  # keep the policy only if the merge and the reload fit next to it
        keep = (ok(merge_step(True, False)) or ok(merge_step(True, True))) and merged_on_gpu(True)[1] == 0
        by_layer = not ok(merge_step(keep, False))
        demo_fits = ok(demo_step(keep, True))
        frees_merged, free_merged = not demo_fits, not ok(chat_step(keep, True))
    else:  # a CPU, or the caller decided
        low = bool(low_memory)
        keep, by_layer, demo_fits, frees_merged, free_merged = not low, low, True, low, low
    merged_parts, merged_cpu = merged_on_gpu(keep)
    steps = [step("load policy", {"policy: base + adapter": policy},
                  {"forward over the prompts": gpu_only(forward_bytes(shape, fwd, t, nf4), nf4)}),
             merge_step(keep, by_layer),
             step("reload merged", {**kept_policy(keep), **merged_parts},
                  {"forward over the prompts": gpu_only(forward_bytes(shape, fwd, dtype, False))}, merged_cpu),
             demo_step(keep, not frees_merged),
             step("pipeline", {**kept_policy(keep), **merged_parts},
                  {"generation: KV cache + forward": gpu_only(gen)}, merged_cpu),
             chat_step(keep, not free_merged)]
    plan = Lesson6Plan(preset.name, device, usable, limit, keep, by_layer, demo_fits, frees_merged, free_merged,
                       {s.step: s for s in steps})
    plan.reasons = _reasons(plan, merged / GIB, policy / GIB, demo_step(keep, True), low_memory)
    plan.assumptions = [
        f"CUDA context {ctx:g} GiB; working sets x{FRAGMENTATION} for the caching allocator" if on_gpu else
        "on the CPU nothing is freed for memory unless low_memory=True",
        f"prompts: {PROMPTS} x {PROMPT_TOKENS} tokens; replies {preset.max_new_tokens} tokens; LoRA weights in fp32",
        "weights counted exactly from the shapes; working sets and accelerate's placement read from "
        "transformers 5 / peft 0.21 / bitsandbytes 0.50 code, not measured"]
    return plan


def _reasons(plan: Lesson6Plan, merged_gib: float, policy_gib: float, demo_next_to_merged: StepMemory,
             low_memory) -> list[str]:
    """One line per decision the plan made, with the numbers behind it."""
    if low_memory is not None or plan.usable_gib is None:
        how = "CPU: " if low_memory is None else f"low_memory={low_memory}: "
        return [how + ("free the policy before the merge, merge layer by layer, set the merged model aside for "
                       "the demo and before the chat page" if low_memory else "keep everything loaded, merge in memory")]
    merge, demo = plan.steps["merge"], plan.steps["NF4 demo"]
    out = [("policy: on the CPU (a float base), nothing to free" if policy_gib == 0 else
            f"policy ({policy_gib:.1f} GiB): kept, the merge and the reload fit next to it" if plan.keep_policy else
            f"policy ({policy_gib:.1f} GiB): freed before the merge, its logits kept on the CPU; next to it the "
            f"merged model ({merged_gib:.1f} GiB) would not fit without offloading"),
           (f"merge layer by layer ({merge.peak_gib:.1f} GiB): the whole merged model does not fit in "
            f"{plan.limit_gib:.1f} GiB; one safetensors shard at a time in RAM") if plan.merge_by_layer else
           f"merge in memory ({merge.peak_gib:.1f} GiB)"]
    out.append(f"NF4 demo fits next to the merged model ({demo.peak_gib:.1f} GiB)" if plan.demo_fits else
               f"NF4 demo: off by default, {demo_next_to_merged.peak_gib:.1f} GiB next to the merged model is over "
               f"{plan.limit_gib:.1f} GiB; DEMO_4BIT = True runs it after setting the merged model aside "
               f"({demo.peak_gib:.1f} GiB), and section 5 loads it again")
    if plan.free_merged_before_chat:
        out.append("chat page: the merged model is freed and the policy loaded again (they do not fit together)")
    return out
