"""Scale-out: the training CLI, unchanged, under ``accelerate launch`` with two CPU processes (DDP over gloo).

Two real runs on the tiny model, 4 optimiser steps each, from the same 32 training pairs:

* ``accelerate launch --config_file configs/accelerate/cpu_ddp.yaml`` with 2 processes x 2 pairs;
* one plain process with 4 pairs: the same global batch.

The accelerate data loader hands step k's pairs 4k..4k+3 to the ranks two by two, and DDP averages
the two ranks' gradients, so both runs take the same optimiser steps up to float rounding.
Measured on the 2-core CPU machine: largest loss difference 4.2e-7, largest LoRA weight
difference 6.3e-7 (weights up to 0.13). Tolerances: 1e-4 on the logged losses and 1e-5 on the
weights, ~100x the rounding noise, while one step moves the loss by more than 1e-2 (asserted),
so a run that saw other pairs or did not average gradients would fail.

Each process runs ``tests/ddp_probe.py``: the CLI module itself (``runpy``, as ``python -m``
does) plus a callback that saves that rank's LoRA weights, the evidence that the ranks stayed in sync.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"
PROBE = Path(__file__).resolve().parent / "ddp_probe.py"
STEPS = 4
LOSS_TOL = 1e-4  # measured 4.2e-7
WEIGHT_TOL = 1e-5  # measured 6.3e-7


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """40 preference pairs: the CLI keeps 8 for evaluation, 32 for training (4 steps x 4 = 16 used)."""
    good = ["a warm, funny and moving story", "beautifully shot and wonderfully acted",
            "a joy from start to finish", "clever, kind and full of life"]
    bad = ["a dull, tedious mess", "badly written and worse acted", "two hours I will never get back",
           "loud, empty and boring"]
    rows = [{"prompt": f"Review {i}: the film about the harbour is", "chosen": f"{good[i % 4]} (take {i}).",
             "rejected": f"{bad[i * 3 % 4]} (take {i})."} for i in range(40)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(launcher: list[str], output_dir: Path, pairs: Path, batch: int) -> dict:
    """Run the CLI (through the probe); returns metrics.json, the per-rank files and the wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*launcher, str(PROBE), "--preset", "tiny", "--dataset", str(pairs), "--output-dir", str(output_dir),
               "--max-steps", str(STEPS), "--set", f"per_device_batch_size={batch}", "--set", "logging_steps=1"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    from safetensors.torch import load_file

    ranks = sorted(output_dir.glob("rank*.json"))
    return {"metrics": json.loads((output_dir / "metrics.json").read_text()), "seconds": seconds,
            "ranks": [json.loads(p.read_text()) for p in ranks],
            "weights": [load_file(p.with_suffix(".safetensors")) for p in ranks]}


@pytest.fixture(scope="module")
def runs(pairs_file, tmp_path_factory, tokenizer):  # tokenizer: the SmolLM2 cache exists before 2 ranks need it
    out = tmp_path_factory.mktemp("ddp")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_ddp.yaml"),
                  "--main_process_port", str(_free_port())]
    ddp = _train(accelerate, out / "ddp", pairs_file, batch=2)
    single = _train([sys.executable], out / "single", pairs_file, batch=4)
    print(f"\n2-process DDP run: {ddp['seconds']:.1f} s, single process: {single['seconds']:.1f} s")
    return {"ddp": ddp, "single": single, "dir": out}


def test_ddp_run_completes_with_two_ranks_in_sync(runs):
    ddp = runs["ddp"]
    assert [r["rank"] for r in ddp["ranks"]] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" and r["global_step"] == STEPS for r in ddp["ranks"])
    assert ddp["metrics"]["global_step"] == STEPS
    assert ddp["metrics"]["epoch"] == pytest.approx(STEPS * 4 / 32)  # global batch 4: 2 ranks x 2 pairs
    assert (runs["dir"] / "ddp" / "adapter" / "adapter_model.safetensors").is_file()  # saved once, by rank 0

    rank0, rank1 = ddp["weights"]
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # bit for bit: DDP averaged the same gradients
    # ...and they trained: a new adapter's B is zero, so equality alone would prove nothing
    assert all(rank0[k].abs().max() > 0 for k in rank0 if "lora_B" in k)
    assert ddp["ranks"][0]["losses"] == ddp["ranks"][1]["losses"]  # every rank logs the all-reduced loss


def test_ddp_matches_a_single_process_with_the_same_global_batch(runs):
    ddp, single = runs["ddp"]["metrics"], runs["single"]["metrics"]
    assert runs["single"]["ranks"][0]["world_size"] == 1
    assert len(ddp["train_losses"]) == len(single["train_losses"]) == STEPS
    assert ddp["train_losses"][0] == pytest.approx(0.6931, abs=1e-3)  # ln 2: policy = reference at step 1
    gaps = [abs(a - b) for a, b in zip(ddp["train_losses"], single["train_losses"])]
    assert max(gaps) < LOSS_TOL, (ddp["train_losses"], single["train_losses"])
    moves = [abs(a - b) for a, b in zip(single["train_losses"], single["train_losses"][1:])]
    assert max(moves) > 100 * LOSS_TOL  # the trajectory moves far more than the tolerance per step
    assert abs(ddp["eval_loss"] - single["eval_loss"]) < LOSS_TOL

    ddp_w, single_w = runs["ddp"]["weights"][0], runs["single"]["weights"][0]
    assert max((ddp_w[k] - single_w[k]).abs().max().item() for k in ddp_w) < WEIGHT_TOL


# Keys accelerate reads from the nested sections; each is also an `accelerate launch --<key>` option.
def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {opt.lstrip("-") for action in launch_command_parser()._actions for opt in action.option_strings}


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("cpu_ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
                                        ("zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_are_valid(name, kind):
    """Every config loads in accelerate (unknown top-level keys are an error there), every nested key is an
    option accelerate knows, and every field carries a comment."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == kind and config.num_processes >= 2 and config.num_machines == 1
    assert config.mixed_precision == "no"  # the preset's bf16/fp16 decides, not the launcher
    options = _launch_options()
    for key in {**config.fsdp_config, **config.deepspeed_config}:
        assert key in options, f"{path.name}: {key} is not an accelerate option"
    fields = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")
              and not line.rstrip().endswith(":")]
    assert fields and all("  # " in line for line in fields), [line for line in fields if "  # " not in line]
    yaml.safe_load(path.read_text())  # plain YAML too, for readers and other tools
