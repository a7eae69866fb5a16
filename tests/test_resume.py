"""Interrupted sessions and reproducibility: kill a real training process midway, resume it, compare.

The runs are the training CLI on the tiny preset (30 steps, a checkpoint every 5). On CPU the
same seed gives bit-identical numbers, so the tolerance is tight: 1e-6 on every logged loss
and on the final evaluation metrics.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from course_utils.checkpoints import (IDENTITY_FILE, ResumeMismatch, check_resumable, latest_checkpoint, list_checkpoints,
                                      run_dir, run_identity, train_with_resume)
from course_utils.presets import get_preset
from course_utils.train import main

TOL = 1e-6
STEPS, SAVE_EVERY, KILL_AFTER = 30, 5, 10
ARGS = ["--preset", "tiny", "--dataset", "sentiment", "--max-steps", str(STEPS), "--set", f"save_steps={SAVE_EVERY}",
        "--set", "logging_steps=1"]
COMPARED = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen")


def _close(a: dict, b: dict) -> None:
    assert len(a["train_losses"]) == len(b["train_losses"]) == STEPS
    for step, (x, y) in enumerate(zip(a["train_losses"], b["train_losses"]), start=1):
        assert abs(x - y) <= TOL, f"loss at step {step}: {x} vs {y}"
    for key in COMPARED:
        assert abs(a[key] - b[key]) <= TOL, f"{key}: {a[key]} vs {b[key]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_pairs):
    out = tmp_path_factory.mktemp("straight")
    return main(ARGS + ["--output-dir", str(out), "--resume", "never"])


def test_same_seed_same_numbers(uninterrupted, tmp_path):
    """Reproducibility: a second run with the same seed logs exactly the same losses and evaluation."""
    again = main(ARGS + ["--output-dir", str(tmp_path), "--resume", "never"])
    _close(uninterrupted, again)
    assert again["train_losses"] == uninterrupted["train_losses"]  # in fact bit-identical on CPU


def test_killed_run_resumes_to_the_same_result(uninterrupted, tmp_path, capsys):
    """SIGKILL (what a dropped Colab runtime amounts to) after checkpoint-10, then the same command again."""
    proc = subprocess.Popen([sys.executable, "-m", "course_utils.train", *ARGS, "--output-dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    target = tmp_path / f"checkpoint-{KILL_AFTER}" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not target.is_file():
        assert proc.poll() is None, f"training exited (code {proc.returncode}) before checkpoint-{KILL_AFTER}"
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = [step for step, _, complete in list_checkpoints(tmp_path) if complete]
    assert max(steps) < STEPS and not (tmp_path / "metrics.json").exists()  # really killed midway

    # A kill during a save leaves a checkpoint folder without trainer_state.json: resume must skip it.
    newest = tmp_path / f"checkpoint-{max(steps)}"
    broken = tmp_path / f"checkpoint-{max(steps) + SAVE_EVERY}"
    shutil.copytree(newest, broken)
    (broken / "trainer_state.json").unlink()
    assert latest_checkpoint(tmp_path) == newest

    capsys.readouterr()
    resumed = main(ARGS + ["--output-dir", str(tmp_path)])  # --resume auto is the default
    out = capsys.readouterr().out
    assert f"Resuming from {newest}" in out and f"Skipping {broken.name}: incomplete" in out
    _close(uninterrupted, resumed)


def test_resume_from_an_explicit_path_must_be_complete(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()

    class Args:
        output_dir, max_steps = str(tmp_path), 10

    class Trainer:
        args = Args()

    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        train_with_resume(Trainer(), tmp_path / "checkpoint-3")


def test_the_resumed_step_survives_checkpoint_rotation(tmp_path):
    """save_total_limit may delete the checkpoint a run resumed from before train() returns: its step is kept."""
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))

    class Args:
        output_dir, max_steps = str(tmp_path), 10

    class Trainer:
        args = Args()

        def train(self, resume_from_checkpoint=None):
            shutil.rmtree(checkpoint)  # rotated away by newer checkpoints
            return resume_from_checkpoint

    trainer = Trainer()
    assert train_with_resume(trainer, True) == str(checkpoint)
    assert trainer.resumed_from == checkpoint and trainer.resumed_from_step == 3


def test_a_finished_run_is_not_resumed(uninterrupted, capsys, tmp_path):
    """Re-running a finished lesson trains again (in a copy of the finished run's folder)."""
    finished = Path(uninterrupted["output_dir"])
    copy = tmp_path / "again"
    shutil.copytree(finished, copy)
    capsys.readouterr()
    again = main(ARGS + ["--output-dir", str(copy)])
    assert f"checkpoint-{STEPS} is the end of a finished run" in capsys.readouterr().out
    _close(uninterrupted, again)


def test_checkpoint_folders_are_per_preset_and_base_model(tmp_path):
    t4, a100, tiny = get_preset("t4"), get_preset("a100"), get_preset("tiny")
    assert run_dir(tmp_path, t4) == tmp_path / "dpo" / "checkpoints" / f"t4-{t4.checkpoint.replace('/', '--')}"
    assert len({run_dir(tmp_path, p) for p in (t4, a100, tiny)}) == 3
    local = tiny.override(model_name=str(tmp_path / "models" / "tiny-mistral"))
    assert run_dir(tmp_path, local).name == "tiny-tiny-mistral"  # a local model folder: its own name


def test_every_checkpoint_records_its_run(uninterrupted):
    for _, path, complete in list_checkpoints(uninterrupted["output_dir"]):
        assert complete and json.loads((path / IDENTITY_FILE).read_text()) == run_identity(get_preset("tiny"))


def test_a_checkpoint_of_another_run_is_refused(uninterrupted, tmp_path, capsys):
    """Resuming with another adapter shape is refused with a message (exit 2), before anything is loaded."""
    copy = tmp_path / "other"
    shutil.copytree(uninterrupted["output_dir"], copy)
    older = sorted(p for _, p, ok in list_checkpoints(copy) if ok)[0]
    (copy / "metrics.json").unlink()  # the finished run's; a refused resume must not write a new one
    with pytest.raises(SystemExit) as exit_info:
        main(ARGS + ["--set", "lora_r=4", "--output-dir", str(copy), "--resume", str(older)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Not resuming" in err and "lora_r 8 (checkpoint) vs 4 (this run)" in err
    assert not (copy / "metrics.json").exists()


def test_an_old_checkpoint_is_checked_on_its_base_model(tmp_path):
    """Without course_run.json, the adapter's base model decides."""
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    check_resumable(ckpt, run_identity(get_preset("cpu")), "HuggingFaceTB/SmolLM2-135M")  # same base: fine
    with pytest.raises(ResumeMismatch, match="trained on 'HuggingFaceTB/SmolLM2-135M'"):
        check_resumable(ckpt, run_identity(get_preset("t4")), get_preset("t4").checkpoint)


def test_metrics_file_records_the_run(uninterrupted):
    assert uninterrupted["global_step"] == STEPS and uninterrupted["diagnoses"] == []
    assert json.loads(json.dumps(uninterrupted))  # plain JSON, as written to metrics.json
