"""Train the cpu preset's path for two steps under this process's ISA caps; print one JSON line.

Used by tests/test_precision.py, which starts it with ``ONEDNN_MAX_CPU_ISA`` /
``ATEN_CPU_CAPABILITY`` set (oneDNN and ATen read them once, at start-up, so each path needs
its own process). The model is the tiny random Llama, so a run takes seconds; everything else
is the cpu preset's: bf16 autocast where native, the reference precomputed and cached, the
completion-only head. Not a test module itself (no ``test_`` prefix).

    python tests/isa_probe.py PAIRS.jsonl OUTPUT_DIR
"""

import json
import sys

from course_utils.cpu import bf16_kernel, cpu_supports_bf16
from course_utils.models import load_model
from course_utils.precision import reference_agreement, trainer_step_one_tolerances
from course_utils.presets import get_preset
from course_utils.train import build_trainer

pairs_path, output_dir = sys.argv[1:3]
rows = [json.loads(line) for line in open(pairs_path)]
preset = get_preset("cpu").override(model_name="tiny", max_length=128, max_steps=2, logging_steps=1, warmup_steps=0,
                                    lora_r=8, lora_alpha=16, learning_rate=5e-3)
model, tokenizer = load_model("tiny", seed=0)
trainer = build_trainer(preset, model, tokenizer, rows, output_dir=output_dir, guard=False, report_to=[],
                        save_strategy="no", disable_tqdm=True)
agreement = reference_agreement(trainer, max_batches=4)
trainer.train()
first = [h for h in trainer.state.log_history if "loss" in h][0]
print(json.dumps({"bf16": trainer.args.bf16, "cpu_supports_bf16": cpu_supports_bf16(), "kernel": bf16_kernel(),
                  "fixed_length": trainer.fixed_length, "same_path": trainer.reference_same_path,
                  "agreement": agreement, "first": first, "bounds": trainer_step_one_tolerances(trainer, first)}))
