"""The cpu preset's pairs for seeds 0-2 ship with the course: the same pairs on every CPU, no model needed."""

import gzip
import json
from importlib import resources

import pytest

from course_utils import sentiment
from course_utils.pair_origin import describe_pairs
from course_utils.presets import get_preset

SEEDS = (0, 1, 2)


@pytest.fixture
def no_sampling(tmp_path, monkeypatch):
    """An empty course cache and no generator: anything not shipped would have to be sampled, and fails."""
    monkeypatch.setenv("DPO_COURSE_CACHE", str(tmp_path))

    def refuse(preset):
        raise AssertionError("the shipped pairs should not need a model")

    monkeypatch.setattr(sentiment, "_load_generator", refuse)


@pytest.mark.parametrize("seed", SEEDS)
def test_cpu_pairs_ship_and_load_without_a_model(no_sampling, seed):
    preset = get_preset("cpu", seed=seed)
    assert sentiment.pairs_are_shipped(preset)
    data, held_out, reports = sentiment.sentiment_dataset(preset)
    assert len(held_out) == preset.eval_prompts
    # every opening is either paired or reported as skipped: nothing lost
    assert reports["train"].paired + len(reports["train"].skipped) == preset.train_prompts
    assert reports["test"].paired + len(reports["test"].skipped) == preset.eval_prompts
    assert len(data["train"]) > 0.8 * preset.train_prompts
    assert not set(data["train"]["opening"]) & set(data["test"]["opening"])


def test_the_same_pairs_whatever_the_cpu_does(no_sampling, monkeypatch):
    preset = get_preset("cpu")
    native, _, _ = sentiment.sentiment_dataset(preset)
    monkeypatch.setenv("DPO_COURSE_CPU_BF16", "0")  # a CPU without bf16 would sample in fp32, under another key
    fp32, _, _ = sentiment.sentiment_dataset(preset)
    assert native["train"].to_list() == fp32["train"].to_list()


def test_shipped_scores_are_the_judges_and_the_manifest_says_how_they_were_made():
    folder = resources.files("course_utils").joinpath(sentiment.SHIPPED)
    manifest = json.loads(folder.joinpath("manifest.json").read_text())
    files = sorted(p.name for p in folder.iterdir() if p.name.endswith(".jsonl.gz"))
    assert sorted(manifest) == files and len(files) == 2 * len(SEEDS)  # train and held-out per seed
    judge = sentiment.SentimentJudge()
    for name, entry in manifest.items():
        assert entry["preset"] == "cpu" and entry["seed"] in SEEDS and entry["machine"]["cpu_model"]
        records = [json.loads(line) for line in gzip.decompress(folder.joinpath(name).read_bytes()).splitlines()]
        assert len(records) == entry["openings"]
        assert all(len(r["samples"]) == entry["samples_per_prompt"] for r in records)
        for r in records[:5]:
            assert r["scores"] == pytest.approx(judge(r["samples"]))


def test_other_seeds_and_recipes_are_sampled_and_the_lesson_line_says_which():
    assert not sentiment.pairs_are_shipped(get_preset("cpu", seed=3))
    assert not sentiment.pairs_are_shipped(get_preset("cpu", train_prompts=100))
    assert not sentiment.pairs_are_shipped(get_preset("tiny"))
    assert "ship with the course" in describe_pairs(get_preset("cpu"), "sentiment")
    assert "ship" not in describe_pairs(get_preset("cpu", seed=3), "sentiment")
