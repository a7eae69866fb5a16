"""Run the lesson notebooks end to end with papermill (``make course`` and the tests).

    python -m course_utils.lessons                    # every lesson on the CPU default
    python -m course_utils.lessons --preset tiny      # the CI-sized run
    python -m course_utils.lessons 02 03              # only some lessons

Executed copies and HTML renderings land in ``build/course/executed``; each lesson's
recorded numbers in ``build/course/results``; all of them, with timings, in
``build/course/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .notebook import load_results

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def lesson_paths(selected: list[str] | None = None, notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Notebooks in reading order (``NN_topic.ipynb``), optionally only those whose number is selected."""
    paths = sorted(notebook_dir.glob("[0-9][0-9]_*.ipynb"))
    if selected:
        paths = [p for p in paths if p.name[:2] in {s.zfill(2)[:2] for s in selected}]
    if not paths:
        raise FileNotFoundError(f"no lesson notebooks matching {selected} in {notebook_dir}")
    return paths


def execute_lesson(path: Path, output_dir: Path, parameters: dict, html: bool = True, timeout: int = 3600) -> dict:
    """Execute one notebook in a fresh kernel; returns its recorded results plus wall-clock seconds."""
    import papermill as pm

    executed = output_dir / "executed" / path.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pm.execute_notebook(
        str(path), str(executed), parameters=parameters, kernel_name="python3", language="python", cwd=str(path.parent),
        progress_bar=False, request_save_on_cell_execute=True, execution_timeout=timeout,
    )
    seconds = time.perf_counter() - start
    if html:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_filename(str(executed))
        executed.with_suffix(".html").write_text(body, encoding="utf-8")
    results = load_results(output_dir).get(path.stem, {})
    return {**results, "wall_seconds": round(seconds, 1)}


def run_lessons(preset: str = "cpu", output_dir: str | Path = "build/course", selected: list[str] | None = None) -> dict:
    output_dir = Path(output_dir).resolve()
    summary = {"preset": preset, "lessons": {}}
    for path in lesson_paths(selected):
        print(f"== {path.name} (preset {preset})", flush=True)
        result = execute_lesson(path, output_dir, {"PRESET": preset, "OUTPUT_DIR": str(output_dir)})
        summary["lessons"][path.stem] = result
        print(f"   done in {result['wall_seconds']:.0f} s", flush=True)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"Executed notebooks and HTML in {output_dir / 'executed'}; summary in {output_dir / 'summary.json'}")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description="Execute the course notebooks with papermill.")
    parser.add_argument("lessons", nargs="*", help="lesson numbers to run (default: all)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--output-dir", default="build/course")
    args = parser.parse_args(argv)
    return run_lessons(args.preset, args.output_dir, args.lessons or None)


if __name__ == "__main__":
    main()
