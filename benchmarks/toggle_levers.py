"""A training lever of the ``cpu`` preset measured by toggling it step by step inside one trainer.

    .venv/bin/python benchmarks/toggle_levers.py                      # all three toggles, 20 steps each
    .venv/bin/python benchmarks/toggle_levers.py --lever gqa --steps 30

Why: on a shared machine whose bf16 product peak switches between about 800 and 2,300 GFLOP/s from one minute to the
next, single ablation runs of ``make bench`` spread more than a lever buys. Here one trainer runs ``make bench``'s
pairs and recipe; odd steps run without the lever, even steps with it, so both kinds of step see the same phases of
the machine. The first two steps are not counted. Reported: the ratio of the median step times (without / with) and
the median ratio of consecutive step pairs. The losses are not the preset's (the path changes every step); speed only.

Levers (docs/performance.md, "Fewer fp32 round trips"):

- ``lora_norms``: :class:`course_utils.fused_lora.Bf16LoraLinears` (fused LoRA linears and bf16 norms) against PEFT's
  LoRA linears with fp32 norm outputs;
- ``norm``: its RMSNorm function against casting the norm's output with a hook (the LoRA linears fused in both);
- ``gqa``: grouped kv heads passed to the CPU's SDPA as they are, against transformers' repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

LEVERS = ("lora_norms", "norm", "gqa")


def toggle(lever: str, steps: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    import bench_dpo
    from course_utils import cpu_autocast, fused_lora
    from course_utils.models import load_model
    from course_utils.presets import get_preset
    from course_utils.train import build_trainer

    rows = bench_dpo.bench_rows(steps)
    recipe = {k: v for k, v in bench_dpo.RECIPE.items() if k != "per_device_train_batch_size"}
    preset = get_preset("cpu", lora_r=bench_dpo.LORA_R, lora_alpha=bench_dpo.LORA_ALPHA)
    model, tokenizer = load_model("smollm2-135m")
    times = {False: [], True: []}
    norms = fused_lora.LLAMA_RMS_NORMS

    class Toggle(TrainerCallback):
        step, block = 0, None

        def on_step_begin(self, *args, **kwargs):
            self.step += 1
            self.on = self.step % 2 == 0
            if lever in ("lora_norms", "norm"):  # the trainer itself runs without Bf16LoraLinears
                fused_lora.LLAMA_RMS_NORMS = norms if (self.on or lever == "lora_norms") else ()
                if self.on or lever == "norm":
                    self.block = fused_lora.Bf16LoraLinears(trainer.model).__enter__()
            else:
                cpu_autocast._sdpa_module.use_gqa_in_sdpa = (
                    cpu_autocast._use_gqa_in_sdpa if self.on else cpu_autocast._transformers_use_gqa_in_sdpa)
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            seconds = time.perf_counter() - self.start
            if self.block is not None:
                self.block.__exit__(None, None, None)
                self.block = None
            if self.step > 2:
                times[self.on].append(seconds)

    trainer = build_trainer(preset.override(per_device_batch_size=bench_dpo.BATCH), model, tokenizer,
                            Dataset.from_list(rows), output_dir=tempfile.mkdtemp(prefix="toggle-"), callbacks=[Toggle()],
                            guard=False, max_steps=steps, logging_steps=1, save_strategy="no", report_to=[],
                            disable_tqdm=True, fused_lora=lever == "gqa", **recipe)
    try:
        trainer.train()
    finally:
        fused_lora.LLAMA_RMS_NORMS = norms
        cpu_autocast._sdpa_module.use_gqa_in_sdpa = cpu_autocast._use_gqa_in_sdpa
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    return {"lever": lever, "steps_counted": {"without": len(times[False]), "with": len(times[True])},
            "median_step_seconds": {"without": without, "with": with_},
            "ratio_of_medians": without / with_,
            "median_pair_ratio": statistics.median(a / b for a, b in zip(times[False], times[True]))}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lever", choices=LEVERS, action="append", help="repeatable; default: all")
    parser.add_argument("--steps", type=int, default=20, help="steps per toggle run (even; the first two not counted)")
    parser.add_argument("--output", default="build/toggle_levers.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_dpo
    results = []
    for lever in args.lever or LEVERS:
        result = toggle(lever, args.steps)
        results.append(result)
        print(f"{lever:>10}: without / with = {result['ratio_of_medians']:.3f} (medians "
              f"{result['median_step_seconds']['without']:.3f} / {result['median_step_seconds']['with']:.3f} s), "
              f"median pair ratio {result['median_pair_ratio']:.3f}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
