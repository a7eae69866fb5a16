"""The course's own batched decoding loop: what every lesson samples and evaluates with.

``transformers``' ``generate`` is general (beams, processors, streamers, stopping criteria); the course
needs two things from it, ancestral sampling and greedy decoding, many short completions of a small model.
Profiled on the project's 2-core CPU (docs/performance.md), ``generate`` spent its time in three places this
loop avoids, without changing what a step computes:

* **sampling**: ``torch.multinomial`` draws one exponential random number per vocabulary entry per row
  (``aten::exponential_``, 49,152 of them for SmolLM2): a third of the time at 128 rows in bf16. Here each
  row draws *one* uniform number per step and inverts the cumulative distribution (:func:`draw_tokens`), a
  draw from the same categorical distribution, exact up to rounding;
* **the prompt**: the ``num_samples`` completions of a prompt share it, so its forward pass (the prefill,
  about 60 % of the FLOPs for 60-token prompts and 40-token completions) runs once and the KV cache is
  repeated ``num_samples`` times;
* **padding**: prompts are batched in order of length, so a batch pads to its own longest prompt.

Randomness is per row, not per batch: row ``i`` (prompt ``i // num_samples``, sample ``i % num_samples``)
uses the ``i``-th row of one ``(rows, max_new_tokens)`` table of uniforms drawn from a generator seeded with
``seed``. A sample therefore does not depend on the batch size or on which prompts share its batch (up to
the floating-point rounding of the batch's matrix products), and the global random state is not touched.

The forward calls are the ones ``generate`` makes (left padding, position ids from the attention mask, a
``DynamicCache``, logits of the last position only), so greedy decoding returns ``generate``'s tokens exactly
on the same weights and batches (``tests/test_decode.py``).

:func:`sampling_model` chooses the weights to decode with: on a CPU with native bf16 (``cpu.cpu_supports_bf16``)
a bf16 copy, with a LoRA adapter merged into it for the policy or dropped for the reference; on a GPU, or for
a 4-bit model, the model itself, in its compute dtype, on its device (no copy of a 7B model).
"""

from __future__ import annotations

import contextlib
import copy
import types
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


@dataclass
class Samples:
    """Completions of ``decode``: ``len(prompts) * num_samples`` rows, prompt-major.

    ``completion_ids[i]`` are the sampled token ids of row ``i`` exactly, with the end-of-turn token when the row
    produced one before ``max_new_tokens`` (``finished[i]``); ``texts[i]`` is their decoded text, special tokens
    dropped and whitespace stripped. ``prompt_ids[i]`` are the formatted prompt's ids (no padding).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]
    num_samples: int
    stats: dict = field(default_factory=dict)  # rows, tokens, forward passes, padding, seconds

    def grouped(self) -> list[list[str]]:
        """Texts as ``[len(prompts)][num_samples]`` (what ``sample_completions`` returns)."""
        n = self.num_samples
        return [self.texts[i : i + n] for i in range(0, len(self.texts), n)]


def _eos_ids(model, tokenizer) -> list[int]:
    """The token ids that end a completion: the generation config's (``generate`` stops on these), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def draw_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, block: int = 256) -> torch.Tensor:
    """One token per row from ``softmax(logits / temperature)`` by inverting its CDF: ``(B, V), (B,) -> (B,)``.

    ``uniforms`` are in [0, 1). Two levels keep it cheap and exact to rounding: the unnormalised probabilities
    ``exp(z - max z)`` are summed in blocks of ``block`` vocabulary entries, a block is chosen from the blocks'
    cumulative sums (float64), then a token within it (float64 again, ``block`` entries). No softmax, no
    ``(B, V)`` float64 tensor. ``temperature == 0`` is greedy (argmax, as ``generate`` with ``do_sample=False``).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    weights = (z - z.amax(dim=-1, keepdim=True)).exp_()  # (B, V), the largest is 1
    rows, vocab = weights.shape
    blocks = -(-vocab // block)
    if blocks * block != vocab:  # zero weight past the vocabulary: never drawn
        weights = torch.nn.functional.pad(weights, (0, blocks * block - vocab))
    tiles = weights.view(rows, blocks, block)
    block_cdf = tiles.sum(dim=-1).double().cumsum(dim=-1)  # (B, blocks); fp32 sums of 256 terms, then float64
    target = uniforms.to(block_cdf.device, torch.float64) * block_cdf[:, -1]  # (B,)
    chosen = torch.searchsorted(block_cdf, target[:, None], right=True).clamp_(max=blocks - 1)  # (B, 1)
    below = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)), torch.zeros_like(target[:, None]))
    inner = tiles[torch.arange(rows, device=tiles.device), chosen[:, 0]].double().cumsum(dim=-1)  # (B, block)
    within = torch.searchsorted(inner, target[:, None] - below, right=True).clamp_(max=block - 1)
    return (chosen * block + within).squeeze(1).clamp_(max=vocab - 1)


def default_batch_size(device) -> int:
    """Rows decoded together: 128 on a CPU (measured fastest for SmolLM2 on 2 cores, docs/performance.md), 32 on a
    GPU, where a 7B model's KV cache for long chat answers has to fit beside the weights (~5 GiB at 32 rows x 512
    tokens for Mistral-7B in fp16; 4x that at 128)."""
    return 128 if torch.device(device).type == "cpu" else 32


def _prefill_inputs(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids``, each ``(B, P)``, as ``generate`` builds them."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attn[i, width - len(r) :] = 1
    position = attn.cumsum(-1) - 1
    position.masked_fill_(attn == 0, 1)
    return ids.to(device), attn.to(device), position.to(device)


@torch.inference_mode()
def decode(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    share_prefill: bool = True,
    sort_by_length: bool = True,
    sampler: str = "inverse_cdf",
    eos_token_ids: list[int] | None = None,
    desc: str | None = "Sampling",
) -> Samples:
    """Sample (or, with ``temperature=0``, greedily decode) ``num_samples`` completions of each prompt.

    Args:
        prompt_ids: token ids of each formatted prompt, unpadded.
        batch_size: rows per forward pass (``batch_size // num_samples`` prompts when ``share_prefill``); None:
            :func:`default_batch_size`.
        share_prefill: run a prompt's forward pass once for its ``num_samples`` rows (see the module docstring).
        sort_by_length: batch prompts in order of length (less padding); rows come back in the input order.
        sampler: ``"inverse_cdf"`` (:func:`draw_tokens`) or ``"multinomial"`` (``generate``'s ``torch.multinomial``,
            seeded from ``seed`` and batch order; kept to measure what the other saves, ``make bench``).
        eos_token_ids: the tokens that end a completion; None: the generation config's (``generate``'s), else the
            tokenizer's. A caller that stops on more (TRL's trainers add the tokenizer's) passes its own.

    Returns :class:`Samples`, rows prompt-major (row ``i * num_samples + j`` is sample ``j`` of prompt ``i``).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    if sampler not in ("inverse_cdf", "multinomial"):
        raise ValueError(f"sampler must be 'inverse_cdf' or 'multinomial', got {sampler!r}")
    if batch_size < 1 or num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size, num_samples and max_new_tokens must be >= 1, got {batch_size}, "
                         f"{num_samples}, {max_new_tokens}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_ids(model, tokenizer)[0]
    eos = torch.tensor(list(eos_token_ids) if eos_token_ids else _eos_ids(model, tokenizer), device=device)
    n_rows = len(prompt_ids) * num_samples
    generator = torch.Generator().manual_seed(seed)
    uniforms = torch.rand((n_rows, max_new_tokens), generator=generator, dtype=torch.float64)
    multinomial_rng = torch.Generator(device=device).manual_seed(seed) if sampler == "multinomial" else None

    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i])) if sort_by_length \
        else list(range(len(prompt_ids)))
    per_batch = max(1, batch_size // num_samples) if share_prefill else max(1, batch_size)
    completions: list[list[int] | None] = [None] * n_rows
    finished = [False] * n_rows
    stats = {"rows": n_rows, "forward_passes": 0, "prompt_tokens": 0, "prefill_tokens": 0, "new_tokens": 0}
    was_training = model.training
    model.eval()
    try:
        if share_prefill:
            units = [order[s : s + per_batch] for s in range(0, len(order), per_batch)]
        else:  # rows, not prompts, are the unit: a prompt's samples may straddle two batches
            flat = [(p, j) for p in order for j in range(num_samples)]
            units = [flat[s : s + per_batch] for s in range(0, len(flat), per_batch)]
        for unit in tqdm(units, desc=desc, unit="batch", disable=desc is None):
            if share_prefill:
                rows = [p * num_samples + j for p in unit for j in range(num_samples)]
                prefill_rows = [prompt_ids[p] for p in unit]
            else:
                rows = [p * num_samples + j for p, j in unit]
                prefill_rows = [prompt_ids[p] for p, _ in unit]
            ids, attn, position = _prefill_inputs(prefill_rows, pad_id, device)
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, attention_mask=attn, position_ids=position, past_key_values=cache,
                        use_cache=True, logits_to_keep=1, cache_position=torch.arange(ids.shape[1], device=device))
            logits = out.logits[:, -1].float()
            stats["forward_passes"] += 1
            stats["prompt_tokens"] += int(attn.sum()) * (num_samples if share_prefill else 1)
            stats["prefill_tokens"] += ids.numel()
            if share_prefill and num_samples > 1:
                cache.batch_repeat_interleave(num_samples)
                logits = logits.repeat_interleave(num_samples, dim=0)
                attn = attn.repeat_interleave(num_samples, dim=0)
                position = position.repeat_interleave(num_samples, dim=0)
            u = uniforms[rows]  # (B, max_new_tokens)
            width = ids.shape[1]
            next_position = position[:, -1:] + 1
            unfinished = torch.ones(len(rows), dtype=torch.bool, device=device)
            tokens = []
            for step in range(max_new_tokens):
                if sampler == "multinomial" and temperature != 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = torch.multinomial(probs, 1, generator=multinomial_rng).squeeze(1)
                else:
                    token = draw_tokens(logits, u[:, step], temperature)
                token = torch.where(unfinished, token, torch.full_like(token, pad_id))
                tokens.append(token)
                unfinished &= ~torch.isin(token, eos)
                if step == max_new_tokens - 1 or not bool(unfinished.any()):
                    break
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
                out = model(input_ids=token[:, None], attention_mask=attn, position_ids=next_position,
                            past_key_values=cache, use_cache=True, logits_to_keep=1,
                            cache_position=torch.tensor([width + step], device=device))
                logits = out.logits[:, -1].float()
                next_position = next_position + 1
                stats["forward_passes"] += 1
            new = torch.stack(tokens, dim=1).cpu()  # (B, steps)
            stops = set(eos.tolist())
            for b, row in enumerate(rows):
                seq = new[b].tolist()
                end = next((k for k, t in enumerate(seq) if t in stops), None)
                completions[row] = seq if end is None else seq[: end + 1]
                finished[row] = end is not None
            stats["new_tokens"] += sum(len(completions[r]) for r in rows)
            del cache, out
    finally:
        model.train(was_training)
    texts = [s.strip() for s in tokenizer.batch_decode(completions, skip_special_tokens=True)]
    prompts_rows = [prompt_ids[i // num_samples] for i in range(n_rows)]
    stats["padding_fraction"] = 1 - stats["prompt_tokens"] / max(1, stats["prefill_tokens"] *
                                                                (num_samples if share_prefill else 1))
    return Samples(prompts_rows, completions, texts, finished, num_samples, stats)


def _is_quantised(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(getattr(model, "config", None), "quantization_config", None))


def sampling_dtype(model) -> torch.dtype:
    """The dtype the course decodes ``model`` in: bf16 on a CPU with native bf16 products for an fp32 model, else the
    model's own (a GPU model already computes in its preset's dtype)."""
    from .cpu import cpu_supports_bf16

    param = next(model.parameters())
    if param.device.type == "cpu" and param.dtype == torch.float32 and not _is_quantised(model) and cpu_supports_bf16():
        return torch.bfloat16
    return param.dtype


def _without_patched_forwards(twin):
    """``twin`` with every instance-level ``forward`` removed, so each module runs its class's own.

    TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``) and the course's completion head
    (``fast_dpo.install_completion_head``) replace ``model.forward`` with a function that passes ordinary calls to
    the forward it replaced, held in a closure. ``copy.deepcopy`` rebinds the method to the copy but copies no
    closure, so without this a bf16 copy of a trained model dispatched every decoding step to the *original* fp32
    model (same tokens' distribution, the original's speed). Decoding needs no fused head, so the copy drops it.
    """
    for module in twin.modules():
        patched = module.__dict__.get("forward")
        if isinstance(patched, types.MethodType) and patched.__func__ is not type(module).forward:
            del module.forward
            module.__dict__.pop("_course_completion_head", None)
    return twin


@contextlib.contextmanager
def sampling_model(model, *, adapter: bool = True, dtype: torch.dtype | str | None = "auto", merge: bool | None = None):
    """The weights to decode ``model`` with, as a context manager.

    * ``adapter``: with a PEFT model, True decodes the policy (base + LoRA), False the reference (adapter off).
    * ``dtype``: ``"auto"`` (:func:`sampling_dtype`), a dtype, or None for the model as it is.
    * ``merge``: None merges the adapter whenever a copy is made; True also copies (and merges) at the model's own
      dtype; False copies without merging (LoRA's extra products in every layer; ``make bench`` measures both).

    When the dtype differs from the model's (a CPU model decoded in bf16), the context yields a *copy*: the
    adapter merged into it (policy: one matrix product per layer instead of three) or dropped (reference), cast to
    ``dtype``; the model itself is untouched. Otherwise it yields ``model`` itself with the adapter switched on or
    off; nothing is copied (a 4-bit 7B model on a GPU).
    """
    param = next(model.parameters())
    target = sampling_dtype(model) if dtype == "auto" else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    peft = hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")
    same = target is None or target == param.dtype
    if _is_quantised(model) or (same and not merge) or (same and not peft):
        context = model.disable_adapter() if (peft and not adapter) else contextlib.nullcontext()
        with context:
            yield model
        return
    twin = _without_patched_forwards(copy.deepcopy(model))
    if peft and not adapter:
        twin = twin.unload()
    elif peft and merge is not False:
        twin = twin.merge_and_unload()
    twin = (twin if same else twin.to(target)).eval()
    try:
        yield twin
    finally:
        del twin
