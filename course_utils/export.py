"""Shipping a DPO-trained LoRA adapter: merge it into its base, check it, share it.

A LoRA adapter adds a low-rank update to every targeted linear layer,
``W' = W + (alpha / r) * B @ A`` (Eq. 3 of Hu et al., 2021). Merging computes ``W'``
once, so the saved model is a plain ``transformers`` checkpoint: no ``peft``, no
``course_utils``, no adapter bookkeeping at inference.

Why a 4-bit (QLoRA) base must be *dequantised* before merging: NF4 stores each weight
as one of 16 levels times a per-block scale. The LoRA update is small next to the gap
between two levels, so adding it to the 4-bit weights and quantising again (what
``merge_and_unload()`` does on a bitsandbytes ``Linear4bit``) snaps every entry back to a
level: most do not move at all, a few jump a whole level, and new block scales move
weights the adapter never touched. On SmolLM2 the result is about as far from the
trained model as the adapter's whole effect. Instead, turn the NF4 weights into ordinary
floats (``bitsandbytes.functional.dequantize_4bit``) - exactly the weights the adapter was
trained against - and merge there.

    report = merge_adapter("tiny", "build/course/dpo/adapter", "build/course/merged")
    compare_logits(report.model, peft_model, report.tokenizer, ["Hello!"])  # ~1e-6
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .generation import chat_prompt
from .models import SMOLLM2_HUB_ID, _to_dtype, load_model

MERGE_INFO_FILE = "merge_info.json"


@dataclass
class MergeReport:
    """What :func:`merge_adapter` made."""

    output_dir: Path  # a plain transformers checkpoint (safetensors + tokenizer + chat template)
    model: Any  # the merged model, still in memory
    tokenizer: Any
    dequantized: bool  # True when the base was 4-bit and was dequantised before merging
    dtype: str  # dtype of the saved weights
    info: dict  # what was written to merge_info.json


def find_adapter(output_dir, preset):
    """``(adapter_dir, preset)`` of lesson 4's run under ``output_dir``: the adapter and the preset that trained it.

    Lesson 4 saves ``dpo/adapter`` and ``dpo/preset.json`` (the preset's fields); without the
    json, ``preset`` is assumed. A missing adapter is an error that says how to make one.
    """
    from .presets import Preset

    dpo_dir = Path(output_dir) / "dpo"
    adapter_dir = dpo_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"No LoRA adapter in {adapter_dir}: run lesson 4 first (or python -m course_utils.train "
            f"--preset {preset.name} --output-dir {dpo_dir})")
    if (dpo_dir / "preset.json").is_file():
        fields = json.loads((dpo_dir / "preset.json").read_text())
        preset = Preset(**{k: v for k, v in fields.items() if k in Preset.__dataclass_fields__})
    return adapter_dir, preset


def _preset_fields(preset) -> dict:
    """A Preset, a dict (lesson 4's preset.json) or None, as a plain dict."""
    if preset is None:
        return {}
    if dataclasses.is_dataclass(preset):
        return dataclasses.asdict(preset)
    return dict(preset)


def dequantize_4bit_model(model, dtype=None):
    """Replace every bitsandbytes ``Linear4bit`` of ``model`` by a plain ``nn.Linear``, in place.

    Each weight becomes ``dequantize_4bit(packed, quant_state)``: the NF4 level times its
    block's scale, shape ``(out_features, in_features)`` - the very weights the 4-bit
    forward pass multiplies with. Returns the model, no longer marked as quantised.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    dtype = _to_dtype(dtype) if dtype is not None else model.config.dtype or torch.float32
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    for name, module in targets:
        _unpack_cpu_4bit(module)
        weight = dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
        plain = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                device=weight.device, dtype=dtype)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if module.bias is not None:
                plain.bias.copy_(module.bias.to(dtype))
        model.set_submodule(name, plain)
    # Forget the quantisation, so save_pretrained writes (and from_pretrained reads) plain floats.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_loaded_in_4bit = False
    return model


def _unpack_cpu_4bit(module) -> None:
    """Undo bitsandbytes' CPU repacking of a ``Linear4bit`` weight, if it happened.

    On CPUs with AVX512-BF16, the first inference forward (eval mode, no grad) of a
    ``Linear4bit`` rearranges its packed weight for a bf16 kernel and rounds the block
    scales to bf16. ``dequantize_4bit`` does not know that layout and would return garbage.
    """
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)


def disable_cpu_bf16_4bit_kernel(model) -> int:
    """Make 4-bit layers on a CPU multiply in their compute dtype (as in training), not in bf16.

    bitsandbytes switches CPU inference of ``Linear4bit`` to a faster bfloat16 kernel on
    AVX512-BF16 machines; logits then differ from the training-time forward by ~1e-3.
    Turned off, 4-bit and merged logits can be compared at float32 precision. Returns how many layers.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in layers:
        _unpack_cpu_4bit(module)
        module.support_avx512bf16_for_cpu = False
    return len(layers)


def load_base(base_name_or_path: str, *, preset=None, dtype=None, load_in_4bit: bool | None = None):
    """``(model, tokenizer)`` of the base as training saw it: 4-bit when ``load_in_4bit`` (default: the preset's)."""
    fields = _preset_fields(preset)
    dtype = dtype or fields.get("dtype", "float32")
    four_bit = fields.get("load_in_4bit", False) if load_in_4bit is None else load_in_4bit
    device_map = "auto" if torch.cuda.is_available() and four_bit else None  # bnb 4-bit also runs on CPU
    model, tokenizer = load_model(base_name_or_path, dtype=dtype, load_in_4bit=four_bit,
                                  checkpoint=fields.get("checkpoint"), seed=fields.get("seed", 0), device_map=device_map)
    if four_bit and not torch.cuda.is_available():
        disable_cpu_bf16_4bit_kernel(model)
    return model, tokenizer


def merge_adapter(base_name_or_path: str, adapter_dir, output_dir, *, preset=None, dtype=None,
                  load_in_4bit: bool | None = None) -> MergeReport:
    """Merge the LoRA adapter in ``adapter_dir`` into its base and save a plain checkpoint.

    Args:
        base_name_or_path: a course model name (``"tiny"``, ``"smollm2-135m"``, ``"mistral-7b"``) or a directory.
        adapter_dir: a peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``).
        output_dir: where the merged model, tokenizer, chat template, README and merge_info.json go.
        preset: the training preset (or its fields as a dict): dtype, 4-bit, checkpoint, seed.
        dtype: dtype of the merged weights (default: the preset's). bfloat16 keeps only 8 bits of
            mantissa, so it also rounds away part of a small update; float32/float16 keep more.
        load_in_4bit: whether the adapter was trained on a 4-bit base (default: the preset's).
            True: load the base in NF4 exactly as in training, dequantise, then merge - the merged
            model computes what the trained model computed. False: merge into the original weights.
    """
    from peft import PeftModel

    fields = _preset_fields(preset)
    dtype = _to_dtype(dtype or fields.get("dtype", "float32"))
    four_bit = bool(fields.get("load_in_4bit", False) if load_in_4bit is None else load_in_4bit)
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"No LoRA adapter in {adapter_dir} (adapter_config.json missing).")

    base, tokenizer = load_base(base_name_or_path, preset=preset, dtype=dtype, load_in_4bit=four_bit)
    if four_bit:
        base = dequantize_4bit_model(base, dtype)  # never merge into NF4: see the module docstring
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.eval()
    if (adapter_dir / "tokenizer_config.json").is_file():  # the tokenizer training used, chat template included
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))

    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(output_dir))
    info = {
        "base": fields.get("checkpoint") or {"smollm2-135m": SMOLLM2_HUB_ID}.get(base_name_or_path, base_name_or_path),
        "adapter_dir": str(adapter_dir),
        "dtype": str(dtype).replace("torch.", ""),
        "base_was_4bit": four_bit,
        "method": "dequantize NF4 -> merge_and_unload" if four_bit else "merge_and_unload",
        "preset": fields.get("name"),
        "lora": {k: v for k, v in json.loads((adapter_dir / "adapter_config.json").read_text()).items()
                 if k in ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora")},
        "versions": _versions(),
    }
    (output_dir / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2))
    (output_dir / "README.md").write_text(_model_card(info), encoding="utf-8")
    return MergeReport(output_dir, merged, tokenizer, four_bit, info["dtype"], info)


def _versions() -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("torch", "transformers", "peft", "bitsandbytes")}


def _model_card(info: dict) -> str:
    base = info["base"]
    hub_id = base.count("/") == 1 and not Path(base).exists()  # the Hub links base_model to a repo id only
    header = "\n".join(["library_name: transformers", *([f"base_model: {base}"] if hub_id else []),
                        "tags: [dpo, lora, merged, dpo-course]"])
    return f"""---
{header}
---
# DPO-tuned {info['base']} (LoRA merged)

Trained with Direct Preference Optimization (Rafailov et al., 2023) in the hands-on DPO course,
then merged: `{info['method']}`, weights in {info['dtype']}.
Loads with plain transformers; no peft needed:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")
tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")
```

Details of the merge are in `{MERGE_INFO_FILE}`.
"""


@torch.inference_mode()
def prompt_logits(model, tokenizer, prompts) -> torch.Tensor:
    """Logits of ``model`` at every real (non-pad) token of ``prompts``: shape ``(tokens, vocab)``, float32, CPU.

    ``prompts`` are chat-message lists (rendered with the chat template) or ready-made strings.
    """
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits  # (batch, seq, vocab)
    finally:
        model.train(was_training)
    return logits.float().cpu()[batch["attention_mask"].bool()]


def compare_logits(model_a, model_b, tokenizer, prompts) -> float:
    """Largest ``|logits_a - logits_b|`` over all real tokens of ``prompts`` (see :func:`prompt_logits`)."""
    a, b = prompt_logits(model_a, tokenizer, prompts), prompt_logits(model_b, tokenizer, prompts)
    return (a - b).abs().max().item()


def hub_token() -> str | None:
    """A Hugging Face token from ``$HF_TOKEN`` or Colab's secrets, else None. Never printed or logged."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    try:
        from google.colab import userdata  # only exists on Colab

        token = (userdata.get("HF_TOKEN") or "").strip()
    except Exception:  # not on Colab, secret missing, or notebook access not granted
        return None
    return token or None


def push_to_hub(folder, repo_id: str, *, private: bool = True, token: str | None = None) -> str | None:
    """Upload ``folder`` to the Hub repo ``repo_id``; returns its URL, or None (with a message) without a token."""
    token = token or hub_token()
    if not token:
        print("No Hugging Face token (set HF_TOKEN, or add it to Colab's secrets): skipping the push.")
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload DPO-merged model")
    print(f"Pushed {folder} to {url}")
    return str(url)
