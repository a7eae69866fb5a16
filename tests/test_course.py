import json

from course_utils.course import run_course


def test_main_job_runs_end_to_end_on_tiny(tmp_path, tiny_pairs):
    summary = run_course("tiny", tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == 20 and saved["preset"] == "tiny"
    assert saved["train_reward_accuracy"] >= 0.75  # it learned its training pairs
    assert saved["last_loss"] < saved["first_loss"]
    assert 0.0 <= saved["win_rate"] <= 1.0 and saved["win_rate_ci"][0] <= saved["win_rate"] <= saved["win_rate_ci"][1]
    assert saved["kl"] > -0.5  # a Monte-Carlo estimate of a non-negative quantity
    assert saved["held_out_prompts"] == 8 and saved["samples"] == 16
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "examples.json").read_text())[0]["policy"] is not None
    assert summary["win_rate"] == saved["win_rate"]
