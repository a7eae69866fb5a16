"""Small helpers every lesson notebook uses: setup, versions, and recording results.

Each lesson records the numbers it teaches with (accuracies, win rates, timings) in
``OUTPUT_DIR/results/<lesson>.json``. ``make course`` collects them into
``build/course/summary.json``; the tests assert on them (papermill only proves that
cells ran; the recorded numbers prove they ran right).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

COURSE_REPO = "dpo-course/dpo-course"  # GitHub owner/name used by the Colab badge and setup cell


def in_colab() -> bool:
    return "google.colab" in sys.modules


def versions() -> dict[str, str]:
    """Versions of the libraries the course depends on (a lesson prints them first)."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


# Libraries whose deprecation notices (FutureWarning / DeprecationWarning) a learner can do nothing about:
# they come from one library calling another (TRL calling a transformers property that is being renamed).
LIBRARY_MODULES = r"(transformers|trl|peft|accelerate|datasets|bitsandbytes|lm_eval|torch)(\.|$)"
# Loggers that print notices about the machine or the call, not about the learner's work: bitsandbytes' "no
# optional CPU kernel package" line and lm-eval's "an already-loaded model was passed" lines.
QUIET_LOGGERS = ("bitsandbytes", "lm_eval", "lm-eval")


def quiet_library_warnings() -> None:
    """Hide library notices that say nothing to a learner; keep every warning the course itself raises.

    Filtered: deprecation warnings issued inside the libraries in :data:`LIBRARY_MODULES`, tqdm's "IProgress
    not found" (no widgets in an executed notebook), and the notices of :data:`QUIET_LOGGERS` below ERROR.
    Not filtered: anything issued from ``course_utils`` (dropped or cut rows, divergence, fallbacks) or from
    the learner's own cells, and every library warning that is not a deprecation.
    """
    import logging
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARY_MODULES)
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a notebook without ipywidgets
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def print_versions() -> None:
    import torch

    for name, version in versions().items():
        print(f"{name:>13}  {version}")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{'device':>13}  {device}")


def _jsonable(value):
    """Floats that JSON can hold (NaN/inf become None), tensors and numpy scalars as numbers."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class Results:
    """Records a lesson's key numbers to ``<output_dir>/results/<lesson>.json`` as they are made."""

    def __init__(self, lesson: str, output_dir: str | Path):
        self.lesson = lesson
        self.path = Path(output_dir) / "results" / f"{lesson}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.values: dict = {}
        self._start = time.perf_counter()

    def record(self, key: str, value) -> None:
        """Store one number (or list / dict of numbers) and rewrite the file, so nothing is lost mid-run."""
        self.values[key] = _jsonable(value)
        self.values["elapsed_seconds"] = round(time.perf_counter() - self._start, 1)
        self.path.write_text(json.dumps(self.values, indent=2))

    def __repr__(self) -> str:
        return f"Results({self.lesson!r}, {len(self.values)} values -> {self.path})"


def load_results(output_dir: str | Path) -> dict[str, dict]:
    """All lessons' recorded results under ``output_dir``, keyed by lesson name."""
    folder = Path(output_dir) / "results"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
