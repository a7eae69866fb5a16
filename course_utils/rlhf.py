"""RLHF background (lesson 1): the pipeline DPO replaces, small enough to run on a CPU.

* Bradley-Terry preferences and a reward model trained on them with TRL's ``RewardTrainer``;
* the KL-shaped per-token reward of the RLHF objective;
* PPO's clipped surrogate (Schulman et al., 2017) on a handful of tokens;
* a seeds x learning-rates sweep of online RL (TRL's ``RLOOTrainer``) against the VADER judge,
  to measure how much the outcome moves with the seed.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from .models import SAFE_LOADING, load_tokenizer, lora_config, resolve_source, tiny_model_dir
from .presets import Preset

PREFERENCE_COLUMNS = ["prompt", "chosen", "rejected"]


# --- 1) Bradley-Terry ------------------------------------------------------------------------


def bradley_terry_prob(r_chosen, r_rejected) -> torch.Tensor:
    """P(chosen > rejected) = sigma(r_chosen - r_rejected): Eq. 1 of Rafailov et al. (2023), after Bradley & Terry (1952).

    Shapes: any two broadcastable tensors (or floats) of rewards; returns their broadcast shape.
    """
    return torch.sigmoid(torch.as_tensor(r_chosen, dtype=torch.float64) - torch.as_tensor(r_rejected, dtype=torch.float64))


def bradley_terry_loss(r_chosen, r_rejected) -> torch.Tensor:
    """Reward-model loss, Eq. 2 of Rafailov et al. (2023): mean of -log sigma(r_chosen - r_rejected); shapes (N,) -> ()."""
    diff = torch.as_tensor(r_chosen, dtype=torch.float64) - torch.as_tensor(r_rejected, dtype=torch.float64)
    return -torch.nn.functional.logsigmoid(diff).mean()


def reward_accuracy(r_chosen, r_rejected) -> float:
    """Fraction of pairs with r(chosen) > r(rejected), strictly (a tie counts as a miss); shapes (N,), (N,)."""
    c, r = np.asarray(r_chosen, float), np.asarray(r_rejected, float)
    if c.shape != r.shape or c.size == 0:
        raise ValueError(f"need equally many chosen and rejected rewards, got {c.shape} and {r.shape}")
    return float((c > r).mean())


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` measured on ``n`` trials (sound near 0 and 1, unlike p +- 2 SE)."""
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))  # clamp float rounding at 0 and 1


# --- 2) A reward model with TRL's RewardTrainer ------------------------------------------------


def reward_backbone_path(preset: Preset, seed: int = 0) -> str:
    """Checkpoint the reward model starts from: the tiny model on "tiny", SmolLM2-135M everywhere else.

    A 7B reward model next to a 7B policy is out of scope for one GPU in this course.
    """
    return str(tiny_model_dir(seed)) if preset.model_name == "tiny" else resolve_source("smollm2-135m")


def load_reward_model(preset: Preset, seed: int = 0, trainable_layers: int | None = None):
    """``(AutoModelForSequenceClassification with num_labels=1, tokenizer)``: the backbone plus a new scalar head ``score``.

    ``trainable_layers``: train only the top N decoder layers, the final norm and the head (None: all). Gradients
    then stop at layer N from the top, so a step costs little more than a forward pass.
    """
    from transformers import AutoModelForSequenceClassification

    path = reward_backbone_path(preset, seed)
    tokenizer = load_tokenizer("tiny" if preset.model_name == "tiny" else "smollm2-135m")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                               **SAFE_LOADING)
    # A zero head: every reward starts at 0, so the first loss is exactly ln 2 (and no random offset to unlearn)
    torch.nn.init.zeros_(model.score.weight)
    model.config.pad_token_id = tokenizer.pad_token_id  # the reward is read at the last non-pad token
    if trainable_layers is not None:
        layers = model.model.layers
        model.requires_grad_(False)
        for module in [*layers[len(layers) - trainable_layers :], model.model.norm, model.score]:
            module.requires_grad_(True)
    return model, tokenizer


def reward_config(output_dir, *, steps: int, learning_rate: float, batch_size: int, max_length: int, seed: int = 0,
                  **overrides):
    """TRL ``RewardConfig`` for a short CPU-friendly run; ``overrides`` are RewardConfig fields."""
    from trl import RewardConfig

    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=steps,  # optimiser steps (a fraction of an epoch on CPU)
        per_device_train_batch_size=batch_size,  # pairs per step; each is two sequences, chosen and rejected
        learning_rate=learning_rate,
        lr_scheduler_type="linear",  # decay to 0 by the last step
        warmup_steps=0,
        max_length=max_length,  # pairs longer than this are dropped (not truncated) by TRL
        center_rewards_coefficient=None,  # optional penalty pulling rewards to mean 0 (Eisenstein et al., 2023)
        bf16=False,  # TRL defaults to bf16=True; the reward model stays fp32 (135M parameters)
        use_cpu=not on_gpu,
        activation_checkpointing=False,  # TRL defaults to checkpointing; short sequences do not need it
        logging_steps=max(1, steps // 8),
        logging_first_step=True,  # step 1 alone: with a zero head its loss is exactly ln 2
        save_strategy="no",  # nothing to resume from in a lesson
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return RewardConfig(**kwargs)


def train_reward_model(preset: Preset, train, output_dir, *, steps: int, learning_rate: float = 1e-4,
                       batch_size: int = 4, trainable_layers: int | None = None, seed: int = 0):
    """Fit a Bradley-Terry reward model on ``train`` (prompt/chosen/rejected, conversational) with ``RewardTrainer``.

    Returns ``(model, tokenizer, metrics)``; ``metrics`` has the logged loss/accuracy curve and ``seconds``.
    """
    from transformers import PrinterCallback
    from trl import RewardTrainer

    model, tokenizer = load_reward_model(preset, seed=seed, trainable_layers=trainable_layers)
    args = reward_config(output_dir, steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                         max_length=preset.max_length, seed=seed)
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                            train_dataset=train.select_columns(PREFERENCE_COLUMNS))  # explicit prompt, chat format
    trainer.remove_callback(PrinterCallback)  # the log is returned below instead of printed
    start = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "seconds": time.perf_counter() - start,
        "steps": trainer.state.global_step,
        "train_pairs": len(trainer.train_dataset),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "log": [{k: h[k] for k in ("step", "loss", "accuracy", "margin") if k in h} for h in logs],
    }
    return trainer.model.eval(), tokenizer, metrics


@torch.inference_mode()
def score_completions(model, tokenizer, prompts, completions, batch_size: int = 16) -> torch.Tensor:
    """Reward r(x, y) of each (chat prompt, completion text), tokenised exactly as RewardTrainer does; shape (N,)."""
    rows = [tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=True, return_dict=True)
            ["input_ids"] for p, c in zip(prompts, completions, strict=True)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # batch similar lengths: less padding
    out = torch.empty(len(rows))
    for start in range(0, len(rows), batch_size):
        chunk = order[start : start + batch_size]
        ids = torch.full((len(chunk), max(len(rows[i]) for i in chunk)), tokenizer.pad_token_id)
        attn = torch.zeros_like(ids)
        for j, i in enumerate(chunk):  # right padding; the model finds the last non-pad token itself
            ids[j, : len(rows[i])], attn[j, : len(rows[i])] = torch.tensor(rows[i]), 1
        logits = model(input_ids=ids.to(model.device), attention_mask=attn.to(model.device)).logits
        out[chunk] = logits[:, 0].float().cpu()
    return out


def evaluate_reward_model(model, tokenizer, pairs) -> dict:
    """Held-out accuracy (r(chosen) > r(rejected)) and the correlation of r with the judge's scores on all completions."""
    import pandas as pd

    prompts = list(pairs["prompt"])
    text = lambda side: [m[-1]["content"] for m in pairs[side]]
    r_c, r_r = score_completions(model, tokenizer, prompts, text("chosen")), score_completions(model, tokenizer, prompts, text("rejected"))
    rewards = torch.cat([r_c, r_r]).numpy()
    judge = np.asarray(list(pairs["chosen_score"]) + list(pairs["rejected_score"]), float)
    rank = lambda v: pd.Series(v).rank().to_numpy()  # ties (many scores are exactly 0) share their average rank
    accuracy, n = reward_accuracy(r_c, r_r), len(prompts)
    return {
        "accuracy": accuracy,
        "accuracy_ci": wilson_interval(accuracy, n),  # 64 pairs: about +-0.12
        "pearson": float(np.corrcoef(rewards, judge)[0, 1]),  # across prompts: per-prompt offsets count too
        "spearman": float(np.corrcoef(rank(rewards), rank(judge))[0, 1]),
        "margin_pearson": float(np.corrcoef(rewards[:n] - rewards[n:], judge[:n] - judge[n:])[0, 1]),  # within a prompt
        "intensity_pearson": float(np.corrcoef(rewards, np.abs(judge))[0, 1]),  # with |score|: strong vs neutral
        "pairs": len(prompts),
        "r_chosen": r_c.tolist(),
        "r_rejected": r_r.tolist(),
        "rewards": rewards.tolist(),
        "judge": judge.tolist(),
    }


# --- 3) The RLHF objective and PPO -------------------------------------------------------------


def kl_shaped_rewards(score: float, logp_policy, logp_ref, beta: float) -> torch.Tensor:
    """Per-token rewards of the KL-regularised objective (Ziegler et al., 2019; Ouyang et al., 2022, Eq. 2).

    r_t = -beta * (log pi(y_t|.) - log pi_ref(y_t|.)), plus the sequence score r(x, y) on the last token.
    Shapes: ``logp_policy``, ``logp_ref`` (T,) -> (T,). Their sum is r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)).
    """
    logp_policy, logp_ref = torch.as_tensor(logp_policy, dtype=torch.float64), torch.as_tensor(logp_ref, dtype=torch.float64)
    rewards = -beta * (logp_policy - logp_ref)
    rewards[-1] += score
    return rewards


def ppo_clipped_objective(logp_new, logp_old, advantages, clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped surrogate, per token: Eq. 7 of Schulman et al. (2017), before the mean over t.

    L_t = min(rho_t * A_t, clip(rho_t, 1 - clip, 1 + clip) * A_t) with rho_t = exp(logp_new - logp_old).
    Shapes: three broadcastable tensors, e.g. (T,) or (B, T) -> the same shape. PPO maximises the mean.
    """
    logp_new, logp_old, advantages = (torch.as_tensor(x, dtype=torch.float64) for x in (logp_new, logp_old, advantages))
    ratio = torch.exp(logp_new - logp_old)
    return torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages)


# --- 4) Online RL with RLOO, and how much it depends on the seed -------------------------------


def judge_reward(judge):
    """Wrap a judge (texts -> scores) as a TRL reward function: ``f(completions, **kwargs) -> list[float]``."""

    def sentiment_reward(completions, **kwargs) -> list[float]:
        # conversational prompts give completions as [{"role": "assistant", "content": ...}]
        return judge([c[-1]["content"] if isinstance(c, list) else c for c in completions])

    return sentiment_reward


def rloo_precision(preset: Preset) -> str:
    """The dtype RLOO trains in: the preset's half precision on a GPU, float32 on a CPU (lesson 1 prints it).

    TRL's ``bf16`` / ``fp16`` flags are set only on a GPU here: lesson 1's runs are short, and on a CPU fp32
    keeps the "old" and "new" log-probs of an RLOO step identical (ratio 1, KL 0 at the first step).
    """
    return preset.dtype if torch.cuda.is_available() and preset.dtype in ("bfloat16", "float16") else "float32"


def rloo_config(preset: Preset, output_dir, *, seed: int, learning_rate: float, steps: int, beta: float,
                num_generations: int = 4, max_completion_length: int = 32, **overrides):
    """TRL ``RLOOConfig``: one prompt x ``num_generations`` samples per step, LoRA, KL to the reference."""
    from trl import RLOOConfig

    on_gpu, dtype = torch.cuda.is_available(), rloo_precision(preset)
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=steps,  # optimiser steps, each on freshly generated samples
        learning_rate=learning_rate,  # of the LoRA adapter
        lr_scheduler_type="constant",  # a handful of steps: no schedule to speak of
        per_device_train_batch_size=num_generations,  # one prompt's group of samples per step
        num_generations=num_generations,  # samples per prompt; each one's baseline is the mean of the others
        max_completion_length=max_completion_length,  # tokens sampled per completion
        temperature=1.0,  # sample from the policy itself (no top-k / top-p)
        beta=beta,  # KL coefficient: reward - beta * sum_t log(pi / pi_ref)
        num_iterations=1,  # updates per batch of samples; >1 is where PPO's clip starts to matter
        epsilon=0.2,  # the clip range of the ratio (PPO's epsilon)
        disable_dropout=True,  # else "old" and "new" log-probs see different dropout masks: ratio != 1, KL noise
        bf16=dtype == "bfloat16",  # TRL defaults bf16=True; be explicit
        fp16=dtype == "float16",
        use_cpu=not on_gpu,
        activation_checkpointing=False,  # TRL defaults to checkpointing; 24-token completions do not need it
        logging_steps=1,  # every step's reward and KL, for the table
        save_strategy="no",
        report_to="none",
        seed=seed,  # LoRA init, data order and sampling
        data_seed=seed,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return RLOOConfig(**kwargs)


def mean_judge_reward(model, tokenizer, prompts, judge, *, num_samples: int, max_new_tokens: int, seed: int) -> float:
    """Mean judge score of ``num_samples`` completions per prompt, sampled with a fixed ``seed``."""
    from .generation import sample_completions

    samples = sample_completions(model, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                 seed=seed, desc="Evaluating")
    return float(np.mean(judge([s for group in samples for s in group])))


def run_rloo(preset: Preset, base, train_prompts, eval_prompts, judge, *, seed: int, learning_rate: float,
             steps: int, output_dir, beta: float | None = None, num_generations: int = 4,
             max_completion_length: int = 32, eval_samples: int = 2, eval_seed: int = 1234,
             config_overrides: dict | None = None, trainer_kwargs: dict | None = None,
             keep_model: bool = False) -> dict:
    """One RLOO run on a copy of ``base = (model, tokenizer)`` with a fresh LoRA adapter; returns its numbers.

    ``train_prompts``/``eval_prompts``: lists of chat prompts. The final policy is scored by ``judge`` on
    ``eval_prompts`` with the same sampling seed in every run, so runs differ only by what training did
    (``eval_prompts=None``: no scoring here, ``final_reward`` is None). ``config_overrides`` go to
    ``RLOOConfig``; ``trainer_kwargs`` to ``RLOOTrainer`` (e.g. another ``reward_funcs``).
    ``keep_model=True`` adds the trained PEFT model as ``"model"`` (lesson 7 measures it further).
    """
    from datasets import Dataset
    from transformers import PrinterCallback
    from .fast_rloo import rloo_trainer_class

    start = time.perf_counter()
    model, tokenizer = copy.deepcopy(base[0]), base[1]  # TRL wraps the model in LoRA in place: never reuse one
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # RLOOTrainer pads prompts on the left
    args = rloo_config(preset, Path(output_dir) / f"lr{learning_rate:g}-seed{seed}", seed=seed,
                       learning_rate=learning_rate, steps=steps, beta=preset.beta if beta is None else beta,
                       num_generations=num_generations, max_completion_length=max_completion_length,
                       **(config_overrides or {}))
    kwargs = dict(reward_funcs=judge_reward(judge), processing_class=tokenizer,
                  train_dataset=Dataset.from_dict({"prompt": list(train_prompts)}),
                  peft_config=lora_config(preset.lora_r, preset.lora_alpha, preset.lora_dropout))
    # TRL's RLOOTrainer, sampling with the course's decoder on a CPU (course_utils/fast_rloo.py)
    trainer = rloo_trainer_class()(model=model, args=args, **{**kwargs, **(trainer_kwargs or {})})
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
    finally:
        tokenizer.padding_side = padding_side  # the tokenizer is shared with the caller
    train_seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h]  # the steps that sampled (and scored) a batch
    # every optimiser step: with num_iterations > 1 the steps that reuse a batch log the clip but no reward
    updates = [h for h in trainer.state.log_history if "clip_ratio/region_mean" in h]
    final = None if eval_prompts is None else mean_judge_reward(
        trainer.model, tokenizer, eval_prompts, judge, num_samples=eval_samples,
        max_new_tokens=max_completion_length, seed=eval_seed)
    extra = {"model": trainer.model} if keep_model else {}
    return {
        "seed": seed,
        "learning_rate": learning_rate,
        "final_reward": final,  # mean judge score on the held-out prompts after training
        "train_rewards": [h["reward"] for h in logs],  # mean judge score of each step's samples
        "kl": [h.get("kl") for h in logs],  # per-token log(pi / pi_ref) of the samples, averaged
        "clip_ratio": [h["clip_ratio/region_mean"] for h in updates],  # fraction of sequences clipped, every step
        "completion_lengths": [h.get("completions/mean_length") for h in logs],  # generated tokens per sample
        "train_seconds": train_seconds,
        "course_sampling_calls": trainer.course_sampling_calls,  # batches sampled by the course's decoder, not generate
        "seconds": time.perf_counter() - start,
        **extra,
    }


def seed_lr_sweep(preset: Preset, base, train_prompts, eval_prompts, judge, *, seeds, learning_rates, steps: int,
                  output_dir, **kwargs) -> list[dict]:
    """``run_rloo`` for every (learning rate, seed); same prompts, same evaluation; a list of run dicts."""
    runs = []
    for lr in learning_rates:
        for seed in seeds:
            run = run_rloo(preset, base, train_prompts, eval_prompts, judge, seed=seed, learning_rate=lr, steps=steps,
                           output_dir=output_dir, **kwargs)
            print(f"lr={lr:g} seed={seed}: final reward {run['final_reward']:+.3f} ({run['seconds']:.0f} s)", flush=True)
            runs.append(run)
    return runs


def sweep_summary(runs: list[dict]):
    """Per learning rate: mean, std across seeds (ddof=1), min, max of the final reward; a pandas DataFrame."""
    import pandas as pd

    frame = pd.DataFrame([{k: r[k] for k in ("learning_rate", "seed", "final_reward", "seconds")} for r in runs])
    return frame.groupby("learning_rate")["final_reward"].agg(["mean", "std", "min", "max", "count"]).reset_index()


# --- Plots -------------------------------------------------------------------------------------


def plot_clipped_objective(clip: float = 0.2):
    """L^CLIP against the ratio rho for A = +1 and A = -1 (Figure 1 of Schulman et al., 2017)."""
    import matplotlib.pyplot as plt

    ratio = torch.linspace(0.01, 2.0, 400, dtype=torch.float64)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=False)
    for ax, adv in zip(axes, (1.0, -1.0)):
        ax.plot(ratio, ratio * adv, ls="--", color="grey", label=r"unclipped $\rho A$")
        ax.plot(ratio, ppo_clipped_objective(ratio.log(), 0.0, adv, clip), lw=2, label=r"$L^{CLIP}$")
        for edge in (1 - clip, 1 + clip):
            ax.axvline(edge, color="tab:red", lw=0.8, ls=":")
        ax.axvline(1.0, color="black", lw=0.5)
        ax.set(title=f"A = {adv:+g}", xlabel=r"ratio $\rho = \pi_\theta / \pi_{\theta_{old}}$", ylabel="objective")
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def plot_reward_vs_judge(evaluation: dict):
    """Learned reward against the VADER score of every held-out completion."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.scatter(evaluation["judge"], evaluation["rewards"], s=14, alpha=0.7)
    ax.set(xlabel="VADER compound score (ground truth)", ylabel="learned reward r(x, y)",
           title=f"held-out completions, Pearson {evaluation['pearson']:.2f}")
    fig.tight_layout()
    return fig


def plot_sweep(runs: list[dict], reference: float | None = None, noise: list[float] | None = None):
    """Final reward per learning rate: a point per seed and the mean; the reference, and its range over ``noise``.

    ``noise``: the reference's score under other evaluation sampling seeds (nothing trained).
    """
    import matplotlib.pyplot as plt

    lrs = sorted({r["learning_rate"] for r in runs})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    rng = np.random.default_rng(0)
    for i, lr in enumerate(lrs):
        vals = [r["final_reward"] for r in runs if r["learning_rate"] == lr]
        ax.scatter(i + rng.uniform(-0.08, 0.08, len(vals)), vals, color="tab:blue", alpha=0.8,
                   label="one seed" if i == 0 else None)
        ax.hlines(np.mean(vals), i - 0.25, i + 0.25, color="black", lw=2, label="mean over seeds" if i == 0 else None)
    if reference is not None:
        ax.axhline(reference, color="tab:red", ls="--", lw=1, label="reference policy")
    if noise:
        span = [*noise, *([reference] if reference is not None else [])]
        ax.axhspan(min(span), max(span), color="tab:red", alpha=0.1, label="reference, range over eval seeds")
    ax.set_xticks(range(len(lrs)), [f"lr={lr:g}" for lr in lrs])
    ax.set(ylabel="mean judge reward, held-out prompts", title="RLOO: same recipe, different seeds")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig
