"""Hardware presets: one plain dataclass that says how to train on this runtime.

``detect_preset()`` looks at the runtime (CPU, T4, A100/H100-class, other CUDA GPU)
and returns a :class:`Preset`. Every field can be overridden in one line::

    preset = detect_preset(max_steps=20, beta=0.5)
    preset = get_preset("t4").override(per_device_batch_size=1)

On a GPU, ``detect_preset`` also checks the preset against the memory model of
:mod:`course_utils.gpu_budget` (:func:`fit_to_gpu`): a batch or length that is predicted
not to fit is lowered before training starts, and a size you set yourself that cannot fit
raises :class:`PresetDoesNotFit` saying what would. ``print(explain_fit(preset, "T4"))``
shows the prediction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .gpu_budget import GPU, GPUS, SHAPES, MemoryPrediction, ModelShape, predict_step_seconds, preset_memory, shape_of
from .models import MISTRAL_DEFAULT_CHECKPOINT


@dataclass(frozen=True)
class Preset:
    """Everything a DPO run needs to know about its hardware budget."""

    name: str  # "cpu", "tiny", "t4", "a100", "cuda"
    model_name: str  # a course model name for load_model: "smollm2-135m", "tiny", "mistral-7b"
    checkpoint: str | None = None  # exact hub checkpoint behind "mistral-7b"
    dtype: str = "float32"  # compute dtype; never bfloat16 on a T4 (no bf16 tensor cores)
    load_in_4bit: bool = False  # QLoRA: NF4 base weights + LoRA adapters in `dtype`
    max_length: int = 256  # prompt + completion tokens; longer pairs are truncated by TRL (keep_start)
    per_device_batch_size: int = 4  # pairs per forward pass (TRL doubles it: chosen + rejected)
    gradient_accumulation_steps: int = 1  # effective batch = per_device_batch_size * this
    gradient_checkpointing: bool = False  # trade ~30% more compute for much less activation memory
    optimizer: str = "adamw_torch"  # "paged_adamw_8bit" on GPU: 8-bit states, paged to CPU on spikes
    precompute_ref_log_probs: bool = False  # one reference pass before training instead of one per step
    cpu_bf16: bool = False  # CPU only: bf16 autocast when the CPU multiplies bf16 natively (~2x faster matmuls)
    lora_r: int = 16  # rank of the LoRA update
    lora_alpha: int = 32  # LoRA scale is alpha / r
    lora_dropout: float = 0.05
    learning_rate: float = 5e-5  # LoRA tolerates (and needs) far higher rates than full fine-tuning
    beta: float = 0.1  # strength of the KL anchor to the reference; the DPO paper uses 0.1-0.5
    max_steps: int = 100  # optimiser steps
    warmup_steps: int = 5
    logging_steps: int = 4
    save_steps: int = 32
    # Offline sentiment data (the CPU course): how many prompts and samples to make.
    train_prompts: int = 256  # movie-review openings used for training pairs
    eval_prompts: int = 64  # held-out openings training never sees
    samples_per_prompt: int = 4  # completions sampled per prompt; best and worst become a pair
    max_new_tokens: int = 40  # completion length when sampling pairs and evaluating
    pair_max_new_tokens: int | None = None  # sentiment completions' cap (pairs, their judge); None: max_new_tokens
    sample_batch_size: int = 32  # rows per generate() call when sampling pairs (part of the pairs' cache key)
    judge_reward_model: str = "lesson-1"  # lesson 5's reward-model judge: "lesson-1", "tiny-random" or a hub id/folder
    seed: int = 0
    notes: str = field(default="", compare=False)  # why this preset looks the way it does

    def override(self, **changes) -> "Preset":
        """A copy with some fields changed; unknown names are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"Preset has no field(s) {unknown}; valid fields: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]

    @property
    def sentiment_new_tokens(self) -> int:
        """Tokens per sentiment completion: "one or two sentences" need far fewer than a chat answer."""
        return self.pair_max_new_tokens or self.max_new_tokens

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_batch_size * self.gradient_accumulation_steps

    def predicted_memory(self, shape: ModelShape | None = None) -> MemoryPrediction:
        """Predicted peak GPU memory of one training step (:func:`course_utils.gpu_budget.predict_memory`)."""
        return preset_memory(self, shape)


# What every GPU preset shares: Mistral-7B in 4-bit NF4 with LoRA (QLoRA).
_QLORA_GPU = dict(
    model_name="mistral-7b",
    checkpoint=MISTRAL_DEFAULT_CHECKPOINT,
    load_in_4bit=True,
    gradient_checkpointing=True,
    optimizer="paged_adamw_8bit",
    precompute_ref_log_probs=False,  # reference = same weights, adapter disabled: no second copy
    lora_r=16,
    lora_alpha=32,
    learning_rate=5e-5,
    max_steps=200,
    train_prompts=296,  # all 360 openings: 296 train + 64 held out (orca pairs: see lesson 3)
    eval_prompts=64,
    max_new_tokens=256,  # chat answers (orca prompts, lesson 6)
    judge_reward_model="Skywork/Skywork-Reward-V2-Qwen3-1.7B",  # ~1.7B, fits beside the 4-bit 7B on a T4 (README)
    pair_max_new_tokens=48,  # sentiment continuations, sampled on the GPU from Mistral itself (sentiment.py)
)

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        model_name="smollm2-135m",
        max_length=160,  # sentiment prompts ~60 tokens + 40-token completions
        per_device_batch_size=4,
        gradient_accumulation_steps=1,
        precompute_ref_log_probs=True,  # the reference is frozen: one pass, kept on disk, reused by every run
        cpu_bf16=True,  # checked against fp32 in tests/test_fast_dpo.py; falls back to fp32 on CPUs without bf16
        lora_r=16,
        lora_alpha=32,
        learning_rate=5e-4,  # 2e-4 won 72% over 3 pair seeds, 5e-4 won 85% (README, "Headline"; higher KL)
        beta=0.1,
        max_steps=64,  # one epoch over ~255 pairs: about 2.5 s a step on 2 cores (make bench)
        sample_batch_size=128,  # with bf16: pairs sampled 1.75x faster than 32 rows in fp32
        notes="SmolLM2-135M-Instruct on a laptop or CI CPU, bf16 autocast where supported, offline.",
    ),
    "tiny": Preset(
        name="tiny",
        model_name="tiny",
        max_length=128,
        per_device_batch_size=4,
        gradient_accumulation_steps=1,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        learning_rate=5e-3,  # random 2-layer model: a high rate shows learning within a few steps
        max_steps=20,
        warmup_steps=0,
        logging_steps=2,
        save_steps=10,
        train_prompts=24,
        eval_prompts=8,
        samples_per_prompt=4,
        max_new_tokens=24,
        judge_reward_model="tiny-random",  # a random classifier built locally (judges.tiny_reward_model): no hub in CI
        notes="Random 2-layer Llama with the SmolLM2 tokenizer; for CI, proves the code path only.",
    ),
    "t4": Preset(
        name="t4",
        dtype="float16",  # Turing has no bf16
        max_length=1024,
        per_device_batch_size=1,
        gradient_accumulation_steps=8,
        notes="Mistral-7B QLoRA on a 16 GB Colab T4 (about 15 GB usable).",
        **_QLORA_GPU,
    ),
    "a100": Preset(
        name="a100",
        dtype="bfloat16",
        max_length=1536,
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        notes="Mistral-7B QLoRA on an A100/H100-class GPU (40 GB or more), bf16 compute.",
        **_QLORA_GPU,
    ),
    "cuda": Preset(
        name="cuda",
        dtype="float16",  # detect_preset switches to bfloat16 on Ampere or newer
        max_length=512,
        per_device_batch_size=1,
        gradient_accumulation_steps=8,
        notes="Another CUDA GPU: conservative lengths and batch; raise them if memory allows.",
        **{**_QLORA_GPU, "lora_r": 8, "lora_alpha": 16},
    ),
}


@dataclass(frozen=True)
class Runtime:
    """What detect_preset looks at. Built from torch by default; tests pass their own."""

    cuda: bool
    device_name: str = "cpu"
    capability: tuple[int, int] = (0, 0)
    memory_gb: float = 0.0
    mps: bool = False  # Apple Silicon's GPU (Metal) is there; the cpu preset still trains on the CPU (MPS_CHOICE)
    colab: bool = False  # running in Google Colab, where "auto" without a GPU is a mistake (see detect_preset)

    @classmethod
    def current(cls) -> "Runtime":
        import sys

        colab = "google.colab" in sys.modules
        if not torch.cuda.is_available():
            mps = getattr(torch.backends, "mps", None)
            return cls(cuda=False, mps=bool(mps and mps.is_available()), colab=colab)
        props = torch.cuda.get_device_properties(0)
        return cls(
            cuda=True,
            device_name=props.name,
            capability=(props.major, props.minor),
            memory_gb=props.total_memory / 2**30,
            colab=colab,
        )


def get_preset(name: str, **overrides) -> Preset:
    """The preset called ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise KeyError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].override(**overrides)


def preset_name_for(runtime: Runtime) -> str:
    """Map a runtime to a preset name (see the table in the README)."""
    if not runtime.cuda:
        return "cpu"
    name = runtime.device_name.upper()
    if "T4" in name or runtime.capability < (8, 0):
        return "t4" if runtime.memory_gb >= 14 else "cuda"
    if runtime.memory_gb >= 39:  # A100 40/80 GB, H100, H200, L40S ...
        return "a100"
    return "cuda"


# Why the cpu preset stays on the CPU of a Mac with MPS (read in the pinned torch 2.13 / accelerate 1.15 /
# TRL 1.16 sources; not run here, there is no Mac): accelerate would autocast bf16 on MPS (torch >= 2.6) and
# the Trainer would pick the MPS device by itself, but only where `use_cpu` is False, and `dpo_config` sets it
# from CUDA alone. What the cpu preset's numbers rest on was verified on CPU kernels only: bf16 chosen only
# where it is native (cpu.py), the reference computed in the policy's exact shapes so that step 1 reproduces
# it bit for bit (fast_dpo.py), and reference caches keyed on the CPU's kernel path. None of these has been
# checked for Metal's kernels, so the course does not claim them there.
MPS_CHOICE = ("Apple MPS is available, but the cpu preset trains on the CPU: its bf16 choice, its "
              "bit-exact reference and its caches are verified on CPU kernels, not on Metal's.")


def detect_preset(runtime: Runtime | None = None, **overrides) -> Preset:
    """The preset for this runtime, with any field overridden: ``detect_preset(max_steps=10)``.

    On Colab without a GPU it raises :class:`NoGPURuntime`, saying how to switch the runtime
    (``get_preset("cpu")`` still runs the CPU version on purpose). On a CUDA runtime the GPU
    preset is fitted to ``runtime.memory_gb`` (:func:`fit_to_gpu`);
    memory fields you pass are kept as given, and :class:`PresetDoesNotFit` is raised up front
    when they are predicted not to fit.
    """
    runtime = runtime or Runtime.current()
    if runtime.colab and not runtime.cuda:
        raise NoGPURuntime(NO_GPU_ON_COLAB)
    preset = get_preset(preset_name_for(runtime), **overrides)
    if runtime.mps:
        print(f"detect_preset: {MPS_CHOICE}")
    if preset.dtype == "bfloat16" and runtime.cuda and runtime.capability < (8, 0):
        raise ValueError(f"{runtime.device_name} has no bfloat16 support; use dtype='float16'.")
    if preset.name == "cuda" and runtime.capability >= (8, 0) and "dtype" not in overrides:
        preset = preset.override(dtype="bfloat16")
    if runtime.cuda and runtime.memory_gb > 0 and preset.name in GPU_PRESETS and preset.model_name in SHAPES:
        preset = fit_to_gpu(preset, runtime.memory_gb, pinned=set(overrides) & set(MEMORY_FIELDS))
    return preset


# --- Fitting a GPU preset to the GPU's memory --------------------------------------------

GPU_PRESETS = ("t4", "a100", "cuda")  # the ones fitted; cpu and tiny are not checked by the GPU model
# Fields that change the predicted peak. A field the user set is never changed by fit_to_gpu.
MEMORY_FIELDS = ("gradient_checkpointing", "precompute_ref_log_probs", "per_device_batch_size",
                 "gradient_accumulation_steps", "max_length", "lora_r", "optimizer", "load_in_4bit", "dtype",
                 "model_name")
LENGTH_STEP = 64  # max_length is only ever lowered to a multiple of this


class NoGPURuntime(RuntimeError):
    """``detect_preset`` on a Colab runtime without a GPU: the lessons' headline path needs one."""


NO_GPU_ON_COLAB = ("This Colab runtime has no GPU, and PRESET = \"auto\" trains Mistral-7B on one. "
                   "Runtime > Change runtime type > T4 GPU (or A100), Save, then run the notebook again from the top. "
                   "To run the small CPU version on purpose instead (SmolLM2-135M, slower), set PRESET = \"cpu\".")


class PresetDoesNotFit(ValueError):
    """A preset is predicted not to fit the GPU's memory; the message says what would."""


def _peak(preset: Preset, shape) -> float:
    return preset.predicted_memory(shape).peak_gib


def _first_fit(candidates, memory_gib: float, shape):
    """The first (largest) candidate preset predicted to fit, or None."""
    return next((p for p in candidates if _peak(p, shape) <= memory_gib), None)


def _shorter(preset: Preset):
    """The preset at each multiple of LENGTH_STEP below its max_length, longest first."""
    top = (preset.max_length - 1) // LENGTH_STEP * LENGTH_STEP
    return (preset.override(max_length=m) for m in range(top, preset.max_new_tokens, -LENGTH_STEP))


def fit_to_gpu(preset: Preset, gpu_memory_gib: float, shape: ModelShape | None = None, *, pinned=(),
               verbose: bool = True) -> Preset:
    """``preset`` with its batch, then its length, lowered until the predicted peak fits.

    Kept as is when it fits. Otherwise the largest ``per_device_batch_size`` that divides the
    effective batch and fits is used, with ``gradient_accumulation_steps`` raised so the
    effective batch stays the same; ``max_length`` is lowered (to a multiple of 64) only when
    one pair per step does not fit. Fields in ``pinned`` are never changed; if only they could
    make it fit, :class:`PresetDoesNotFit` is raised. Prints what it changed.
    """
    if _peak(preset, shape) <= gpu_memory_gib:
        return preset
    pinned, fitted, batch = set(pinned), None, preset
    if not pinned & {"per_device_batch_size", "gradient_accumulation_steps"}:
        eff = preset.effective_batch_size
        smaller = (preset.override(per_device_batch_size=b, gradient_accumulation_steps=eff // b)
                   for b in range(preset.per_device_batch_size - 1, 0, -1) if eff % b == 0)
        fitted = _first_fit(smaller, gpu_memory_gib, shape)
        batch = preset.override(per_device_batch_size=1, gradient_accumulation_steps=eff)
    if fitted is None and "max_length" not in pinned:
        fitted = _first_fit(_shorter(batch), gpu_memory_gib, shape)
    if fitted is None:
        raise PresetDoesNotFit(_does_not_fit(preset, gpu_memory_gib, shape, pinned))
    if verbose:
        changed = [f"{f} {getattr(preset, f)} -> {getattr(fitted, f)}" for f in
                   ("per_device_batch_size", "gradient_accumulation_steps", "max_length")
                   if getattr(preset, f) != getattr(fitted, f)]
        print(f"fit_to_gpu: preset {preset.name!r} on {gpu_memory_gib:.1f} GiB: {', '.join(changed)} "
              f"(effective batch {fitted.effective_batch_size}); predicted peak {_peak(fitted, shape):.1f} GiB, "
              f"was {_peak(preset, shape):.1f} GiB.")
    return fitted


def _fitting_changes(preset: Preset, memory_gib: float, shape, limit: int = 3) -> list[tuple[dict, float]]:
    """Up to ``limit`` small sets of field changes predicted to fit, fewest changes first."""
    found = {}

    def add(hit):
        change = {f: getattr(hit, f) for f in MEMORY_FIELDS if getattr(hit, f) != getattr(preset, f)}
        found[tuple(change)] = (change, _peak(hit, shape))

    for base in ({}, {"gradient_checkpointing": True}, {"precompute_ref_log_probs": True}):
        p0 = preset.override(**base)
        if base and (p0 == preset or _peak(p0, shape) >= _peak(preset, shape)):
            continue  # already on, or it does not lower the peak
        if base and _peak(p0, shape) <= memory_gib:
            add(p0)  # this switch alone is enough
            continue
        one_pair = p0.override(per_device_batch_size=1)
        for candidates in ((p0.override(per_device_batch_size=b) for b in range(p0.per_device_batch_size - 1, 0, -1)),
                           _shorter(p0), _shorter(one_pair) if one_pair != p0 else ()):
            hit = _first_fit(candidates, memory_gib, shape)
            if hit is not None:
                add(hit)
    return sorted(found.values(), key=lambda cp: (len(cp[0]), -cp[1]))[:limit]


def _does_not_fit(preset: Preset, memory_gib: float, shape, pinned: set) -> str:
    pred = preset.predicted_memory(shape)
    parts = ", ".join(f"{k} {v:.1f} GiB" for k, v in pred.biggest(3))
    options = "; ".join(", ".join(f"{k}={v!r}" for k, v in change.items()) + f" would fit: predicted {pk:.1f} GiB"
                        for change, pk in _fitting_changes(preset, memory_gib, shape))
    kept = f" You set {', '.join(sorted(pinned))}, so fit_to_gpu did not change them." if pinned else ""
    return (f"Preset {preset.name!r} (max_length={preset.max_length}, per_device_batch_size="
            f"{preset.per_device_batch_size}, gradient_checkpointing={preset.gradient_checkpointing}) is predicted "
            f"to need {pred.peak_gib:.1f} GiB but this GPU has {memory_gib:.1f} GiB usable. Largest parts: {parts}."
            f"{kept} {options or 'Nothing tried fits; use a GPU with more memory'}. "
            f"(A prediction, not a measurement: see course_utils.gpu_budget.)")


def explain_fit(preset: Preset, gpu, shape: ModelShape | None = None) -> str:
    """A small table for a notebook: predicted memory by part, the verdict, the step time.

    ``gpu``: a key of :data:`course_utils.gpu_budget.GPUS` (``"T4"``), a ``GPU``, a
    :class:`Runtime`, or usable GiB as a number.
    """
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    memory = gpu.memory_gib if isinstance(gpu, GPU) else gpu.memory_gb if isinstance(gpu, Runtime) else float(gpu)
    pred = preset.predicted_memory(shape)
    lines = [f"Preset {preset.name!r}: max_length {preset.max_length}, {preset.per_device_batch_size} pair(s) x "
             f"{preset.gradient_accumulation_steps} accumulation, gradient checkpointing "
             f"{'on' if preset.gradient_checkpointing else 'off'} (predicted, not measured)", pred.table(),
             f"  {'usable GPU memory':<34}{memory:8.2f} GiB -> {'fits' if pred.fits(memory) else 'does NOT fit'}"]
    if isinstance(gpu, GPU) and (shape or shape_of(preset.model_name)):
        sec = predicted_step_seconds(preset, gpu, shape)
        lines.append(f"  {'seconds per optimiser step':<34}{sec:8.1f} s  (assumed {gpu.mfu:.0%} of {gpu.name} peak)")
        lines.append(f"  {f'training, {preset.max_steps} steps':<34}{sec * preset.max_steps / 60:8.0f} min (every pair "
                     f"at max_length: real pairs are shorter)")
    return "\n".join(lines)


def predicted_step_seconds(preset: Preset, gpu, shape: ModelShape | None = None) -> float:
    """Seconds per optimiser step of ``preset`` on ``gpu`` (a :data:`GPUS` key or a ``GPU``), every pair at max_length.

    A prediction (:func:`course_utils.gpu_budget.predict_step_seconds`, assumed utilisation), not a measurement.
    """
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    return predict_step_seconds(shape or shape_of(preset.model_name), seq_len=preset.max_length,
                                pairs=preset.per_device_batch_size,
                                gradient_accumulation_steps=preset.gradient_accumulation_steps, gpu=gpu,
                                gradient_checkpointing=preset.gradient_checkpointing, lora_r=preset.lora_r,
                                reference="precomputed" if preset.precompute_ref_log_probs else "adapter_disabled",
                                compute_dtype=preset.dtype)


def predicted_training_minutes(name: str, gpu_name: str, **overrides) -> float:
    """Lesson 4's training time for preset ``name`` fitted to ``gpu_name``: the README's GPU minutes come from here."""
    gpu = GPUS[gpu_name]
    preset = fit_to_gpu(get_preset(name, **overrides), gpu.memory_gib, verbose=False)
    return predicted_step_seconds(preset, gpu) * preset.max_steps / 60
