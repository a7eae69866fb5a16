"""Tests for course_utils.data: the preference schema, its validator and the loaders.

Every bad-row kind is checked in both modes: ``raise`` must name the row and field (and the
file when loaded from one); ``drop`` must report every dropped row and keep the rest in order.
"""

import json
import warnings

import pandas as pd
import pytest

from course_utils.data import (
    DropReport,
    DroppedRowsWarning,
    PreferenceDataError,
    length_stats,
    load_hub_preferences,
    load_orca_dpo_pairs,
    load_preference_file,
    orca_to_preference,
    to_dataset,
    train_test_split,
    validate_preferences,
)
from course_utils.templates import completion_end

from bad_corpus import BAD_IDS, BAD_ROWS, assistant, chat, plain, user  # noqa: F401


@pytest.fixture
def tok(tokenizer):
    """The real SmolLM2 tokenizer and chat template (conftest's session-wide ``tokenizer``)."""
    return tokenizer




# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("case_id, bad, field, kind, words", BAD_ROWS, ids=BAD_IDS)
def test_bad_row_raises_naming_row_and_field(case_id, bad, field, kind, words):
    rows = [plain(0), bad, plain(2)]
    with pytest.raises(PreferenceDataError) as info:
        validate_preferences(rows, source="prefs.jsonl")
    err = info.value
    assert (err.source, err.row, err.field, err.kind) == ("prefs.jsonl", 1, field, kind)
    expected_where = "prefs.jsonl: row 1" + (f", field '{field}': " if field else ": ")
    assert str(err).startswith(expected_where)
    assert words in err.reason


@pytest.mark.parametrize("case_id, bad, field, kind, words", BAD_ROWS, ids=BAD_IDS)
def test_bad_row_dropped_and_reported(case_id, bad, field, kind, words):
    rows = [plain(0), bad, plain(2), bad, plain(4)]
    with pytest.warns(DroppedRowsWarning, match="dropped 2 of 5 rows"):
        clean, report = validate_preferences(rows, on_error="drop")
    assert clean == [plain(0), plain(2), plain(4)]  # survivors, in their original order
    assert [(r.row, r.field, r.kind) for r in report] == [(1, field, kind), (3, field, kind)]
    assert all(words in r.reason for r in report)


def test_error_message_reads_like_the_docs():
    rows = [plain(i) for i in range(7)] + [{"prompt": "q", "chosen": "   ", "rejected": "b"}]
    with pytest.raises(PreferenceDataError) as info:
        validate_preferences(rows, source="prefs.jsonl")
    assert str(info.value) == "prefs.jsonl: row 7, field 'chosen': empty or whitespace-only text"


def test_raise_mode_stops_at_the_first_bad_row():
    rows = [plain(0), {"prompt": "q", "chosen": "", "rejected": "b"}, {"prompt": None, "chosen": "a", "rejected": "b"}]
    with pytest.raises(PreferenceDataError) as info:
        validate_preferences(rows)
    assert (info.value.row, info.value.kind) == (1, "empty_text")


def test_dataset_must_use_one_format_named_by_first_differing_row():
    rows = [plain(0), plain(1), chat(2), plain(3), chat(4)]
    with pytest.raises(PreferenceDataError) as info:
        validate_preferences(rows)
    assert (info.value.row, info.value.kind) == (2, "format_mismatch")
    assert "row 0 is plain text" in str(info.value)
    with pytest.warns(DroppedRowsWarning):
        clean, report = validate_preferences(rows, on_error="drop")
    assert clean == [plain(0), plain(1), plain(3)]
    assert [r.row for r in report] == [2, 4]


def test_first_valid_row_sets_the_format():
    # Row 0 is broken, so the conversational row 1 decides; the plain row 2 is the odd one out.
    rows = [{"prompt": "q"}, chat(1), plain(2)]
    with pytest.warns(DroppedRowsWarning):
        clean, report = validate_preferences(rows, on_error="drop")
    assert clean == [chat(1)]
    assert [(r.row, r.kind) for r in report] == [(0, "missing_field"), (2, "format_mismatch")]


def test_clean_rows_keep_only_the_schema_and_warn_nothing():
    rows = [{**plain(0), "id": 17, "source": "x"}, {**chat(1), "meta": None}]
    rows[1]["chosen"] = [{"role": "assistant", "content": "Good.", "name": "bot"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped -> no warning
        clean, report = validate_preferences(rows[:1])
        clean_chat, _ = validate_preferences(rows[1:])
    assert clean == [plain(0)] and len(report) == 0 and report.total == 1
    assert clean_chat[0]["chosen"] == [{"role": "assistant", "content": "Good."}]  # extra message keys dropped
    assert set(clean_chat[0]) == {"prompt", "chosen", "rejected"}


def test_valid_utf8_bytes_are_decoded():
    clean, _ = validate_preferences([{"prompt": b"caf\xc3\xa9?", "chosen": "a", "rejected": "b"}])
    assert clean[0]["prompt"] == "café?"


def test_report_counts_and_summary():
    rows = [plain(0), {"prompt": "q", "chosen": "", "rejected": "b"}, 3, {"prompt": "q", "chosen": "", "rejected": "c"}]
    with pytest.warns(DroppedRowsWarning):
        _, report = validate_preferences(rows, on_error="drop", source="x.json")
    assert isinstance(report, DropReport)
    assert report.counts() == {"empty_text": 2, "not_a_dict": 1}
    assert report.summary() == "dropped 3 of 4 rows from x.json (empty_text: 2, not_a_dict: 1)"
    lines = str(report).splitlines()
    assert lines[1:] == [
        "  row 1, field 'chosen': empty or whitespace-only text",
        "  row 2: expected a dict with fields prompt, chosen, rejected, got int",
        "  row 3, field 'chosen': empty or whitespace-only text",
    ]


@pytest.mark.parametrize("call", [
    lambda: validate_preferences([plain(0)], on_error="skip"),
    lambda: load_preference_file("whatever.jsonl", on_error="ignore"),
])
def test_invalid_on_error_is_a_value_error(call):
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'drop'") as info:
        call()
    assert not isinstance(info.value, PreferenceDataError)


def test_to_dataset_and_split():
    ds = to_dataset([plain(i) for i in range(10)])
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 10
    with pytest.raises(PreferenceDataError):
        to_dataset([plain(0), {"prompt": "q"}])
    split = train_test_split(ds, test_size=0.2, seed=0)
    assert (len(split["train"]), len(split["test"])) == (8, 2)
    assert split["test"]["prompt"] == train_test_split(ds, test_size=0.2, seed=0)["test"]["prompt"]  # seeded


# ---------------------------------------------------------------------------- files


def write(path, rows, fmt):
    """Write rows in one of the supported layouts."""
    if fmt == "json-list":
        path.write_text(json.dumps(rows))
    elif fmt == "json-data":
        path.write_text(json.dumps({"data": rows}))
    elif fmt in ("jsonl", "json-lines"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    return path


FILE_FORMATS = [("json-list", ".json"), ("json-data", ".json"), ("json-lines", ".json"), ("jsonl", ".jsonl"),
                ("csv", ".csv"), ("parquet", ".parquet")]
# CSV holds plain-text rows only.
ROUND_TRIPS = [(fmt, suffix, make) for fmt, suffix in FILE_FORMATS for make in (plain, chat)
               if not (fmt == "csv" and make is chat)]


@pytest.mark.parametrize("fmt, suffix, make", ROUND_TRIPS, ids=[f"{f}-{m.__name__}" for f, _, m in ROUND_TRIPS])
def test_file_round_trip(tmp_path, fmt, suffix, make):
    rows = [{**make(i), "extra": i} for i in range(3)]
    ds = load_preference_file(write(tmp_path / f"prefs{suffix}", rows, fmt))
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds.to_list() == [make(i) for i in range(3)]


@pytest.mark.parametrize("case_id, bad, field, kind, words",
                         [c for c in BAD_ROWS if c[0] != "bad-bytes"],  # JSON cannot hold raw bytes
                         ids=[i for i in BAD_IDS if i != "bad-bytes"])
def test_bad_row_in_a_file_names_the_file(tmp_path, case_id, bad, field, kind, words):
    path = write(tmp_path / "prefs.jsonl", [plain(0), plain(1), bad, plain(3)], "jsonl")
    with pytest.raises(PreferenceDataError) as info:
        load_preference_file(path)
    assert str(info.value).startswith(f"{path}: row 2")
    assert (info.value.field, info.value.kind) == (field, kind)
    with pytest.warns(DroppedRowsWarning, match="prefs.jsonl"):
        ds = load_preference_file(path, on_error="drop")
    assert ds.to_list() == [plain(0), plain(1), plain(3)]


def jsonl_with_truncated_line(tmp_path):
    lines = [json.dumps(plain(0)), "", json.dumps(plain(1)), json.dumps(plain(2))[:25], json.dumps(plain(3))]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path  # the truncated line is row 2 (blank lines are not rows) on line 4


def test_truncated_jsonl_line_raises_with_row_and_line(tmp_path):
    path = jsonl_with_truncated_line(tmp_path)
    with pytest.raises(PreferenceDataError) as info:
        load_preference_file(path)
    assert str(info.value).startswith(f"{path}: row 2 (line 4): invalid JSON")
    assert (info.value.row, info.value.line, info.value.kind) == (2, 4, "invalid_json")


def test_truncated_jsonl_line_dropped_in_drop_mode(tmp_path):
    with pytest.warns(DroppedRowsWarning):
        ds = load_preference_file(jsonl_with_truncated_line(tmp_path), on_error="drop")
    assert ds.to_list() == [plain(0), plain(1), plain(3)]


def test_undecodable_bytes_in_jsonl_are_a_row_error(tmp_path):
    path = tmp_path / "prefs.jsonl"
    bad = json.dumps(plain(1)).encode().replace(b"Good", b"G\xf6od")  # Latin-1 'ö' is not UTF-8
    path.write_bytes(json.dumps(plain(0)).encode() + b"\n" + bad + b"\n")
    with pytest.raises(PreferenceDataError, match=r"row 1, field 'chosen': undecodable text") as info:
        load_preference_file(path)
    assert info.value.kind == "undecodable"


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("content", [b"", b"\n  \n"], ids=["zero-bytes", "blank"])
def test_empty_file(tmp_path, suffix, content):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(content)
    with pytest.raises(PreferenceDataError, match="file is empty") as info:
        load_preference_file(path, on_error="drop")  # file-level problems raise even when dropping
    assert info.value.source == str(path)


@pytest.mark.parametrize("text, message", [
    ("[]", "file has no rows"),
    ('[{"prompt": "q", "chosen": "a",\n "rejected": ', "invalid JSON"),
    ('"just a string"', "expected a list of rows"),
])
def test_bad_json_files(tmp_path, text, message):
    path = tmp_path / "prefs.json"
    path.write_text(text)
    with pytest.raises(PreferenceDataError, match=message) as info:
        load_preference_file(path)
    assert str(info.value).startswith(str(path))


def test_missing_path_and_directory_and_suffix(tmp_path):
    with pytest.raises(PreferenceDataError, match="cannot read file") as info:
        load_preference_file(tmp_path / "nope.jsonl")
    assert str(tmp_path / "nope.jsonl") in str(info.value)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(PreferenceDataError, match="cannot read file"):
        load_preference_file(tmp_path / "dir.json")
    with pytest.raises(PreferenceDataError, match="unsupported file type '.txt'"):
        load_preference_file(tmp_path / "prefs.txt")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_missing_column_names_it(tmp_path, fmt):
    rows = [{"prompt": "q", "choosen": "a", "rejected": "b"}]
    path = write(tmp_path / f"prefs.{fmt}", rows, fmt)
    with pytest.raises(PreferenceDataError) as info:
        load_preference_file(path, on_error="drop")
    assert str(info.value) == f"{path}: field 'chosen': missing column 'chosen' (found 'choosen' — a typo?)"
    assert (info.value.field, info.value.kind) == ("chosen", "missing_column")


def test_csv_empty_cell_and_bad_bytes_are_row_errors(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_bytes(b"prompt,chosen,rejected\nq0,a0,b0\nq1,,b1\nq2,caf\xe9,b2\nq3,a3,b3\n")
    with pytest.warns(DroppedRowsWarning):
        ds = load_preference_file(path, on_error="drop")
    assert ds["prompt"] == ["q0", "q3"]
    with pytest.raises(PreferenceDataError, match=r"row 1, field 'chosen': empty"):
        load_preference_file(path)


def test_parquet_binary_column_with_bad_utf8(tmp_path):
    pd.DataFrame({"prompt": [b"q0", b"q1"], "chosen": [b"a0", b"\xff"], "rejected": [b"b0", b"b1"]}).to_parquet(
        tmp_path / "prefs.parquet")
    with pytest.raises(PreferenceDataError, match=r"row 1, field 'chosen': undecodable text: byte 0xff"):
        load_preference_file(tmp_path / "prefs.parquet")


def test_corrupt_parquet(tmp_path):
    (tmp_path / "prefs.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(PreferenceDataError, match="cannot parse as PARQUET"):
        load_preference_file(tmp_path / "prefs.parquet")


def test_all_rows_dropped_is_an_error(tmp_path):
    path = write(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "", "rejected": "b"}], "jsonl")
    with pytest.warns(DroppedRowsWarning), pytest.raises(PreferenceDataError, match="no valid rows left"):
        load_preference_file(path, on_error="drop")


# ---------------------------------------------------------------------------- orca and the hub

ORCA = [
    {"system": "", "question": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"system": "You are a terse tutor.", "question": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
    {"system": "", "question": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]


def hub_dir(tmp_path, rows, with_readme=True):
    """A local directory laid out like the hub repo of Intel/orca_dpo_pairs."""
    root = tmp_path / "orca_dpo_pairs"
    (root / "data").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / "data" / "train-00000-of-00001.parquet")
    if with_readme:
        (root / "README.md").write_text(
            "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
            "    path: data/train-*\n---\n# orca_dpo_pairs (test copy)\n")
    return str(root)


def test_orca_prompt_is_the_templates_own_output(tok):
    with_system = orca_to_preference(ORCA[1], tok)
    messages = [{"role": "system", "content": ORCA[1]["system"]}, {"role": "user", "content": ORCA[1]["question"]}]
    assert with_system["prompt"] == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "You are a terse tutor." in with_system["prompt"]

    no_system = orca_to_preference(ORCA[0], tok)
    user_only = [{"role": "user", "content": ORCA[0]["question"]}]
    assert no_system["prompt"] == tok.apply_chat_template(user_only, tokenize=False, add_generation_prompt=True)
    # An empty system is left out, not rendered as an empty system turn.
    empty_turn = [{"role": "system", "content": ""}] + user_only
    assert no_system["prompt"] != tok.apply_chat_template(empty_turn, tokenize=False, add_generation_prompt=True)


def test_orca_answer_ends_like_a_template_turn(tok):
    row = orca_to_preference(ORCA[1], tok)
    assert row["chosen"] == "Paris." + completion_end(tok)
    # prompt + chosen is the template's rendering of the full conversation, up to what follows EOS.
    messages = [{"role": "system", "content": ORCA[1]["system"]}, {"role": "user", "content": ORCA[1]["question"]},
                {"role": "assistant", "content": "Paris."}]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full.startswith(row["prompt"] + row["chosen"])
    assert row["chosen"].endswith(tok.eos_token)  # so TRL adds no second EOS


def test_orca_as_messages(tok):
    row = orca_to_preference(ORCA[1], tok, as_messages=True)
    assert row == {
        "prompt": [{"role": "system", "content": "You are a terse tutor."},
                   {"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
    }
    assert orca_to_preference(ORCA[0], tok, as_messages=True)["prompt"] == user("What is 2+2?")


@pytest.mark.parametrize("row, field, kind", [
    ({"system": "", "question": "q", "chosen": "", "rejected": "b"}, "chosen", "empty_text"),
    ({"system": "", "questions": "q", "chosen": "a", "rejected": "b"}, "question", "missing_field"),
    ({"system": 3, "question": "q", "chosen": "a", "rejected": "b"}, "system", "wrong_type"),
])
def test_orca_bad_rows(tok, row, field, kind):
    with pytest.raises(PreferenceDataError) as info:
        orca_to_preference(row, tok)
    assert (info.value.field, info.value.kind) == (field, kind)


@pytest.mark.parametrize("with_readme", [True, False], ids=["readme-configs", "plain-layout"])
def test_load_orca_through_load_dataset_offline(tok, tmp_path, with_readme):
    root = hub_dir(tmp_path, ORCA, with_readme)
    ds = load_orca_dpo_pairs(tok, path_or_id=root, cache_dir=str(tmp_path / "cache"))
    assert ds.to_list() == [orca_to_preference(r, tok) for r in ORCA]
    chat_ds = load_orca_dpo_pairs(tok, path_or_id=root, limit=2, as_messages=True, cache_dir=str(tmp_path / "cache"))
    assert len(chat_ds) == 2 and chat_ds[1]["chosen"] == [{"role": "assistant", "content": "Paris."}]


def test_load_orca_bad_row_raise_and_drop(tok, tmp_path):
    rows = ORCA + [{"system": "", "question": "Same?", "chosen": "Yes", "rejected": "Yes"},
                   {"system": "", "question": "Empty?", "chosen": "ok", "rejected": " "}]
    root = hub_dir(tmp_path, rows)
    with pytest.raises(PreferenceDataError) as info:
        load_orca_dpo_pairs(tok, path_or_id=root, cache_dir=str(tmp_path / "cache"))
    assert str(info.value).startswith(f"{root}: row 3, field 'rejected': identical")
    with pytest.warns(DroppedRowsWarning, match="dropped 2 of 5 rows"):
        ds = load_orca_dpo_pairs(tok, path_or_id=root, on_error="drop", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 3


def test_load_hub_preferences_canonical_and_errors(tmp_path):
    root = tmp_path / "prefs_repo"
    (root / "data").mkdir(parents=True)
    pd.DataFrame([plain(i) for i in range(4)]).to_parquet(root / "data" / "train-00000-of-00001.parquet")
    cache = str(tmp_path / "cache")
    assert load_hub_preferences(str(root), cache_dir=cache).to_list() == [plain(i) for i in range(4)]
    with pytest.raises(PreferenceDataError, match="cannot load split 'test'"):
        load_hub_preferences(str(root), split="test", cache_dir=cache)
    with pytest.raises(PreferenceDataError, match="missing column 'prompt'"):
        load_hub_preferences(hub_dir(tmp_path, ORCA), cache_dir=cache)  # orca columns need convert=
    with pytest.raises(PreferenceDataError, match="cannot load split"):
        load_hub_preferences(str(tmp_path / "no_such_dir"), cache_dir=cache)


# ---------------------------------------------------------------------------- lengths


def test_length_stats_hand_counted(tok):
    # Token counts under TRL's rules (EOS appended): "Hi there" = [Hi, ' there'];
    # "Hello!" -> [Hello, !, EOS]; "Go." -> [Go, ., EOS]; "Go away." -> [Go, ' away', ., EOS].
    rows = [
        {"prompt": "Hi there", "chosen": "Hello!", "rejected": "Go."},  # 2 | 3 | 3
        {"prompt": "Hi there", "chosen": "Hello!", "rejected": "Go away."},  # 2 | 3 | 4
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},  # 1 | 3 | 4
    ]
    stats = length_stats(to_dataset(rows), tok)
    assert stats["prompt"] == {"count": 3, "mean": 5 / 3, "median": 2.0, "p95": 2.0, "max": 2}
    assert stats["rejected"] == {"count": 3, "mean": 11 / 3, "median": 4.0, "p95": 4.0, "max": 4}
    # prompt+chosen = [5, 5, 4]; p95 interpolates between the sorted 4, 5, 5 -> 5.
    assert stats["prompt+chosen"] == {"count": 3, "mean": 14 / 3, "median": 5.0, "p95": 5.0, "max": 5}
    assert stats["prompt+rejected"]["max"] == 6


def test_length_stats_conversational(tok):
    # System default + "Hi there" renders to 32 prompt tokens; an answer turn adds "<|im_end|>" and "\n".
    row = {"prompt": user("Hi there"), "chosen": assistant("Hello!"), "rejected": assistant("Go away.")}
    stats = length_stats([row, row], tok)
    assert (stats["prompt"]["max"], stats["chosen"]["max"], stats["rejected"]["max"]) == (32, 4, 5)
    assert stats["prompt+rejected"]["mean"] == 37.0


# ---------------------------------------------------------------------------- gzip and converters' columns


@pytest.mark.parametrize("fmt, suffix", [("jsonl", ".jsonl.gz"), ("csv", ".csv.gz"), ("json-list", ".json.gz")])
def test_gzipped_files_load(tmp_path, fmt, suffix):
    import gzip

    plain_path = write(tmp_path / f"prefs{suffix.removesuffix('.gz')}", [plain(i) for i in range(3)], fmt)
    path = tmp_path / f"prefs{suffix}"
    path.write_bytes(gzip.compress(plain_path.read_bytes()))
    assert load_preference_file(path).to_list() == [plain(i) for i in range(3)]


def test_orca_loader_refuses_another_layout_by_its_columns(tok, tmp_path):
    """A folder named like orca_dpo_pairs but holding prompt/chosen/rejected fails once, as a missing column."""
    with pytest.raises(PreferenceDataError) as info:
        load_orca_dpo_pairs(tok, path_or_id=hub_dir(tmp_path, [plain(i) for i in range(3)]), on_error="drop",
                            cache_dir=str(tmp_path / "cache"))
    assert (info.value.kind, info.value.field) == ("missing_column", "question")
