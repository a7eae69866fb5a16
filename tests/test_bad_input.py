"""Malformed preference data through the entry points that come after the loaders.

``test_data.py`` already runs the corpus (``bad_corpus.py``) through ``validate_preferences``
and the file loaders. Here the same rows go through the training builder, the training CLI
and the hub loader, plus what only a file or a tokenizer can show: a truncated JSON line,
invalid UTF-8, an empty file, an unreadable path, a dataset mixing plain and conversational
rows, and rows longer than ``max_length``. Every case must end in a clear error naming
source, row and field, or (``on_error="drop"``) in a report that lists every dropped row.
"""

import json
import warnings

import pytest
from datasets import Dataset

from bad_corpus import BAD_IDS, BAD_ROWS, chat, plain
from course_utils.data import DroppedRowsWarning, PreferenceDataError, load_hub_preferences
from course_utils.models import load_model
from course_utils.prepare import PreparedData, TruncatedRowsWarning, prepare_preferences
from course_utils.train import build_trainer, main

LONG_PROMPT = "word " * 200  # ~200 tokens: more than the tiny preset's max_length of 128


@pytest.fixture(scope="module")
def tiny():
    """For tests where build_trainer fails before it touches the model (a built trainer wraps it in LoRA)."""
    return load_model("tiny", seed=0)


# --- the training builder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id, bad, field, kind, words", BAD_ROWS, ids=BAD_IDS)
def test_build_trainer_names_row_and_field(tiny, tiny_preset, tmp_path, case_id, bad, field, kind, words):
    """A list of rows with one bad row: the error comes from us, before TRL or Arrow see the data."""
    model, tokenizer = tiny
    with pytest.raises(PreferenceDataError) as info:
        build_trainer(tiny_preset, model, tokenizer, [plain(0), bad, plain(2)], output_dir=tmp_path)
    assert str(info.value).startswith("train_dataset: row 1")
    assert (info.value.row, info.value.field, info.value.kind) == (1, field, kind)
    assert words in str(info.value)


@pytest.mark.parametrize("case_id, bad, field, kind, words", BAD_ROWS, ids=BAD_IDS)
def test_prepare_drops_and_reports_each_case(tokenizer, case_id, bad, field, kind, words):
    """What build_trainer(on_error="drop") keeps and reports, case by case."""
    with pytest.warns(DroppedRowsWarning):
        prepared = prepare_preferences([plain(0), bad, plain(2)], tokenizer, 128, on_error="drop")
    assert prepared.dataset.to_list() == [plain(0), plain(2)]
    (record,) = prepared.dropped
    assert (record.row, record.field, record.kind) == (1, field, kind)


def test_build_trainer_drop_mode_keeps_good_rows_and_reports_all(tiny_preset, tmp_path):
    model, tokenizer = load_model("tiny", seed=0)
    rows = [plain(0)] + [case[1] for case in BAD_ROWS] + [plain(1), chat(2),
                                                          {"prompt": LONG_PROMPT, "chosen": "a", "rejected": "b"}]
    with pytest.warns(DroppedRowsWarning):
        trainer = build_trainer(tiny_preset, model, tokenizer, rows, output_dir=tmp_path, on_error="drop")
    report = trainer.data_reports["train"]
    assert len(trainer.train_dataset) == 2 and report.dataset.to_list() == [plain(0), plain(1)]
    assert [r.row for r in report.dropped] == list(range(1, len(rows) - 3)) + [len(rows) - 2, len(rows) - 1]
    assert report.dropped.counts()["format_mismatch"] == 1 and report.dropped.counts()["too_long"] == 1
    assert len(report.dropped) + 2 == report.dropped.total == len(rows)  # nothing lost unreported


def test_build_trainer_accepts_a_dataset_with_bad_values(tiny, tiny_preset, tmp_path):
    """Arrow-typed data (a ``datasets.Dataset``) with a None, an empty text and a duplicate answer."""
    model, tokenizer = tiny
    rows = [plain(0), {**plain(1), "chosen": None}, {**plain(2), "rejected": "  "}, {**plain(3), "rejected": "Good answer 3."},
            plain(4)]
    ds = Dataset.from_list(rows)
    with pytest.raises(PreferenceDataError, match="train_dataset: row 1, field 'chosen': value is None"):
        build_trainer(tiny_preset, model, tokenizer, ds, output_dir=tmp_path)
    with pytest.raises(PreferenceDataError, match="eval_dataset: row 1"):
        build_trainer(tiny_preset, model, tokenizer, Dataset.from_list([plain(0)]), ds, output_dir=tmp_path)
    with pytest.warns(DroppedRowsWarning, match="null: 1, empty_text: 1, identical: 1"):
        trainer = build_trainer(tiny_preset, load_model("tiny", seed=0)[0], tokenizer, ds, output_dir=tmp_path,
                                on_error="drop")
    assert len(trainer.train_dataset) == 2


def test_a_datasetdict_is_refused_with_a_hint(tiny, tiny_preset, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(PreferenceDataError, match="pass one split"):
        build_trainer(tiny_preset, model, tokenizer, {"train": [plain(0)]}, output_dir=tmp_path)


# --- lengths ----------------------------------------------------------------------------------------------


def test_prompt_that_fills_max_length_is_an_error_not_a_silent_drop(tiny, tiny_preset, tmp_path):
    """TRL would silently filter this row out; we say so."""
    model, tokenizer = tiny
    rows = [plain(0), {"prompt": LONG_PROMPT, "chosen": "Yes.", "rejected": "No."}, plain(2)]
    with pytest.raises(PreferenceDataError) as info:
        build_trainer(tiny_preset, model, tokenizer, rows, output_dir=tmp_path)
    assert (info.value.row, info.value.field, info.value.kind) == (1, "prompt", "too_long")
    assert "max_length=128" in str(info.value) and "Raise max_length" in str(info.value)


def test_over_long_answers_follow_on_long(tokenizer):
    long_answer = {"prompt": "Q?", "chosen": "yes " * 200, "rejected": "no " * 3}
    rows = [plain(0), long_answer, plain(2)]
    with pytest.warns(TruncatedRowsWarning, match="1 row\\(s\\) longer than max_length=128"):
        kept = prepare_preferences(rows, tokenizer, 128)
    assert len(kept.dataset) == 3 and [t.row for t in kept.truncated] == [1]
    assert kept.truncated[0].tokens_cut > 0 and "truncated at max_length=128" in kept.summary()
    with pytest.warns(DroppedRowsWarning, match="truncated: 1"):
        dropped = prepare_preferences(rows, tokenizer, 128, on_long="drop")
    assert len(dropped.dataset) == 2 and dropped.dropped[0].row == 1
    with pytest.raises(PreferenceDataError, match="row 1, field 'chosen': the longer answer loses its last"):
        prepare_preferences(rows, tokenizer, 128, on_long="raise")


def test_answers_that_differ_only_after_the_cut_carry_no_signal(tokenizer):
    same_start = "same " * 150
    rows = [plain(0), {"prompt": "Q?", "chosen": same_start + "good", "rejected": same_start + "bad"}]
    with pytest.raises(PreferenceDataError) as info:
        prepare_preferences(rows, tokenizer, 128)
    assert (info.value.row, info.value.kind) == (1, "identical_after_truncation")


def test_clean_data_passes_untouched(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        prepared = prepare_preferences([plain(i) for i in range(5)], tokenizer, 128)
    assert isinstance(prepared, PreparedData) and prepared.dataset.to_list() == [plain(i) for i in range(5)]
    assert prepared.summary() == "train_dataset: 5 of 5 pairs ready"


# --- the command line -------------------------------------------------------------------------------------


def _bad_file(tmp_path):
    """A JSONL file with every file-representable corpus row, a truncated line, raw invalid UTF-8,
    a conversational row in a plain file, a too-long prompt, between good rows."""
    good = [plain(i) for i in range(8)]
    bad = [json.dumps(case[1]).encode() for case in BAD_ROWS if case[0] not in ("bad-bytes", "surrogate")]
    bad += [json.dumps(plain(90)).encode()[:30],  # truncated line
            b'{"prompt": "q", "chosen": "caf\xe9", "rejected": "b"}',  # Latin-1 byte in a UTF-8 file
            json.dumps(chat(91)).encode(),
            json.dumps({"prompt": LONG_PROMPT, "chosen": "a", "rejected": "b"}).encode()]
    lines = [json.dumps(g).encode() for g in good[:4]] + bad + [json.dumps(g).encode() for g in good[4:]]
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, len(lines), len(bad)


def test_cli_raise_mode_gives_one_clear_line(tmp_path, capsys):
    path, _, _ = _bad_file(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "tiny", "--dataset", str(path), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: row 4: expected a dict")  # the first bad row: the corpus's not-a-dict
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_cli_drop_mode_trains_on_the_rest_and_reports_every_row(tmp_path, capsys):
    path, total, n_bad = _bad_file(tmp_path)
    with pytest.warns(DroppedRowsWarning) as caught:
        metrics = main(["--preset", "tiny", "--dataset", str(path), "--output-dir", str(tmp_path / "out"),
                        "--on-error", "drop", "--max-steps", "2"])
    assert metrics["global_step"] == 2
    out = capsys.readouterr().out
    assert f"{path}: {total - n_bad} of {total} pairs ready" in out
    report = str(caught[0].message)
    assert f"dropped {n_bad} of {total} rows from {path}" in report
    for kind in ("invalid_json", "undecodable", "format_mismatch", "too_long", "missing_field", "identical"):
        assert kind in report
    assert report.count("\n  row ") == min(n_bad, 20)  # one line per dropped row (the first 20, then a count)


@pytest.mark.parametrize("name, content, words", [
    ("empty.jsonl", b"", "file is empty"),
    ("blank.jsonl", b"\n \n", "file is empty"),
    ("missing.jsonl", None, "cannot read file"),
    ("notes.txt", b"hello", "unsupported file type"),
])
def test_cli_file_problems(tmp_path, capsys, name, content, words):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "tiny", "--dataset", str(path), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and words in err


def test_cli_directory_is_unreadable(tmp_path, capsys):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--dataset", str(folder), "--output-dir", str(tmp_path / "out")])
    assert "cannot read file" in capsys.readouterr().err


def test_cli_bad_set_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "tiny", "--set", "max_stepz=3"])
    assert exit_info.value.code == 2 and "expected FIELD=VALUE" in capsys.readouterr().err


# --- the hub loader ---------------------------------------------------------------------------------------


def test_hub_layout_with_mixed_types_is_reported_per_row(tmp_path):
    """JSON lines in a hub-style repo folder: datasets reads mixed types; we still name each bad row."""
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    rows = [plain(0), {"prompt": 7, "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": {"x": 1},
                                                                      "rejected": "b"}, plain(3)]
    (root / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cache = str(tmp_path / "cache")
    with pytest.raises(PreferenceDataError, match=f"{root}: row 1, field 'prompt': expected text, got int"):
        load_hub_preferences(str(root), cache_dir=cache)
    with pytest.warns(DroppedRowsWarning, match="dropped 2 of 4"):
        ds = load_hub_preferences(str(root), cache_dir=cache, on_error="drop")
    assert ds.to_list() == [plain(0), plain(3)]
