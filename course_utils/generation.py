"""Sampling completions and scoring them under a model.

Both the data generator (pairs are sampled from the reference policy, as in the DPO
paper's controlled-sentiment experiment) and the evaluation (policy vs reference
samples, KL estimates) use these two functions.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from .losses import token_logps


def chat_prompt(tokenizer, prompt) -> str:
    """Render a prompt (text, or a list of chat messages) with the model's chat template.

    Plain-text prompts are taken to be already formatted.
    """
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@torch.inference_mode()
def sample_completions(
    model,
    tokenizer,
    prompts: list,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    desc: str = "Sampling",
) -> list[list[str]]:
    """Draw ``num_samples`` completions for every prompt; returns ``[len(prompts)][num_samples]`` strings.

    Pure ancestral sampling (no top-k / top-p) at ``temperature``: with the default
    1.0 the samples follow the model's own distribution, which the KL estimate in
    :func:`sequence_logprobs` relies on. Deterministic for a seed on CPU.
    """
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    flat = [t for t in texts for _ in range(num_samples)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in tqdm(range(0, len(flat), batch_size), desc=desc, unit="batch"):
                batch = tokenizer(flat[start : start + batch_size], return_tensors="pt", padding=True,
                                  add_special_tokens=False).to(model.device)
                generated = model.generate(
                    **batch,
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = generated[:, batch["input_ids"].shape[1] :]
                out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [[s.strip() for s in out[i * num_samples : (i + 1) * num_samples]] for i in range(len(prompts))]


@torch.inference_mode()
def sequence_logprobs(
    model,
    tokenizer,
    prompts: list,
    completions: list[str],
    *,
    batch_size: int = 16,
    disable_adapter: bool = False,
    per_token: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """Summed log-probability of each completion given its prompt: ``log pi(y | x)``, shape ``(N,)``.

    With ``per_token=True``, the terms of each sum instead: a list of N tensors, the i-th of shape
    ``(len(completion_i tokens),)`` (what a per-token KL estimator such as k3 needs).

    The completion is tokenised after the formatted prompt and followed by the
    template's end-of-turn token (the model must learn to stop), unless it already ends with it. With
    ``disable_adapter=True`` a PEFT model is scored with its LoRA adapter switched
    off, i.e. as the reference policy, without a second copy in memory.
    """
    eos = tokenizer.eos_token or ""
    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        p_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        end = "" if eos and completion.endswith(eos) else eos  # orca's answers arrive with it (data.py), as TRL does
        c_ids = tokenizer(completion + end, add_special_tokens=False)["input_ids"]
        rows.append((p_ids, c_ids))
    context = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    result = []
    try:
        with context:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                width = max(len(p) + len(c) for p, c in chunk)
                ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
                attn = torch.zeros_like(ids)
                mask = torch.zeros_like(ids, dtype=torch.bool)  # True on completion tokens
                for i, (p, c) in enumerate(chunk):
                    ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                    attn[i, : len(p) + len(c)] = 1
                    mask[i, len(p) : len(p) + len(c)] = True
                logits = model(input_ids=ids.to(model.device), attention_mask=attn.to(model.device)).logits
                terms = token_logps(logits, ids.to(logits.device), mask.to(logits.device)).cpu()  # (b, width-1)
                if per_token:
                    result.extend(row[m] for row, m in zip(terms, mask[:, 1:]))
                else:
                    result.append(terms.sum(dim=-1))
    finally:
        model.train(was_training)
    return result if per_token else torch.cat(result)
