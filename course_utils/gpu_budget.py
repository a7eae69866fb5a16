"""How much GPU memory and time one QLoRA DPO step needs, predicted from model shapes.

The presets use this to pick a batch and length that fit before a run starts, instead of
failing with an out-of-memory error twenty minutes in::

    from course_utils.gpu_budget import MISTRAL_7B, predict_memory
    pred = predict_memory(MISTRAL_7B, seq_len=1024, pairs_per_device=1, lora_r=16,
                          gradient_checkpointing=True, compute_dtype="float16")
    print(pred.table())

The activation term is counted tensor by tensor from what the installed code saves for
backward (transformers' Llama/Mistral layers, peft LoRA, bitsandbytes NF4, SDPA) and is
checked against torch's own saved-tensor bytes on CPU in ``tests/test_gpu_budget.py``.
The rest (CUDA context, fragmentation, working sets, throughput) are assumptions until
measured on a GPU with ``benchmarks/gpu_validate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30
LORA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# TRL 1.16 fused LM head (trl/kernels/chunked_logprob.py): logits live in one
# [TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE] tile at a time, never [N, vocab].
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768
CUDA_CONTEXT_GIB = 0.75  # ASSUMED: CUDA context, cuBLAS workspaces, bitsandbytes/Triton kernels
FRAGMENTATION = 1.10  # ASSUMED: caching-allocator reserved / allocated at the peak
_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}
_WEIGHTS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # preset dtype -> weights name


def _dtypes(weights: str, compute_dtype: str, kbit_prepared: bool) -> tuple[int, int, int]:
    """Bytes of (compute dtype c, residual stream res, projection output out) for a weights format."""
    weights = _WEIGHTS.get(weights, weights)
    c = _BYTES[compute_dtype] if weights == "nf4" else _BYTES[weights]  # unquantised: no autocast assumed
    res = 4 if weights == "fp32" or (weights == "nf4" and kbit_prepared) else c
    return c, res, (res if weights == "nf4" else c)  # bnb casts its output back; a plain Linear gives c


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama/Mistral-family decoder that memory and FLOPs depend on."""

    hidden_size: int  # h: width of the residual stream
    intermediate_size: int  # i: width of the SwiGLU MLP
    num_layers: int  # L: decoder layers
    num_heads: int  # a: query heads; head_dim = h / a
    num_kv_heads: int  # grouped-query attention: K/V heads shared by a / kv query heads
    vocab_size: int  # V: embedding rows and LM-head outputs
    tie_embeddings: bool = False  # LM head shares the embedding matrix (SmolLM2 does, Mistral does not)

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a ``transformers`` Llama/Mistral-style config (any object with those fields)."""
        heads = config.num_attention_heads
        shape = cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                    getattr(config, "num_key_value_heads", None) or heads, config.vocab_size,
                    bool(getattr(config, "tie_word_embeddings", False)))
        if (getattr(config, "head_dim", None) or shape.head_dim) != shape.head_dim:
            raise ValueError("head_dim != hidden_size / num_heads is not modelled")
        return shape

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear in one decoder layer."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_parameters(self) -> int:
        """Parameters in the decoder linears: the ones bitsandbytes quantises."""
        return self.num_layers * sum(a * b for a, b in self.linears().values())

    def other_parameters(self) -> int:
        """Embeddings, LM head (unless tied) and RMSNorm weights: never quantised."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + head + (2 * self.num_layers + 1) * self.hidden_size

    def num_parameters(self) -> int:
        return self.linear_parameters() + self.other_parameters()

    def lora_parameters(self, r: int, targets="all-linear") -> int:
        """LoRA adds A (r x in) and B (out x r) to each adapted linear (Hu et al. 2021, Eq. 3)."""
        return self.num_layers * sum(r * (a + b) for n, (a, b) in self.linears().items() if n in _targets(targets))


MISTRAL_7B = ModelShape(4096, 14336, 32, 32, 8, 32002)  # OpenHermes-2.5 adds 2 chat tokens to 32000
SMOLLM2_135M = ModelShape(576, 1536, 30, 9, 3, 49152, tie_embeddings=True)
TINY = ModelShape(64, 128, 2, 4, 2, 49152, tie_embeddings=True)  # models.TINY_SHAPES with SmolLM2's vocabulary
SHAPES = {"mistral-7b": MISTRAL_7B, "smollm2-135m": SMOLLM2_135M, "tiny": TINY}  # by Preset.model_name


def shape_of(model_name: str) -> ModelShape | None:
    """The shape of a course model name, or of a local model folder (its ``config.json``); None if unknown."""
    if model_name in SHAPES:
        return SHAPES[model_name]
    import json
    from pathlib import Path
    from types import SimpleNamespace

    config = Path(model_name) / "config.json"
    return ModelShape.from_config(SimpleNamespace(**json.loads(config.read_text()))) if config.is_file() else None


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one bitsandbytes ``Linear4bit`` weight of ``numel`` entries, quantisation state included.

    NF4 packs two 4-bit codes per byte and keeps one absmax per block of 64 weights. Double
    quantisation (QLoRA) stores those absmaxes as uint8 with one fp32 scale per 256 of them, plus
    its 256-entry fp32 code table and an fp32 offset; the 16 NF4 levels are one more fp32 table.
    Checked against a real ``Linear4bit`` in ``tests/test_gpu_budget.py``.
    """
    blocks = -(-numel // 64)
    if not double_quant:
        return numel // 2 + 4 * blocks + 4 * 16
    return numel // 2 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 + 4 * 16


def _targets(targets) -> set[str]:
    # peft's "all-linear" is every linear except the output layer
    return set(LORA_LINEARS) if targets == "all-linear" else set(targets)


def activation_bytes_per_token(shape: ModelShape, *, seq_len: int, weights: str = "nf4",
                               compute_dtype: str = "bfloat16", kbit_prepared: bool = True, lora_r: int = 16,
                               lora_targets="all-linear", lora_dropout: bool = True, padded: bool = True,
                               device: str = "cuda") -> float:
    """Bytes autograd keeps for backward per token in ONE decoder layer, without checkpointing.

    Counted from the code, tensor by tensor (h hidden, i intermediate, a heads, kv = K/V width,
    c = compute-dtype bytes, res = residual-stream bytes, out = bytes of a projection's output):

    * 2 RMSNorms: fp32 copy of the input + fp32 1/rms: ``2 * (4h + 4)``
    * SwiGLU: SiLU keeps gate(x); gate*up keeps silu(gate(x)) and up(x): ``3 * i * out``
    * SDPA (flash / memory-efficient: no s x s scores): q, k, v, output in c, fp32 log-sum-exp
      ``4a``; with a padding mask HF repeats K/V to all heads (no GQA kernel takes a mask) and
      SDPA keeps an additive mask ``c * s`` per token per layer
    * LoRA A keeps its input, B keeps A's output (``r * c`` each). With dropout each adapter keeps
      its own input (CUDA: a bool mask + the input in c; CPU: peft casts before dropout, so the
      noise and the dropped input, both in c); without it, adapters sharing an input share one
      tensor when no cast is needed (o_proj's is SDPA's output, already counted)
    * The frozen base matmul keeps nothing (input grads only need the weight).

    This is the 34·s·b·h-style count of Korthikanti et al. (2022), redone for QLoRA: after
    ``prepare_model_for_kbit_training`` the residual stream is fp32 (it upcasts the embeddings),
    and bitsandbytes returns each projection in its input's dtype, so ``out = res = 4``.
    """
    h, i, a = shape.hidden_size, shape.intermediate_size, shape.num_heads
    kv = shape.num_kv_heads * shape.head_dim
    c, res, out = _dtypes(weights, compute_dtype, kbit_prepared)
    targets = _targets(lora_targets)
    n = 2 * (4 * h + 4) + 3 * i * out
    kv_kept = a * shape.head_dim if padded and kv != a * shape.head_dim else kv
    n += (2 * a * shape.head_dim + 2 * kv_kept) * c + 4 * a + (c * seq_len if padded else 0)
    for names, width, dtype, already in ((("q_proj", "k_proj", "v_proj"), h, out, False), (("o_proj",), h, c, True),
                                         (("gate_proj", "up_proj"), h, out, False), (("down_proj",), i, out, False)):
        k = len(targets.intersection(names))
        if k and lora_dropout:
            n += k * width * ((1 + c) if device == "cuda" else 2 * c)
        elif k and dtype != c:
            n += k * width * c  # autocast makes a fresh copy per adapter
        elif k and not already:
            n += width * c
    return n + len(targets) * lora_r * c


@dataclass
class MemoryPrediction:
    """Predicted peak GPU memory of one training micro-step, in GiB, with its breakdown."""

    components: dict[str, float]  # GiB per part, at the phase of the step where the total peaks
    peak_gib: float  # sum of components: what must fit in the GPU's memory
    phase: str  # "policy forward", "reference forward" or "backward"
    phases: dict[str, float]  # total GiB at each phase
    assumptions: list[str] = field(default_factory=list)

    def biggest(self, n: int = 3) -> list[tuple[str, float]]:
        """The n largest parts of the model's own memory (overheads left out)."""
        own = {k: v for k, v in self.components.items() if k not in ("allocator fragmentation", "CUDA context")}
        return sorted(own.items(), key=lambda kv: -kv[1])[:n]

    def fits(self, usable_gib: float) -> bool:
        return self.peak_gib <= usable_gib

    def table(self) -> str:
        rows = [f"  {k:<34}{v:8.2f} GiB" for k, v in self.components.items() if v > 0.005]
        return "\n".join(rows + [f"  {'predicted peak (' + self.phase + ')':<34}{self.peak_gib:8.2f} GiB"])


def predict_memory(shape: ModelShape, *, seq_len: int, pairs_per_device: int, lora_r: int,
                   lora_targets="all-linear", gradient_checkpointing: bool, reference: str = "adapter_disabled",
                   weights: str = "nf4", compute_dtype: str = "bfloat16", optimizer: str = "paged_adamw_8bit",
                   lora_dropout: bool = True, padded: bool = True, kbit_prepared: bool = True,
                   double_quant: bool = True) -> MemoryPrediction:
    """Peak GPU memory of a LoRA/QLoRA DPO micro-step as TRL 1.16 runs it.

    ``seq_len`` is the padded length (the preset's ``max_length`` is the worst case); DPO runs
    chosen and rejected together, so ``2 * pairs_per_device`` sequences. ``reference``:
    ``"adapter_disabled"`` (TRL's default with LoRA: same weights, a no-grad forward),
    ``"precomputed"`` (log-probs computed before training), ``"separate_copy"`` (a second model).
    """
    if reference not in ("adapter_disabled", "precomputed", "separate_copy"):
        raise ValueError(f"reference must be adapter_disabled, precomputed or separate_copy, not {reference!r}")
    h, i, V, L = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_layers
    weights = _WEIGHTS.get(weights, weights)
    c, res, out = _dtypes(weights, compute_dtype, kbit_prepared)
    T = 2 * pairs_per_device * seq_len  # tokens in the micro-batch
    # NF4: 4 bits + one 8-bit absmax per 64 weights + one fp32 absmax per 256 of those (double quant)
    per_linear = (0.5 + (1 / 64 + 4 / (64 * 256)) if double_quant else 0.5 + 4 / 64) if weights == "nf4" else c
    other = 4 if kbit_prepared and weights == "nf4" else c  # peft upcasts every non-4-bit parameter to fp32
    base = shape.linear_parameters() * per_linear
    base_other = shape.other_parameters() * other
    # TRL casts a quantised model's adapters to bf16 (QLoRA paper); peft keeps others in fp32; under fp16,
    # build_trainer makes them fp32 again (the CUDA GradScaler cannot unscale bf16: train.upcast_trainable_to_fp32)
    ad = 2 if weights == "nf4" and compute_dtype == "bfloat16" else 4
    n_lora = shape.lora_parameters(lora_r, lora_targets)
    opt = 2 if "8bit" in optimizer else 2 * ad  # two Adam moments: 8-bit each, or the adapters' dtype
    per_layer = activation_bytes_per_token(shape, seq_len=seq_len, weights=weights, compute_dtype=compute_dtype,
                                           kbit_prepared=kbit_prepared, lora_r=lora_r, lora_targets=lora_targets,
                                           lora_dropout=lora_dropout, padded=padded)
    mask = 2 * pairs_per_device * seq_len * seq_len if padded else 0  # HF's bool (b, 1, s, s) mask, shared
    kept = T * res * h * L if gradient_checkpointing else T * per_layer * L  # checkpoints keep each layer's input
    saved = kept + T * (4 * h + 4) + mask  # + the final norm's fp32 input and 1/rms
    recompute = T * per_layer if gradient_checkpointing else 0  # one layer re-run during backward
    # Fused LM head (N scored positions <= T; all of them assumed): saves the gathered hidden
    # states, the targets and two fp32 stats; works in one logits tile plus a compute-dtype
    # copy of one vocab chunk of the (fp32 after kbit prep) head and of the token chunk.
    n_tile, v_tile = min(T, TRL_TOKEN_CHUNK), min(V, TRL_VOCAB_CHUNK)
    head_saved = T * (h * res + 16)
    head_ws = n_tile * v_tile * c + (v_tile * h * c if other != c else 0) + n_tile * h * c + 7 * T * 4
    head_bwd = head_ws + T * h * 4  # + fp32 grad of the hidden states
    dequant = h * i * c  # bitsandbytes dequantises one weight per matmul
    layer_fwd = T * (3 * i * out + i * c + 2 * h * res) + dequant  # ASSUMED no-grad MLP working set
    bwd_ws = T * (3 * i * out + 2 * i * c + 2 * h * res) + dequant  # ASSUMED MLP gradients of one layer
    static = {"quantised linear weights" if weights == "nf4" else "linear weights": base,
              "embeddings, LM head, norms": base_other, "LoRA adapters": n_lora * ad, "LoRA gradients": n_lora * ad,
              "optimizer states": n_lora * opt,
              "reference model copy": base + base_other if reference == "separate_copy" else 0,
              "saved activations": saved}
    ref_ws = 0 if reference == "precomputed" else max(layer_fwd, head_ws)
    phases = {"policy forward": {"LM-head log-probs": head_saved + head_ws},
              "reference forward": {"LM-head log-probs": head_saved, "reference forward": ref_ws},
              "backward": {"LM-head log-probs": head_saved + head_bwd} if head_saved + head_bwd > recompute + bwd_ws
              else {"recomputed layer": recompute, "backward working set": bwd_ws}}
    totals = {}
    for name, parts in phases.items():
        allocated = sum(static.values()) + sum(parts.values())
        parts["allocator fragmentation"] = allocated * (FRAGMENTATION - 1)
        parts["CUDA context"] = CUDA_CONTEXT_GIB * GIB
        totals[name] = (allocated + parts["allocator fragmentation"] + parts["CUDA context"]) / GIB
    phase = max(totals, key=totals.get)
    components = {k: v / GIB for k, v in {**static, **phases[phase]}.items()}
    assumptions = [
        f"CUDA context and library workspaces: {CUDA_CONTEXT_GIB} GiB (assumed, not measured)",
        f"caching-allocator fragmentation: +{FRAGMENTATION - 1:.0%} of allocated memory (assumed)",
        f"every sequence padded to seq_len={seq_len}; every position scored by the LM head (upper bound)",
        "no-grad reference and backward working sets: one layer's MLP tensors plus one dequantised weight (assumed)",
        "activations counted from transformers 5 / peft 0.21 / bitsandbytes 0.50 / TRL 1.16 code paths",
    ]
    return MemoryPrediction(components, totals[phase], phase, totals, assumptions)


def count_dpo_step_flops(shape: ModelShape, tokens_per_sequence: int, sequences: int, lora_r: int,
                         gradient_checkpointing: bool, reference: str = "adapter_disabled",
                         lora_targets="all-linear", lm_head_tokens_per_sequence: int | None = None,
                         head_recomputes: bool = True) -> dict[str, float]:
    """Matmul FLOPs of one DPO micro-step (``sequences`` = 2 x pairs), exact from shapes.

    A matmul of (m x k) @ (k x n) is 2mnk FLOPs; norms, RoPE, softmax and the embedding
    lookup are left out. Per layer and sequence of s tokens: the linears ``2 s in out``;
    attention scores + weighted sum ``2 * 2 s^2 h`` (the full square: SDPA does not halve
    it for causal masks on CPU); LoRA ``2 s r (in + out)`` per adapter; LM head ``2 s h V``.

    * backward: input grads of the frozen base (= its forward), attention 2.5x its forward
      (flash-style kernels recompute the scores, then dP, dV, dQ, dK), LM head 2x (TRL's
      chunked head recomputes each logits tile, then its input grad; 1x with
      ``head_recomputes=False``, as for ``fast_dpo``'s completion-only head, which keeps its
      logits), LoRA 2x (weight and input grads)
    * recompute: the decoder forward again under gradient checkpointing
    * reference: a forward without LoRA (``"precomputed"``: 0)

    Pass real (unpadded) token counts to count real work; ``lm_head_tokens_per_sequence``
    is the positions the head scores (default: all).
    """
    s, n, r = tokens_per_sequence, sequences, lora_r
    lm = s if lm_head_tokens_per_sequence is None else lm_head_tokens_per_sequence
    T, L = s * n, shape.num_layers
    linear = L * sum(2 * T * a * b for a, b in shape.linears().values())
    attention = L * n * 2 * 2 * s * s * shape.num_heads * shape.head_dim
    lora = L * sum(2 * T * r * (a + b) for k, (a, b) in shape.linears().items() if k in _targets(lora_targets))
    head = 2 * n * lm * shape.hidden_size * shape.vocab_size
    flops = {"forward": linear + attention + lora + head,
             "backward": linear + 2.5 * attention + 2 * lora + (2 if head_recomputes else 1) * head,
             "recompute": linear + attention + lora if gradient_checkpointing else 0,
             "reference": 0 if reference == "precomputed" else linear + attention + head}
    flops["total"] = sum(flops.values())
    return flops


@dataclass(frozen=True)
class GPU:
    """One GPU kind. Peaks are dense tensor-core numbers from NVIDIA's data sheets."""

    name: str
    memory_gib: float  # usable: what torch reports as total memory
    fp16_tflops: float  # dense fp16 tensor peak, no sparsity
    bf16_tflops: float | None  # None: no bf16 tensor cores (Turing)
    mfu: float  # ASSUMED fraction of peak a 4-bit QLoRA step achieves (dequantisation per matmul); unmeasured


GPUS = {
    "T4": GPU("T4", 15.0, 65.0, None, 0.15),  # Turing: slow NF4 dequant, fp16 only
    "A100-40GB": GPU("A100-40GB", 39.5, 312.0, 312.0, 0.30),
    "A100-80GB": GPU("A100-80GB", 79.0, 312.0, 312.0, 0.30),
    "H100-80GB": GPU("H100-80GB", 79.0, 989.0, 989.0, 0.25),  # SXM; bnb kernels keep up less well
    "H200": GPU("H200", 139.0, 989.0, 989.0, 0.25),
}


def predict_step_seconds(shape: ModelShape, *, seq_len: int, pairs: int, gradient_accumulation_steps: int, gpu,
                         gradient_checkpointing: bool, reference: str = "adapter_disabled", lora_r: int = 16,
                         lora_targets="all-linear", compute_dtype: str = "bfloat16") -> float:
    """Seconds per optimiser step: counted FLOPs / (tensor peak x assumed utilisation).

    An assumption until measured: the utilisation in :data:`GPUS` is a guess for bitsandbytes
    NF4 (every matmul dequantises its weight first), not a benchmark. ``seq_len`` may be a mean
    real length rather than the padded one.
    """
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    peak = gpu.bf16_tflops if compute_dtype == "bfloat16" else gpu.fp16_tflops
    if peak is None:
        raise ValueError(f"{gpu.name} has no bfloat16 tensor cores; use compute_dtype='float16'")
    flops = count_dpo_step_flops(shape, seq_len, 2 * pairs, lora_r, gradient_checkpointing, reference, lora_targets)
    return flops["total"] * gradient_accumulation_steps / (peak * 1e12 * gpu.mfu)


TABLE_ROWS = (("t4", "T4"), ("a100", "A100-40GB"), ("a100", "A100-80GB"), ("a100", "H100-80GB"), ("a100", "H200"))


def prediction_table() -> str:
    """Markdown table of each GPU preset on its target GPU, as ``detect_preset`` would fit it."""
    from .presets import fit_to_gpu, get_preset

    lines = ["| preset | GPU | usable GiB | max_length | pairs x accum | checkpointing | predicted peak GiB "
             "| largest part (GiB) | s / optimiser step | h / max_steps |", "|" + "---|" * 10]
    for name, gpu_name in TABLE_ROWS:
        gpu = GPUS[gpu_name]
        p = fit_to_gpu(get_preset(name), gpu.memory_gib, verbose=False)
        pred = p.predicted_memory()
        part, gib = pred.biggest(1)[0]
        sec = predict_step_seconds(SHAPES[p.model_name], seq_len=p.max_length, pairs=p.per_device_batch_size,
                                   gradient_accumulation_steps=p.gradient_accumulation_steps, gpu=gpu,
                                   gradient_checkpointing=p.gradient_checkpointing, reference=_reference(p),
                                   lora_r=p.lora_r, compute_dtype=p.dtype)
        lines.append(f"| {name} | {gpu_name} | {gpu.memory_gib:g} | {p.max_length} | {p.per_device_batch_size} x "
                     f"{p.gradient_accumulation_steps} | {'on' if p.gradient_checkpointing else 'off'} | "
                     f"{pred.peak_gib:.1f} | {part} ({gib:.1f}) | {sec:.0f} | {sec * p.max_steps / 3600:.1f} |")
    return "\n".join(lines)


def _reference(preset) -> str:
    return "precomputed" if preset.precompute_ref_log_probs else "adapter_disabled"


def preset_memory(preset, shape: ModelShape | None = None) -> MemoryPrediction:
    """:func:`predict_memory` for a :class:`~course_utils.presets.Preset` (its fields, its model)."""
    shape = shape or shape_of(preset.model_name)
    if shape is None:
        raise KeyError(f"no shape known for model {preset.model_name!r}; pass shape=ModelShape.from_config(...)")
    return predict_memory(shape, seq_len=preset.max_length, pairs_per_device=preset.per_device_batch_size,
                          lora_r=preset.lora_r, gradient_checkpointing=preset.gradient_checkpointing,
                          reference=_reference(preset), optimizer=preset.optimizer, compute_dtype=preset.dtype,
                          weights="nf4" if preset.load_in_4bit else preset.dtype, lora_dropout=preset.lora_dropout > 0)
