"""Chat templates, token by token: which tokens DPO actually trains on.

A preference row (see :mod:`course_utils.data`) becomes two training sequences,
``prompt + chosen`` and ``prompt + rejected``. Only the completion tokens carry loss: the
DPO log-ratio of Eq. 7 in Rafailov et al. (2023) sums ``log pi(y_t | x, y_<t)`` over the
answer ``y`` alone, never over the prompt ``x``.

:func:`tokenize_like_trl` reproduces, step for step, how TRL 1.16's ``DPOTrainer``
(``_prepare_dataset`` and ``DataCollatorForPreference``) turns a row into token ids:

1. Plain-text rows get the tokenizer's EOS token appended to ``chosen`` and ``rejected``,
   unless the text already *ends with* it (conversational rows are left alone: the chat
   template closes the turn).
2. The prompt and the whole ``prompt + completion`` are tokenized *separately*: plain text
   as the concatenated string, conversational rows through ``apply_chat_template``.
3. The completion starts where the two token sequences stop agreeing. Usually that is right
   after the prompt, but when BPE merges tokens across the boundary (``"Hello wor" + "ld"``)
   the end of the prompt is left out of the training sequence.
4. The collator concatenates ``prompt_ids + completion_ids`` and marks the completion with
   ``completion_mask = [0] * len(prompt_ids) + [1] * len(completion_ids)``, then cuts the
   sequence at ``max_length`` (keeping the start).

:func:`inspect_example` shows the result so a learner can see it: ``[prompt]`` vs ``[LOSS]``;
:func:`length_stats` counts the same tokens over a dataset, to choose ``max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

# Stands in for an assistant's answer so the text the template puts after it can be found.
_SENTINEL = "COURSE_SENTINEL_7d1f"


def end_of_turn(tokenizer) -> str:
    """What the chat template writes after an assistant message, e.g. ``"<|im_end|>\\n"`` for ChatML.

    Derived by rendering a conversation whose answer is a sentinel and taking the suffix,
    so it is right for any template and nothing is hard-coded.
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if _SENTINEL not in text:
        raise ValueError("The chat template rewrites assistant messages; cannot find where a turn ends.")
    return text[text.rindex(_SENTINEL) + len(_SENTINEL):]


def completion_end(tokenizer) -> str:
    """The end-of-turn to append to a plain-text completion: :func:`end_of_turn` cut after EOS.

    For ChatML this is ``"<|im_end|>"``, not ``"<|im_end|>\\n"``: TRL appends EOS to any
    plain-text completion that does not *end with* it, so keeping the newline would train
    on ``"<|im_end|>\\n<|im_end|>"``. Ending on EOS is also where generation stops.
    """
    suffix, eos = end_of_turn(tokenizer), tokenizer.eos_token
    if eos and eos in suffix:
        return suffix[: suffix.index(eos) + len(eos)]
    return suffix


def is_conversational(row: dict) -> bool:
    """True for rows whose values are lists of chat messages (TRL's "conversational" format)."""
    return isinstance(row["prompt"], list)


def add_eos(text: str, eos_token: str) -> str:
    """TRL's EOS rule for plain-text completions: append EOS unless the text ends with it."""
    return text if text.endswith(eos_token) else text + eos_token


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"])


class TrlTokens(NamedTuple):
    """Token ids of one row exactly as TRL's DPOTrainer stores them."""

    prompt_ids: list[int]  # the prompt part of the training sequence
    chosen_ids: list[int]  # completion tokens of prompt+chosen (they carry loss)
    rejected_ids: list[int]  # completion tokens of prompt+rejected
    left_out_ids: list[int]  # end of the tokenized prompt TRL drops (tokens merged across the boundary)


def tokenize_like_trl(row: dict, tokenizer) -> TrlTokens:
    """Tokenize a canonical row the way TRL 1.16's ``DPOTrainer._prepare_dataset`` does (steps 1-3 above)."""
    prompt = row["prompt"]
    if is_conversational(row):
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        full = [_chat_ids(tokenizer, prompt + row[key]) for key in ("chosen", "rejected")]
    else:
        prompt_ids = list(tokenizer(text=prompt)["input_ids"])
        full = [list(tokenizer(text=prompt + add_eos(row[key], tokenizer.eos_token))["input_ids"])
                for key in ("chosen", "rejected")]
    # The completion starts where prompt and prompt+completion diverge (TRL's common_prefix_length).
    n = min(_common_prefix_length(prompt_ids, ids) for ids in full)
    return TrlTokens(prompt_ids[:n], full[0][n:], full[1][n:], prompt_ids[n:])


@dataclass
class TokenView:
    """One training sequence, ``prompt + completion``, as the DPO loss sees it."""

    name: str  # "chosen" or "rejected"
    text: str  # the completion text (plain rows: after TRL's EOS rule)
    ids: list[int]  # input_ids of prompt + completion, after truncation
    tokens: list[str]  # one per id, so "".join(tokens) reads as the text (see decode_tokens)
    mask: list[int]  # TRL's completion_mask: 1 = the token's log-prob enters the loss

    @property
    def n_loss(self) -> int:
        return sum(self.mask)

    def spans(self) -> str:
        """``[prompt]...[/prompt][LOSS]...[/LOSS]``: the mask is zeros, then ones, so two spans."""
        p = len(self.mask) - self.n_loss
        return f"[prompt]{''.join(self.tokens[:p])}[/prompt][LOSS]{''.join(self.tokens[p:])}[/LOSS]"

    def table(self, prompt_tail: int | None = 8) -> str:
        """One line per token (index, id, LOSS flag, token); only the last ``prompt_tail`` prompt tokens."""
        p = len(self.mask) - self.n_loss
        start = 0 if prompt_tail is None else max(0, p - prompt_tail)
        lines = [f"{'idx':>5} {'id':>7}  loss  token"]
        if start:
            lines.append(f"{'...':>5} ({start} earlier prompt tokens)")
        for i in range(start, len(self.ids)):
            # "" = more bytes of the character shown on an earlier line (decode_tokens)
            shown = repr(self.tokens[i]) if self.tokens[i] else "  (more bytes of the character above)"
            lines.append(f"{i:>5} {self.ids[i]:>7}  {'LOSS' if self.mask[i] else '    '}  {shown}")
        return "\n".join(lines)


@dataclass
class InspectedExample:
    """What DPO trains on for one row: formatted prompt, both completions, tokens and loss masks."""

    format: str  # "plain text" or "conversational"
    prompt_text: str  # the prompt as the model reads it (chat template applied)
    chosen: TokenView
    rejected: TokenView
    left_out: list[str]  # prompt tokens TRL leaves out (merged across the boundary); usually empty
    max_length: int | None = None

    @property
    def trl_would_drop(self) -> bool:
        """TRL drops rows whose prompt alone fills ``max_length`` (nothing would be left to learn)."""
        n_prompt = len(self.chosen.mask) - self.chosen.n_loss
        return self.max_length is not None and n_prompt >= self.max_length

    def render(self, table: bool = False) -> str:
        """A readable view: spans marked ``[prompt]``/``[LOSS]``, or a token table with ``table=True``."""
        lines = [f"format: {self.format}; prompt: {len(self.chosen.mask) - self.chosen.n_loss} tokens"]
        if self.left_out:
            lines.append(f"note: TRL leaves out the prompt's last tokens {self.left_out!r} (merged with the answer)")
        if self.trl_would_drop:
            lines.append(f"note: the prompt fills max_length={self.max_length}; TRL drops this row")
        for view in (self.chosen, self.rejected):
            lines.append(f"--- {view.name}: {view.n_loss} of {len(view.ids)} tokens carry loss")
            lines.append(view.table() if table else view.spans())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def decode_tokens(tokenizer, ids: list[int], mask: list[int] | None = None, longest: int = 8) -> list[str]:
    """Each id's text, one string per id, whole characters kept whole.

    Byte-level BPE splits one CJK, Arabic or emoji character over several tokens, and each
    token decoded alone is U+FFFD. Consecutive tokens are decoded together until their bytes
    form whole characters: the first token of the group shows the text, the others ``""``.
    Groups never cross a change in ``mask`` (or run past ``longest`` tokens), so every
    string stays on the token whose mask it shares.
    """
    mask = mask if mask is not None else [0] * len(ids)
    out: list[str] = []
    i = 0
    while i < len(ids):
        j, text = i + 1, tokenizer.decode([ids[i]])
        while text.endswith("\ufffd") and j < len(ids) and mask[j] == mask[i] and j - i < longest:
            text, j = tokenizer.decode(ids[i:j + 1]), j + 1  # an incomplete character: take the next token's bytes
        if text.endswith("\ufffd") and j > i + 1:  # never completed: show the tokens one by one
            text, j = tokenizer.decode([ids[i]]), i + 1
        out += [text] + [""] * (j - i - 1)
        i = j
    return out


def inspect_example(row: dict[str, Any], tokenizer, max_length: int | None = None) -> InspectedExample:
    """Show how TRL's DPOTrainer tokenizes and masks one canonical row (see the module docstring).

    ``max_length`` mirrors ``DPOConfig.max_length`` (TRL's default is 1024): sequences are cut
    keeping their start, as ``DataCollatorForPreference`` does.
    """
    toks = tokenize_like_trl(row, tokenizer)
    if is_conversational(row):
        prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        texts = []
        for key in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            texts.append(full[len(prompt_text):] if full.startswith(prompt_text) else full)
    else:
        prompt_text = row["prompt"]
        texts = [add_eos(row[key], tokenizer.eos_token) for key in ("chosen", "rejected")]

    views = []
    for name, text, completion in zip(("chosen", "rejected"), texts, (toks.chosen_ids, toks.rejected_ids)):
        ids = toks.prompt_ids + completion
        mask = [0] * len(toks.prompt_ids) + [1] * len(completion)
        if max_length is not None:  # the collator's keep_start truncation
            ids, mask = ids[:max_length], mask[:max_length]
        views.append(TokenView(name, text, ids, decode_tokens(tokenizer, ids, mask), mask))
    return InspectedExample(
        format="conversational" if is_conversational(row) else "plain text",
        prompt_text=prompt_text,
        chosen=views[0],
        rejected=views[1],
        left_out=[tokenizer.decode([i]) for i in toks.left_out_ids],
        max_length=max_length,
    )


def _describe(values: list[int]) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(values if values else [0])  # an empty dataset reports zeros, not NaN
    return {"count": len(values), "mean": float(arr.mean()), "median": float(np.median(arr)),
            "p95": float(np.percentile(arr, 95)), "max": int(arr.max())}


LENGTH_KEYS = ("prompt", "chosen", "rejected", "prompt+chosen", "prompt+rejected")


def token_lengths(dataset: Iterable[dict], tokenizer) -> dict[str, list[int]]:
    """Per-row token counts, keyed by :data:`LENGTH_KEYS`, counted as TRL's DPOTrainer tokenizes.

    EOS included; the completion starts where the prompt's and the full sequence's tokens
    diverge (:func:`tokenize_like_trl`). :func:`length_stats` summarises these; the plots use
    every row's value.
    """
    out: dict[str, list[int]] = {key: [] for key in LENGTH_KEYS}
    for row in dataset:
        toks = tokenize_like_trl(row, tokenizer)
        p, c, r = len(toks.prompt_ids), len(toks.chosen_ids), len(toks.rejected_ids)
        for key, n in zip(LENGTH_KEYS, (p, c, r, p + c, p + r)):
            out[key].append(n)
    return out


def length_stats(dataset: Iterable[dict], tokenizer) -> dict[str, dict[str, float]]:
    """Token lengths (count, mean, median, p95, max) of prompts, completions and whole sequences.

    Counted as TRL's DPOTrainer tokenizes (:func:`token_lengths`, EOS included), so
    ``stats["prompt+chosen"]["max"]`` is what ``DPOConfig.max_length`` must cover to avoid
    truncation. ``pandas.DataFrame(stats).T`` shows it as a table.
    """
    return {key: _describe(values) for key, values in token_lengths(dataset, tokenizer).items()}
