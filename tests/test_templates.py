"""Tests for course_utils.templates: end-of-turn detection and the TRL-faithful token inspector.

The inspector's ids and loss masks are compared with what TRL's own DPOTrainer produces
(``_prepare_dataset`` followed by ``DataCollatorForPreference``) for the same rows.
"""

import pytest
from datasets import Dataset

from course_utils.data import orca_to_preference
from course_utils.models import build_tiny_model
from course_utils.templates import (
    completion_end,
    decode_tokens,
    end_of_turn,
    inspect_example,
    tokenize_like_trl,
)

EOS = 2  # id of "<|im_end|>", SmolLM2's EOS token

# TRL's DPOConfig trips a transformers FutureWarning of its own (gradient_checkpointing renamed).
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")


@pytest.fixture
def tok(tokenizer):
    """The real SmolLM2 tokenizer and chat template (conftest's session-wide ``tokenizer``)."""
    return tokenizer


def chat_row(question="Hi there", chosen="Hello!", rejected="Go away."):
    return {"prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def test_end_of_turn_is_read_from_the_template(tok, monkeypatch):
    assert end_of_turn(tok) == "<|im_end|>\n"  # ChatML
    assert completion_end(tok) == "<|im_end|>"  # cut after EOS: TRL would add a second one otherwise
    # A different template gives a different answer: nothing is hard-coded.
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}<{{ m.role }}>{{ m.content }}</turn>\n\n"
                                              "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    assert end_of_turn(tok) == "</turn>\n\n"
    assert completion_end(tok) == "</turn>\n\n"  # EOS is not part of this turn end, so all of it stays


def test_template_that_drops_content_is_refused(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}<{{ m.role }}>{% endfor %}")
    with pytest.raises(ValueError, match="rewrites assistant messages"):
        end_of_turn(tok)


def test_tokenize_like_trl_plain_appends_eos_once(tok):
    # Hand-written ids: "The sky is" = [The, ' sky', ' is']; EOS (id 2) is appended to each answer.
    t = tokenize_like_trl({"prompt": "The sky is", "chosen": " blue.", "rejected": " green.<|im_end|>"}, tok)
    assert tok.convert_ids_to_tokens(t.prompt_ids) == ["The", "Ġsky", "Ġis"]
    assert tok.convert_ids_to_tokens(t.chosen_ids) == ["Ġblue", ".", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(t.rejected_ids) == ["Ġgreen", ".", "<|im_end|>"]  # already ended: not doubled
    assert t.left_out_ids == []


def test_tokenize_like_trl_boundary_merge(tok):
    # "Hello wor" + "ld" tokenizes as [Hello, ' world']: the prompt's last token ' wor' is not a
    # prefix of the full sequence, so the completion starts at ' world' and ' wor' is left out.
    t = tokenize_like_trl({"prompt": "Hello wor", "chosen": "ld", "rejected": "m"}, tok)
    assert tok.convert_ids_to_tokens(t.prompt_ids) == ["Hello"]
    assert tok.convert_ids_to_tokens(t.chosen_ids) == ["Ġworld", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(t.rejected_ids) == ["Ġworm", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(t.left_out_ids) == ["Ġwor"]


def test_inspector_mask_by_hand(tok):
    ex = inspect_example(chat_row(), tok)
    # 32 prompt tokens (template's default system prompt + user turn + "assistant\n"), then
    # Hello | ! | <|im_end|> | \n carry loss: the template's turn end, newline included.
    assert ex.chosen.mask == [0] * 32 + [1, 1, 1, 1]
    assert ex.chosen.tokens[32:] == ["Hello", "!", "<|im_end|>", "\n"]
    assert ex.chosen.ids[-2:] == [EOS, 198]
    assert ex.chosen.text == "Hello!<|im_end|>\n"
    assert ex.prompt_text == tok.apply_chat_template(chat_row()["prompt"], tokenize=False, add_generation_prompt=True)
    assert ex.rejected.n_loss == 5  # Go | ' away' | . | <|im_end|> | \n


def test_render_marks_prompt_and_loss(tok):
    ex = inspect_example({"prompt": "Hi there", "chosen": "Hello!", "rejected": "Go."}, tok)
    text = str(ex)
    assert "[prompt]Hi there[/prompt][LOSS]Hello!<|im_end|>[/LOSS]" in text
    assert "[prompt]Hi there[/prompt][LOSS]Go.<|im_end|>[/LOSS]" in text
    assert "chosen: 3 of 5 tokens carry loss" in text
    table = ex.render(table=True)
    assert table.count("LOSS") == 6  # 3 completion tokens in each of the two tables
    merged = inspect_example({"prompt": "Hello wor", "chosen": "ld", "rejected": "m"}, tok)
    assert "TRL leaves out the prompt's last tokens [' wor']" in str(merged)


@pytest.mark.parametrize("question, answer, other", [
    ("你好，世界", "谢谢你", "不客气"),  # CJK: three bytes a character, split over byte tokens
    ("مرحبا بالعالم", "شكرا جزيلا", "عفوا"),  # Arabic: two bytes a character
    ("Wave 👋🏽 back", "Sure 😀👍", "No 🙃"),  # emoji and a skin-tone modifier: four bytes each
], ids=["cjk", "arabic", "emoji"])
def test_inspector_shows_whole_characters(tok, question, answer, other):
    ex = inspect_example(chat_row(question, answer, other), tok)
    trl = tokenize_like_trl(chat_row(question, answer, other), tok)
    for view, completion in ((ex.chosen, trl.chosen_ids), (ex.rejected, trl.rejected_ids)):
        assert view.mask == [0] * len(trl.prompt_ids) + [1] * len(completion)  # grouping never moves the mask
        assert len(view.tokens) == len(view.ids) and "".join(view.tokens) == tok.decode(view.ids)
        assert "\ufffd" not in view.spans() and "\ufffd" not in view.table(prompt_tail=None)
    assert f"[LOSS]{answer}<|im_end|>" in ex.chosen.spans() and question in ex.chosen.spans()
    assert "more bytes of the character above" in ex.chosen.table()


def test_decode_tokens_groups_by_bytes_within_a_mask(tok):
    ids = tok("谢", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and [tok.decode([i]) for i in ids] == ["\ufffd"] * 3  # what token-by-token decoding shows
    assert decode_tokens(tok, ids) == ["谢", "", ""]  # the character on its first token
    # A mask change inside the character: each side keeps its own tokens (shown as U+FFFD, masks intact).
    assert decode_tokens(tok, ids, [0, 1, 1]) == ["\ufffd", "\ufffd", "\ufffd"]


def trl_batches(rows, tok, tmp_path, max_length=None):
    """input_ids and completion_mask that TRL's DPOTrainer builds for each row, padding removed."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True,
                     max_length=max_length, per_device_train_batch_size=1)
    trainer = DPOTrainer(model=build_tiny_model(tok), ref_model=build_tiny_model(tok), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    out = []
    for example in trainer.train_dataset:
        batch = trainer.data_collator([example])  # one row -> two sequences: chosen, rejected
        lengths = batch["attention_mask"].sum(dim=1).tolist()  # cut the right padding off
        out.append(([ids[:n] for ids, n in zip(batch["input_ids"].tolist(), lengths)],
                    [m[:n] for m, n in zip(batch["completion_mask"].tolist(), lengths)]))
    return out


ORCA_ROW = {"system": "You are a terse tutor.", "question": "Capital of France?", "chosen": "Paris.",
            "rejected": "Lyon, I think."}
CASES = {
    "orca-plain": (lambda tok: [orca_to_preference(ORCA_ROW, tok), orca_to_preference({**ORCA_ROW, "system": ""}, tok)],
                   None),
    "orca-chat": (lambda tok: [orca_to_preference(ORCA_ROW, tok, as_messages=True), chat_row()], None),
    "boundary-merge": (lambda tok: [{"prompt": "Hello wor", "chosen": "ld", "rejected": "m"}], None),
    # 25 prompt tokens: max_length=27 keeps 2 answer tokens; 20 makes TRL drop the row.
    "truncated": (lambda tok: [orca_to_preference(ORCA_ROW, tok)], 27),
    "prompt-fills-max-length": (lambda tok: [orca_to_preference(ORCA_ROW, tok), {"prompt": "Hi", "chosen": "Yo",
                                                                                 "rejected": "No"}], 20),
    # A plain answer ending with the full turn end "<|im_end|>\n": TRL appends a second EOS.
    "naive-turn-end": (lambda tok: [{**orca_to_preference(ORCA_ROW, tok), "chosen": "Paris.<|im_end|>\n"}], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inspector_matches_trl(tok, tmp_path, case):
    make_rows, max_length = CASES[case]
    rows = make_rows(tok)
    examples = [inspect_example(row, tok, max_length=max_length) for row in rows]
    kept = [ex for ex in examples if not ex.trl_would_drop]  # TRL filters these out of the dataset
    assert len(kept) == (1 if case == "prompt-fills-max-length" else len(rows))
    for ex, (input_ids, completion_mask) in zip(kept, trl_batches(rows, tok, tmp_path, max_length), strict=True):
        assert [ex.chosen.ids, ex.rejected.ids] == input_ids
        assert [ex.chosen.mask, ex.rejected.mask] == completion_mask
        assert sum(ex.chosen.mask) > 0
    if case == "truncated":
        assert len(kept[0].chosen.ids) == 27 and kept[0].chosen.n_loss == 2


def test_orca_answers_end_with_exactly_one_eos_under_trl(tok, tmp_path):
    (ids, mask), = trl_batches([orca_to_preference(ORCA_ROW, tok)], tok, tmp_path)
    chosen = [i for i, m in zip(ids[0], mask[0]) if m]
    assert tok.decode(chosen) == "Paris.<|im_end|>" and chosen.count(EOS) == 1
    # The naive turn end trains on "<|im_end|>\n<|im_end|>", which is why completion_end cuts at EOS.
    naive = inspect_example({**orca_to_preference(ORCA_ROW, tok), "chosen": "Paris." + end_of_turn(tok)}, tok)
    assert naive.chosen.tokens[-3:] == ["<|im_end|>", "\n", "<|im_end|>"]


def test_truncation_and_drop_flag(tok):
    row = orca_to_preference(ORCA_ROW, tok)
    full = inspect_example(row, tok)
    n_prompt = len(full.chosen.mask) - full.chosen.n_loss
    cut = inspect_example(row, tok, max_length=n_prompt + 1)
    assert cut.chosen.mask == [0] * n_prompt + [1]  # only the first answer token survives keep_start
    assert not cut.trl_would_drop
    assert inspect_example(row, tok, max_length=n_prompt).trl_would_drop
