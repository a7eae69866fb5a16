"""Benchmarks with lm-evaluation-harness (lesson 5, optional): the policy and the reference on the same tasks.

On a GPU with the model hub, real tasks such as ``truthfulqa_mc2``. Offline (CI, the CPU course) the same code
runs a small multiple-choice task the course ships (``assets/lm_eval/course_mc.jsonl``, 16 questions, 3 choices):
:func:`local_task_dir` writes its YAML next to an absolute path of that file, and a ``TaskManager`` with
``include_path`` finds it. Both models are evaluated in memory (``HFLM(pretrained=model)``); the reference is the
policy with its LoRA adapter switched off, as everywhere in the course.
"""

from __future__ import annotations

import contextlib
from importlib import resources
from pathlib import Path

LOCAL_TASK = "course_mc"
HUB_TASKS = ["truthfulqa_mc2"]  # multiple choice, scored by log-likelihood: no generation, no judge

_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def local_task_dir(folder) -> Path:
    """Write the course's local lm-eval task (YAML + the shipped JSONL's absolute path) into ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(str(resources.files("course_utils").joinpath("assets/lm_eval/course_mc.jsonl"))).resolve()
    (folder / f"{LOCAL_TASK}.yaml").write_text(_YAML.format(task=LOCAL_TASK, data=data), encoding="utf-8")
    return folder


def run_benchmarks(model, tokenizer, tasks: list[str], *, include_path=None, limit: int | None = None,
                   batch_size: int = 8, reference: bool = True) -> dict:
    """``{"policy": {task: {metric: value}}, "reference": {...}}`` from ``lm_eval.simple_evaluate``.

    ``reference=True`` also evaluates ``model`` with its adapter disabled. ``limit`` caps documents per task.
    Metric names are lm-eval's without the filter suffix (``acc``, ``acc_stderr``, ...).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = {}
    sides = [("policy", contextlib.nullcontext())]
    if reference:
        sides.append(("reference", model.disable_adapter() if hasattr(model, "disable_adapter")
                      else contextlib.nullcontext()))
    for side, context in sides:
        with context:
            res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          log_samples=False, bootstrap_iters=0)
        out[side] = {task: {k.split(",")[0]: v for k, v in metrics.items() if k != "alias" and isinstance(v, float)}
                     for task, metrics in res["results"].items()}
    return out
