"""Checkpoints that survive a disconnected session, and resuming from the newest one.

A Colab runtime can vanish mid-run, taking its local disk with it. The Trainer already
writes ``checkpoint-<step>/`` folders (adapter, optimizer, scheduler, RNG states and
``trainer_state.json``) every ``save_steps``; this module decides *where* (one folder per
preset and base model, under ``OUTPUT_DIR``, which :mod:`course_utils.storage` puts on Google
Drive on Colab) and resumes from the newest *complete* one, so re-running the same cell
continues where the session died::

    out = run_dir(OUTPUT_DIR, preset)                   # OUTPUT_DIR/dpo/checkpoints/t4-mistralai--Mistral-7B-...
    trainer = build_trainer(preset, model, tok, data, output_dir=out)
    train_with_resume(trainer)                          # fresh start, or continue

``resume_from_checkpoint`` restores the RNG states and skips the batches already seen,
so a resumed run with the same seed ends where an uninterrupted one would (tested:
``tests/test_resume.py``). A checkpoint made with another preset or base model is refused
with :class:`ResumeMismatch`, never loaded: every checkpoint carries ``course_run.json``
(:func:`run_identity`), written by :class:`RunIdentityCallback`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from transformers import TrainerCallback

# The Trainer writes trainer_state.json last, so a checkpoint without it was cut off while saving.
COMPLETE_MARKER = "trainer_state.json"
IDENTITY_FILE = "course_run.json"  # which preset and base model made a checkpoint
_STEP = re.compile(r"^checkpoint-(\d+)$")


class ResumeMismatch(RuntimeError):
    """A checkpoint was made by another preset or base model; resuming it would mis-train."""


def _slug(name: str) -> str:
    """A folder-name form of a model name or path: ``mistralai/Mistral-7B`` -> ``mistralai--Mistral-7B``."""
    if Path(name).is_absolute():
        name = Path(name).name  # a local model folder: its own name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("/", "--")).strip("-") or "model"


def run_key(preset) -> str:
    """``<preset>-<base model>``: one checkpoint folder per combination, e.g. ``t4-mistralai--Mistral-7B-v0.1``."""
    return f"{preset.name}-{_slug(preset.checkpoint or preset.model_name)}"


def run_dir(output_dir, preset, run_name: str = "dpo") -> Path:
    """Where a run of ``preset`` keeps its checkpoints and TensorBoard logs: ``output_dir/run_name/checkpoints/<run_key>``."""
    return Path(output_dir) / run_name / "checkpoints" / run_key(preset)


def run_identity(preset) -> dict:
    """What must match for a checkpoint to be resumed: the preset, the base model and the adapter's shape.

    Step counts, beta or the learning rate may change between sessions (lesson 4's exercise resumes
    a longer run); a different base model, dtype or adapter would load the wrong weights.
    """
    return {"preset": preset.name, "base_model": preset.checkpoint or preset.model_name, "dtype": preset.dtype,
            "load_in_4bit": preset.load_in_4bit, "lora_r": preset.lora_r, "lora_alpha": preset.lora_alpha}


class RunIdentityCallback(TrainerCallback):
    """Writes :func:`run_identity` into every checkpoint the Trainer saves."""

    def __init__(self, identity: dict):
        self.identity = identity

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / IDENTITY_FILE).write_text(json.dumps(self.identity, indent=2))
        return control


def check_resumable(checkpoint: Path, identity: dict | None, base_model: str | None = None) -> None:
    """Raise :class:`ResumeMismatch` when ``checkpoint`` was made by another run than ``identity`` describes.

    Checkpoints from before ``course_run.json`` existed are checked on the base model their
    ``adapter_config.json`` names (``base_model``: the trainer's).
    """
    checkpoint = Path(checkpoint)
    advice = (f"Set RESUME = False (or --resume never) to train from scratch, or use another output folder; "
              f"delete {checkpoint.parent} to discard the old run.")
    saved_file = checkpoint / IDENTITY_FILE
    if identity is not None and saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        diff = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
        if diff:
            listed = ", ".join(f"{k} {old!r} (checkpoint) vs {new!r} (this run)" for k, (old, new) in diff.items())
            raise ResumeMismatch(f"Not resuming {checkpoint}: it was made by another run ({listed}). {advice}")
        return
    config = checkpoint / "adapter_config.json"
    if base_model and config.is_file():
        saved_base = json.loads(config.read_text()).get("base_model_name_or_path")
        if saved_base and saved_base != base_model:
            raise ResumeMismatch(f"Not resuming {checkpoint}: its adapter was trained on {saved_base!r}, "
                                 f"this run's base model is {base_model!r}. {advice}")


def _trainer_base_model(trainer) -> str | None:
    peft_config = getattr(getattr(trainer, "model", None), "peft_config", None) or {}
    config = peft_config.get("default") if isinstance(peft_config, dict) else None
    return getattr(config, "base_model_name_or_path", None)


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path, bool]]:
    """``(step, path, complete)`` for every ``checkpoint-<step>`` folder, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _STEP.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path, (path / COMPLETE_MARKER).is_file()))
    return sorted(found)


def latest_checkpoint(directory: str | Path, *, verbose: bool = True) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None.

    Unlike ``transformers.trainer_utils.get_last_checkpoint`` this skips a folder whose save
    was interrupted (no ``trainer_state.json``), which would otherwise crash the resume.
    """
    newest = None
    for step, path, complete in list_checkpoints(directory):
        if complete:
            newest = path
        elif verbose:
            print(f"Skipping {path.name}: incomplete (the session ended while it was being saved).")
    return newest


def train_with_resume(trainer, resume: bool | str | Path = True):
    """``trainer.train()``, continuing from the newest complete checkpoint in its output_dir.

    Args:
        resume: True: resume from the newest complete checkpoint of an *unfinished* run
            (one saved before ``max_steps``); a finished run is not resumed (re-running a
            finished lesson trains again, it does not return at once). False: always start
            fresh (old checkpoints are overwritten or rotated away). A path: resume from
            exactly that checkpoint.

    Sets ``trainer.resumed_from`` (the checkpoint, or None) and ``trainer.resumed_from_step`` (its step, 0 for a
    fresh start) before training: with ``save_total_limit`` the checkpoint itself may be deleted by the time
    ``train()`` returns.

    A checkpoint made by another preset or base model (``trainer.course_run``, set by
    ``build_trainer``, against the checkpoint's ``course_run.json``) raises :class:`ResumeMismatch`
    before anything is loaded.
    """
    if resume is True:
        found = latest_checkpoint(trainer.args.output_dir)
        if found is not None and checkpoint_step(found) >= trainer.args.max_steps:
            print(f"{found.name} is the end of a finished run ({trainer.args.max_steps} steps): starting fresh. "
                  "Pass its path to resume it anyway.")
            found = None
    elif resume:
        found = Path(resume)
        if not (found / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(f"{found} is not a complete checkpoint (no {COMPLETE_MARKER}); "
                                    f"complete ones: {[p.name for _, p, ok in list_checkpoints(found.parent) if ok]}")
    else:
        found = None
    if found is not None:
        check_resumable(found, getattr(trainer, "course_run", None), _trainer_base_model(trainer))
        print(f"Resuming from {found} (step {checkpoint_step(found)} of {trainer.args.max_steps}).")
    trainer.resumed_from = found  # so a caller can tell how many steps this session trained
    # read now: save_total_limit may rotate that checkpoint away before train() returns
    trainer.resumed_from_step = checkpoint_step(found) if found is not None else 0
    return trainer.train(resume_from_checkpoint=str(found) if found else None)


def checkpoint_step(checkpoint: Path) -> int:
    """The global step a complete checkpoint was saved at."""
    return int(json.loads((checkpoint / COMPLETE_MARKER).read_text())["global_step"])

