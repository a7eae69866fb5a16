"""Checkpoints that survive a disconnected session, and resuming from the newest one.

A Colab runtime can vanish mid-run, taking its local disk with it. The Trainer already
writes ``checkpoint-<step>/`` folders (adapter, optimizer, scheduler, RNG states and
``trainer_state.json``) every ``save_steps``; this module decides *where* (Google Drive
when it is mounted, so the folders outlive the runtime) and resumes from the newest
*complete* one, so re-running the same cell continues where the session died::

    out = checkpoint_dir("dpo", local="build/dpo")      # Drive on Colab if mounted
    trainer = build_trainer(preset, model, tok, data, output_dir=out)
    train_with_resume(trainer)                          # fresh start, or continue

``resume_from_checkpoint`` restores the RNG states and skips the batches already seen,
so a resumed run with the same seed ends where an uninterrupted one would (tested:
``tests/test_resume.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DRIVE_ROOT = Path("/content/drive/MyDrive")  # where Colab mounts Google Drive
DRIVE_FOLDER = "dpo-course"
# The Trainer writes trainer_state.json last, so a checkpoint without it was cut off while saving.
COMPLETE_MARKER = "trainer_state.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def drive_mounted(root: Path = DRIVE_ROOT) -> bool:
    """True on Colab after ``google.colab.drive.mount("/content/drive")``."""
    return root.is_dir()


def checkpoint_dir(run_name: str, local: str | Path, *, drive_root: Path = DRIVE_ROOT) -> Path:
    """Where a run keeps its checkpoints: ``<Drive>/dpo-course/<run_name>`` if Drive is mounted, else ``local``."""
    if drive_mounted(drive_root):
        return drive_root / DRIVE_FOLDER / run_name
    return Path(local)


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
        print(f"Resuming from {found} (step {checkpoint_step(found)} of {trainer.args.max_steps}).")
    trainer.resumed_from = found  # so a caller can tell how many steps this session trained
    return trainer.train(resume_from_checkpoint=str(found) if found else None)


def checkpoint_step(checkpoint: Path) -> int:
    """The global step a complete checkpoint was saved at."""
    return int(json.loads((checkpoint / COMPLETE_MARKER).read_text())["global_step"])

