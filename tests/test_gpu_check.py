"""``make gpu-check`` (benchmarks/gpu_check.py) on a machine without a GPU.

The measuring needs a CUDA GPU. What a CPU can check, in seconds: the script stops at once with
its documented exit code and writes nothing; the pass rule (a peak within 15% of its prediction,
either way) holds; and the plan is the issue's, with the t4 preset in fp16 under a T4's 15 GiB and
the a100 preset in bf16, each at two lengths.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from course_utils.gpu_budget import SHAPES
from course_utils.presets import get_preset

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
HEAVY = ("transformers", "trl", "peft", "bitsandbytes")
# Runs the script as `python gpu_check.py ...` would, then says which heavy libraries got imported.
WRAPPER = f"""
import runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    print("heavy:", sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_exits_with_its_code_before_loading_anything_heavy(gpu_check, tmp_path):
    output, workdir = tmp_path / "build" / "gpu_check.json", tmp_path / "work"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even where the machine has one
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(SCRIPT), "--output", str(output), "--workdir",
                           str(workdir)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == gpu_check.NOT_RUN == 2
    assert f"{gpu_check.NOT_RUN}: nothing was measured" in gpu_check.__doc__  # the code is the documented one
    assert "needs a CUDA GPU" in proc.stderr and "nothing was written" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "heavy: []" in proc.stdout  # no transformers, TRL, peft or bitsandbytes were imported
    runs, resume = gpu_check.plan(139.0)
    for run in runs:  # it says what it would run
        assert f"{run.preset:<5}{run.dtype:<9} max_length {run.max_length:>4}" in proc.stderr
    assert f"resumes it to step {resume.max_steps}" in proc.stderr
    assert not output.exists() and not output.parent.exists() and not workdir.exists()


@pytest.mark.parametrize("off, ok", [(0.10, True), (-0.10, True), (0.20, False), (-0.20, False)])
def test_a_peak_passes_within_15_percent_of_its_prediction_either_way(gpu_check, off, ok):
    predicted = get_preset("t4").predicted_memory().peak_gib
    [row] = gpu_check.verdicts([{"measured_peak_gib": predicted * (1 + off), "predicted_peak_gib": predicted}])
    assert row["ratio"] == pytest.approx(1 + off)
    assert row["ok"] is ok


def test_a_peak_that_was_not_measured_fails(gpu_check):
    [row] = gpu_check.verdicts([{"measured_peak_gib": None, "predicted_peak_gib": 8.5}])  # out of memory
    assert row["ok"] is False


@pytest.mark.parametrize("off", [0.10, 0.20])
def test_only_the_peak_off_by_more_than_15_percent_is_a_problem(gpu_check, off):
    runs, resume = gpu_check.plan(139.0)
    rows = []
    for i, run in enumerate(runs):
        predicted = gpu_check.run_preset(run).predicted_memory().peak_gib
        rows.append({**vars(run), "out_of_memory": None, "steps_done": run.steps, "diagnoses": [],
                     "mixed_precision": gpu_check.AUTOCAST[run.dtype], "predicted_peak_gib": predicted,
                     "measured_peak_gib": predicted * (1 + off if i == 2 else 1.01)})
    found = gpu_check.problems(gpu_check.verdicts(rows), None, resume)
    if off <= gpu_check.TOLERANCE:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith(f"a100 at max_length {runs[2].max_length}: ")
        assert f"+{off:.0%} off" in found[0]


@pytest.mark.parametrize("total_gib", [139.0, 79.0])  # an H200, an H100
def test_the_plan_is_t4_in_fp16_under_15_gib_and_a100_in_bf16_at_two_lengths_each(gpu_check, total_gib):
    runs, resume = gpu_check.plan(total_gib)
    for name, dtype in (("t4", "float16"), ("a100", "bfloat16")):
        mine = [run for run in runs if run.preset == name]
        top = get_preset(name).max_length
        assert sorted(run.max_length for run in mine) == [top // 2, top]  # two distinct lengths: a slope
        for run in mine:
            assert run.dtype == dtype == gpu_check.run_preset(run).dtype
            assert run.steps >= 2  # the first step is left out of the timing
            if name == "t4":
                assert run.memory_cap_gib == 15
                assert run.memory_fraction * total_gib == pytest.approx(15)
            else:
                assert run.memory_cap_gib is None and run.memory_fraction == 1.0
    assert {run.preset for run in runs} == {"t4", "a100"}
    assert resume.preset == "t4" and 0 < resume.stop_after < resume.max_steps and resume.eval_pairs > 0


def test_the_slope_leaves_out_the_memory_that_does_not_grow_with_tokens(gpu_check):
    runs, _ = gpu_check.plan(139.0)
    rows = []
    for run in runs:
        preset = gpu_check.run_preset(run)
        predicted = gpu_check.prediction(preset, SHAPES[preset.model_name], "H200")["allocated_gib"]
        rows.append({"preset": run.preset, "tokens": gpu_check.tokens(preset), "predicted_allocated_gib": predicted,
                     "measured_allocated_gib": predicted + 0.7})  # e.g. weights the model did not count
    slopes = gpu_check.slopes(rows)
    assert [s["preset"] for s in slopes] == ["t4", "a100"]
    for s in slopes:
        assert s["predicted_gib_per_1k_tokens"] > 0 and s["ratio"] == pytest.approx(1)
