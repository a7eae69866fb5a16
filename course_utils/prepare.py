"""The last check before training: schema, then lengths, with every decision reported.

:func:`prepare_preferences` is what :func:`course_utils.train.build_trainer` runs on its
datasets. It exists because TRL, handed a bad row, either fails deep inside ``datasets``
or Arrow with a traceback that names neither the row nor the field, or, worse, quietly
changes the data: TRL 1.16's ``DPOTrainer`` *drops* every pair whose prompt alone fills
``max_length`` and *truncates* the rest without saying so.

The length rule (tokens counted exactly as TRL counts them, see
:func:`course_utils.templates.tokenize_like_trl`); ``P`` = prompt tokens, ``C`` = the longer
of the two completions:

* ``P + C <= max_length``: the row is trained on whole.
* ``P < max_length < P + C``: TRL keeps the first ``max_length`` tokens of each sequence
  (``truncation_mode="keep_start"``), so the end of the answer carries no loss. With
  ``on_long="truncate"`` (the default) the row is kept and counted in the report (and a
  warning); ``on_long="drop"`` drops and reports it; ``on_long="raise"`` stops.
* ``P >= max_length``: no answer token would be left, so the pair teaches nothing. This is
  a bad row (kind ``too_long``) and follows ``on_error`` like any schema error.
* If the two answers agree on every token that survives truncation, the pair has no signal
  left either (kind ``identical_after_truncation``), also handled by ``on_error``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

from .data import (DropRecord, DropReport, DroppedRowsWarning, PreferenceDataError, _check_on_error, _dataset_from,
                   validate_preferences)
from .templates import tokenize_like_trl

ON_LONG = ("truncate", "drop", "raise")


class TruncatedRowsWarning(UserWarning):
    """Emitted when rows were kept but their answers cut at ``max_length``."""


@dataclass(frozen=True)
class Truncation:
    """One row whose answer(s) lose their end at ``max_length``."""

    row: int
    prompt_tokens: int
    completion_tokens: int  # the longer of chosen and rejected
    tokens_cut: int  # of that longer completion

    def __str__(self) -> str:
        return (f"row {self.row}: prompt {self.prompt_tokens} + completion {self.completion_tokens} tokens; "
                f"the last {self.tokens_cut} are cut")


@dataclass
class PreparedData:
    """A training-ready ``datasets.Dataset`` (prompt, chosen, rejected) and what was done to get it."""

    dataset: Any
    dropped: DropReport  # rows removed: schema errors and length errors (on_error="drop", on_long="drop")
    truncated: list[Truncation] = field(default_factory=list)  # rows kept with their answers' ends cut
    max_length: int | None = None

    def summary(self) -> str:
        where = f"{self.dropped.source}: " if self.dropped.source else ""
        parts = [f"{len(self.dataset)} of {self.dropped.total} pairs ready"]
        if self.dropped:
            parts.append(", ".join(f"{n} dropped ({k})" for k, n in self.dropped.counts().items()))
        if self.truncated:
            cut = sum(t.tokens_cut for t in self.truncated)
            parts.append(f"{len(self.truncated)} truncated at max_length={self.max_length} ({cut} answer tokens cut)")
        return where + "; ".join(parts)

    def __str__(self) -> str:
        lines = [self.summary()] + [f"  dropped {r}" for r in self.dropped[:10]]
        lines += [f"  truncated {t}" for t in self.truncated[:10]]
        return "\n".join(lines)


def _rows_of(data) -> list:
    """Rows of a ``datasets.Dataset``, a list of dicts or any iterable of rows."""
    if hasattr(data, "to_list"):
        return data.to_list()
    if isinstance(data, dict):
        raise PreferenceDataError("expected rows (a Dataset or a list of dicts), got a dict; a DatasetDict? "
                                  "pass one split, e.g. splits['train']", kind="not_a_dict")
    return list(data)


def _length_problem(tokens, max_length: int) -> tuple[str | None, int]:
    """(problem kind or None, tokens cut from the longer completion)."""
    prompt = len(tokens.prompt_ids)
    if prompt >= max_length:
        return "too_long", 0
    room = max_length - prompt
    longest = max(len(tokens.chosen_ids), len(tokens.rejected_ids))
    if tokens.chosen_ids[:room] == tokens.rejected_ids[:room]:
        return "identical_after_truncation", max(0, longest - room)
    return None, max(0, longest - room)


def prepare_preferences(data: Iterable[Any], tokenizer, max_length: int | None, *, on_error: str = "raise",
                        on_long: str = "truncate", source: str | None = None) -> PreparedData:
    """Validate ``data`` against the schema, then apply the length rule of the module docstring.

    Args:
        data: a ``datasets.Dataset`` or a list of row dicts (extra columns are dropped).
        tokenizer: the model's tokenizer; lengths are counted as TRL 1.16 counts them.
        max_length: TRL's ``max_length``; None skips the length checks.
        on_error: "raise" stops at the first bad row with a :class:`PreferenceDataError` naming
            source, row and field; "drop" removes every bad row and reports it.
        on_long: what to do with rows that fit only truncated: "truncate" (TRL's keep_start,
            reported), "drop" or "raise".
        source: a file or dataset name for messages ("train_dataset" if None).

    Rows are numbered from 0 in the order of ``data``. Returns :class:`PreparedData`; warns
    (:class:`DroppedRowsWarning`, :class:`TruncatedRowsWarning`) when anything was dropped or cut.
    """
    _check_on_error(on_error)
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {ON_LONG}, got {on_long!r}")
    source = source or "train_dataset"
    with warnings.catch_warnings():  # one combined warning below instead of one per stage
        warnings.simplefilter("ignore", DroppedRowsWarning)
        rows, dropped = validate_preferences(_rows_of(data), on_error, source)
    # validate_preferences returns the kept rows only: their indices are the ones its report does not name
    bad = {r.row for r in dropped}
    kept_index = [i for i in range(dropped.total) if i not in bad]
    keep, truncated = [], []
    for index, row in zip(kept_index, rows):
        kind, cut = (None, 0)
        if max_length is not None:
            tokens = tokenize_like_trl(row, tokenizer)
            kind, cut = _length_problem(tokens, max_length)
            if kind is None and cut and on_long != "truncate":
                kind = "truncated"
        if kind is not None:
            reason = _REASONS[kind].format(max_length=max_length, cut=cut, prompt=len(tokens.prompt_ids))
            field_name = "prompt" if kind == "too_long" else "rejected" if kind.startswith("identical") else "chosen"
            err = PreferenceDataError(reason, source=source, row=index, field=field_name, kind=kind)
            if on_error == "raise" and kind != "truncated" or on_long == "raise" and kind == "truncated":
                raise err
            dropped.append(DropRecord(index, field_name, kind, reason))
            continue
        if cut:
            truncated.append(Truncation(index, len(tokens.prompt_ids),
                                        max(len(tokens.chosen_ids), len(tokens.rejected_ids)), cut))
        keep.append(row)
    dropped.sort(key=lambda r: (r.row is None, r.row or 0))
    result = PreparedData(_dataset_from(keep), dropped, truncated, max_length)
    if dropped:
        warnings.warn(str(dropped), DroppedRowsWarning, stacklevel=2)
    if truncated:
        warnings.warn(f"{source}: {len(truncated)} row(s) longer than max_length={max_length}: TRL keeps the first "
                      f"{max_length} tokens, so the end of those answers carries no loss (first: {truncated[0]}). "
                      "Raise max_length, or pass on_long='drop' to train on whole answers only.",
                      TruncatedRowsWarning, stacklevel=2)
    if not keep:
        raise PreferenceDataError(f"no rows left to train on: {result.summary()}", source=source, kind="empty_file")
    return result


_REASONS = {
    "too_long": "the prompt alone is {prompt} tokens, at least max_length={max_length}: no answer token would be "
                "left to train on (TRL would silently drop this pair). Raise max_length or shorten the prompt",
    "identical_after_truncation": "chosen and rejected agree on every token that fits in max_length={max_length} "
                                  "(they differ only in the part that is cut): the pair carries no signal",
    "truncated": "the longer answer loses its last {cut} tokens at max_length={max_length} (on_long forbids "
                 "truncation)",
}
