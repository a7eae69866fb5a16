"""A real, tiny DPO run on CPU: TRL's DPOTrainer + peft LoRA (+ bitsandbytes 4-bit)."""

import json
import math

import pytest
import torch

from course_utils.evaluate import implicit_reward_accuracy
from course_utils.models import load_model
from course_utils.train import build_trainer, device_map_for, main


def _snapshot(model, key):
    return {n: p.detach().clone() for n, p in model.named_parameters() if key(n)}


@pytest.fixture(scope="module")
def trained(tiny_pairs, tiny_preset, tmp_path_factory):
    preset = tiny_preset.override(logging_steps=1)
    model, tokenizer = load_model("tiny", seed=preset.seed)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = build_trainer(preset, model, tokenizer, tiny_pairs[0]["train"], output_dir=tmp_path_factory.mktemp("dpo"))
    lora_before = _snapshot(trainer.model, lambda n: "lora_" in n)
    before = implicit_reward_accuracy(trainer.model, tokenizer, tiny_pairs[0]["train"], preset.beta)
    trainer.train()
    return dict(trainer=trainer, tokenizer=tokenizer, preset=preset, base_before=base_before,
                lora_before=lora_before, before=before)


def test_divergence_guard_is_on_and_quiet(trained):
    guard = trained["trainer"].guard  # build_trainer adds one by default
    assert guard is not None and len(guard.history) == trained["preset"].max_steps
    assert guard.diagnoses == []


def test_first_step_loss_is_ln2(trained):
    """LoRA's B starts at zero, so at step 1 policy == reference and -log sigma(0) = ln 2."""
    first = trained["trainer"].state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)


def test_reward_accuracy_and_margins_rise(trained):
    logs = [h for h in trained["trainer"].state.log_history if "rewards/accuracies" in h]
    early, late = logs[:3], logs[-3:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    assert mean(late, "rewards/accuracies") > mean(early, "rewards/accuracies")
    assert mean(late, "rewards/margins") > mean(early, "rewards/margins") + 0.05
    assert mean(late, "loss") < mean(early, "loss")


def test_implicit_reward_on_training_pairs_improves(trained, tiny_pairs):
    after = implicit_reward_accuracy(trained["trainer"].model, trained["tokenizer"], tiny_pairs[0]["train"],
                                     trained["preset"].beta)
    assert trained["before"]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert after["reward_accuracy"] >= 0.75 and after["reward_margin"] > 0.05


def test_lora_changed_and_base_stayed_frozen(trained):
    model = trained["trainer"].model
    lora_after = _snapshot(model, lambda n: "lora_" in n)
    changed = [n for n in lora_after if not torch.equal(lora_after[n], trained["lora_before"][n])]
    assert len(changed) == len(lora_after) > 0  # every adapter matrix moved
    base = model.get_base_model()
    for name, before in trained["base_before"].items():
        after = dict(base.named_parameters()).get(name.replace(".weight", ".base_layer.weight"),
                                                   dict(base.named_parameters()).get(name))
        assert torch.equal(after, before), f"base weight {name} changed"


def test_qlora_on_cpu_trains_lora_on_a_4bit_base(tiny_pairs, tiny_preset, tmp_path):
    """The real QLoRA path: bitsandbytes NF4 base + LoRA + DPO steps, on CPU."""
    import bitsandbytes as bnb

    model, tokenizer = load_model("tiny", load_in_4bit=True, seed=0)
    assert getattr(model, "is_loaded_in_4bit", False)
    packed_before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    trainer = build_trainer(tiny_preset.override(max_steps=3, logging_steps=1), model, tokenizer,
                            tiny_pairs[0]["train"], output_dir=tmp_path)
    lora_before = _snapshot(trainer.model, lambda n: "lora_B" in n)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(l) for l in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    lora_after = _snapshot(trainer.model, lambda n: "lora_B" in n)
    assert any(not torch.equal(lora_after[n], lora_before[n]) for n in lora_after)
    four_bit = {n.replace("base_model.model.", "").replace(".base_layer", ""): m
                for n, m in trainer.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(four_bit) == len(packed_before) == 14
    for name, packed in packed_before.items():
        assert torch.equal(four_bit[name].weight, packed)  # 4-bit base untouched


def test_cli_trains_and_saves_an_adapter(tmp_path):
    metrics = main(["--preset", "tiny", "--dataset", "sentiment", "--max-steps", "2", "--output-dir", str(tmp_path)])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["eval_loss"] == pytest.approx(metrics["eval_loss"]) and math.isfinite(saved["eval_loss"])


def test_cli_on_a_local_preference_file(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"A helpful answer {i}.", "rejected": f"No {i}."} for i in range(12)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["--preset", "tiny", "--dataset", str(path), "--max-steps", "1", "--output-dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_dataset_columns_are_named(tiny_preset, tmp_path):
    from datasets import Dataset

    model, tokenizer = load_model("tiny")
    with pytest.raises(ValueError, match="chosen"):
        build_trainer(tiny_preset, model, tokenizer, Dataset.from_list([{"prompt": "a", "choosen": "b", "rejected": "c"}]),
                      output_dir=tmp_path)


@pytest.mark.parametrize("env, cuda, expected", [
    ({}, False, None),  # CPU: no device map
    ({}, True, "auto"),  # one process on a GPU
    ({"WORLD_SIZE": "1"}, True, "auto"),
    ({"WORLD_SIZE": "4", "LOCAL_RANK": "2"}, True, {"": 2}),  # DDP: a whole copy on this process's GPU
    ({"WORLD_SIZE": "4", "LOCAL_RANK": "2", "ACCELERATE_USE_FSDP": "true"}, True, None),  # the launcher shards
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, True, None),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, False, None),  # CPU DDP (gloo), as tests/test_accelerate.py runs
])
def test_device_map_for_each_launch(env, cuda, expected):
    assert device_map_for(env, cuda) == expected
