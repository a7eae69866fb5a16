"""Every exercise and questionnaire item of every lesson has a collapsed answer; the self-check helper works.

The lessons end with exercises at three levels and a questionnaire (``../shared/STYLE.md``). A learner tries first
and then opens the answer, so each answer is a markdown ``<details>`` block:

* an exercise (a markdown cell starting ``**Level N.**`` or a ``### Level N`` heading) is answered by a
  ``<details><summary>Answer (level N)…`` block before the next level or the questionnaire;
* questionnaire item ``k`` (a line ``k. …`` of the ``## Questionnaire`` cell) is answered by a
  ``<details><summary>Answer k…`` block in a markdown cell after it.

No notebook runs here; the lesson tests execute them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from course_utils.self_check import check_answer

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
LEVEL = re.compile(r"^\s*(?:\*\*Level (\d)\.\*\*|#+\s*Level (\d)\b)", re.M)
QUESTION = re.compile(r"^(\d+)\.\s", re.M)
DETAILS = re.compile(r"<details>\s*<summary>(.*?)</summary>(.*?)</details>", re.S)


def _cells(path: Path) -> list[tuple[str, str]]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]


def _answers(cells: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(summary, body) of every <details> block in the given markdown cells."""
    return [(s.strip(), b.strip()) for kind, text in cells if kind == "markdown" for s, b in DETAILS.findall(text)]


def _section(cells, title):
    starts = [i for i, (kind, text) in enumerate(cells) if kind == "markdown" and re.search(rf"^{title}\s*$", text, re.M)]
    assert len(starts) == 1, f"expected one cell with the heading {title!r}, found {len(starts)}"
    return starts[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_has_a_collapsed_answer(path):
    cells = _cells(path)
    start, quiz = _section(cells, "## Exercises"), _section(cells, "## Questionnaire")
    levels = [(i, int(m.group(1) or m.group(2))) for i in range(start, quiz) for m in [LEVEL.search(cells[i][1])]
              if cells[i][0] == "markdown" and m]
    assert [n for _, n in levels] == [1, 2, 3], f"{path.name}: exercises at levels {[n for _, n in levels]}"
    bounds = [i for i, _ in levels] + [quiz]
    for (i, n), end in zip(levels, bounds[1:]):
        summaries = [s for s, body in _answers(cells[i:end]) if body]
        assert any(re.match(rf"Answer \(level {n}\)", s) for s in summaries), (
            f"{path.name}: exercise level {n} has no '<details><summary>Answer (level {n})…' block before the next one")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_question_has_a_collapsed_answer(path):
    cells = _cells(path)
    quiz = _section(cells, "## Questionnaire")
    questions = [int(k) for k in QUESTION.findall(cells[quiz][1])]
    assert questions == list(range(1, len(questions) + 1)) and questions, f"{path.name}: questions {questions}"
    answered = {int(m.group(1)) for s, body in _answers(cells[quiz:]) if body for m in [re.match(r"Answer (\d+)\b", s)]
                if m}
    missing = [k for k in questions if k not in answered]
    assert not missing, f"{path.name}: questionnaire items {missing} have no '<details><summary>Answer k…' block"


def test_check_answer_verdicts(capsys):
    assert check_answer("x", None, 1.0) is None  # not answered: no verdict, no exception
    assert check_answer("x", 1.004, 1.0, rel=0.01) is True
    assert check_answer("x", 1.2, 1.0, rel=0.01, hint="look again") is False
    assert "Hint: look again" in capsys.readouterr().out
    assert check_answer("x", 0.001, 0.0, abs_tol=0.01) is True  # relative tolerance alone never accepts near 0
    assert check_answer("x", "1.0", 1.0) is False  # a string is not a number
    assert check_answer("x", True, 1.0) is False  # nor is a bool
    assert check_answer("which", " Towards  the Reference", "towards the reference") is True
    assert check_answer("pair", (1, 2), (1, 2)) is True and check_answer("pair", (2, 1), (1, 2)) is False
