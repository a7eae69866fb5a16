"""Preference data: one schema, validated loaders, and token-length statistics.

The canonical schema
--------------------
A preference dataset is a list of rows. Each row is a dict with three fields:
``prompt`` (what the model is asked), ``chosen`` (the preferred answer) and
``rejected`` (the dispreferred one). A row uses one of two formats, and every row of
a dataset uses the same one:

* **plain text**: all three values are ``str``. The prompt is already formatted (chat
  template applied) and ends where the answer begins; each answer ends with the
  template's end-of-turn (see :func:`orca_to_preference`)::

      {"prompt": "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n",
       "chosen": "Hello!<|im_end|>", "rejected": "Go away.<|im_end|>"}

* **conversational** (TRL's term): each value is a list of messages
  ``{"role": ..., "content": str}``. The prompt may hold system, user and assistant
  turns and ends with a user turn; ``chosen`` and ``rejected`` are one or more assistant
  turns. TRL applies the chat template itself::

      {"prompt": [{"role": "user", "content": "Hi"}],
       "chosen": [{"role": "assistant", "content": "Hello!"}],
       "rejected": [{"role": "assistant", "content": "Go away."}]}

:func:`validate_preferences` checks rows against this schema; every loader here
(:func:`load_preferences`, :func:`load_preference_file`, :func:`load_hub_preferences`,
:func:`load_orca_dpo_pairs`) returns a validated ``datasets.Dataset`` with exactly these
three columns. :func:`load_preferences` is the one to start with: it takes a file, a folder
or a hub id in any layout of :mod:`course_utils.layouts` and says what it converted.
:func:`length_stats` (from :mod:`course_utils.templates`) counts their tokens as TRL does.
"""

from __future__ import annotations

import difflib
import gzip
import io
import json
import warnings
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from course_utils.templates import completion_end, length_stats  # noqa: F401 (length_stats: re-exported)

FIELDS = ("prompt", "chosen", "rejected")
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")  # each also gzipped (.jsonl.gz)
ROLES = ("system", "user", "assistant")
ORCA_ID = "Intel/orca_dpo_pairs"
ON_ERROR = ("raise", "drop")


class PreferenceDataError(ValueError):
    """A preference row or file is malformed; the message names file, row and field.

    ``kind`` is a short code for the problem, which :class:`DropReport` counts by. Rows:
    not_a_dict, missing_field, null, wrong_type, undecodable, empty_text, bad_message,
    mixed_format, identical, prompt_repeated, format_mismatch, invalid_json; from
    :mod:`course_utils.layouts`, unparsable_messages and prompt_mismatch; and, from the length rule of
    :mod:`course_utils.prepare`, too_long, identical_after_truncation, truncated. Files:
    unreadable, empty_file, missing_column.
    """

    def __init__(self, reason: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None, line: int | None = None, kind: str = "invalid"):
        self.reason, self.source, self.row, self.field, self.line, self.kind = reason, source, row, field, line, kind
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + _where(row, line, field) + reason)

    def at(self, source: str | None = None, row: int | None = None, field: str | None = None) -> PreferenceDataError:
        """The same error, located where it was not yet (locations already set are kept)."""
        return PreferenceDataError(self.reason, source=self.source or source, row=row if self.row is None else self.row,
                                   field=self.field or field, line=self.line, kind=self.kind)


class DroppedRowsWarning(UserWarning):
    """Emitted with the report's summary whenever ``on_error="drop"`` dropped rows."""


def _where(row: int | None, line: int | None, field: str | None) -> str:
    parts = [f"row {row}" + (f" (line {line})" if line else "")] if row is not None else []
    parts += [f"line {line}"] if row is None and line else []
    parts += [f"field {field!r}"] if field is not None else []
    return ", ".join(parts) + ": " if parts else ""


class DropRecord(NamedTuple):
    """One dropped row: where it was and why."""

    row: int | None
    field: str | None
    kind: str
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        return _where(self.row, self.line, self.field) + self.reason


class DropReport(list):
    """Every row dropped by ``on_error="drop"`` (a list of :class:`DropRecord`), so nothing disappears silently."""

    def __init__(self, records: Iterable[DropRecord] = (), total: int = 0, source: str | None = None):
        super().__init__(records)
        self.total = total  # rows seen, kept and dropped
        self.source = source

    def counts(self) -> dict[str, int]:
        """How many rows were dropped for each kind of problem."""
        return dict(Counter(r.kind for r in self))

    def summary(self) -> str:
        where = f" from {self.source}" if self.source else ""
        if not self:
            return f"kept all {self.total} rows{where}"
        kinds = ", ".join(f"{k}: {n}" for k, n in self.counts().items())
        return f"dropped {len(self)} of {self.total} rows{where} ({kinds})"

    def __str__(self) -> str:
        lines = [self.summary()] + [f"  {r}" for r in self[:20]]
        return "\n".join(lines + ([f"  ... and {len(self) - 20} more"] if len(self) > 20 else []))


class ValidationResult(NamedTuple):
    """Clean rows and the report of dropped ones; unpack as ``rows, report = ...``."""

    rows: list[dict]
    report: DropReport


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'drop', got {on_error!r}")


def _missing(name: str, keys: Iterable, noun: str = "field") -> str:
    """Reason for a missing field, pointing at a likely typo among the keys present."""
    present = [k for k in keys if isinstance(k, str)]
    close = difflib.get_close_matches(name, [k for k in present if k not in FIELDS], n=1, cutoff=0.6)
    if close:
        return f"missing {noun} {name!r} (found {close[0]!r} — a typo?)"
    return f"missing {noun} {name!r} (present: {', '.join(map(repr, present)) or 'none'})"


def _check_text(value: Any, what: str = "") -> str:
    """A non-empty, encodable ``str``; UTF-8 ``bytes`` are decoded. Raises PreferenceDataError."""
    if value is None:
        raise PreferenceDataError(f"{what}value is None", kind="null")
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise PreferenceDataError(f"{what}undecodable text: byte 0x{value[err.start]:02x} at position "
                                      f"{err.start} is not valid UTF-8", kind="undecodable") from None
    if not isinstance(value, str):
        raise PreferenceDataError(f"{what}expected text, got {type(value).__name__} {str(value)[:40]!r}",
                                  kind="wrong_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        # Lone surrogates are what errors="surrogateescape" makes of bytes that were not UTF-8.
        raise PreferenceDataError(f"{what}undecodable text: lone surrogate {value[err.start]!r} at position "
                                  f"{err.start} (the source was not valid UTF-8)", kind="undecodable") from None
    if not value.strip():
        raise PreferenceDataError(f"{what}empty or whitespace-only text", kind="empty_text")
    return value


def _check_messages(name: str, messages: list) -> list[dict]:
    """A valid list of chat messages for field ``name``, reduced to role and content."""
    if not messages:
        raise PreferenceDataError("empty list of messages", kind="empty_text")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise PreferenceDataError(f"message {i} is a {type(msg).__name__}, expected a dict with 'role' and "
                                      "'content'", kind="bad_message")
        for key in ("role", "content"):
            if key not in msg:
                raise PreferenceDataError(f"message {i}: " + _missing(key, msg, "key"), kind="bad_message")
        if msg["role"] not in ROLES:
            raise PreferenceDataError(f"message {i} has role {msg['role']!r}, expected one of {', '.join(ROLES)}",
                                      kind="bad_message")
        out.append({"role": msg["role"], "content": _check_text(msg["content"], f"message {i}: ")})
    roles = [m["role"] for m in out]
    if name == "prompt" and roles[-1] != "user":
        raise PreferenceDataError(f"the prompt must end with a user turn, not {roles[-1]!r}", kind="bad_message")
    if name != "prompt" and set(roles) != {"assistant"}:
        bad = next(i for i, r in enumerate(roles) if r != "assistant")
        raise PreferenceDataError(f"message {bad} has role {roles[bad]!r}; {name} must hold assistant turns only",
                                  kind="bad_message")
    return out


def _normalized(value: str | list[dict]):
    """For the chosen == rejected check: whitespace at the ends does not make answers differ."""
    if isinstance(value, str):
        return value.strip()
    return [(m["role"], m["content"].strip()) for m in value]


def _check_row(row: Any) -> tuple[dict, str]:
    """``(clean_row, format)`` for a valid row; raises PreferenceDataError without a location."""
    if not isinstance(row, dict):
        raise PreferenceDataError(f"expected a dict with fields {', '.join(FIELDS)}, got {type(row).__name__}",
                                  kind="not_a_dict")
    clean, formats = {}, {}
    for name in FIELDS:
        if name not in row:
            raise PreferenceDataError(_missing(name, row), field=name, kind="missing_field")
        value = row[name]
        formats[name] = "conversational" if isinstance(value, list) else "plain text"
        try:
            if formats[name] != formats["prompt"]:
                raise PreferenceDataError(f"{formats[name]} but 'prompt' is {formats['prompt']}; a row must use "
                                          "one format", kind="mixed_format")
            clean[name] = _check_messages(name, value) if isinstance(value, list) else _check_text(value)
        except PreferenceDataError as err:
            raise err.at(field=name) from None
    if _normalized(clean["chosen"]) == _normalized(clean["rejected"]):
        raise PreferenceDataError("identical to 'chosen' (after stripping whitespace)", field="rejected",
                                  kind="identical")
    if formats["prompt"] == "plain text":
        _check_prompt_not_repeated(clean)
    return clean, formats["prompt"]


def _check_prompt_not_repeated(row: dict) -> None:
    """An answer holding its whole prompt (hh-rlhf with a prompt column added) would train on the prompt twice."""
    prompt = row["prompt"].strip()
    for name in ("chosen", "rejected"):
        answer = row[name].lstrip()
        if answer.startswith(prompt) or (len(prompt) >= 20 and prompt in answer):
            raise PreferenceDataError("the answer repeats its whole prompt, so TRL would train on the prompt twice; "
                                      "keep only the answer here, or drop the 'prompt' column and let "
                                      "load_preferences extract it", field=name, kind="prompt_repeated")


def _validate(items: Iterable[tuple[int, Any]], on_error: str, source: str | None) -> ValidationResult:
    """Validate ``(index, row)`` pairs; a row may be a PreferenceDataError from an earlier stage (parsing)."""
    _check_on_error(on_error)
    rows, report = [], DropReport(source=source)
    first = None  # (format, index) of the first good row: the whole dataset must match it
    for index, row in items:
        report.total += 1
        try:
            if isinstance(row, PreferenceDataError):
                raise row
            clean, fmt = _check_row(row)
            if first is None:
                first = (fmt, index)
            elif fmt != first[0]:
                raise PreferenceDataError(f"{fmt} row in a {first[0]} dataset (row {first[1]} is {first[0]}); "
                                          "use one format throughout", kind="format_mismatch")
        except PreferenceDataError as err:
            err = err.at(source, index)
            if on_error == "raise":
                raise err from None
            report.append(DropRecord(err.row, err.field, err.kind, err.reason, err.line))
            continue
        rows.append(clean)
    if report:
        warnings.warn(str(report), DroppedRowsWarning, stacklevel=3)
    return ValidationResult(rows, report)


def validate_preferences(rows: Iterable[Any], on_error: str = "raise", source: str | None = None) -> ValidationResult:
    """Check rows against the canonical schema (module docstring); return ``(rows, report)``.

    Args:
        rows: any iterable of rows (dicts); row indices in messages count from 0.
        on_error: ``"raise"`` raises :class:`PreferenceDataError` for the first bad row;
            ``"drop"`` drops every bad row, records each in the report and warns
            (:class:`DroppedRowsWarning`) with the summary.
        source: file path or dataset name, used in messages.

    Returned rows hold exactly ``prompt``, ``chosen`` and ``rejected`` in their original
    order: extra columns are dropped, messages keep only ``role`` and ``content``, and
    UTF-8 ``bytes`` are decoded to ``str``.
    """
    return _validate(enumerate(rows), on_error, source)


def _dataset_from(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows) if rows else Dataset.from_dict({name: [] for name in FIELDS})


def to_dataset(rows: Iterable[dict], on_error: str = "raise", source: str | None = None):
    """Validate rows and build a ``datasets.Dataset`` with columns prompt, chosen, rejected."""
    return _dataset_from(validate_preferences(rows, on_error, source).rows)


def train_test_split(dataset, test_size: float | int = 0.1, seed: int = 42):
    """A reproducible ``DatasetDict`` with ``"train"`` and ``"test"`` splits (seeded shuffle)."""
    return dataset.train_test_split(test_size=test_size, seed=seed)


# ---------------------------------------------------------------------------- files


def _read_jsonl(text: str, source: str) -> list[tuple[int, Any]]:
    items = []
    # split("\n"), not splitlines(): JSON strings may legally hold U+2028, which splitlines breaks on.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline) are not rows
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            row = PreferenceDataError(f"invalid JSON ({err.msg} at column {err.colno}) — a truncated line?",
                                      line=lineno, kind="invalid_json")
        items.append((len(items), row))
    return items


def _read_json(text: str, source: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{"):  # several objects: JSON lines saved as .json
            return _read_jsonl(text, source)
        raise PreferenceDataError(f"invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})",
                                  source=source, line=err.lineno, kind="invalid_json") from None
    if isinstance(data, dict):
        data = data["data"] if isinstance(data.get("data"), list) else [data]
    if not isinstance(data, list):
        raise PreferenceDataError(f"expected a list of rows or {{'data': [...]}}, got {type(data).__name__}",
                                  source=source, kind="invalid_json")
    return list(enumerate(data))


def _read_table(data: bytes, source: str, suffix: str, require: bool = True) -> tuple[list, list[tuple[int, Any]]]:
    try:
        if suffix == ".csv":
            import pandas as pd

            # object dtype and no NA parsing: empty cells stay "" and undecodable bytes stay surrogates,
            # so both are reported per row instead of failing the whole file.
            frame = pd.read_csv(io.BytesIO(data), dtype=object, keep_default_na=False, encoding="utf-8-sig",
                                encoding_errors="surrogateescape")
            columns, rows = list(frame.columns), frame.to_dict("records")
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(data))
            columns, rows = table.column_names, table.to_pylist()
    except Exception as err:  # pandas and pyarrow raise many types for a corrupt file
        raise PreferenceDataError(f"cannot parse as {suffix[1:].upper()}: {err}", source=source,
                                  kind="unreadable") from err
    if require:
        _require_columns(columns, source)
    return columns, list(enumerate(rows))


def _require_columns(columns: list[str], source: str, names: Iterable[str] = FIELDS) -> None:
    for name in (name for name in names if name not in columns):
        raise PreferenceDataError(_missing(name, columns, "column"), source=source, field=name, kind="missing_column")


def load_preference_file(path: str | Path, on_error: str = "raise"):
    """Load a local ``.json``, ``.jsonl``, ``.csv`` or ``.parquet`` file (or ``.gz``) in the canonical layout.

    ``.json`` holds a list of rows, ``{"data": [...]}``, or JSON lines. CSV holds plain-text
    rows only (:func:`load_preferences` also reads message lists exported to CSV, and other layouts). Row errors follow ``on_error`` (see :func:`validate_preferences`); problems
    with the file itself (missing, empty, unparsable, a missing column, no valid row left)
    always raise :class:`PreferenceDataError` naming the path.
    """
    _check_on_error(on_error)
    return _finish(validate_preferences(read_preference_rows(path), on_error, str(path)), str(path))


def _file_suffix(path: Path) -> str:
    """``.jsonl`` for ``x.jsonl`` and ``x.jsonl.gz``."""
    return Path(path.stem).suffix.lower() if path.suffix.lower() == ".gz" else path.suffix.lower()


def read_preference_rows(path: str | Path, require_columns: bool = True) -> list:
    """The rows of a preference file, unvalidated, in file order (row ``i`` is element ``i``).

    A row that could not even be parsed (a truncated JSON line) is a
    :class:`PreferenceDataError` in the list, so :func:`validate_preferences` reports it with
    the others. Problems with the whole file raise (see :func:`load_preference_file`).
    ``require_columns=False`` accepts any columns (for :mod:`course_utils.layouts` to convert).
    """
    return _read_file(Path(path), require_columns)[1]


def _read_file(path: Path, require_columns: bool = True) -> tuple[list[str] | None, list]:
    """``(columns or None for JSON, rows)`` of a preference file; see :func:`read_preference_rows`."""
    source, suffix = str(path), _file_suffix(path)
    if suffix not in FILE_SUFFIXES:
        raise PreferenceDataError(f"unsupported file type {path.suffix.lower()!r}; use .json, .jsonl, .csv or "
                                  ".parquet (or the same gzipped, .jsonl.gz)", source=source, kind="unreadable")
    try:
        data = path.read_bytes()
        if path.suffix.lower() == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError when truncated
        raise PreferenceDataError(f"cannot read file: {getattr(err, 'strerror', None) or err}", source=source,
                                  kind="unreadable") from None
    if not data.strip():
        raise PreferenceDataError("file is empty", source=source, kind="empty_file")
    if suffix in (".json", ".jsonl"):
        # surrogateescape keeps bad bytes as lone surrogates, reported for their row only.
        text = data.decode("utf-8-sig", errors="surrogateescape")
        columns, items = None, (_read_jsonl if suffix == ".jsonl" else _read_json)(text, source)
    else:
        columns, items = _read_table(data, source, suffix, require_columns)
    if not items:
        raise PreferenceDataError("file has no rows", source=source, kind="empty_file")
    return columns, [row for _, row in items]  # items are numbered 0..n-1 in order


def _finish(result: ValidationResult, source: str):
    if not result.rows:
        raise PreferenceDataError(f"no valid rows left: {result.report.summary()}", source=source, kind="empty_file")
    return _dataset_from(result.rows)


# ---------------------------------------------------------------------------- the hub


def load_hub_preferences(dataset_id: str, split: str = "train", *, name: str | None = None,
                         convert: Callable[[dict], dict] | None = None, limit: int | None = None,
                         on_error: str = "raise", cache_dir: str | None = None, require: Iterable[str] = FIELDS):
    """Load a split with ``datasets.load_dataset`` and return it validated in the canonical schema.

    ``dataset_id`` is a hub id or a local directory laid out like a hub dataset repo
    (``data/train-*.parquet``, optionally a README.md with ``configs:``). ``convert`` maps a
    source row to a canonical row (e.g. :func:`orca_to_preference`); it may raise
    :class:`PreferenceDataError`, which is handled like any bad row. ``limit`` keeps the
    first ``limit`` source rows (fewer come back if some are dropped). ``require``: columns
    whose absence fails the whole split (kind missing_column), checked when ``convert`` is given.
    """
    from datasets import load_dataset

    _check_on_error(on_error)
    try:
        raw = load_dataset(dataset_id, name, split=split, cache_dir=cache_dir)
    except (OSError, ValueError) as err:  # not found, hub unreachable (ConnectionError), unknown split
        raise PreferenceDataError(f"cannot load split {split!r}: {err}", source=dataset_id, kind="unreadable") from err
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))
    _require_columns(raw.column_names, dataset_id, FIELDS if convert is None else require)

    def items():
        for i, row in enumerate(raw.to_list()):
            try:
                yield i, row if convert is None else convert(row)
            except PreferenceDataError as err:
                yield i, err

    return _finish(_validate(items(), on_error, dataset_id), dataset_id)


def orca_to_preference(row: dict, tokenizer, as_messages: bool = False) -> dict:
    """One ``Intel/orca_dpo_pairs`` row (system, question, chosen, rejected) as a canonical row.

    The prompt goes through the model's own chat template (an empty system is left out, so
    the template's default system prompt, if any, applies). Plain text (the default):
    prompt = ``apply_chat_template([system?, user], add_generation_prompt=True)`` and each
    answer is followed by :func:`~course_utils.templates.completion_end`. With
    ``as_messages=True`` the conversational form is returned and TRL applies the template.
    """
    fields = {}
    for col in ("question", "chosen", "rejected"):
        if col not in row:
            raise PreferenceDataError(_missing(col, row, "column"), field=col, kind="missing_field")
        try:
            fields[col] = _check_text(row[col])
        except PreferenceDataError as err:
            raise err.at(field=col) from None
    system = row.get("system") or ""
    if not isinstance(system, str):
        raise PreferenceDataError(f"expected text, got {type(system).__name__}", field="system", kind="wrong_type")
    prompt = ([{"role": "system", "content": system}] if system.strip() else [])
    prompt.append({"role": "user", "content": fields["question"]})
    if as_messages:
        return {"prompt": prompt, **{k: [{"role": "assistant", "content": fields[k]}] for k in ("chosen", "rejected")}}
    end = completion_end(tokenizer)
    return {"prompt": tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
            "chosen": fields["chosen"] + end, "rejected": fields["rejected"] + end}


def load_orca_dpo_pairs(tokenizer, split: str = "train", path_or_id: str = ORCA_ID, limit: int | None = None,
                        on_error: str = "raise", as_messages: bool = False, cache_dir: str | None = None):
    """Intel/orca_dpo_pairs (or a local copy laid out like it) formatted by ``tokenizer``'s chat template."""
    convert = partial(orca_to_preference, tokenizer=tokenizer, as_messages=as_messages)
    return load_hub_preferences(path_or_id, split, convert=convert, limit=limit, on_error=on_error,
                                cache_dir=cache_dir, require=("question", "chosen", "rejected"))


# ---------------------------------------------------------------------------- any layout


def load_preferences(source: str | Path, *, split: str | None = None, config: str | None = None,
                     on_error: str = "raise", tokenizer=None, cache_dir: str | None = None, verbose: bool = True):
    """Load preference pairs in any layout of :mod:`course_utils.layouts` as a validated Dataset.

    ``source`` is a local file (``.json``, ``.jsonl``, ``.csv``, ``.parquet``, each also
    ``.gz``), a local folder laid out like a hub dataset (``data/<split>-*.parquet``, a README
    with ``configs:``) or a hub id. Without ``split`` one is chosen from those the source has;
    a wrong ``split`` or ``config`` lists the ones that exist. ``tokenizer`` lets the report
    say whether plain-text prompts already carry its chat template. ``verbose`` prints the
    layout seen and what was converted. Row errors follow ``on_error`` (:func:`validate_preferences`).
    """
    from course_utils.layouts import read_preferences

    _check_on_error(on_error)
    converted = read_preferences(source, split=split, config=config, tokenizer=tokenizer, cache_dir=cache_dir)
    if verbose:
        print(converted.report())
    return _finish(validate_preferences(converted.rows, on_error, converted.source), converted.source)
