import json

import pytest

from course_utils import sentiment


def test_openings_are_many_unique_and_plain():
    openings = sentiment.load_openings()
    assert len(openings) >= 300
    assert len(set(openings)) == len(openings)
    assert all(8 <= len(o.split()) <= 30 for o in openings)


def test_split_is_deterministic_and_held_out_is_disjoint():
    train_a, held_a = sentiment.split_openings(200, 64, seed=0)
    train_b, held_b = sentiment.split_openings(200, 64, seed=0)
    train_c, _ = sentiment.split_openings(200, 64, seed=1)
    assert (train_a, held_a) == (train_b, held_b)
    assert train_a != train_c
    assert not set(train_a) & set(held_a)
    assert (len(train_a), len(held_a)) == (200, 64)
    # Held-out prompts do not depend on how many training prompts are asked for.
    assert sentiment.split_openings(50, 64, seed=0)[1] == held_a
    with pytest.raises(ValueError, match="only"):
        sentiment.split_openings(1000, 64)


def test_judge_orders_sentiment():
    judge = sentiment.SentimentJudge()
    pos, neu, neg = judge(["A wonderful, moving film. I loved it.", "The film is 90 minutes long.",
                           "A dull, painful mess. I hated it."])
    assert pos > 0.5 and neg < -0.5 and abs(neu) < 0.1


def test_rank_into_pairs_picks_best_and_worst_and_reports_skips():
    rows, report = sentiment.rank_into_pairs(
        ["opening one", "opening two", "opening three"],
        [["ok", "great", "bad"], ["same", "same", "same"], ["", "", "fine"]],
        [[0.1, 0.9, -0.6], [0.0, 0.0, 0.0], [0.0, 0.0, 0.2]],
    )
    assert len(rows) == 1 and report.paired == 1
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "great"}]  # 0.9, the most positive
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "bad"}]  # -0.6, the least
    assert rows[0]["prompt"] == sentiment.sentiment_prompt("opening one")
    assert [s["index"] for s in report.skipped] == [1, 2]  # nothing lost silently
    assert "2 prompts skipped" in report.summary()


def test_tiny_pairs_are_real_ranked_and_cached(tiny_pairs, tiny_preset):
    splits, held_out, reports = tiny_pairs
    train, test = splits["train"], splits["test"]
    assert reports["train"].paired + len(reports["train"].skipped) == tiny_preset.train_prompts
    assert len(train) == reports["train"].paired >= tiny_preset.train_prompts // 2
    assert len(held_out) == tiny_preset.eval_prompts
    assert not set(train["opening"]) & set(held_out)  # training never sees held-out prompts
    for row in train:
        assert row["chosen_score"] - row["rejected_score"] >= 0.1
        assert row["chosen"][0]["content"].strip() and row["chosen"] != row["rejected"]
    # cached on disk: a second call is the same data without sampling
    again, _, _ = sentiment.sentiment_dataset(tiny_preset)
    assert again["train"]["chosen"] == train["chosen"]
    cache = list((sentiment.cache_dir() / "sentiment").glob("pairs-*.jsonl"))
    assert cache and all(json.loads(p.read_text().splitlines()[0])["samples"] for p in cache)
