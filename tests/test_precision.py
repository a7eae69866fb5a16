"""Checks that follow the precision (course_utils/precision.py) and the CPU's instruction-set paths (cpu.py).

The ISA tests run the cpu preset's training path in child processes with oneDNN/ATen capped
(``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``), so the AMX-off and AVX2-only paths run on
whatever CPU runs the tests.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_utils import cpu
from course_utils.precision import (compute_dtype, describe_training, rounding_bound, step_one_tolerances, training_dtype,
                                    unit_roundoff)
from course_utils.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cpu", "tiny", "t4", "a100"])
def test_dpo_config_trains_in_the_precision_lessons_print(name, tmp_path):
    from course_utils.train import dpo_config

    preset = get_preset(name)
    assert compute_dtype(dpo_config(preset, tmp_path)) == training_dtype(preset)  # on this machine


def test_training_dtype_per_preset_and_runtime():
    cpu_preset, tiny, t4, a100 = (get_preset(n) for n in ("cpu", "tiny", "t4", "a100"))
    assert training_dtype(cpu_preset, on_gpu=False, native_bf16=True) == torch.bfloat16  # bf16 autocast where native
    assert training_dtype(cpu_preset, on_gpu=False, native_bf16=False) == torch.float32  # emulated bf16 is slower
    assert training_dtype(tiny, on_gpu=False, native_bf16=True) == torch.float32  # CI's numbers stay fp32
    assert training_dtype(t4, on_gpu=True) == torch.float16 and training_dtype(a100, on_gpu=True) == torch.bfloat16
    assert "bf16 autocast" in describe_training(cpu_preset, on_gpu=False, native_bf16=True)
    assert "matrix products in fp32" in describe_training(cpu_preset, on_gpu=False, native_bf16=False)
    assert "4-bit NF4" in describe_training(t4, on_gpu=True) and "fp16 autocast" in describe_training(t4, on_gpu=True)


def test_unit_roundoff_is_half_the_gap_above_one():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        gap = torch.finfo(dtype).eps  # 1 -> next representable number
        assert unit_roundoff(dtype) == gap / 2
        one = torch.tensor(1.0, dtype=dtype)
        assert one + gap / 4 == one and one + gap != one  # below u rounds back to 1, the gap does not
    assert unit_roundoff("bf16") == 2.0**-8 and unit_roundoff("float32") == 2.0**-24


def test_step_one_tolerances_follow_dtype_path_and_magnitude():
    kw = dict(beta=0.1, logp_chosen=-150.0, logp_rejected=-140.0)
    fp32 = step_one_tolerances(torch.float32, same_path=False, **kw)
    bf16 = step_one_tolerances(torch.bfloat16, same_path=False, **kw)
    same = step_one_tolerances(torch.bfloat16, same_path=True, **kw)
    assert fp32["margin"] == pytest.approx(0.1 * 2 * 2 * 2**-24 * 290)  # 2 evaluations, compounding 2
    assert fp32["loss"] < 1e-5 and bf16["loss"] > 0.1  # fp32 keeps a tight check; bf16 cannot promise one
    assert same == {**fp32}  # the same operations: only fp32 arithmetic is left
    assert bf16["margin"] / fp32["margin"] == pytest.approx(2.0**16)  # the ratio of the unit roundoffs
    x = bf16["margin"]
    assert bf16["loss"] == pytest.approx(x / 2 + x * x / 8)
    # and the loss bound really bounds -log sigmoid(x) - ln 2 at the worst margin
    assert abs(-torch.nn.functional.logsigmoid(torch.tensor(-x, dtype=torch.float64)).item() - math.log(2)) <= bf16["loss"]
    assert rounding_bound(torch.bfloat16, -100.0, evaluations=1) == 2 * 100 * 2**-8


@pytest.mark.parametrize("env, expected", [
    ({"DPO_COURSE_CPU_BF16": "0"}, False),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
    ({"ONEDNN_MAX_CPU_ISA": "avx512_core"}, False),  # torch still says True here; oneDNN emulates bf16
    ({"ATEN_CPU_CAPABILITY": "avx2"}, False),
    ({"DPO_COURSE_CPU_BF16": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"}, True),  # the override wins
])
def test_cpu_supports_bf16_sees_caps_and_override(env, expected):
    assert cpu.cpu_supports_bf16(env) is expected


def test_uncapped_and_amx_off_follow_the_hardware():
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert cpu.cpu_supports_bf16({}) is native
    assert cpu.cpu_supports_bf16({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}) is native  # AMX off, AVX512-BF16 kept


def test_bad_overrides_are_refused():
    with pytest.raises(ValueError, match="DPO_COURSE_CPU_BF16"):
        cpu.cpu_supports_bf16({"DPO_COURSE_CPU_BF16": "maybe"})
    with pytest.raises(ValueError, match="ONEDNN_MAX_CPU_ISA"):
        cpu.cpu_supports_bf16({"ONEDNN_MAX_CPU_ISA": "AVX3"})


def test_machine_info_names_the_cpu():
    info = cpu.machine_info(kernel=False)
    assert info["cpu_model"] and info["cpu_count"] >= 1
    assert info["hardware_isa"] in ("amx", "avx512_bf16", "avx512", "avx2", "arm", "other")
    assert info["bf16_native"] is cpu.cpu_supports_bf16()


# --- the cpu preset's training path under each ISA cap ------------------------------------------

HAS_BF16 = cpu.hardware_isa() in ("amx", "avx512_bf16")
PATHS = {  # name: (environment, does the preset train in bf16 there?)
    "uncapped": ({}, bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())),
    "amx_off": ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, HAS_BF16),
    "avx2_only": ({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, False),
}


@pytest.fixture(scope="module")
def probe_pairs(tiny_pairs, tmp_path_factory):
    path = tmp_path_factory.mktemp("isa") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in tiny_pairs[0]["train"].to_list()[:16]))
    return path


@pytest.mark.parametrize("path", sorted(PATHS))
def test_cpu_preset_trains_correctly_on_each_isa_path(path, probe_pairs, tmp_path):
    caps, bf16 = PATHS[path]
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                                           "DPO_COURSE_CPU_BF16")}
    env.update(caps, DPO_COURSE_REFERENCE_CACHE=str(tmp_path / "reference"), TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "isa_probe.py"), str(probe_pairs), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bf16"] is bf16 and out["cpu_supports_bf16"] is bf16  # bf16 only where native
    if path == "avx2_only":
        assert "avx512" not in out["kernel"] and "amx" not in out["kernel"], out["kernel"]
    if path == "amx_off":
        assert "amx" not in out["kernel"], out["kernel"]
    # under bf16 the reference is computed in the policy's shapes, so step 1 reproduces it (fp32: to rounding)
    assert out["same_path"] is bf16 and (out["fixed_length"] is not None) is bf16
    assert out["agreement"]["max"] <= rounding_bound(torch.float32, out["agreement"]["logp_magnitude"])
    first, bounds = out["first"], out["bounds"]
    assert first["step"] == 1 and bounds["dtype"] == "float32"
    assert abs(first["loss"] - math.log(2)) <= bounds["loss"], (first["loss"], bounds)
    assert abs(first["rewards/margins"]) <= bounds["margin"], (first["rewards/margins"], bounds)
