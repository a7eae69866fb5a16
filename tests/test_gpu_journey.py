"""The Colab learner's GPU path, emulated on CPU: lessons 04 -> 05 -> 06 chained under papermill.

The t4 preset's recipe with the fields a CPU accepts: the base model in 4-bit NF4 with fp16 as the
compute dtype (bitsandbytes runs NF4 on a CPU), gradient checkpointing, the reference as the adapter
switched off, orca-format chat pairs. What cannot run here: Mistral-7B itself (a random two-layer
Mistral with the same architecture stands in), the fp16 gradient scaler (accelerate uses it on CUDA only;
tests/test_fp16_path.py emulates its step), paged 8-bit AdamW (CUDA only; dpo_config picks adamw_torch
on a CPU) and the hub (the pairs come from a local folder laid out like Intel/orca_dpo_pairs' repository).
"""

import json

import pandas as pd
import pytest

from course_utils.checkpoints import IDENTITY_FILE, list_checkpoints, run_dir, run_identity
from course_utils.lessons import execute_lesson, lesson_paths
from course_utils.models import tiny_model_dir
from course_utils.presets import Preset, get_preset

SYSTEMS = ["", "You are an AI assistant. Answer the question step by step."]


def orca_rows(n: int = 30) -> list[dict]:
    """Rows with Intel/orca_dpo_pairs' four columns: a stronger answer chosen, a weaker one rejected."""
    rows = []
    for i in range(n):
        a, b = 3 + i, 7 + 2 * i
        rows.append({"system": SYSTEMS[i % 2], "question": f"What is {a} plus {b}? Explain briefly.",
                     "chosen": f"{a} plus {b} is {a + b}: adding {b} to {a} gives {a + b}.",
                     "rejected": f"It is {a + b + 1}."})
    return rows


@pytest.fixture(scope="module")
def orca_dir(tmp_path_factory):
    """A folder laid out like the hub repository: data/train-*.parquet and a README whose front matter names the split."""
    root = tmp_path_factory.mktemp("hub") / "orca_dpo_pairs"
    (root / "data").mkdir(parents=True)
    pd.DataFrame(orca_rows()).to_parquet(root / "data" / "train-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/train-*\n---\n# orca-format pairs for the GPU-journey test\n")
    return root


T4_ON_CPU = dict(model_name=str(tiny_model_dir(0, "mistral")), checkpoint=None,  # the t4 recipe on a tiny Mistral
                 max_length=128, per_device_batch_size=2, gradient_accumulation_steps=2, max_steps=6, save_steps=3,
                 warmup_steps=0, learning_rate=5e-3, lora_r=8, lora_alpha=16, train_prompts=24, eval_prompts=6,
                 max_new_tokens=16, pair_max_new_tokens=8)


@pytest.fixture(scope="module")
def journey(tmp_path_factory, orca_dir):
    out = tmp_path_factory.mktemp("journey")
    common = {"PRESET": "t4", "OUTPUT_DIR": str(out)}
    results = {"out": out}
    for number, extra in (("04", {"DATASET": str(orca_dir), "PRESET_OVERRIDES": T4_ON_CPU}),
                          ("05", {"NUM_SAMPLES": 1, "TRAIN_PAIRS": 8, "REWARD_MODEL": "tiny-random",
                                  "LLM_JUDGE": "tiny", "CHAT_PROMPTS": 4,
                                  "BENCHMARK_TASKS": None}),  # lm-eval runs in the tiny lesson test
                          ("06", {})):
        results[number] = execute_lesson(lesson_paths([number])[0], out, {**common, **extra}, html=False)
    return results


def test_lesson_04_trains_the_t4_recipe_on_orca_pairs(journey, orca_dir):
    r = journey["04"]
    assert r["preset"] == "t4" and r["dataset"] == str(orca_dir) and r["pairs_on_policy"] is False
    assert r["steps"] == T4_ON_CPU["max_steps"] and r["train_pairs"] == 24  # 30 rows, a seeded held-out fifth
    trained = Preset(**json.loads((journey["out"] / "dpo" / "preset.json").read_text()))
    assert trained.load_in_4bit and trained.dtype == "float16" and trained.gradient_checkpointing
    folder = run_dir(journey["out"], trained)
    assert folder.name == "t4-tiny-mistral-seed0"  # one folder per preset and base model
    saved = [p for _, p, ok in list_checkpoints(folder) if ok]
    assert saved and all(json.loads((p / IDENTITY_FILE).read_text()) == run_identity(trained) for p in saved)


def test_lesson_05_scores_lesson_4s_held_out_orca_pairs(journey):
    r = journey["05"]
    assert r["held_out_pairs"] == 6  # the split lesson 4 made: min(eval_prompts, 30 rows // 5)
    assert 0.0 <= r["held_out_reward_accuracy"] <= 1.0


def test_lesson_05_judges_the_chat_model_with_a_reward_model(journey):
    """On orca data the reward-model judge makes the verdict; no ground truth, so no validity table."""
    r = journey["05"]
    assert r["rm_judge"] == "tiny random reward model" and r["rm_pairs"] == 4  # CHAT_PROMPTS fresh answers per model
    assert 0.0 <= r["rm_win_rate_ci"][0] <= r["rm_win_rate"] <= r["rm_win_rate_ci"][1] <= 1.0
    assert r["verdict_judge"] == "reward model" and "reward model" in r["verdict"]
    assert "judge_validity" not in r
    assert 0.0 <= r["llm_judge_first_position_share"] <= 1.0  # the optional pairwise judge, both orders


def test_lesson_06_merges_the_4bit_base(journey):
    r = journey["06"]
    assert r["base_was_4bit"] is True and r["merge_max_abs_diff"] < 1e-3
    assert r["generated_tokens"] > 0 and r["demo_response_received"] is True


def test_a_resume_into_another_preset_is_refused(journey, capsys):
    """The t4 run's checkpoint, offered to a cpu-preset run through the CLI: refused before the checkpoint is loaded."""
    trained = get_preset("t4", **T4_ON_CPU)
    newest = [p for _, p, ok in list_checkpoints(run_dir(journey["out"], trained)) if ok][-1]
    from course_utils.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "tiny", "--max-steps", "2", "--output-dir", str(newest.parent), "--resume", str(newest)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Not resuming" in err and "preset 't4' (checkpoint) vs 'tiny'" in err
