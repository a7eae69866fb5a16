"""Preference layouts: how public datasets lay out their pairs, recognised and converted to one schema.

The canonical schema is in :mod:`course_utils.data`. Datasets in the wild store the same
pairs in other layouts; :func:`convert_rows` recognises each from its columns and values
and rewrites it, noting what it changed, so nothing is converted (or dropped) silently:

* **explicit**: ``prompt`` / ``chosen`` / ``rejected`` already (kept as is).
* **implicit prompt**: no ``prompt``; ``chosen`` and ``rejected`` are whole dialogues that
  share their opening (trl-lib/ultrafeedback_binarized's message lists, Anthropic/hh-rlhf's
  ``"\\n\\nHuman: … \\n\\nAssistant: …"`` text, turned into messages first). The shared
  prefix, cut back to its last user turn, is the prompt (TRL's ``extract_prompt``).
* **prompt text plus full dialogues**: ``prompt`` is text and the answers are message lists
  that repeat the user turn (HuggingFaceH4/ultrafeedback_binarized): the repeated turns
  become the prompt and leave the answers.
* **orca-style**: ``system`` + ``question`` (or ``input``) + ``chosen`` + ``rejected`` text
  (Intel/orca_dpo_pairs, argilla's distilabel pairs): a system turn, a user turn, answers.
* **ShareGPT**: messages keyed ``from`` / ``value`` (human, gpt, system), a ``conversations``
  column as the prompt, single-message answers.

Across layouts: a ``system`` column becomes a system turn (never dropped), message lists
stored as text (CSV exports write Python reprs) are parsed back or refused, and columns
that are not used are named in the report.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from typing import Any, NamedTuple

from course_utils.data import PreferenceDataError

EXPLICIT, IMPLICIT, DIALOGUES, ORCA, SHAREGPT = (
    "explicit", "implicit prompt", "prompt text plus full dialogues", "orca-style", "ShareGPT")
QUESTION_COLUMNS = ("question", "input", "instruction")  # orca-style prompt columns, in order of preference
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
MESSAGE_FIELDS = ("prompt", "chosen", "rejected", "conversations")

# A cell that starts like a message list or one message: "[{'role': ..." or '{"from": ...'
_MESSAGE_TEXT = re.compile(r"^\s*\[?\s*\{\s*['\"](role|content|from|value)['\"]\s*:")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


class Converted(NamedTuple):
    """Rows in the canonical layout (unvalidated; a row that failed to convert is a PreferenceDataError)."""

    rows: list
    layout: str  # the layout most rows had
    notes: list[str]  # what was converted, one line each, counted over rows
    source: str
    split: str | None = None
    config: str | None = None

    def report(self) -> str:
        where = "".join(f", {k} {v!r}" for k, v in (("config", self.config), ("split", self.split)) if v)
        return "\n".join([f"{self.source}{where}: {len(self.rows)} rows, layout: {self.layout}"]
                         + [f"  - {note}" for note in self.notes])


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def parse_message_text(text: str) -> list | None:
    """A message list written as text (JSON or a Python repr, as pandas writes to CSV), or None if it is not one.

    Parsed with ``json.loads`` or ``ast.literal_eval`` (literals only, never code). Text that
    looks like a message list but does not parse raises, so its repr never becomes an answer.
    """
    if not _MESSAGE_TEXT.match(text):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):  # one message (a ShareGPT answer)
            value = [value]
        if _is_messages(value):
            return value
    raise PreferenceDataError(f"holds a message list written as text that cannot be parsed back ({text[:50]!r}…); "
                              "re-export it as JSON lines or Parquet, which keep lists", kind="unparsable_messages")


def hh_messages(text: str) -> list[dict] | None:
    """``"\\n\\nHuman: Hi\\n\\nAssistant: Hello"`` as messages, or None when the text is not in that form."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n"))
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _sharegpt(messages: list[dict]) -> tuple[list[dict], bool]:
    """Messages keyed from/value mapped to role/content; True when any was."""
    out, mapped = [], False
    for m in messages:
        if "role" not in m and "from" in m and "value" in m:
            role = str(m["from"])
            out.append({"role": SHAREGPT_ROLES.get(role.lower(), role), "content": m["value"]})
            mapped = True
        else:
            out.append(m)
    return out, mapped


def _shared_prefix(chosen: list[dict], rejected: list[dict]) -> int:
    """Number of leading messages both answers share, cut back so the prompt ends with a user turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1].get("role") != "user":
        n -= 1
    return n


def _shared_text_prefix(chosen: str, rejected: str) -> int:
    """TRL's ``extract_prompt`` on text: the common prefix, not ending inside a shared space."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n - 1 if n and chosen[n - 1] == " " else n


def _user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(value: Any) -> Any:
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else value


def convert_row(row: Any, columns: set[str]) -> tuple[Any, str | None, list[str]]:
    """``(canonical row, layout, notes)`` for one source row; bad values are left for validation to name.

    ``columns`` are the dataset's columns: whether a ``system`` column exists is decided per
    dataset, so every row ends up in the same format.
    """
    if not isinstance(row, dict):
        return row, None, []
    row, notes, layout = dict(row), [], EXPLICIT
    for key in MESSAGE_FIELDS:  # message lists stored as text (CSV): parse back, or refuse naming the field
        if isinstance(row.get(key), str):
            try:
                parsed = parse_message_text(row[key])
            except PreferenceDataError as err:
                raise err.at(field=key) from None
            if parsed is not None:
                row[key] = parsed
                notes.append("message lists stored as text (a CSV export?) parsed back into messages")
    for key in MESSAGE_FIELDS:
        value = row.get(key)
        if key in ("chosen", "rejected") and isinstance(value, dict) and ("from" in value or "role" in value):
            value = row[key] = [value]  # ShareGPT pairs hold a single answer message
        if _is_messages(value):
            row[key], mapped = _sharegpt(value)
            if mapped:
                layout = SHAREGPT
                notes.append("ShareGPT keys: from/value mapped to role/content (human→user, gpt→assistant)")
    if "prompt" not in row and _is_messages(row.get("conversations")):
        row["prompt"] = row.pop("conversations")
        layout = SHAREGPT
        notes.append("ShareGPT: the 'conversations' column is the prompt")
    chosen, rejected = row.get("chosen"), row.get("rejected")
    question = next((c for c in QUESTION_COLUMNS if c in row), None)
    if "prompt" not in row and question and isinstance(chosen, str) and isinstance(rejected, str):
        layout = ORCA
        row.update(prompt=_user_turn(row.pop(question)), chosen=_assistant(chosen), rejected=_assistant(rejected))
        notes.append(f"orca-style: '{question}' became the user turn, the answers assistant turns")
    elif "prompt" not in row and isinstance(chosen, str) and isinstance(rejected, str):
        hh = hh_messages(chosen), hh_messages(rejected)
        if hh[0] and hh[1]:
            chosen, rejected = row["chosen"], row["rejected"] = hh
            notes.append("'\\n\\nHuman: … \\n\\nAssistant: …' text turned into messages")
        else:
            n = _shared_text_prefix(chosen, rejected)
            if not chosen[:n].strip():
                raise PreferenceDataError("no 'prompt' column, and chosen and rejected share no opening to take it "
                                          "from", field="prompt", kind="missing_field")
            layout = IMPLICIT
            row.update(prompt=chosen[:n], chosen=chosen[n:], rejected=rejected[n:])
            notes.append("implicit prompt: extracted the shared prefix of chosen and rejected (text)")
    if "prompt" not in row and _is_messages(chosen) and _is_messages(rejected):
        n = _shared_prefix(chosen, rejected)
        if not n:
            raise PreferenceDataError("no 'prompt' column, and chosen and rejected share no opening user turn to "
                                      "take it from", field="prompt", kind="missing_field")
        layout = IMPLICIT
        row.update(prompt=chosen[:n], chosen=chosen[n:], rejected=rejected[n:])
        notes.append("implicit prompt: extracted the shared prefix of chosen and rejected")
    elif isinstance(row.get("prompt"), str) and _is_messages(chosen) and _is_messages(rejected):
        row["prompt"], row["chosen"], row["rejected"], note, layout = _dialogues(row["prompt"], chosen, rejected)
        notes.append(note)
    notes += _system_column(row, columns)
    return row, layout, notes


def _dialogues(prompt: str, chosen: list[dict], rejected: list[dict]):
    """A text prompt with message-list answers: drop the answers' repeated opening turns, or wrap the prompt."""
    lead = [next((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), len(msgs))
            for msgs in (chosen, rejected)]
    if lead == [0, 0]:
        return _user_turn(prompt), chosen, rejected, "plain-text prompt turned into a user turn", EXPLICIT
    opening = chosen[:lead[0]]
    if opening != rejected[:lead[1]]:
        raise PreferenceDataError("chosen and rejected open with different turns before the answer; cannot tell "
                                  "which is the prompt", field="rejected", kind="prompt_mismatch")
    users = [m for m in opening if m.get("role") == "user"]
    if not users or str(users[-1].get("content", "")).strip() != prompt.strip():
        raise PreferenceDataError("the answer opens with a user turn that is not the prompt", field="chosen",
                                  kind="prompt_mismatch")
    return (opening, chosen[lead[0]:], rejected[lead[1]:],
            "prompt text plus full dialogues: removed the repeated user turn from the answers", DIALOGUES)


def _system_column(row: dict, columns: set[str]) -> list[str]:
    """A ``system`` column becomes the prompt's system turn (the whole dataset turns conversational)."""
    if "system" not in columns:
        return []
    system, notes = row.pop("system", None), []
    if system is not None and not isinstance(system, str):
        raise PreferenceDataError(f"expected text, got {type(system).__name__}", field="system", kind="wrong_type")
    if isinstance(row.get("prompt"), str):
        row["prompt"] = _user_turn(row["prompt"])
        row["chosen"], row["rejected"] = _assistant(row.get("chosen")), _assistant(row.get("rejected"))
        notes.append("plain-text rows turned into messages so the system column has a turn to go in")
    prompt = row.get("prompt")
    if not (system or "").strip():
        return notes + ["empty system column left out (the template's default system prompt, if any, applies)"]
    if _is_messages(prompt) and not (prompt[0].get("role") == "system" and prompt[0].get("content") == system):
        row["prompt"] = [{"role": "system", "content": system}] + prompt
    return notes + ["system column kept as a system turn at the start of the prompt"]


def _generation_suffix(tokenizer) -> str | None:
    """What the chat template writes after a user message when asking for an answer, e.g. ChatML's assistant header."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    marker = "COURSE_MARKER_3c9a"
    text = tokenizer.apply_chat_template(_user_turn(marker), tokenize=False, add_generation_prompt=True)
    return text[text.rindex(marker) + len(marker):].strip() or None


def convert_rows(rows: list, columns: list[str] | None = None, *, source: str, tokenizer=None,
                 split: str | None = None, config: str | None = None) -> Converted:
    """Every row through :func:`convert_row`; the notes are counted once per dataset, not once per row.

    A row that fails to convert comes back as its :class:`PreferenceDataError`, so
    :func:`course_utils.data.validate_preferences` reports it (``on_error``) with the rest.
    """
    if columns is None:  # JSON rows: the union of their keys, in order of appearance
        columns = list(dict.fromkeys(k for row in rows if isinstance(row, dict) for k in row))
    column_set, out, layouts, notes = set(columns), [], Counter(), Counter()
    for row in rows:
        if isinstance(row, PreferenceDataError):
            out.append(row)
            continue
        try:
            row, layout, row_notes = convert_row(row, column_set)
        except PreferenceDataError as err:
            out.append(err)
            continue
        out.append(row)
        layouts[layout] += layout is not None
        notes.update(dict.fromkeys(row_notes, 1))
    layout = layouts.most_common(1)[0][0] if layouts else EXPLICIT
    lines = [f"{note} ({n} of {len(rows)} rows)" if n < len(rows) else note for note, n in notes.items()]
    used = {"prompt", "chosen", "rejected", "system", "conversations", *(QUESTION_COLUMNS if layout == ORCA else ())}
    if unused := [c for c in columns if c not in used]:
        lines.append(f"columns not used: {', '.join(unused[:8])}" + (f" and {len(unused) - 8} more" if len(unused) > 8
                                                                     else ""))
    lines += _untemplated(out, tokenizer)
    return Converted(out, layout, lines, source, split, config)


def _untemplated(rows: list, tokenizer) -> list[str]:
    """One note when plain-text prompts will reach the model without its chat template."""
    prompts = [r["prompt"] for r in rows if isinstance(r, dict) and isinstance(r.get("prompt"), str)]
    if not prompts:
        return []
    suffix = _generation_suffix(tokenizer)
    if suffix is None and tokenizer is not None:
        return []  # a model without a chat template: plain text is what it reads
    bare = [p for p in prompts if suffix is None or not p.rstrip().endswith(suffix)]
    if not bare:
        return []
    return [f"plain-text prompts get no chat template: {len(bare)} of {len(prompts)} prompts are used exactly as "
            "written (fine for a base model; for a chat model store message lists, and TRL applies the template)"]


# ---------------------------------------------------------------------------- sources


def is_file_source(source: str) -> bool:
    """A local file (existing, or named like one: a missing ``x.jsonl`` is an unreadable file, not a hub id)."""
    from course_utils.data import FILE_SUFFIXES, _file_suffix
    from pathlib import Path

    path = Path(source)
    return path.is_file() or (_file_suffix(path) in FILE_SUFFIXES) or (path.suffix.lower() == ".gz")


def choose_split(source: str, split: str | None, config: str | None) -> tuple[str | None, str, list[str]]:
    """``(config, split, notes)`` for a folder or hub id: given ones checked, missing ones chosen and said.

    Without ``split``: ``train`` if there is one, else the first starting with ``train``
    (H4's ``train_prefs``), else the first. A wrong name lists the ones that exist.
    """
    from datasets import get_dataset_config_names, get_dataset_split_names

    notes = []
    try:
        configs = get_dataset_config_names(source)
        if config is None and len(configs) > 1 and "default" not in configs:
            config = configs[0]
            notes.append(f"config: chose {config!r} of {', '.join(configs)} (pick one with config=)")
        elif config is not None and config not in configs:
            raise PreferenceDataError(f"no config {config!r}; this dataset has: {', '.join(configs)}",
                                      source=source, kind="unreadable")
        splits = list(get_dataset_split_names(source, config))
    except PreferenceDataError:
        raise
    except Exception as err:  # not found, offline, no data files: datasets raises many types
        raise PreferenceDataError(f"cannot open as a dataset folder or hub id: {err}", source=source,
                                  kind="unreadable") from err
    if not splits:
        raise PreferenceDataError("no splits found", source=source, kind="unreadable")
    if split is None:
        split = "train" if "train" in splits else next((s for s in splits if s.startswith("train")), splits[0])
        if len(splits) > 1 or split != "train":
            notes.append(f"split: chose {split!r} of {', '.join(splits)} (pick one with split=)")
    elif split not in splits:
        raise PreferenceDataError(f"no split {split!r}; this dataset has: {', '.join(splits)}", source=source,
                                  kind="unreadable")
    return config, split, notes


def read_preferences(source, *, split: str | None = None, config: str | None = None, tokenizer=None,
                     cache_dir: str | None = None) -> Converted:
    """The rows of a file, folder or hub id, converted to the canonical layout but not yet validated.

    See :func:`course_utils.data.load_preferences`, which validates them; the CLI passes them
    to :func:`course_utils.prepare.prepare_preferences` instead, which validates and checks lengths.
    """
    from pathlib import Path

    from course_utils.data import _read_file

    source = str(source)
    if is_file_source(source):
        if split not in (None, "train"):
            raise PreferenceDataError(f"a file holds one split, 'train'; got split={split!r}", source=source,
                                      kind="unreadable")
        columns, rows = _read_file(Path(source), require_columns=False)
        return convert_rows(rows, columns, source=source, tokenizer=tokenizer)
    from datasets import load_dataset

    config, split, notes = choose_split(source, split, config)
    try:
        raw = load_dataset(source, config, split=split, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise PreferenceDataError(f"cannot load split {split!r}: {err}", source=source, kind="unreadable") from err
    converted = convert_rows(raw.to_list(), raw.column_names, source=source, tokenizer=tokenizer, split=split,
                             config=config)
    return converted._replace(notes=notes + converted.notes)
