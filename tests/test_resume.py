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

from course_utils.checkpoints import checkpoint_dir, latest_checkpoint, list_checkpoints, train_with_resume
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


def test_a_finished_run_is_not_resumed(uninterrupted, capsys, tmp_path):
    """Re-running a finished lesson trains again (in a copy of the finished run's folder)."""
    finished = Path(uninterrupted["output_dir"])
    copy = tmp_path / "again"
    shutil.copytree(finished, copy)
    capsys.readouterr()
    again = main(ARGS + ["--output-dir", str(copy)])
    assert f"checkpoint-{STEPS} is the end of a finished run" in capsys.readouterr().out
    _close(uninterrupted, again)


def test_checkpoints_go_to_drive_when_mounted(tmp_path):
    drive = tmp_path / "MyDrive"
    assert checkpoint_dir("dpo", tmp_path / "local", drive_root=drive) == tmp_path / "local"
    drive.mkdir()
    assert checkpoint_dir("dpo", tmp_path / "local", drive_root=drive) == drive / "dpo-course" / "dpo"


def test_metrics_file_records_the_run(uninterrupted):
    assert uninterrupted["global_step"] == STEPS and uninterrupted["diagnoses"] == []
    assert json.loads(json.dumps(uninterrupted))  # plain JSON, as written to metrics.json
