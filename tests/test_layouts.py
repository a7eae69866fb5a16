"""Bring your own preferences: the layouts of common public datasets load as canonical rows, or fail clearly.

Every example row is written here (shaped like the layouts the datasets' cards document,
never copied from them). Each layout is loaded from each file type, checked down to which
tokens carry loss, and a few go through the CLI on the tiny preset.
"""

import gzip
import json
import warnings

import pandas as pd
import pytest

from course_utils.data import DroppedRowsWarning, PreferenceDataError, load_preferences
from course_utils.layouts import DIALOGUES, EXPLICIT, IMPLICIT, ORCA, SHAREGPT, parse_message_text, read_preferences
from course_utils.templates import completion_end, end_of_turn, inspect_example
from course_utils.train import load_training_data, main


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


QUESTIONS = ["Why is the sky blue?", "Name a prime number.", "What is 2 + 3?", "Say hello in French.",
             "What do bees make?", "How many legs has a spider?"]
GOOD = ["Light scatters.", "Seven.", "Five.", "Bonjour.", "Honey.", "Eight."]
BAD = ["It is painted.", "Nine.", "Six.", "Hola.", "Milk.", "Six legs."]
SYS = "You answer in one short sentence."


def canonical(i, with_system=False):
    """What every conversational layout below must become for question ``i``."""
    return {"prompt": ([system(SYS)] if with_system else []) + [user(QUESTIONS[i])],
            "chosen": [bot(GOOD[i])], "rejected": [bot(BAD[i])]}


# layout id -> (make a source row for question i, expected layout, expected canonical row, words in the report)
LAYOUTS = {
    "explicit-messages": (lambda i: canonical(i), EXPLICIT, canonical, []),
    "hh-rlhf": (lambda i: {"chosen": f"\n\nHuman: {QUESTIONS[i]}\n\nAssistant: {GOOD[i]}",
                           "rejected": f"\n\nHuman: {QUESTIONS[i]}\n\nAssistant: {BAD[i]}"},
                IMPLICIT, canonical, ["Human: … ", "extracted the shared prefix"]),
    "trl-ultrafeedback": (lambda i: {"chosen": [user(QUESTIONS[i]), bot(GOOD[i])],
                                     "rejected": [user(QUESTIONS[i]), bot(BAD[i])], "score_chosen": 8.0},
                          IMPLICIT, canonical, ["extracted the shared prefix", "columns not used: score_chosen"]),
    "h4-ultrafeedback": (lambda i: {"prompt": QUESTIONS[i], "prompt_id": f"id{i}",
                                    "chosen": [user(QUESTIONS[i]), bot(GOOD[i])],
                                    "rejected": [user(QUESTIONS[i]), bot(BAD[i])]},
                         DIALOGUES, canonical, ["removed the repeated user turn", "columns not used: prompt_id"]),
    "intel-orca": (lambda i: {"system": SYS if i % 2 else "", "question": QUESTIONS[i], "chosen": GOOD[i],
                              "rejected": BAD[i]},
                   ORCA, lambda i: canonical(i, with_system=bool(i % 2)),
                   ["'question' became the user turn", "system column kept", "empty system column left out"]),
    "argilla-orca": (lambda i: {"system": SYS, "input": QUESTIONS[i], "chosen": GOOD[i], "rejected": BAD[i],
                                "status": "tie" if i == 0 else "ok", "rating": [8.0, 5.0]},
                     ORCA, lambda i: canonical(i, with_system=True),
                     ["'input' became the user turn", "system column kept", "columns not used: status, rating"]),
    "truthy": (lambda i: {"id": str(i), "source": "test", "system": SYS, "prompt": QUESTIONS[i], "chosen": GOOD[i],
                          "rejected": BAD[i]},
               EXPLICIT, lambda i: canonical(i, with_system=True),
               ["system column kept", "turned into messages", "columns not used: id, source"]),
    "sharegpt": (lambda i: {"conversations": [{"from": "system", "value": SYS}, {"from": "human", "value": QUESTIONS[i]}],
                            "chosen": {"from": "gpt", "value": GOOD[i]}, "rejected": {"from": "gpt", "value": BAD[i]}},
                 SHAREGPT, lambda i: canonical(i, with_system=True), ["from/value mapped", "'conversations'"]),
}
SUFFIXES = [".jsonl", ".json", ".jsonl.gz", ".json.gz", ".csv", ".csv.gz", ".parquet", ".parquet.gz"]


def write(path, rows):
    """Write rows as the file type the name says, the way a user would export them (pandas for CSV/Parquet)."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    elif name.endswith(".json"):
        data = json.dumps(rows, ensure_ascii=False).encode()
    elif name.endswith(".csv"):
        data = pd.DataFrame(rows).to_csv(index=False).encode()  # lists become Python-repr cells
    else:
        import io

        buffer = io.BytesIO()
        pd.DataFrame(rows).to_parquet(buffer)
        data = buffer.getvalue()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


CASES = [(layout, suffix) for layout in LAYOUTS for suffix in SUFFIXES]


@pytest.mark.parametrize("layout_id, suffix", CASES, ids=[f"{l}{s}" for l, s in CASES])
def test_each_layout_loads_from_each_file_type(tmp_path, capsys, layout_id, suffix):
    make, layout, expected, words = LAYOUTS[layout_id]
    path = write(tmp_path / f"prefs{suffix}", [make(i) for i in range(3)])
    ds = load_preferences(path)
    assert ds.to_list() == [expected(i) for i in range(3)]
    report = capsys.readouterr().out
    assert report.startswith(f"{path}: 3 rows, layout: {layout}")
    for word in words + (["parsed back into messages"] if ".csv" in suffix and layout_id != "hh-rlhf"
                                                            and layout_id not in ("intel-orca", "argilla-orca", "truthy")
                         else []):
        assert word in report


@pytest.mark.parametrize("layout_id", list(LAYOUTS))
def test_only_the_answer_carries_loss_and_the_prompt_comes_once(tokenizer, tmp_path, capsys, layout_id):
    make, _, _, _ = LAYOUTS[layout_id]
    row = load_preferences(write(tmp_path / "prefs.jsonl", [make(1), make(2)]), tokenizer=tokenizer)[0]
    ex = inspect_example(row, tokenizer)
    for view, answer in ((ex.chosen, GOOD[1]), (ex.rejected, BAD[1])):
        loss = tokenizer.decode([i for i, m in zip(view.ids, view.mask) if m])
        prompt = tokenizer.decode([i for i, m in zip(view.ids, view.mask) if not m])
        assert loss == answer + end_of_turn(tokenizer)  # the answer and its turn end, nothing else
        assert prompt.count(QUESTIONS[1]) == 1 and answer not in prompt
    assert ex.prompt_text.count(SYS) == (1 if layout_id in ("argilla-orca", "truthy", "sharegpt", "intel-orca") else 0)


def test_plain_text_explicit_layout_loss_is_answer_and_eos(tokenizer, tmp_path, capsys):
    rows = [{"prompt": tokenizer.apply_chat_template([user(q)], tokenize=False, add_generation_prompt=True),
             "chosen": g + completion_end(tokenizer), "rejected": b + completion_end(tokenizer)}
            for q, g, b in zip(QUESTIONS, GOOD, BAD)]
    row = load_preferences(write(tmp_path / "prefs.csv", rows), tokenizer=tokenizer)[0]
    assert "no chat template" not in capsys.readouterr().out  # these prompts carry the template
    ex = inspect_example(row, tokenizer)
    assert tokenizer.decode([i for i, m in zip(ex.chosen.ids, ex.chosen.mask) if m]) == GOOD[0] + "<|im_end|>"


# ---------------------------------------------------------------------------- nothing mis-trains silently


def test_plain_prompt_without_template_is_reported_once(tokenizer, tmp_path, capsys):
    rows = [{"prompt": q, "chosen": g, "rejected": b} for q, g, b in zip(QUESTIONS, GOOD, BAD)]
    load_preferences(write(tmp_path / "plain.jsonl", rows), tokenizer=tokenizer)
    out = capsys.readouterr().out
    assert out.count("no chat template") == 1 and "6 of 6 prompts" in out


def test_csv_repr_that_does_not_parse_is_refused_naming_file_row_field(tmp_path):
    # What pandas writes for a *numpy array* of messages (a list read from Parquet): no commas between dicts.
    broken = "[{'role': 'user', 'content': 'Hi'}\n {'role': 'assistant', 'content': 'Hello'}]"
    rows = [make for make in (LAYOUTS["trl-ultrafeedback"][0](0), LAYOUTS["trl-ultrafeedback"][0](1))]
    path = tmp_path / "export.csv"
    frame = pd.DataFrame(rows)
    frame["chosen"] = frame["chosen"].astype(str)
    frame.loc[1, "chosen"] = broken
    frame.to_csv(path, index=False)
    with pytest.raises(PreferenceDataError) as info:
        load_preferences(path)
    assert str(info.value).startswith(f"{path}: row 1, field 'chosen': holds a message list written as text")
    assert info.value.kind == "unparsable_messages"
    with pytest.warns(DroppedRowsWarning, match="unparsable_messages"):
        assert len(load_preferences(path, on_error="drop")) == 1


def test_message_text_parsing_is_literal_only():
    assert parse_message_text("[{'role': 'user', 'content': 'Hi'}]") == [user("Hi")]
    assert parse_message_text('[{"content": "Hi", "role": "user"}]') == [{"content": "Hi", "role": "user"}]
    assert parse_message_text("Just [an answer] with brackets.") is None
    with pytest.raises(PreferenceDataError):  # literal_eval never calls anything
        parse_message_text("[{'role': __import__('os').system('echo hi'), 'content': 'x'}]")


def test_naive_hh_fix_that_repeats_the_prompt_is_an_error(tmp_path):
    rows = [{"prompt": f"\n\nHuman: {q}\n\nAssistant:", "chosen": f"\n\nHuman: {q}\n\nAssistant: {g}",
             "rejected": f"\n\nHuman: {q}\n\nAssistant: {b}"} for q, g, b in zip(QUESTIONS, GOOD, BAD)]
    rows[0] = {"prompt": QUESTIONS[0], "chosen": GOOD[0], "rejected": BAD[0]}
    path = write(tmp_path / "naive.jsonl", rows)
    with pytest.raises(PreferenceDataError) as info:
        load_preferences(path)
    assert str(info.value).startswith(f"{path}: row 1, field 'chosen': the answer repeats its whole prompt")
    assert info.value.kind == "prompt_repeated"


def test_dialogue_whose_user_turn_is_not_the_prompt_is_refused(tmp_path):
    row = {"prompt": "What is 2 + 3?", "chosen": [user("Something else"), bot("Five.")],
           "rejected": [user("Something else"), bot("Six.")]}
    with pytest.raises(PreferenceDataError, match="row 0, field 'chosen': the answer opens with a user turn"):
        load_preferences(write(tmp_path / "p.jsonl", [row]))


def test_answers_holding_a_user_turn_are_still_refused(tmp_path):
    row = {"chosen": [user("Hi"), bot("Hello"), user("More?"), bot("Yes")], "rejected": [user("Hi"), bot("Go.")]}
    with pytest.raises(PreferenceDataError, match="row 0, field 'chosen': message 1 has role 'user'"):
        load_preferences(write(tmp_path / "p.jsonl", [row]))


def test_no_shared_opening_is_a_missing_prompt(tmp_path):
    with pytest.raises(PreferenceDataError, match="row 0, field 'prompt': no 'prompt' column"):
        load_preferences(write(tmp_path / "p.jsonl", [{"chosen": "Yes", "rejected": "No"}]))


def test_file_problems_still_name_the_file(tmp_path):
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "q"}\n')[:12])
    with pytest.raises(PreferenceDataError, match="cut.jsonl.gz: cannot read file"):
        load_preferences(tmp_path / "cut.jsonl.gz")
    with pytest.raises(PreferenceDataError, match="a file holds one split"):
        load_preferences(write(tmp_path / "p.jsonl", [LAYOUTS["trl-ultrafeedback"][0](0)]), split="test")


# ---------------------------------------------------------------------------- folders: splits and configs


def hub_folder(tmp_path, name="prefs_repo"):
    """A folder laid out like a hub dataset: two configs, the default one with H4-style splits."""
    root = tmp_path / name
    (root / "data").mkdir(parents=True)
    (root / "pairs").mkdir()
    h4, trl = LAYOUTS["h4-ultrafeedback"][0], LAYOUTS["trl-ultrafeedback"][0]
    pd.DataFrame([h4(i) for i in range(4)]).to_parquet(root / "data" / "train_prefs-00000-of-00001.parquet")
    pd.DataFrame([h4(i) for i in range(4, 6)]).to_parquet(root / "data" / "test_prefs-00000-of-00001.parquet")
    pd.DataFrame([trl(i) for i in range(3)]).to_parquet(root / "pairs" / "train-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_prefs\n    path: data/train_prefs-*\n"
        "  - split: test_prefs\n    path: data/test_prefs-*\n- config_name: pairs\n  data_files:\n  - split: train\n"
        "    path: pairs/train-*\n---\n# A test folder\n")
    return root


def test_folder_split_is_chosen_and_said(tmp_path, capsys):
    root = hub_folder(tmp_path)
    cache = str(tmp_path / "cache")
    ds = load_preferences(root, cache_dir=cache)
    assert ds.to_list() == [canonical(i) for i in range(4)]
    out = capsys.readouterr().out
    assert "split: chose 'train_prefs' of train_prefs, test_prefs" in out and f"layout: {DIALOGUES}" in out
    assert load_preferences(root, split="test_prefs", cache_dir=cache).to_list() == [canonical(4), canonical(5)]
    pairs = load_preferences(root, config="pairs", cache_dir=cache)
    assert pairs.to_list() == [canonical(i) for i in range(3)] and f"layout: {IMPLICIT}" in capsys.readouterr().out


def test_wrong_split_or_config_lists_what_exists(tmp_path):
    root = hub_folder(tmp_path)
    with pytest.raises(PreferenceDataError, match="no split 'train'; this dataset has: train_prefs, test_prefs"):
        load_preferences(root, split="train", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(PreferenceDataError, match="no config 'nope'; this dataset has: default, pairs"):
        load_preferences(root, config="nope", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(PreferenceDataError, match="cannot open as a dataset folder or hub id"):
        load_preferences(tmp_path / "no_such_folder")


def test_folder_named_orca_dpo_pairs_with_another_layout_is_detected(tokenizer, tiny_preset, tmp_path, capsys,
                                                                     monkeypatch):
    """HuggingFaceH4/orca_dpo_pairs-like data under an orca_dpo_pairs name: not forced through Intel's converter."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root = hub_folder(tmp_path, "orca_dpo_pairs")
    train, test = load_training_data(str(root), tiny_preset, tokenizer, split="train_prefs")
    assert len(train) + len(test) == 4 and f"layout: {DIALOGUES}" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the CLI, end to end


@pytest.mark.parametrize("layout_id, suffix", [("hh-rlhf", ".jsonl.gz"), ("trl-ultrafeedback", ".parquet"),
                                               ("h4-ultrafeedback", ".csv"), ("intel-orca", ".json"),
                                               ("argilla-orca", ".jsonl"), ("truthy", ".parquet.gz"),
                                               ("sharegpt", ".jsonl")])
def test_cli_trains_on_each_layout(tmp_path, capsys, layout_id, suffix):
    make, layout, _, _ = LAYOUTS[layout_id]
    path = write(tmp_path / f"mine{suffix}", [make(i) for i in range(6)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DroppedRowsWarning)  # nothing may be dropped on the way
        metrics = main(["--preset", "tiny", "--dataset", str(path), "--max-steps", "1",
                        "--output-dir", str(tmp_path / "out")])
    assert metrics["global_step"] == 1
    out = capsys.readouterr().out
    assert f"[data] {path}: 6 rows, layout: {layout}" in out and "6 of 6 pairs ready" in out


def test_cli_split_and_config_reach_the_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root = hub_folder(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "tiny", "--dataset", str(root), "--split", "bogus", "--output-dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "no split 'bogus'; this dataset has: train_prefs, test_prefs" in capsys.readouterr().err
    metrics = main(["--preset", "tiny", "--dataset", str(root), "--config", "pairs", "--max-steps", "1",
                    "--output-dir", str(tmp_path / "out")])
    assert metrics["global_step"] == 1 and f"layout: {IMPLICIT}" in capsys.readouterr().out


def test_read_preferences_keeps_bad_rows_for_the_validator(tmp_path):
    rows = [LAYOUTS["hh-rlhf"][0](0), {"chosen": "Yes", "rejected": "No"}, LAYOUTS["hh-rlhf"][0](1)]
    converted = read_preferences(write(tmp_path / "p.jsonl", rows))
    assert isinstance(converted.rows[1], PreferenceDataError) and converted.rows[0] == canonical(0)
