"""Sampling completions and scoring them under a model.

Both the data generator (pairs are sampled from the reference policy, as in the DPO
paper's controlled-sentiment experiment) and the evaluation (policy vs reference
samples, KL estimates) use these functions. Decoding itself is :mod:`course_utils.decode`.
"""

from __future__ import annotations

import contextlib

import torch

from .decode import Samples, decode, sampling_model
from .losses import token_logps


def chat_prompt(tokenizer, prompt) -> str:
    """Render a prompt (text, or a list of chat messages) with the model's chat template.

    Plain-text prompts are taken to be already formatted.
    """
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt after :func:`chat_prompt` (no special tokens added: the template has them)."""
    return [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def adapter_enabled(model) -> bool:
    """False when ``model`` is a PEFT model whose adapter is switched off (inside ``disable_adapter()``)."""
    if not hasattr(model, "disable_adapter"):
        return True
    for module in model.modules():
        if hasattr(module, "disable_adapters") and hasattr(module, "lora_A"):
            return not module.disable_adapters
    return True


def sample(
    model,
    tokenizer,
    prompts: list,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    dtype="auto",
    desc: str | None = "Sampling",
) -> Samples:
    """``num_samples`` completions of every prompt, with the token ids that were sampled (:class:`~.decode.Samples`).

    The policy is decoded with its adapter merged into a copy of the weights, the reference (a PEFT model inside
    ``disable_adapter()``) from the base weights; on a CPU with native bf16 that copy is bf16 (``dtype="auto"``,
    see :func:`course_utils.decode.sampling_model`). ``temperature=0`` decodes greedily. Pure ancestral sampling
    (no top-k / top-p): with the default 1.0 the samples follow the model's own distribution, which the KL estimate
    relies on. Reproducible for a seed, and a row's random numbers do not depend on ``batch_size``.
    """
    prompt_ids = encode_prompts(tokenizer, prompts)
    with sampling_model(model, adapter=adapter_enabled(model), dtype=dtype) as sampler:
        return decode(sampler, tokenizer, prompt_ids, num_samples=num_samples, max_new_tokens=max_new_tokens,
                      temperature=temperature, seed=seed, batch_size=batch_size, desc=desc)


def sample_completions(
    model,
    tokenizer,
    prompts: list,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    dtype="auto",
    desc: str | None = "Sampling",
) -> list[list[str]]:
    """Draw ``num_samples`` completions for every prompt; returns ``[len(prompts)][num_samples]`` strings.

    The texts of :func:`sample` (same arguments); use :func:`sample` itself where the sampled token ids matter,
    e.g. to score exactly those tokens (:func:`sequence_logprobs_of_ids`).
    """
    return sample(model, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                  temperature=temperature, seed=seed, batch_size=batch_size, dtype=dtype, desc=desc).grouped()


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
    return sequence_logprobs_of_ids(model, [p for p, _ in rows], [c for _, c in rows], pad_id=tokenizer.pad_token_id,
                                    batch_size=batch_size, disable_adapter=disable_adapter, per_token=per_token)


def decoder_and_head(model):
    """``(decoder, lm_head)`` of ``model`` (a PEFT model's LoRA layers stay in the decoder), or None where the
    logits are more than ``lm_head(hidden)`` (soft-capped or scaled heads) or the parts cannot be found."""
    from .fast_dpo import scaled_head_attribute

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if decoder is None or decoder is base or head is None or scaled_head_attribute(base):
        return None
    return decoder, head


def completion_token_logps(decoder, head, ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor):
    """:func:`~course_utils.losses.token_logps` with the vocabulary product taken at completion positions only.

    ``ids``, ``attention_mask``, ``mask`` (True on completion tokens): ``(B, T)``; returns ``(B, T-1)`` float32.
    Why: a log-prob needs logits only where a completion token is predicted (~a third of a sentiment row), and
    ``(B, T, V)`` logits in float32 are 400 MB for 16 rows of 130 tokens; here it is one ``[N_c, H] @ [H, V]``
    product and one float32 log-softmax over those ``N_c`` rows (the training head's trick, ``fast_dpo.py``).
    """
    hidden = decoder(input_ids=ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[:, :-1]
    scored = mask[:, 1:].bool()  # position t predicts token t + 1
    logits = head(hidden[scored]).float()  # (N_c, V)
    targets = ids[:, 1:][scored]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (N_c,)
    return torch.zeros(scored.shape, dtype=torch.float32, device=ids.device).masked_scatter(scored, picked)


@torch.inference_mode()
def sequence_logprobs_of_ids(
    model,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    pad_id: int = 0,
    batch_size: int = 16,
    disable_adapter: bool = False,
    per_token: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """Summed log-probability of the given completion *ids* after the given prompt ids, shape ``(N,)``.

    No tokenisation: scores exactly these tokens, e.g. the ones :func:`sample` drew (``Samples.completion_ids``),
    so a Monte-Carlo KL is taken over the tokens that were sampled (decoding to text and tokenising again is not
    a bijection). ``per_token`` and ``disable_adapter`` as in :func:`sequence_logprobs`. An empty completion
    scores 0.
    """
    rows = list(zip(prompt_ids, completion_ids, strict=True))
    scorer = decoder_and_head(model)
    context = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    result = []
    try:
        with context:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                width = max(len(p) + len(c) for p, c in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attn = torch.zeros_like(ids)
                mask = torch.zeros_like(ids, dtype=torch.bool)  # True on completion tokens
                for i, (p, c) in enumerate(chunk):
                    ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c))
                    attn[i, : len(p) + len(c)] = 1
                    mask[i, len(p) : len(p) + len(c)] = True
                ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
                if scorer is None:
                    logits = model(input_ids=ids, attention_mask=attn).logits
                    terms = token_logps(logits, ids, mask)
                else:
                    terms = completion_token_logps(*scorer, ids, attn, mask)
                terms, mask = terms.cpu(), mask.cpu()  # (b, width-1), (b, width)
                if per_token:
                    result.extend(row[m] for row, m in zip(terms, mask[:, 1:]))
                else:
                    result.append(terms.sum(dim=-1))
    finally:
        model.train(was_training)
    return result if per_token else torch.cat(result)
