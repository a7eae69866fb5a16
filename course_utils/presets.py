"""Hardware presets: one plain dataclass that says how to train on this runtime.

``detect_preset()`` looks at the runtime (CPU, T4, A100/H100-class, other CUDA GPU)
and returns a :class:`Preset`. Every field can be overridden in one line::

    preset = detect_preset(max_steps=20, beta=0.5)
    preset = get_preset("t4").override(per_device_batch_size=1)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

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
    def effective_batch_size(self) -> int:
        return self.per_device_batch_size * self.gradient_accumulation_steps


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
    max_new_tokens=256,
)

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        model_name="smollm2-135m",
        max_length=160,  # sentiment prompts ~60 tokens + 40-token completions
        per_device_batch_size=4,
        gradient_accumulation_steps=1,
        precompute_ref_log_probs=True,  # the reference is frozen: one pass, then never again
        lora_r=16,
        lora_alpha=32,
        learning_rate=2e-4,
        beta=0.1,
        max_steps=64,  # one epoch over ~255 pairs: about 5 s a step on 2 cores
        notes="SmolLM2-135M-Instruct on a laptop or CI CPU, fp32, offline.",
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

    @classmethod
    def current(cls) -> "Runtime":
        if not torch.cuda.is_available():
            return cls(cuda=False)
        props = torch.cuda.get_device_properties(0)
        return cls(
            cuda=True,
            device_name=props.name,
            capability=(props.major, props.minor),
            memory_gb=props.total_memory / 2**30,
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


def detect_preset(runtime: Runtime | None = None, **overrides) -> Preset:
    """The preset for this runtime, with any field overridden: ``detect_preset(max_steps=10)``."""
    runtime = runtime or Runtime.current()
    preset = get_preset(preset_name_for(runtime), **overrides)
    if preset.dtype == "bfloat16" and runtime.cuda and runtime.capability < (8, 0):
        raise ValueError(f"{runtime.device_name} has no bfloat16 support; use dtype='float16'.")
    if preset.name == "cuda" and runtime.capability >= (8, 0) and "dtype" not in overrides:
        preset = preset.override(dtype="bfloat16")
    return preset
