import dataclasses

import pytest
import torch

from course_utils.presets import PRESETS, Preset, Runtime, detect_preset, get_preset, preset_name_for

T4 = Runtime(cuda=True, device_name="Tesla T4", capability=(7, 5), memory_gb=15.0)
A100 = Runtime(cuda=True, device_name="NVIDIA A100-SXM4-40GB", capability=(8, 0), memory_gb=39.6)
H100 = Runtime(cuda=True, device_name="NVIDIA H100 80GB HBM3", capability=(9, 0), memory_gb=79.1)
RTX = Runtime(cuda=True, device_name="NVIDIA GeForce RTX 3060", capability=(8, 6), memory_gb=12.0)
CPU = Runtime(cuda=False)


@pytest.mark.parametrize(
    "runtime, expected",
    [(CPU, "cpu"), (T4, "t4"), (A100, "a100"), (H100, "a100"), (RTX, "cuda")],
)
def test_runtime_maps_to_preset(runtime, expected):
    assert preset_name_for(runtime) == expected
    assert detect_preset(runtime).name == expected


def test_this_machine_is_cpu_when_no_cuda():
    if torch.cuda.is_available():
        pytest.skip("this check is about CPU-only machines")
    preset = detect_preset()
    assert preset.name == "cpu" and preset.model_name == "smollm2-135m" and preset.dtype == "float32"


def test_t4_never_bf16_and_gpu_presets_use_qlora():
    t4 = detect_preset(T4)
    assert t4.dtype == "float16"
    for runtime in (T4, A100, H100, RTX):
        p = detect_preset(runtime)
        assert p.load_in_4bit and p.optimizer == "paged_adamw_8bit" and p.gradient_checkpointing
        assert p.model_name == "mistral-7b" and p.checkpoint
    assert detect_preset(A100).dtype == "bfloat16"
    assert detect_preset(RTX).dtype == "bfloat16"  # Ampere consumer card: bf16 works


def test_bf16_on_t4_is_refused():
    with pytest.raises(ValueError, match="bfloat16"):
        detect_preset(T4, dtype="bfloat16")


def test_override_in_one_line_and_unknown_field_is_an_error():
    p = detect_preset(CPU, max_steps=7, beta=0.5)
    assert (p.max_steps, p.beta) == (7, 0.5)
    assert get_preset("t4").override(per_device_batch_size=2).per_device_batch_size == 2
    with pytest.raises(TypeError, match="no field"):
        get_preset("cpu", max_step=3)  # typo of max_steps
    with pytest.raises(KeyError, match="Unknown preset"):
        get_preset("tpu")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_plain_dataclass_with_sane_fields(name):
    p = PRESETS[name]
    assert dataclasses.is_dataclass(p) and isinstance(p, Preset)
    assert p.max_length > p.max_new_tokens > 0
    assert p.per_device_batch_size >= 1 and p.gradient_accumulation_steps >= 1
    assert p.lora_alpha >= p.lora_r > 0
    assert p.torch_dtype in (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_fits_the_sentiment_openings(name):
    from course_utils.sentiment import split_openings

    p = PRESETS[name]
    train, held_out = split_openings(p.train_prompts, p.eval_prompts, seed=p.seed)
    assert len(train) == p.train_prompts and len(held_out) == p.eval_prompts


def test_a_mac_with_mps_trains_the_cpu_preset_on_the_cpu_and_says_why(capsys, tmp_path):
    from course_utils.train import dpo_config

    mac = Runtime(cuda=False, mps=True)
    preset = detect_preset(mac)
    assert preset.name == "cpu"
    said = capsys.readouterr().out
    assert "Apple MPS is available" in said and "verified on CPU kernels" in said  # what, and why
    assert dpo_config(preset, tmp_path).use_cpu is True  # trains on the CPU, not MPS
    assert detect_preset(T4).name == "t4"
    capsys.readouterr()
    detect_preset(CPU)
    assert capsys.readouterr().out == ""  # a plain CPU runtime prints nothing
