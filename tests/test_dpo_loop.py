"""course_utils.dpo_loop: the from-scratch DPO loop takes TRL's DPOTrainer's steps, on the tiny model.

Same pairs, same model and LoRA initialisation, AdamW with the same settings, constant learning
rate, no shuffling, fp32, dropout off: the batches must be identical token for token and the first
steps' losses and margins equal to float32 rounding.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from course_utils import dpo_loop
from course_utils.models import load_model, lora_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL 1.16 / transformers 5 notices

COLUMNS = ["prompt", "chosen", "rejected"]
BATCH_SIZE = 2
STEPS = 4  # two epochs over the four training pairs
LR = 5e-3  # the tiny preset's: the random model's margins move visibly within a few steps
TOLERANCE = 1e-5  # losses and margins, float32, after a few Adam steps (measured: under 2e-6)
RELATIVE = 1e-6  # and relative to the size: summed log-probs of ~-280 nats carry float32's 7 digits
# rewards, margins and the loss are beta x differences of those sums: they inherit the sums' rounding, beta x |log p|
GRAD_RELATIVE = 1e-4  # the gradient norm sums many terms that cancel, in another order than TRL's (measured 2.7e-5)


@pytest.fixture(scope="module")
def pairs(tiny_pairs):
    splits = tiny_pairs[0]
    return splits["train"].select(range(2 * BATCH_SIZE)).select_columns(COLUMNS)


@pytest.fixture(scope="module")
def runs(pairs, tiny_preset, tmp_path_factory):
    """The scratch loop and TRL, each ``STEPS`` steps from the same tiny model, and what they started from."""
    from trl import DPOTrainer

    base, tokenizer = load_model("tiny", seed=0)
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    args = dpo_loop.matching_dpo_config(tmp_path_factory.mktemp("trl"), beta=tiny_preset.beta, learning_rate=LR,
                                        batch_size=BATCH_SIZE, steps=STEPS, max_length=tiny_preset.max_length)
    trainer = DPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=lora_config(tiny_preset.lora_r, tiny_preset.lora_alpha, dropout=0.0))
    trl_batch = next(iter(trainer.get_train_dataloader()))
    trl_init = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()

    model = dpo_loop.add_lora(base, tiny_preset.lora_r, tiny_preset.lora_alpha, seed=0)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loop = dpo_loop.DPOLoop(model, dpo_loop.adamw(model, LR), pairs, tokenizer, beta=tiny_preset.beta,
                            batch_size=BATCH_SIZE, max_length=tiny_preset.max_length, eval_pairs=pairs, eval_every=2)
    loop.run(1)
    loop.run(STEPS - 1)  # continues where it stopped
    return dict(trainer=trainer, trl_batch=trl_batch, trl_init=trl_init, model=model, init=init, frozen=frozen,
                loop=loop, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------


def test_collate_is_trls_batch(runs, pairs):
    ours = dpo_loop.collate([pairs[i] for i in range(BATCH_SIZE)], runs["tokenizer"], max_length=128)
    theirs = runs["trl_batch"]
    assert set(ours) == {"input_ids", "attention_mask", "completion_mask"}
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype == torch.long
        assert torch.equal(value, theirs[key]), key


def test_collate_truncates_like_trl(pairs, tiny_preset, tmp_path):
    """A max_length that cuts into the completions: TRL keeps the start, so do we."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    _, tokenizer = load_model("tiny", seed=0)
    rows = [pairs[i] for i in range(BATCH_SIZE)]
    tokenized = [dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), dpo_loop.tokenize_pair(r, tokenizer)))
                 for r in rows]
    max_length = max(len(t["prompt_ids"]) for t in tokenized) + 3  # three completion tokens left at most
    theirs = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)(tokenized)
    ours = dpo_loop.collate(rows, tokenizer, max_length=max_length)
    assert ours["input_ids"].shape[1] == max_length
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    with pytest.raises(ValueError, match="fills max_length"):
        dpo_loop.collate(rows, tokenizer, max_length=min(len(t["prompt_ids"]) for t in tokenized))


class _ToyTokenizer:
    """A chat template small enough to write the expected batch by hand.

    Each message is ``[role, *content, END]`` with role ids 1 (user) and 2 (assistant); the
    generation prompt is ``[2]``; content words are their integer values. Pad id 0.
    """

    pad_token_id = 0

    def apply_chat_template(self, messages, tokenize=True, return_dict=True, add_generation_prompt=False):
        ids = []
        for m in messages:
            ids += [1 if m["role"] == "user" else 2] + [int(w) for w in m["content"].split()] + [9]
        return {"input_ids": ids + ([2] if add_generation_prompt else [])}


def test_collate_by_hand():
    def pair(prompt, chosen, rejected):
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    batch = dpo_loop.collate([pair("5 6", "7", "8 8"), pair("5", "7 7 7", "8")], _ToyTokenizer())
    assert batch["input_ids"].tolist() == [
        [1, 5, 6, 9, 2, 7, 9, 0],  # pair 0, chosen: prompt [1 5 6 9 2], completion [7 9], padding
        [1, 5, 9, 2, 7, 7, 7, 9],  # pair 1, chosen: the longest row sets the width
        [1, 5, 6, 9, 2, 8, 8, 9],  # pair 0, rejected
        [1, 5, 9, 2, 8, 9, 0, 0],  # pair 1, rejected
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 0, 0],
    ]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 0],  # the answer and its end-of-turn token; not the generation prompt [2]
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 0, 0],
    ]
    cut = dpo_loop.collate([pair("5 6", "7", "8 8"), pair("5", "7 7 7", "8")], _ToyTokenizer(), max_length=6)
    assert cut["input_ids"].tolist() == [[1, 5, 6, 9, 2, 7], [1, 5, 9, 2, 7, 7], [1, 5, 6, 9, 2, 8], [1, 5, 9, 2, 8, 9]]
    assert cut["completion_mask"].tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1],
                                               [0, 0, 0, 0, 1, 1]]


def test_collate_refuses_plain_text():
    with pytest.raises(ValueError, match="conversational"):
        dpo_loop.collate([{"prompt": "hi", "chosen": "a", "rejected": "b"}], _ToyTokenizer())


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------


def test_same_lora_initialisation(runs):
    assert runs["init"].keys() == runs["trl_init"].keys() and len(runs["init"]) > 0
    for name, value in runs["init"].items():
        assert torch.equal(value, runs["trl_init"][name]), name


def test_first_steps_match_trl(runs, tiny_preset):
    ours = runs["loop"].history.steps
    theirs = dpo_loop.trl_step_records(runs["trainer"])
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, STEPS + 1))
    assert ours[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy = reference
    for a, b in zip(ours, theirs):
        from_sums = tiny_preset.beta * abs(b["logps_chosen"])  # the size whose rounding a reward carries
        for key in ("loss", "margin", "chosen_reward", "rejected_reward", "accuracy", "logps_chosen", "grad_norm"):
            size = from_sums if key in ("loss", "margin", "chosen_reward", "rejected_reward") else abs(b[key])
            relative = GRAD_RELATIVE if key == "grad_norm" else RELATIVE
            assert a[key] == pytest.approx(b[key], abs=TOLERANCE + relative * size), (a["step"], key)
    assert ours[-1]["loss"] < math.log(2)  # the second epoch sees the pairs again: it has learnt them
    trained = {n: p for n, p in runs["trainer"].model.named_parameters() if p.requires_grad}
    worst = {}
    for name, p in runs["model"].named_parameters():
        if p.requires_grad:
            # Adam divides by sqrt(v): where a gradient is at float32's rounding level, the two runs' rounding can take
            # an element a step apart, so compare whole tensors (the trajectories above already agree step by step)
            worst[name] = float((p - trained[name]).detach().norm() / trained[name].detach().norm().clamp(min=1e-12))
    assert max(worst.values()) < 1e-3, max(worst.items(), key=lambda kv: kv[1])


def test_lora_trained_and_base_frozen(runs):
    model = runs["model"]
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, runs["init"][n])]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    base = model.get_base_model()
    for name, p in base.named_parameters():
        if "lora_" not in name:
            original = name.replace(".base_layer", "")
            assert not p.requires_grad and torch.equal(p, runs["frozen"][original]), name


def test_history_and_held_out(runs):
    loop = runs["loop"]
    assert loop.step == STEPS and [r["epoch"] for r in loop.history.steps] == [1, 1, 2, 2]
    assert [e["step"] for e in loop.history.evals] == [0, 2, 4]  # step 0 once, although run() was called twice
    first = loop.history.evals[0]
    assert first["margin"] == 0.0 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    # the held-out pairs are the training pairs here: after two epochs, scored in full, the margin is positive
    assert loop.history.evals[-1]["margin"] > 0
    assert loop.history.seconds > 0


def test_first_step_moves_only_lora_b(tiny_pairs, tiny_preset):
    """At step 1, B = 0, so the loss's gradient with respect to A is 0: only B moves."""
    base, tokenizer = load_model("tiny", seed=0)
    model = dpo_loop.add_lora(base, tiny_preset.lora_r, tiny_preset.lora_alpha, seed=0)
    batch = dpo_loop.collate([tiny_pairs[0]["train"][i] for i in range(BATCH_SIZE)], tokenizer, 128)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    record = dpo_loop.train_step(model, dpo_loop.adamw(model, LR), batch, tiny_preset.beta)
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-6) and record["margin"] == 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[name]) == ("lora_A" in name), name


def test_plot_loop_curves(runs):
    from course_utils.loop_plots import plot_loop_curves

    fig = plot_loop_curves(runs["loop"].history, title="tiny")
    assert len(fig.axes) == 4
    held = fig.axes[1]
    assert list(held.lines[0].get_xdata()) == [0, 2, 4]  # the held-out margin at the steps it was scored
