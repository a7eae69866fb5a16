"""The GPU figures in the README and docs come from course_utils.gpu_budget, so none contradicts another."""

import re
from pathlib import Path

from course_utils.gpu_budget import prediction_table
from course_utils.presets import get_preset, predicted_step_seconds, predicted_training_minutes

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_lesson_4_gpu_minutes_are_the_budget_s():
    t4, a100 = predicted_training_minutes("t4", "T4"), predicted_training_minutes("a100", "A100-40GB")
    row = next(line for line in README.splitlines() if line.startswith("| 04 |"))
    assert f"T4 {t4:.0f}, A100 {a100:.0f} (predicted" in row
    assert f"at {predicted_step_seconds(get_preset('t4'), 'T4'):.0f} s a step on a T4" in README
    assert f"{predicted_step_seconds(get_preset('a100'), 'A100-40GB'):.0f} s on an A100" in README
    assert f"`MAX_STEPS = 60` is predicted at {predicted_training_minutes('t4', 'T4', max_steps=60):.0f} minutes" in README


def test_no_unsourced_gpu_estimates_are_left():
    assert not re.search(r"\(est\.\)|35 s per step|~60 min", README)


def test_performance_doc_holds_the_current_prediction_table():
    assert prediction_table() in (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
