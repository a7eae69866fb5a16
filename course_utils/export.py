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

On a 16 GB T4 the merged float16 Mistral-7B (14.5 GB) fits neither the GPU next to anything nor
free Colab's ~12.7 GB of RAM: ``merge_adapter(..., by_layer=True)`` merges one layer at a time
and writes shards as they fill (:func:`save_merged_by_layer`), never holding the whole model.
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
MAX_SHARD_BYTES = 10**9  # merged weights go to disk in shards of at most 1 GB, one at a time (free Colab: ~12.7 GB RAM)


@dataclass
class MergeReport:
    """What :func:`merge_adapter` made."""

    output_dir: Path  # a plain transformers checkpoint (safetensors + tokenizer + chat template)
    model: Any  # the merged model, still in memory; None when merged by_layer (it exists on disk only)
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
                  load_in_4bit: bool | None = None, by_layer: bool = False,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> MergeReport:
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
        by_layer: never hold the whole merged model: merge and write it one layer at a time
            (:func:`save_merged_by_layer`); the report's ``model`` is then None. Same weights, bit for bit.
        max_shard_bytes: the largest safetensors file written (the RAM one shard needs).
    """
    from peft import PeftModel

    fields = _preset_fields(preset)
    dtype = _to_dtype(dtype or fields.get("dtype", "float32"))
    four_bit = bool(fields.get("load_in_4bit", False) if load_in_4bit is None else load_in_4bit)
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"No LoRA adapter in {adapter_dir} (adapter_config.json missing).")

    if Path(base_name_or_path).resolve() == output_dir.resolve():
        raise ValueError(f"output_dir {output_dir} is the base model's own folder: merge into a new one")
    base, tokenizer = load_base(base_name_or_path, preset=preset, dtype=dtype, load_in_4bit=four_bit)
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_weight_files(output_dir)  # a previous merge may have written other shards
    if by_layer:  # NF4 stays packed; each layer is dequantised only while it is merged
        merged = None
        save_merged_by_layer(PeftModel.from_pretrained(base, str(adapter_dir)), output_dir, dtype,
                             max_shard_bytes=max_shard_bytes)
    else:
        if four_bit:
            base = dequantize_4bit_model(base, dtype)  # never merge into NF4: see the module docstring
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.eval()
        merged.save_pretrained(str(output_dir), safe_serialization=True, max_shard_size=max_shard_bytes)
    if (adapter_dir / "tokenizer_config.json").is_file():  # the tokenizer training used, chat template included
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(output_dir))
    method = "dequantize NF4 -> merge_and_unload" if four_bit else "merge_and_unload"
    info = {
        "base": fields.get("checkpoint") or {"smollm2-135m": SMOLLM2_HUB_ID}.get(base_name_or_path, base_name_or_path),
        "adapter_dir": str(adapter_dir),
        "dtype": str(dtype).replace("torch.", ""),
        "base_was_4bit": four_bit,
        "method": method + (", layer by layer" if by_layer else ""),
        "preset": fields.get("name"),
        "lora": {k: v for k, v in json.loads((adapter_dir / "adapter_config.json").read_text()).items()
                 if k in ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora")},
        "versions": _versions(),
    }
    (output_dir / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2))
    (output_dir / "README.md").write_text(_model_card(info), encoding="utf-8")
    return MergeReport(output_dir, merged, tokenizer, four_bit, info["dtype"], info)


def save_merged_by_layer(peft_model, output_dir, dtype, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write ``peft_model`` with its LoRA merged as a plain checkpoint, one weight at a time.

    Each LoRA-wrapped linear becomes ``W' = W + (alpha / r) B @ A`` (Eq. 3 of Hu et al., 2021),
    shape ``(out_features, in_features)``, computed on the layer's own device exactly as
    :func:`dequantize_4bit_model` + ``merge_and_unload()`` would (NF4 weights dequantised, the
    update added by peft's own ``get_delta_weight``), then moved to the CPU. Weights are grouped
    into safetensors shards of at most ``max_shard_bytes``; each shard is written and dropped
    before the next is made. ``peft_model`` itself is not changed. Returns the files written.
    """
    import copy

    from safetensors.torch import save_file

    dtype, output_dir = _to_dtype(dtype), Path(output_dir)
    model = peft_model.get_base_model()
    specs = _merged_weight_specs(model, dtype)
    shards, size = [[]], 0
    for name, nbytes, make in specs:  # greedy, in state-dict order
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, make))
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    output_dir.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for filename, shard in zip(names, shards):
        tensors = {name: make() for name, make in shard}  # only this shard is ever in RAM
        save_file(tensors, str(output_dir / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(n for _, n, _ in specs)}, "weight_map": weight_map}
        (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = copy.deepcopy(model.config)  # as save_pretrained writes it, without the quantisation
    config.__dict__.pop("quantization_config", None)
    config.dtype = str(dtype).replace("torch.", "")
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(output_dir))
    if model.can_generate():
        model.generation_config.save_pretrained(str(output_dir))
    return names


def _merged_weight_specs(model, dtype) -> list[tuple[str, int, Any]]:
    """``(state-dict name, bytes, make)`` of every tensor of the merged model; ``make()`` builds it on the CPU.

    Names are those of the merged ``state_dict()``: a LoRA layer's merged weight under the layer's
    name, no adapters, a tied weight once (under its first name, as save_pretrained keeps it).
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    specs, seen, inside = [], set(), None
    for prefix, module in model.named_modules():
        if inside is not None and prefix.startswith(inside):
            continue  # base_layer, lora_A, lora_B, dropout: folded into the merged weight
        inside = None
        if isinstance(module, (LoraLayer, bnb.nn.Linear4bit)):  # a 4-bit linear without LoRA is dequantised too
            inside, lora = prefix + ".", module if isinstance(module, LoraLayer) else None
            base = lora.get_base_layer() if lora is not None else module
            specs.append((prefix + ".weight", base.out_features * base.in_features * dtype.itemsize,
                          lambda base=base, lora=lora: _merged_linear_weight(base, lora, dtype)))
        skip = {"weight"} if inside else set()  # replaced by the merged weight; a bias is saved as it is
        module = base if inside else module
        persistent = {k: v for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set}
        for name, tensor in [*module._parameters.items(), *persistent.items()]:
            if tensor is None or name in skip or id(tensor) in seen:
                continue  # a tied weight is saved once (SmolLM2's LM head is its embedding matrix)
            seen.add(id(tensor))
            cast = dtype if tensor.is_floating_point() else tensor.dtype
            specs.append((f"{prefix}.{name}" if prefix else name, tensor.numel() * cast.itemsize,
                          lambda tensor=tensor, cast=cast: tensor.detach().to("cpu", cast).contiguous()))
    return specs


@torch.no_grad()
def _merged_linear_weight(base, lora, dtype) -> torch.Tensor:
    """``W + (alpha / r) B @ A`` for each active adapter of ``lora`` (None: just ``W``), in ``dtype``, on the CPU."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    adapters = [a for a in lora.active_adapters if a in lora.lora_A] if lora is not None else []
    if adapters and (lora.fan_in_fan_out or any(lora.lora_variant.get(a) for a in adapters)):
        raise NotImplementedError("by_layer merges plain LoRA only (no DoRA, no fan_in_fan_out)")
    if isinstance(base, bnb.nn.Linear4bit):
        _unpack_cpu_4bit(base)
        weight = dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)  # as dequantize_4bit_model
    else:
        weight = base.weight.detach().to(dtype, copy=True)
    for adapter in adapters:
        weight += lora.get_delta_weight(adapter)  # what merge_and_unload adds, in the same precision
    return weight.cpu()


def _remove_weight_files(folder: Path) -> None:
    """Delete the weight files (single or sharded safetensors and their index) of an earlier merge."""
    for path in folder.glob("model*.safetensors*"):
        if path.is_file():
            path.unlink()


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
    """Largest ``|logits_a - logits_b|`` over all real tokens of ``prompts`` (see :func:`prompt_logits`).

    ``model_b`` may also be logits that :func:`prompt_logits` returned earlier for the same prompts:
    a model that is no longer in memory can still be compared with.
    """
    a = prompt_logits(model_a, tokenizer, prompts)
    b = model_b if isinstance(model_b, torch.Tensor) else prompt_logits(model_b, tokenizer, prompts)
    if a.shape != b.shape:
        raise ValueError(f"logits of shape {tuple(a.shape)} and {tuple(b.shape)}: not the same prompts")
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
