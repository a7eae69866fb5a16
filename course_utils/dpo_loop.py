"""A DPO training loop written from scratch: batch, log-probs, loss, optimizer step, held-out check.

Lesson 2, section 8, in the spirit of Raschka's ``dpo-from-scratch.ipynb``: every step TRL's
``DPOTrainer`` takes for the plain sigmoid loss, written out, so that the same pairs, model,
LoRA initialisation and optimizer settings give TRL's numbers (``tests/test_dpo_loop.py``)::

    model = add_lora(base, r=8, alpha=16, seed=0)           # the reference = this model, adapter off
    optimizer = adamw(model, lr=5e-3)
    loop = DPOLoop(model, optimizer, train_pairs, tokenizer, beta=0.1, batch_size=4, max_length=128,
                   eval_pairs=held_out, eval_every=4)
    loop.run(3)                                              # steps 1-3; loop.run(9) continues to 12
    steps, evals = loop.history.frames()

The pieces are the library's own: the loss is :func:`course_utils.losses.preference_loss`
(Eq. 7 of Rafailov et al., 2023), the log-probs :func:`course_utils.losses.sequence_logps`.
Pairs are conversational rows (``prompt``/``chosen``/``rejected`` message lists), as in
:func:`course_utils.sentiment.sentiment_dataset`. Plain fp32, constant learning rate, no
gradient accumulation: what the loop leaves out, TRL adds on top (see :func:`matching_dpo_config`).
The curves of a run: :func:`course_utils.loop_plots.plot_loop_curves`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .losses import preference_loss, sequence_logps
from .models import lora_config

# ---------------------------------------------------------------------------------------------
# The batch: [chosen_1 .. chosen_B; rejected_1 .. rejected_B], as TRL's DataCollatorForPreference
# ---------------------------------------------------------------------------------------------


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(example: dict, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` of one conversational pair, as TRL 1.x tokenizes it.

    The prompt is templated alone with ``add_generation_prompt=True`` (it ends where the assistant
    starts), and prompt + answer as one conversation; the completion is what follows their common
    prefix, so it includes the template's end-of-turn tokens: the model learns to stop too.
    (TRL's ``DPOTrainer._prepare_dataset``; the common prefix, not the prompt's length, because some
    templates render a prompt differently when an answer follows.)
    """
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(example[key], list):
            raise ValueError(f"tokenize_pair needs conversational rows (lists of messages); {key!r} is "
                             f"{type(example[key]).__name__}. Wrap plain text as [{{'role': 'user', 'content': ...}}].")

    def ids(messages, **kwargs):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])

    prompt = ids(example["prompt"], add_generation_prompt=True)
    with_chosen = ids(example["prompt"] + example["chosen"])
    with_rejected = ids(example["prompt"] + example["rejected"])
    n = min(_common_prefix(prompt, with_chosen), _common_prefix(prompt, with_rejected))
    return prompt[:n], with_chosen[n:], with_rejected[n:]


def collate(examples, tokenizer, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """``B`` pairs -> one batch of ``2B`` sequences, chosen rows first, right-padded to the longest.

    Args:
        examples: ``B`` conversational pairs (dicts, or a ``datasets.Dataset`` slice's rows).
        tokenizer: with a chat template and a pad token.
        max_length: prompt + completion tokens kept per sequence; the end is cut (TRL's
            ``truncation_mode="keep_start"``), so a long answer loses its last tokens.

    Returns:
        ``input_ids``, ``attention_mask`` (1 on real tokens) and ``completion_mask`` (1 on the
        answer's tokens: only they enter log π(y|x)), each ``(2B, T)`` int64, ``T`` the longest
        sequence of the batch. Rows ``i`` and ``B + i`` share a prompt.
    """
    rows = [tokenize_pair(example, tokenizer) for example in examples]
    if max_length is not None:
        too_long = [i for i, (prompt, _, _) in enumerate(rows) if len(prompt) >= max_length]
        if too_long:  # TRL drops such rows from the dataset; a batch cannot, so say which
            raise ValueError(f"pairs {too_long}: the prompt alone fills max_length = {max_length}, leaving no "
                             "completion token to learn from; drop them or raise max_length")
    sequences = [p + c for p, c, _ in rows] + [p + r for p, _, r in rows]
    masks = [[0] * len(p) + [1] * len(c) for p, c, _ in rows] + [[0] * len(p) + [1] * len(r) for p, _, r in rows]
    if max_length is not None:
        sequences, masks = [s[:max_length] for s in sequences], [m[:max_length] for m in masks]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        completion_mask[i, : len(seq)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def mask_table(batch: dict, tokenizer, row: int, context: int = 3):
    """One row of a batch around its two boundaries (prompt -> completion, completion -> padding), as a DataFrame.

    Columns: the token as text, ``attention_mask``, ``completion_mask`` and which part it belongs to;
    the index is the position. ``context`` tokens are shown on each side of each boundary.
    """
    import pandas as pd

    ids, attn, comp = (batch[k][row].tolist() for k in ("input_ids", "attention_mask", "completion_mask"))
    start, end = comp.index(1), sum(attn)  # first completion token; first padding position (or the width)
    shown = sorted({*range(start - context, start + context), *range(end - context, min(end + context, len(ids)))})
    part = ["padding" if not a else "completion" if c else "prompt" for a, c in zip(attn, comp)]
    return pd.DataFrame({"token": [repr(tokenizer.decode([ids[i]])) for i in shown],
                         "attention_mask": [attn[i] for i in shown], "completion_mask": [comp[i] for i in shown],
                         "part": [part[i] for i in shown]}, index=pd.Index(shown, name="position"))


# ---------------------------------------------------------------------------------------------
# Model, optimizer, log-probs
# ---------------------------------------------------------------------------------------------


def add_lora(model, r: int, alpha: int, seed: int = 0):
    """``model`` wrapped with a fresh LoRA adapter on every linear projection (a ``PeftModel``).

    Seeded right before the adapter is built, as ``DPOTrainer`` does: LoRA's ``A`` matrices are
    random (``B`` starts at 0, so the policy starts as the reference), and the same seed gives
    TRL's ``A``. Dropout 0, because TRL switches dropout off (``disable_dropout=True``): with it,
    the policy and the reference would differ by noise as well as by the adapter.
    """
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(seed)
    return get_peft_model(model, lora_config(r, alpha, dropout=0.0))


def adamw(model, lr: float) -> torch.optim.AdamW:
    """AdamW over the trainable (LoRA) parameters with the ``transformers.Trainer`` defaults.

    betas (0.9, 0.999), eps 1e-8, weight decay 0: what ``DPOConfig`` uses unless told otherwise.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def batch_logps(model, batch: dict) -> torch.Tensor:
    """log π(y|x) of every sequence, ``(2B,)``: the completion tokens' log-probs summed.

    Gradients flow when called outside ``torch.no_grad``. Prompt and padding count 0
    (``completion_mask``); the one-position shift is :func:`course_utils.losses.sequence_logps`'.
    The model computes logits only from the last prompt token of the shortest prompt on
    (``logits_to_keep``): the prompt's own next-token predictions are never scored, and the LM
    head over a 49k-token vocabulary is a large share of a small model's forward pass.
    """
    device = _device(model)
    input_ids, mask = batch["input_ids"].to(device), batch["completion_mask"].to(device)
    first = int(mask.argmax(dim=1).min())  # the earliest completion token of the batch (padding is on the right)
    keep = input_ids.shape[1] - first + 1  # that token is predicted by the position before it
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), use_cache=False,
                   logits_to_keep=keep).logits  # (2B, keep, V): the last `keep` positions
    return sequence_logps(logits, input_ids[:, -keep:], mask[:, -keep:])  # -> (2B,)


@torch.no_grad()
def reference_logps(model, batch: dict) -> torch.Tensor:
    """log π_ref(y|x), ``(2B,)``: the same model with its LoRA adapter switched off.

    No second copy of the model: the base weights *are* the reference, and ``disable_adapter()``
    runs them without the ``B A`` update. No gradient, so no activations are kept.
    """
    with model.disable_adapter():
        return batch_logps(model, batch)


def pair_stats(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """Eq. 7 on a batch: ``(loss, stats)`` from ``(2B,)`` policy and reference log-probs.

    ``loss`` is the mean over pairs of ``-log σ(β Δ)`` (TRL averages the same way);
    ``stats`` holds per-pair tensors ``(B,)``: ``chosen_reward``/``rejected_reward`` (β log π/π_ref),
    ``margin`` (their difference, TRL's ``rewards/margins``), ``correct`` (margin > 0, TRL's
    ``rewards/accuracies``), ``logps_chosen``/``logps_rejected`` (the policy's log π, detached).
    """
    chosen, rejected = policy.chunk(2)
    ref_chosen, ref_rejected = reference.chunk(2)
    losses, chosen_reward, rejected_reward = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
    stats = {"loss": losses.detach(), "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
             "margin": chosen_reward - rejected_reward, "correct": (chosen_reward > rejected_reward).float(),
             "logps_chosen": chosen.detach(), "logps_rejected": rejected.detach()}
    return losses.mean(), stats


def _means(stats: dict) -> dict:
    out = {k: v.float().mean().item() for k, v in stats.items() if k != "correct"}
    out["accuracy"] = stats["correct"].mean().item()
    return out


# ---------------------------------------------------------------------------------------------
# One step, an evaluation, the loop
# ---------------------------------------------------------------------------------------------


def train_step(model, optimizer, batch: dict, beta: float, ref_logps: torch.Tensor | None = None,
               max_grad_norm: float = 1.0) -> dict:
    """One optimizer step on one batch; returns the batch means (loss, rewards, margin, accuracy, grad_norm).

    ``ref_logps``: ``(2B,)`` reference log-probs if already known (the reference never changes, so
    :func:`train` computes them once per batch), else computed here with the adapter off.
    The gradient is clipped to norm ``max_grad_norm`` before the step, like ``Trainer``; the
    recorded ``grad_norm`` is the norm before clipping (what TRL logs).
    """
    model.train()
    if ref_logps is None:
        ref_logps = reference_logps(model, batch)
    loss, stats = pair_stats(batch_logps(model, batch), ref_logps.to(_device(model)), beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return {**_means(stats), "loss": loss.item(), "grad_norm": grad_norm.item()}


@torch.no_grad()
def evaluate(model, batches: list[dict], beta: float, ref_logps: list[torch.Tensor] | None = None) -> dict:
    """Loss, rewards, margin and accuracy over every pair of ``batches`` (means over pairs, not batches)."""
    model.eval()
    parts = []
    for i, batch in enumerate(batches):
        ref = reference_logps(model, batch) if ref_logps is None else ref_logps[i].to(_device(model))
        parts.append(pair_stats(batch_logps(model, batch), ref, beta)[1])
    model.train()
    return _means({k: torch.cat([p[k] for p in parts]) for k in parts[0]})


@dataclass
class History:
    """What a :class:`DPOLoop` measured: one dict per step, one per held-out evaluation (each with its ``step``)."""

    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # wall-clock time spent in DPOLoop.run

    def frames(self):
        """``(steps, evals)`` as pandas DataFrames indexed by step."""
        import pandas as pd

        return pd.DataFrame(self.steps).set_index("step"), pd.DataFrame(self.evals).set_index("step")


def batches_of(pairs, tokenizer, batch_size: int, max_length: int | None) -> list[dict]:
    """Consecutive batches of ``pairs`` in their order, the last one possibly smaller (no shuffling)."""
    rows = [pairs[i] for i in range(len(pairs))]
    return [collate(rows[i : i + batch_size], tokenizer, max_length) for i in range(0, len(rows), batch_size)]


class DPOLoop:
    """DPO on a fixed list of pairs, cycled in order (epochs), with a held-out check; :meth:`run` continues.

    Args:
        model: a ``PeftModel`` (:func:`add_lora`); the adapter is trained, the base is the reference.
        optimizer: over the adapter's parameters (:func:`adamw`); the learning rate stays constant.
        train_pairs, eval_pairs: conversational pairs; ``eval_pairs`` are held out, scored at step 0
            (margin 0: the policy is the reference) and after every ``eval_every``-th step.
        beta: β of Eq. 7. batch_size: pairs per step. max_length: see :func:`collate`.

    ``history`` (:class:`History`) holds, per step, the batch's loss, mean chosen/rejected reward,
    margin, accuracy, mean policy log-probs and gradient norm; per evaluation the same over all
    held-out pairs.
    """

    def __init__(self, model, optimizer, train_pairs, tokenizer, *, beta: float, batch_size: int,
                 max_length: int | None, eval_pairs=None, eval_every: int | None = None, max_grad_norm: float = 1.0):
        self.model, self.optimizer, self.beta, self.max_grad_norm = model, optimizer, beta, max_grad_norm
        self.eval_every = eval_every
        self.train_batches = batches_of(train_pairs, tokenizer, batch_size, max_length)
        self.eval_batches = batches_of(eval_pairs, tokenizer, batch_size, max_length) if eval_pairs is not None else []
        # The reference is frozen: its log-probs for a batch are computed once, not once per epoch
        # (TRL's precompute_ref_log_probs does the same for a whole dataset).
        self.train_refs = [reference_logps(model, b) for b in self.train_batches]
        self.eval_refs = [reference_logps(model, b) for b in self.eval_batches]
        self.history = History()
        self.step = 0

    def evaluate(self) -> dict:
        """Scores the held-out pairs now and appends the result to ``history.evals``."""
        record = {"step": self.step, **evaluate(self.model, self.eval_batches, self.beta, self.eval_refs)}
        self.history.evals.append(record)
        return record

    def run(self, steps: int) -> History:
        """``steps`` more optimizer steps; returns the whole history so far."""
        start = time.perf_counter()
        if self.step == 0 and self.eval_batches:
            self.evaluate()
        for _ in range(steps):
            i = self.step % len(self.train_batches)  # batch i of the epoch, in the same order every epoch
            record = train_step(self.model, self.optimizer, self.train_batches[i], self.beta, self.train_refs[i],
                                self.max_grad_norm)
            self.step += 1
            self.history.steps.append({"step": self.step, "epoch": (self.step - 1) // len(self.train_batches) + 1,
                                       **record})
            if self.eval_batches and self.eval_every and self.step % self.eval_every == 0:
                self.evaluate()
        self.history.seconds += time.perf_counter() - start
        return self.history


def train(model, optimizer, train_pairs, tokenizer, *, steps: int, **loop_args) -> History:
    """``steps`` optimizer steps of a fresh :class:`DPOLoop` (same arguments); returns its :class:`History`."""
    return DPOLoop(model, optimizer, train_pairs, tokenizer, **loop_args).run(steps)


# ---------------------------------------------------------------------------------------------
# TRL, set up to take exactly the loop's steps
# ---------------------------------------------------------------------------------------------


def matching_dpo_config(output_dir, *, beta: float, learning_rate: float, batch_size: int, steps: int,
                        max_length: int | None, seed: int = 0, **overrides):
    """A ``trl.DPOConfig`` whose training steps are :func:`train`'s (TRL 1.16 defaults checked in its source).

    Pass the *base* model and ``peft_config=lora_config(r, alpha, dropout=0.0)`` to ``DPOTrainer``
    with this config: TRL seeds with ``seed`` and builds the adapter, as :func:`add_lora` does.
    """
    from trl import DPOConfig

    kwargs = dict(
        output_dir=str(output_dir),
        beta=beta,  # β of Eq. 7
        loss_type=["sigmoid"],  # Eq. 7 itself, averaged over the batch's pairs
        learning_rate=learning_rate,
        lr_scheduler_type="constant",  # Trainer's default is "linear" decay to 0; the loop keeps lr fixed
        warmup_steps=0,  # no warmup (the default, stated)
        optim="adamw_torch",  # torch.optim.AdamW; transformers 5 defaults to its fused kernel (other rounding)
        weight_decay=0.0,  # the default; adam_beta1/2 = 0.9/0.999 and adam_epsilon = 1e-8 are too
        max_grad_norm=1.0,  # the default: clip the gradient's norm to 1 before each step
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,  # one batch, one step
        train_sampling_strategy="sequential",  # the pairs in their order, every epoch (default: shuffled)
        max_length=max_length,  # cut at the end (truncation_mode="keep_start", the default)
        disable_dropout=True,  # the default; the loop's LoRA has dropout 0 and the base models none
        bf16=False,  # fp32 end to end (TRL defaults to bf16=True)
        activation_checkpointing=False,  # TRL defaults to recomputing activations; same numbers, slower here
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,  # log every step, to compare step by step
        save_strategy="no",  # no checkpoints
        report_to="none",
        disable_tqdm=True,
        seed=seed,  # seeds the LoRA initialisation, as add_lora does
    )
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def trl_step_records(trainer) -> list[dict]:
    """The per-step log of a ``DPOTrainer`` run with ``logging_steps=1``, in :func:`train_step`'s names."""
    names = {"loss": "loss", "rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward",
             "rewards/margins": "margin", "rewards/accuracies": "accuracy", "logps/chosen": "logps_chosen",
             "logps/rejected": "logps_rejected", "grad_norm": "grad_norm"}
    logs = [log for log in trainer.state.log_history if "loss" in log and "rewards/margins" in log]
    return [{"step": log["step"], **{ours: float(log[theirs]) for theirs, ours in names.items()}} for log in logs]
