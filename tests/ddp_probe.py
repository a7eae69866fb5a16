"""Run the training CLI exactly as ``python -m course_utils.train`` does, and leave per-rank evidence.

Used by tests/test_accelerate.py under ``accelerate launch``: every process (rank) runs the
unchanged CLI module; the only addition is a callback, attached by wrapping ``trl.DPOTrainer``,
that writes at the end of training, into ``--output-dir``:

* ``rank<R>.safetensors``: this rank's LoRA weights (DDP must keep them identical on all ranks);
* ``rank<R>.json``: world size, backend, and the losses this rank logged.

Not a test module itself (no ``test_`` prefix), so pytest does not collect it.
"""

import json
import os
import runpy
import sys

import trl
from transformers import TrainerCallback


class RankEvidence(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        import torch.distributed as dist
        from safetensors.torch import save_file

        rank = dist.get_rank() if dist.is_initialized() else 0
        lora = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}
        save_file(lora, os.path.join(args.output_dir, f"rank{rank}.safetensors"))
        evidence = {"rank": rank, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "backend": dist.get_backend() if dist.is_initialized() else None,
                    "losses": [h["loss"] for h in state.log_history if "loss" in h],
                    "global_step": state.global_step}
        with open(os.path.join(args.output_dir, f"rank{rank}.json"), "w") as f:
            json.dump(evidence, f)


class DPOTrainerWithEvidence(trl.DPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(RankEvidence())


trl.DPOTrainer = DPOTrainerWithEvidence  # build_trainer imports it from trl at call time
sys.argv[0] = "course_utils.train"
runpy.run_module("course_utils.train", run_name="__main__", alter_sys=True)
