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


# The numbers a reader of build/course/summary.json looks for first: (lesson, recorded key).
KEY_NUMBERS = {
    "reward_model_held_out_accuracy": ("01_rlhf_background", "rm_held_out_accuracy"),
    "dpo_vs_trl_loss_difference": ("02_dpo_loss_derivation", "batch_loss_diff_trl"),
    "train_pairs": ("03_preference_data", "train_pairs"),
    "train_seconds": ("04_dpo_training", "train_seconds"),
    "seconds_per_step": ("04_dpo_training", "seconds_per_step"),
    "held_out_reward_accuracy": ("05_evaluation", "held_out_reward_accuracy"),
    "win_rate": ("05_evaluation", "win_rate"),
    "win_rate_ci": ("05_evaluation", "win_rate_ci"),
    "kl": ("05_evaluation", "kl"),
    "policy_reward": ("05_evaluation", "policy_reward"),
    "reference_reward": ("05_evaluation", "reference_reward"),
    "length_controlled_win_rate": ("05_evaluation", "length_controlled_win_rate"),
    "judge_validity": ("05_evaluation", "judge_validity"),  # each judge's agreement with VADER, 95% CI
    "llm_judge_position_bias": ("05_evaluation", "llm_judge_position_bias"),  # share of first-shown wins
    "rm_judge": ("05_evaluation", "rm_judge"),
    "rm_win_rate": ("05_evaluation", "rm_win_rate"),
    "rm_win_rate_ci": ("05_evaluation", "rm_win_rate_ci"),
    "rm_win_rate_at_equal_length": ("05_evaluation", "rm_win_rate_at_equal_length"),
    "merge_max_abs_diff": ("06_inference", "merge_max_abs_diff"),
    "frontier_dpo_best_reward": ("07_reward_kl_frontier", "dpo_best_reward"),
    "frontier_rloo_best_reward": ("07_reward_kl_frontier", "rloo_best_reward"),
    "frontier_bon_best_reward": ("07_reward_kl_frontier", "bon_best_reward"),
    "frontier_dpo_dominates_rloo": ("07_reward_kl_frontier", "dpo_dominates_rloo"),
}


def key_numbers(lessons: dict) -> dict:
    """The headline numbers picked out of every lesson's results (missing ones are left out)."""
    out = {}
    for name, (lesson, key) in KEY_NUMBERS.items():
        if key in lessons.get(lesson, {}):
            out[name] = lessons[lesson][key]
    out["minutes_per_lesson"] = {k: round(v["wall_seconds"] / 60, 1) for k, v in lessons.items()}
    return out


def run_lessons(preset: str = "cpu", output_dir: str | Path = "build/course", selected: list[str] | None = None) -> dict:
    output_dir = Path(output_dir).resolve()
    summary = {"preset": preset, "lessons": {}}
    for path in lesson_paths(selected):
        print(f"== {path.name} (preset {preset})", flush=True)
        result = execute_lesson(path, output_dir, {"PRESET": preset, "OUTPUT_DIR": str(output_dir)})
        summary["lessons"][path.stem] = result
        summary["key_numbers"] = key_numbers(summary["lessons"])
        print(f"   done in {result['wall_seconds']:.0f} s", flush=True)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["key_numbers"], indent=2))
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
