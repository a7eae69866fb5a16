"""Measure a real QLoRA DPO run on a GPU next to course_utils.gpu_budget's prediction.

A randomly initialised model with Mistral-7B's exact shapes stands in for the checkpoint
(memory and time depend on shapes, not on trained values), so nothing is downloaded but a
tokenizer. The weights are written shard by shard as safetensors (about 1 GB in RAM at a
time, so a Colab T4 runtime can do it), loaded in 4-bit NF4 through
``course_utils.models.load_model`` as the real checkpoint is, and trained for a few DPO
steps through ``course_utils.train.build_trainer`` with the preset, on synthetic
preference pairs as long as the preset's ``max_length`` (the worst case the model predicts).

    python benchmarks/gpu_validate.py --preset auto --steps 6 --out build/gpu_validate.json
    python benchmarks/gpu_validate.py --preset t4 --tokenizer tiny    # offline: SmolLM2's tokenizer

The JSON holds torch.cuda.max_memory_allocated / max_memory_reserved, the device-wide memory
in use (CUDA context and paged optimizer states included), the median step time, and the
prediction with its breakdown. Needs a CUDA GPU; elsewhere it exits with a message.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

GIB = 2**30


def mistral_config(shape):
    """A ``MistralConfig`` with the shapes of a :class:`course_utils.gpu_budget.ModelShape`."""
    from transformers import MistralConfig

    return MistralConfig(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                         num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                         num_key_value_heads=shape.num_kv_heads, vocab_size=shape.vocab_size,
                         tie_word_embeddings=shape.tie_embeddings)


def write_random_checkpoint(directory: Path, config, tokenizer, shard_bytes: int = 2**30, device="cpu") -> Path:
    """A random-weight checkpoint of ``config`` in bf16 safetensors shards, never all in memory.

    ``device``: where the numbers are drawn. torch draws them on one CPU core, which took one to two
    minutes for Mistral-7B's 7.2 B weights on the project's CPU machine; a GPU draws them far faster,
    and each tensor is then copied to the CPU to be saved.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if (directory / "model.safetensors.index.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):  # names and shapes only
        names = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    weight_map, shard, size, index = {}, {}, 0, 0
    gen = torch.Generator(device=device).manual_seed(0)
    for i, (name, shape) in enumerate(names.items()):
        if name.endswith("norm.weight"):
            shard[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:  # std 0.02: the usual initialiser range, so logits stay near uniform
            shard[name] = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        size += shard[name].numel() * 2
        if size >= shard_bytes or i == len(names) - 1:
            file = f"model-{index:05d}.safetensors"
            save_file(shard, str(directory / file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
            shard, size, index = {}, 0, index + 1
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def text_of_tokens(tokenizer, word: str, n: int) -> str:
    """A string of ``word`` repeated that tokenizes to exactly ``n`` tokens (or just under)."""
    text = word * n
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) > n:
        text = text[: -len(word)]
    return text


def synthetic_pairs(tokenizer, max_length: int, count: int, words=(" a", " b", " c")) -> list[dict]:
    """Pairs that fill ``max_length``: half prompt, and a rejected answer 8 tokens shorter than
    the chosen one, so every batch is padded and carries an attention mask, like real data.
    ``words``: what the prompt, the chosen and the rejected answers repeat."""
    prompt = text_of_tokens(tokenizer, words[0], max_length // 2)
    room = max_length - max_length // 2 - 4  # BOS/EOS and a margin
    chosen, rejected = text_of_tokens(tokenizer, words[1], room), text_of_tokens(tokenizer, words[2], room - 8)
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected} for _ in range(count)]


def check_vocabulary(tokenizer, rows: list[dict], vocab_size: int) -> None:
    """The tokenizer stands in for the model's own: its ids must index the model's embeddings."""
    ids = tokenizer(rows[0]["prompt"] + rows[0]["chosen"] + rows[0]["rejected"])["input_ids"]
    assert max(ids) < vocab_size, "the tokenizer's ids exceed the model's vocabulary"
    assert max(tokenizer.pad_token_id, tokenizer.eos_token_id) < vocab_size, "pad/EOS ids exceed the vocabulary"


def gpu_key(name: str, memory_gib: float) -> str | None:
    """The course_utils.gpu_budget.GPUS entry for a device name, if there is one."""
    name = name.upper()
    for key, hit in (("H200", "H200"), ("H100-80GB", "H100"), ("T4", "T4")):
        if hit in name:
            return key
    if "A100" in name:
        return "A100-80GB" if memory_gib > 60 else "A100-40GB"
    return None


def step_timer():
    """A ``TrainerCallback`` that records the seconds of every optimizer step (all its micro-steps) in ``.seconds``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.start = [], 0.0

        def on_step_begin(self, *_, **__):  # once per optimizer step, before its first micro-batch
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):  # after the optimizer step
            torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.start)

    return StepTimer()


def free_gpu_memory() -> None:
    """Return cached blocks to the driver, so the next run's peak starts from what is really held."""
    gc.collect()
    torch.cuda.empty_cache()


def measure_training(trainer, timer) -> dict:
    """``trainer.train()`` with torch's peak-memory counters reset first; the peaks, in GiB, and the step times.

    ``max_memory_allocated``: bytes in live tensors at the peak. ``max_memory_reserved``: what the
    caching allocator held from the driver at its peak (allocated + fragmentation).
    ``outside_allocator_gib``: device memory in use that torch's allocator does not own (CUDA
    context, library kernels, bitsandbytes' paged optimizer states), read after training, when
    every kernel has been loaded.
    """
    free_gpu_memory()
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    timed = timer.seconds[1:] or timer.seconds  # the first step pays kernel loading and autotuning
    return {"max_memory_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "max_memory_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "device_in_use_gib": (total - free) / GIB,
            "outside_allocator_gib": (total - free - torch.cuda.memory_reserved()) / GIB,
            "step_seconds": list(timer.seconds),
            "median_step_seconds": statistics.median(timed) if timed else None}


def prediction(preset, shape, key: str | None) -> dict:
    """What course_utils.gpu_budget predicts for ``preset``: peak memory and its parts, and the step time on
    the GPU ``key`` of ``GPUS`` (None: no step time).

    ``peak_gib`` = allocated + fragmentation + CUDA context, so ``reserved_gib`` (no context) is
    the counterpart of ``max_memory_reserved`` and ``allocated_gib`` (neither) of ``max_memory_allocated``.
    """
    from course_utils.presets import predicted_step_seconds

    pred = preset.predicted_memory(shape)
    context, fragmentation = pred.components["CUDA context"], pred.components["allocator fragmentation"]
    step = None if key is None else predicted_step_seconds(preset, key, shape)
    return {"peak_gib": pred.peak_gib, "reserved_gib": pred.peak_gib - context,
            "allocated_gib": pred.peak_gib - context - fragmentation, "phase": pred.phase,
            "components_gib": pred.components, "step_seconds": step, "assumptions": pred.assumptions}


def library_versions() -> dict:
    return {m: __import__(m).__version__ for m in ("torch", "transformers", "trl", "peft", "bitsandbytes")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="auto", help="auto (detect_preset, fitted to this GPU), t4, a100, cuda")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps; the first is left out of the median")
    parser.add_argument("--tokenizer", default=None, help="hub id or folder (default: the preset's checkpoint); "
                        "'tiny' for the course's offline SmolLM2 tokenizer")
    parser.add_argument("--workdir", default="build/gpu_validate", help="random checkpoint and trainer output")
    parser.add_argument("--out", default="build/gpu_validate.json")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a preset field")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_validate needs a CUDA GPU: no CUDA device is visible to torch here, so nothing was "
                         "measured. Run it on a GPU runtime (e.g. Colab with a T4).")

    from transformers import AutoTokenizer

    from course_utils.gpu_budget import SHAPES
    from course_utils.models import load_model, load_tokenizer
    from course_utils.presets import Runtime, detect_preset, get_preset
    from course_utils.train import build_trainer, parse_overrides

    overrides = parse_overrides(args.set)
    runtime = Runtime.current()
    preset = detect_preset(runtime, **overrides) if args.preset == "auto" else get_preset(args.preset, **overrides)
    shape = SHAPES[preset.model_name]
    tokenizer = (load_tokenizer("tiny") if args.tokenizer == "tiny"
                 else AutoTokenizer.from_pretrained(args.tokenizer or preset.checkpoint, trust_remote_code=False))
    workdir = Path(args.workdir)
    folder = write_random_checkpoint(workdir / f"random-{preset.model_name}", mistral_config(shape), tokenizer,
                                     device="cuda")
    model, tokenizer = load_model(str(folder), dtype=preset.dtype, load_in_4bit=True, device_map={"": 0})

    preset = preset.override(max_steps=args.steps, warmup_steps=0, logging_steps=1, save_steps=10**6)
    rows = synthetic_pairs(tokenizer, preset.max_length, preset.effective_batch_size * args.steps)
    check_vocabulary(tokenizer, rows, shape.vocab_size)

    timer = step_timer()
    trainer = build_trainer(preset, model, tokenizer, rows, output_dir=str(workdir / "run"), guard=False,
                            callbacks=[timer], report_to="none", save_strategy="no")
    measured = measure_training(trainer, timer)
    key = gpu_key(runtime.device_name, runtime.memory_gb)
    result = {
        "device": runtime.device_name, "memory_gib": runtime.memory_gb, "gpu_key": key,
        "versions": library_versions(),
        "preset": {f: getattr(preset, f) for f in ("name", "dtype", "max_length", "per_device_batch_size",
                                                   "gradient_accumulation_steps", "gradient_checkpointing",
                                                   "optimizer", "lora_r", "precompute_ref_log_probs")},
        "measured": measured,
        "predicted": prediction(preset, shape, key),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    m, p = result["measured"], result["predicted"]
    print(f"allocated peak {m['max_memory_allocated_gib']:.2f} GiB (predicted {p['allocated_gib']:.2f}); "
          f"in use on the device {m['device_in_use_gib']:.2f} GiB (predicted peak {p['peak_gib']:.2f}); "
          f"median step {m['median_step_seconds']:.1f} s (predicted {p['step_seconds'] or float('nan'):.1f}). "
          f"Written to {args.out}")
    return result


if __name__ == "__main__":
    main()
