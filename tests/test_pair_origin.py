"""Where pairs come from: the default data per preset, on-policy sampling on the GPU presets, true sentences."""

import hashlib
import json

import pytest

from course_utils import sentiment
from course_utils.data import ORCA_ID
from course_utils.models import tiny_model_dir
from course_utils.pair_origin import default_dataset, describe_pairs, on_policy, resolve_dataset
from course_utils.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_default_data_and_its_sentence_per_preset(name):
    preset = get_preset(name)
    gpu = name in ("t4", "a100", "cuda")
    assert default_dataset(preset) == resolve_dataset("auto", preset) == (ORCA_ID if gpu else "sentiment")
    assert resolve_dataset("my_pairs.jsonl", preset) == "my_pairs.jsonl"
    sentence = describe_pairs(preset, "sentiment")
    assert on_policy(preset, "sentiment") == (name != "tiny")
    if name == "tiny":
        assert sentence.startswith("Off-policy") and "smollm2-135m" in sentence
    else:
        assert sentence.startswith("On-policy") and (preset.checkpoint or preset.model_name) in sentence
        assert ("on the GPU" in sentence) == gpu
    assert not on_policy(preset, ORCA_ID) and describe_pairs(preset, ORCA_ID).startswith("Off-policy")


def test_gpu_presets_sample_short_sentiment_completions_from_mistral():
    for name in ("t4", "a100", "cuda"):
        preset = get_preset(name)
        assert sentiment.pair_generator(preset) == preset.checkpoint
        assert preset.sentiment_new_tokens == 48 < preset.max_new_tokens  # a chat answer's cap is not a sentence's


def test_cpu_cache_key_is_the_recipe():
    """The cpu preset's pairs are keyed by their recipe: data version 2 (the course's decoder), generator, openings,
    samples, length, seed, batch size and bf16. Moving the generator into the preset did not change the key."""
    openings = ["a", "b"]
    old = json.dumps([2, "smollm2-135m", openings, 4, 40, 0, 128] + ["bf16"])
    path = sentiment._cache_path(openings, 4, 40, 0, 128, True, sentiment.pair_generator(get_preset("cpu")))
    assert path.name == f"pairs-{hashlib.sha256(old.encode()).hexdigest()[:16]}.jsonl"


def test_a_gpu_preset_samples_from_its_own_4bit_model(tmp_path, monkeypatch):
    """The t4 recipe end to end on CPU: its own model (a tiny random Mistral here) loaded in NF4, fp16 compute."""
    monkeypatch.setenv("DPO_COURSE_CACHE", str(tmp_path))
    preset = get_preset("t4", model_name=str(tiny_model_dir(0, "mistral")), checkpoint=None, train_prompts=3,
                        eval_prompts=2, samples_per_prompt=2, pair_max_new_tokens=6, sample_batch_size=8)
    loaded = []
    real = sentiment._load_generator
    monkeypatch.setattr(sentiment, "_load_generator", lambda p: loaded.append(p) or real(p))
    data, held_out, reports = sentiment.sentiment_dataset(preset, use_cache=False)
    model, tokenizer = real(preset)
    assert loaded == [preset]  # one load for both splits and getattr(model, "is_loaded_in_4bit", False)
    cached = sorted((tmp_path / "sentiment").glob("pairs-*.jsonl"))
    assert len(cached) == 2  # train and held-out openings, keyed apart from SmolLM2's pairs
    for line in cached[0].read_text().splitlines():
        for text in json.loads(line)["samples"]:
            assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 6 + 1  # the cap (+1: re-tokenising)
    assert reports["train"].paired + len(reports["train"].skipped) == 3 and len(held_out) == 2
