"""Where a lesson keeps what must outlive its runtime: Google Drive on Colab, the local disk elsewhere.

Colab gives every notebook its own runtime, and a runtime's disk goes when it disconnects or
the notebook changes. Lesson 5 needs lesson 4's adapter, lesson 6 needs it too, and a
reference-log-prob cache or a set of sampled pairs is worth keeping. So on Colab every lesson
mounts Drive right after its parameters and moves ``OUTPUT_DIR`` there::

    OUTPUT_DIR = course_storage(OUTPUT_DIR, use_drive=USE_DRIVE)

* ``OUTPUT_DIR`` (results, checkpoints, adapters, plots) goes to
  ``<Drive>/dpo-course/<OUTPUT_DIR>`` when it is a relative path; an absolute path is kept.
* The course's own cache (``DPO_COURSE_CACHE``: sampled sentiment pairs, reference log-probs,
  converted models) goes to ``<Drive>/dpo-course/cache``.
* The hub's downloads (Mistral-7B's ~14.5 GB of shards) stay in the runtime's local cache: they
  would fill a free 15 GB Drive, and Colab downloads them again in a minute or two.

Anywhere else (a laptop, CI, papermill) nothing changes and nothing is mounted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DRIVE_MOUNT = Path("/content/drive")  # where the lessons mount Google Drive on Colab
DRIVE_ROOT = DRIVE_MOUNT / "MyDrive"
DRIVE_FOLDER = "dpo-course"  # one folder on the learner's Drive holds everything the course writes
CACHE_ENV = "DPO_COURSE_CACHE"  # read by course_utils.models.cache_dir


def on_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules


def _mount_drive(mountpoint: Path) -> None:  # pragma: no cover - needs a Colab runtime and a Google account
    from google.colab import drive

    drive.mount(str(mountpoint))  # asks the learner to authorise once per runtime


def course_storage(output_dir: str | os.PathLike, use_drive: bool = True, *, colab: bool | None = None,
                   mount=_mount_drive, drive_root: Path = DRIVE_ROOT, env=None) -> str:
    """``output_dir`` as the lesson should use it, with Drive mounted on Colab when ``use_drive``.

    Args:
        output_dir: the lesson's ``OUTPUT_DIR`` parameter.
        use_drive: False keeps everything on the runtime's disk (lost when it disconnects).
        colab, mount, drive_root, env: what Colab provides (``google.colab.drive.mount``,
            ``/content/drive/MyDrive``, ``os.environ``); tests pass their own.

    Returns the directory as a string (papermill parameters are strings too) and, on Colab,
    points the course cache at Drive unless ``DPO_COURSE_CACHE`` is already set.
    """
    env = os.environ if env is None else env
    colab = on_colab() if colab is None else colab
    if not (colab and use_drive):
        if colab:
            print("USE_DRIVE = False: results stay on this runtime's disk and are lost when it disconnects; "
                  "the next lesson (its own runtime) will not find them.")
        return str(output_dir)
    if not Path(drive_root).is_dir():
        mount(Path(drive_root).parent)
    if not Path(drive_root).is_dir():
        raise RuntimeError(f"Google Drive did not mount at {drive_root}. Run the cell again and allow access, "
                           "or set USE_DRIVE = False to keep results on this runtime only.")
    course_root = Path(drive_root) / DRIVE_FOLDER
    resolved = Path(output_dir) if Path(output_dir).is_absolute() else course_root / output_dir
    resolved.mkdir(parents=True, exist_ok=True)
    env.setdefault(CACHE_ENV, str(course_root / "cache"))
    print(f"Google Drive: results in {resolved}, course cache in {env[CACHE_ENV]} (both outlive this runtime).")
    return str(resolved)
