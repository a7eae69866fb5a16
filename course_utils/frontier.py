"""Lesson 7: DPO, online RL (RLOO) and best-of-N on the reward-KL frontier.

Section 6.1 and Figure 2 (left) of Rafailov et al. (2023): GPT-2 continues IMDb review
prefixes, a sentiment classifier is the ground-truth reward, and each method's runs are
plotted as (KL(pi || pi_ref), reward); DPO's frontier lies above PPO's. Here the same
experiment at course scale: SmolLM2 (or the random tiny model) continues the course's
review openings and VADER is the ground truth (``course_utils.sentiment``).

Three ways to move from the reference towards higher reward, each at several settings:

* **DPO** at several beta, on pairs sampled from the reference and ranked by VADER
  (:func:`run_dpo`, through :func:`course_utils.train.build_trainer`);
* **online RL** with TRL's ``RLOOTrainer`` against VADER itself, at several KL
  coefficients (:func:`run_online`, through :func:`course_utils.rlhf.run_rloo`);
* **best-of-N** from the reference, no training (:func:`best_of_n`).

Every policy is measured the same way (:func:`measure_policy`): the same held-out prompts,
the same number of samples, temperature 1, the same ``max_new_tokens`` and sampling seed.
Summaries, conclusions and plots are in :mod:`course_utils.frontier_report`; the FLOP
estimates are explained in :func:`generation_flops`, :func:`dpo_run_flops` and
:func:`rloo_run_flops`.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .evaluate import kl_on_sampled_ids, mean_and_stderr
from .generation import chat_prompt, sample, sample_completions
from .gpu_budget import SHAPES, ModelShape, count_dpo_step_flops
from .precision import trainer_step_one_tolerances, training_dtype

METHODS = ("reference", "bon", "dpo", "rloo")  # the order of every table and plot
SATURATED = 0.9  # a VADER compound score this high is near its ceiling of 1: more reward is hardly possible


@dataclass(frozen=True)
class FrontierGrid:
    """What lesson 7 runs: the settings of each method, the seeds and the shared evaluation."""

    dpo_betas: tuple[float, ...]  # DPO's KL knob (Eq. 7): larger keeps the policy nearer the reference
    rloo_betas: tuple[float, ...]  # RLOO's KL coefficient in R = r - beta * log(pi / pi_ref) (Eq. 3)
    bon_ns: tuple[int, ...] = (1, 4, 16)  # candidates per prompt; N = 1 is plain sampling from the reference
    num_seeds: int = 3  # seeds per configuration: the fewest that show a spread (std and min-max)
    dpo_steps: int = 8  # DPO optimiser steps of preset.effective_batch_size pairs
    dpo_learning_rate: float = 1e-3  # a short run needs a higher LoRA rate than the 64-step preset's 5e-4
    dpo_warmup_steps: int = 0  # the preset's 5 warm-up steps would eat most of a short run
    rloo_steps: int = 8  # RLOO optimiser steps, each on num_generations fresh samples of one prompt
    rloo_learning_rate: float = 1e-3  # LoRA rate of RLOO (constant schedule, as in lesson 1)
    num_generations: int = 4  # RLOO samples per prompt; each one's baseline is the mean of the others
    eval_prompts: int = 16  # held-out openings every policy is measured on (the same ones for all)
    eval_samples: int = 2  # completions per held-out prompt and policy (best-of-N keeps one per N candidates)
    max_new_tokens: int = 32  # completion cap when measuring and in RLOO's training samples
    eval_seed: int = 1234  # sampling seed of every measurement: runs differ only by their policy


GRIDS = {
    # a random 2-layer model: proves the code path in about a minute (CI), the numbers mean nothing
    "tiny": FrontierGrid(dpo_betas=(0.05, 1.0), rloo_betas=(0.01, 0.5), bon_ns=(1, 4, 16), dpo_steps=4,
                         dpo_learning_rate=5e-3, rloo_steps=2, rloo_learning_rate=1e-2, eval_prompts=8,
                         eval_samples=1, max_new_tokens=16),
    # SmolLM2-135M on 2 CPU cores, sized from measured costs (make course, quiet machine): best-of-N ~15 s per
    # eval prompt (3 seeds x 16 candidates), a DPO run ~25 s at 8 steps + ~10 s measuring, an RLOO run ~31 s (4
    # steps of ~7 s: generating 4 x 32 tokens dominates) + ~9 s measuring. At lr 2e-3 six RLOO steps drove the
    # KL to ~22 nats; 5e-4 keeps it near 1. Eight DPO steps at 1e-3 reached 3-5 nats, beyond the other methods
    "cpu": FrontierGrid(dpo_betas=(0.1, 1.0), rloo_betas=(0.01, 0.5), bon_ns=(1, 4, 16), dpo_steps=6,
                        dpo_learning_rate=1e-3, rloo_steps=4, rloo_learning_rate=5e-4, eval_prompts=8,
                        eval_samples=1, max_new_tokens=32),
    # Colab GPU presets (Mistral-7B QLoRA): not run in this repository. Estimated from the README's ~35 s per
    # T4 step of 8 pairs: ~1.5 h of DPO on a T4 plus RLOO's generation; far less on an A100
    "gpu": FrontierGrid(dpo_betas=(0.05, 0.1, 0.5, 1.0), rloo_betas=(0.01, 0.05, 0.2), bon_ns=(1, 4, 16),
                        dpo_steps=12, dpo_learning_rate=2e-4, dpo_warmup_steps=2, rloo_steps=12,
                        rloo_learning_rate=1e-4, eval_prompts=16, eval_samples=1, max_new_tokens=64),
}


def grid_for(preset_name: str, **overrides) -> FrontierGrid:
    """The grid of a preset ("gpu" for every GPU preset); ``overrides`` that are None are ignored."""
    grid = GRIDS.get(preset_name, GRIDS["gpu"])
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(grid, **changes)


# --- KL of best-of-N -------------------------------------------------------------------------


def bon_kl(n: int) -> float:
    """KL(pi_BoN || pi_ref) = log N - (N - 1) / N nats (Stiennon et al., 2020).

    Not a Monte-Carlo estimate: the best-of-N density of a completion depends on where it ranks
    among all completions, so it cannot be scored token by token. Beirami et al. (2024) show the
    formula is an upper bound on the true KL, so best-of-N points sit at most this far right. 0 for N = 1.
    """
    if n < 1:
        raise ValueError(f"N must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


# --- FLOPs (estimates) -----------------------------------------------------------------------


def generation_flops(shape: ModelShape, *, prompt_tokens: float, completion_tokens: float, sequences: int,
                     lora_r: int = 0) -> float:
    """Matmul FLOPs of sampling ``sequences`` completions: about 2 x parameters per token, counted from shapes.

    With a KV cache every prompt and generated token passes through the decoder linears once
    (2 * in * out each), attention is counted as for a full pass over prompt + completion, and
    the LM head (2 * h * V) runs only where a token is drawn (``completion_tokens`` positions).
    That is :func:`course_utils.gpu_budget.count_dpo_step_flops`'s forward pass with the head
    limited to the completion. An estimate: no padding, norms or sampling itself.
    """
    s = max(1, round(prompt_tokens + completion_tokens))
    return count_dpo_step_flops(shape, s, sequences, lora_r, False, reference="precomputed",
                                lm_head_tokens_per_sequence=max(1, round(completion_tokens)))["forward"]


def dpo_step_flops(shape: ModelShape, *, pairs: int, prompt_tokens: float, completion_tokens: float, lora_r: int,
                   gradient_checkpointing: bool, precomputed_reference: bool, completion_head: bool) -> dict:
    """FLOPs of one DPO optimiser step over ``pairs`` pairs (2 x pairs sequences), from
    :func:`course_utils.gpu_budget.count_dpo_step_flops` at the mean real lengths."""
    kwargs = {}
    if completion_head and "head_recomputes" in inspect.signature(count_dpo_step_flops).parameters:
        kwargs["head_recomputes"] = False  # fast_dpo's completion-only head keeps its logits for backward
    return count_dpo_step_flops(
        shape, max(1, round(prompt_tokens + completion_tokens)), 2 * pairs, lora_r, gradient_checkpointing,
        reference="precomputed" if precomputed_reference else "adapter_disabled",
        lm_head_tokens_per_sequence=max(1, round(completion_tokens)) if completion_head else None, **kwargs)


def dpo_run_flops(shape: ModelShape, *, steps: int, pairs_per_step: int, prompt_tokens: float,
                  completion_tokens: float, lora_r: int, gradient_checkpointing: bool = False,
                  completion_head: bool = False) -> float:
    """Training FLOPs of one DPO run (an estimate):

        steps x (policy forward + backward + reference forward) on 2 x pairs_per_step sequences

    The reference forward is counted on the pairs the run trains on, which is what TRL's default (a
    reference forward in every step) costs. The cpu preset instead scores all training pairs once and
    keeps them on disk (``fast_dpo``), which pays off when many runs share the pass, as every run here
    and lesson 4 do; that shared pass is charged to no run. Not counted either: sampling and judging the
    preference pairs (:func:`pair_data_flops`), also shared by every DPO run.
    """
    step = dpo_step_flops(shape, pairs=pairs_per_step, prompt_tokens=prompt_tokens,
                          completion_tokens=completion_tokens, lora_r=lora_r,
                          gradient_checkpointing=gradient_checkpointing, precomputed_reference=False,
                          completion_head=completion_head)
    return steps * step["total"]


def pair_data_flops(*, prompts: int, samples_per_prompt: int, prompt_tokens: float, completion_tokens: float,
                    shape: ModelShape | None = None, preset=None) -> float:
    """Generation FLOPs of the DPO training data: ``samples_per_prompt`` samples per prompt from the pairs'
    generator (``sentiment.pair_generator``: the preset's own model, SmolLM2-135M on ``tiny`` and without
    a preset), unless ``shape`` says otherwise."""
    from .sentiment import GENERATOR_MODEL

    key = GENERATOR_MODEL if preset is None or preset.name == "tiny" else preset.model_name
    return generation_flops(shape or SHAPES[key], prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens, sequences=prompts * samples_per_prompt)


def rloo_run_flops(shape: ModelShape, *, steps: int, sequences_per_step: int, prompt_tokens: float,
                   completion_tokens, lora_r: int, gradient_checkpointing: bool = False) -> float:
    """Training FLOPs of one RLOO run (an estimate). Per step, on ``sequences_per_step`` sampled sequences:

        generation (:func:`generation_flops`, with the adapter)
        + the "old" policy log-probs (a forward without grad; TRL takes it even when num_iterations = 1)
        + the reference log-probs (a forward with the adapter off)
        + the loss: policy forward + backward

    The LM head is counted on completion positions only (TRL keeps ``logits_to_keep`` logits).
    ``completion_tokens``: the mean generated length, one number or one per step (TRL logs it).
    """
    lengths = completion_tokens if isinstance(completion_tokens, (list, tuple)) else [completion_tokens] * steps
    total = 0.0
    for c in lengths[:steps]:
        c = max(1, round(c))
        f = count_dpo_step_flops(shape, max(1, round(prompt_tokens + c)), sequences_per_step, lora_r,
                                 gradient_checkpointing, reference="adapter_disabled", lm_head_tokens_per_sequence=c)
        total += 2 * f["forward"] + f["backward"] + f["recompute"] + f["reference"]  # generation + old logps = 2 forwards
    return total


def mean_prompt_tokens(tokenizer, prompts) -> float:
    """Mean length in tokens of the chat-formatted prompts (what the model reads before answering)."""
    return float(np.mean([len(tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"])
                          for p in prompts]))


def mean_completion_tokens(tokenizer, texts) -> float:
    """Mean length in tokens of completion texts, plus one for the end-of-turn token."""
    return float(np.mean([len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]))


# --- Measuring a policy ----------------------------------------------------------------------


def measure_policy(model, tokenizer, prompts, judge, grid: FrontierGrid, *, reference: bool = False) -> dict:
    """Mean ground-truth reward and Monte-Carlo KL(pi || pi_ref) of ``model`` on ``prompts``.

    ``grid.eval_samples`` completions per prompt at temperature 1, ``grid.max_new_tokens`` at
    most, seeded with ``grid.eval_seed``: every policy sees the same prompts and random numbers.
    KL = mean over those samples of log pi(y|x) - log pi_ref(y|x) (adapter on vs off,
    :func:`course_utils.evaluate.kl_on_sampled_ids`, on the sampled token ids); ``reference=True`` (a model without adapter)
    skips it: the reference's KL to itself is 0 by definition.
    """
    start = time.perf_counter()
    samples = sample(model, tokenizer, prompts, num_samples=grid.eval_samples, max_new_tokens=grid.max_new_tokens,
                     seed=grid.eval_seed, desc="Measuring")
    texts = samples.texts
    scores = judge(texts)
    reward, reward_se = mean_and_stderr(scores)
    kl, kl_se = (0.0, 0.0) if reference else kl_on_sampled_ids(model, samples)  # on the tokens it drew
    return {"reward": reward, "reward_stderr": reward_se, "kl": kl, "kl_stderr": kl_se,
            "saturated": float(np.mean(np.asarray(scores) >= SATURATED)),
            "kl_source": "zero" if reference else "monte_carlo", "completion_tokens": mean_completion_tokens(tokenizer, texts),
            "eval_seconds": time.perf_counter() - start, "samples": len(texts), "examples": texts[:2]}


def best_of_n(model, tokenizer, prompts, judge, grid: FrontierGrid, seed: int) -> list[dict]:
    """Best-of-N from the reference for every N in ``grid.bon_ns``, one run dict per N.

    For each prompt and each of ``grid.eval_samples`` outputs, ``max(N)`` candidates are sampled
    (seed ``grid.eval_seed + 1 + seed``, temperature 1); best-of-N keeps the highest-scoring of the
    first N. The subsets are nested, so per output best-of-16 >= best-of-4 >= best-of-1, and
    best-of-1 is a plain reference sample. KL from :func:`bon_kl`; FLOPs: generating N candidates
    per output (:func:`generation_flops`), paid at inference for every prompt, not once.
    """
    n_max, k = max(grid.bon_ns), grid.eval_samples
    start = time.perf_counter()
    groups = sample_completions(model, tokenizer, prompts, num_samples=n_max * k, max_new_tokens=grid.max_new_tokens,
                                seed=grid.eval_seed + 1 + seed, desc=f"Best-of-{n_max}")
    texts = [t for g in groups for t in g]
    scores = np.asarray(judge(texts), float).reshape(len(prompts), k, n_max)
    seconds = time.perf_counter() - start
    shape = ModelShape.from_config(model.config)
    p_tok, c_tok = mean_prompt_tokens(tokenizer, prompts), mean_completion_tokens(tokenizer, texts)
    runs = []
    for n in sorted(grid.bon_ns):
        best = scores[:, :, :n].max(axis=-1).ravel()  # (prompts * k,)
        reward, reward_se = mean_and_stderr(best)
        runs.append({"method": "bon", "param": "n", "value": n, "seed": seed, "reward": reward,
                     "reward_stderr": reward_se, "kl": bon_kl(n), "kl_stderr": 0.0, "kl_source": "closed_form",
                     "seconds": seconds * n / n_max,  # the share of the sampling time these N candidates took
                     "flops": generation_flops(shape, prompt_tokens=p_tok, completion_tokens=c_tok,
                                               sequences=len(prompts) * k * n),
                     "saturated": float(np.mean(best >= SATURATED)), "completion_tokens": c_tok, "samples": len(best)})
    return runs


# --- Training runs ---------------------------------------------------------------------------


def _hash_reference_once(model) -> None:
    """Key of the on-disk reference log-probs (``fast_dpo``), hashed once on the base: every copy inherits it."""
    try:
        from .fast_dpo import reference_weights_hash
    except ImportError:  # a course_utils without the on-disk reference cache
        return
    reference_weights_hash(model)


def run_dpo(preset, base, train_pairs, prompts, judge, grid: FrontierGrid, *, beta: float, seed: int,
            output_dir) -> dict:
    """One DPO run on a copy of the reference ``base = (model, tokenizer)``, then measured.

    ``grid.dpo_steps`` steps of ``preset.effective_batch_size`` pairs drawn (by ``seed``) from all of
    ``train_pairs``, so the precomputed reference log-probs are the cached ones of lesson 4.
    """
    from transformers import PrinterCallback

    from .train import build_trainer

    if preset.precompute_ref_log_probs:
        _hash_reference_once(base[0])
    model, tokenizer = copy.deepcopy(base[0]), base[1]  # build_trainer adds LoRA in place: never reuse one
    run_preset = preset.override(beta=beta, seed=seed, max_steps=grid.dpo_steps, learning_rate=grid.dpo_learning_rate,
                                 warmup_steps=min(grid.dpo_warmup_steps, grid.dpo_steps - 1),
                                 logging_steps=1)
    start = time.perf_counter()
    trainer = build_trainer(run_preset, model, tokenizer, train_pairs, guard=False, report_to=[], save_strategy="no",
                            disable_tqdm=True, output_dir=str(Path(output_dir) / f"dpo-beta{beta:g}-seed{seed}"))
    trainer.remove_callback(PrinterCallback)  # the log is kept in the run dict instead of printed
    trainer.train()
    seconds = time.perf_counter() - start
    data = trainer.train_dataset
    p_tok = float(np.mean([len(x) for x in data["prompt_ids"]]))
    c_tok = float(np.mean([(len(c) + len(r)) / 2 for c, r in zip(data["chosen_ids"], data["rejected_ids"])]))
    flops = dpo_run_flops(ModelShape.from_config(model.config), steps=trainer.state.global_step,
                          pairs_per_step=run_preset.effective_batch_size, prompt_tokens=p_tok, completion_tokens=c_tok,
                          lora_r=run_preset.lora_r, gradient_checkpointing=run_preset.gradient_checkpointing,
                          completion_head=bool(getattr(trainer, "completion_head", False)))
    measured = measure_policy(trainer.model, tokenizer, prompts, judge, grid)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    # how close to ln 2 step 1 must be, derived from the precision and the path (precision.py)
    bounds = trainer_step_one_tolerances(trainer, logs[0]) if logs[0]["step"] == 1 else None
    run = {"method": "dpo", "param": "beta", "value": beta, "seed": seed, "seconds": seconds, "flops": flops,
           "steps": trainer.state.global_step, "pairs_seen": trainer.state.global_step * run_preset.effective_batch_size,
           "learning_rate": grid.dpo_learning_rate, "first_loss": losses[0], "last_loss": losses[-1],
           "first_loss_bound": bounds["loss"] if bounds else None, "first_loss_bound_dtype": bounds and bounds["dtype"],
           "first_margin": logs[0].get("rewards/margins"),
           # True when the precomputed reference log-probs came from the on-disk cache (fast_dpo), not a fresh pass
           "reference_cache_hit": bool(getattr(trainer, "reference_cache_hits", None)), **measured}
    del trainer, model
    gc.collect()  # a few hundred MB per run on cpu
    return run


def run_online(preset, base, train_prompts, prompts, judge, grid: FrontierGrid, *, beta: float, seed: int,
               output_dir) -> dict:
    """One RLOO run (:func:`course_utils.rlhf.run_rloo`, TRL's ``RLOOTrainer``) with KL coefficient ``beta``
    against ``judge`` itself, on a copy of the reference ``base``, then measured like every other policy."""
    from .rlhf import run_rloo

    tokenizer = base[1]
    # on CPU, the bf16 autocast the preset's DPO training uses (where native), so both trained methods get it
    cpu_bf16 = not torch.cuda.is_available() and training_dtype(preset, on_gpu=False) is torch.bfloat16
    out = run_rloo(preset, base, train_prompts, None, judge, seed=seed,
                   learning_rate=grid.rloo_learning_rate, steps=grid.rloo_steps, beta=beta,
                   output_dir=Path(output_dir) / f"rloo-beta{beta:g}", num_generations=grid.num_generations,
                   max_completion_length=grid.max_new_tokens, keep_model=True,  # rewarded by judge_reward(judge)
                   config_overrides={"bf16": True} if cpu_bf16 else None)
    policy = out.pop("model")  # run_rloo trained a deep copy of base
    lengths = [c if c is not None else grid.max_new_tokens for c in out["completion_lengths"]]
    flops = rloo_run_flops(ModelShape.from_config(policy.config), steps=grid.rloo_steps,
                           sequences_per_step=grid.num_generations, prompt_tokens=mean_prompt_tokens(tokenizer, train_prompts),
                           completion_tokens=lengths, lora_r=preset.lora_r)
    measured = measure_policy(policy, tokenizer, prompts, judge, grid)
    run = {"method": "rloo", "param": "beta", "value": beta, "seed": seed, "seconds": out["train_seconds"],
           "flops": flops, "steps": len(out["train_rewards"]), "samples_seen": grid.rloo_steps * grid.num_generations,
           "learning_rate": grid.rloo_learning_rate, "train_rewards": out["train_rewards"],
           "train_kl_per_token": out["kl"], **measured}
    del policy
    gc.collect()
    return run
