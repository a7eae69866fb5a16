"""Making DPO fast on a CPU: what the ``cpu`` preset changes, and why each change pays.

Measured on a 2-core CPU (``make bench``; table in docs/performance.md), the ``cpu``
preset trains SmolLM2-135M 2.3x faster than TRL's ``DPOConfig`` defaults with the same
losses. What each lever is worth when it alone is undone (pairs/s):

1. **Completion-only log-prob head** (:func:`install_completion_head`), 2.2x. DPO needs
   log π(y_t | x, y_<t) only at completion tokens (Eq. 7 of Rafailov et al., 2023:
   log π(y|x) = Σ_t log π(y_t | x, y_<t)). TRL's fused head scores *every* position;
   on GPUs with Triton it compacts to the scored ones, but on CPU it keeps all of
   them so tile shapes stay fixed (that matters for compiled devices, not here), and
   its torch fallback makes many fp32 passes over each [tokens, 32768] tile, twice.
   The prompt is ~60% of each row. The replacement gathers the ``N_c`` completion
   positions and does one ``[N_c, H] @ [H, V]`` product plus an fp32 log-softmax.
2. **bf16 autocast** where the CPU has native bf16 dot products (AVX512-BF16/AMX),
   1.8x: bf16 products ran 2.25x faster than fp32 on the project's machine. Log-softmax
   and the loss stay fp32.
3. **Reference log-probs computed once and kept on disk**
   (:class:`CachingDPOTrainer`), 1.6x per step: π_ref is frozen, so log π_ref(y|x) for
   a pair is a constant. TRL's ``precompute_ref_log_probs`` computes it before
   training, but its cache lives in a temporary folder for in-memory datasets and is
   keyed on a hash that includes the fresh LoRA weights, so every run (every lesson,
   every seed) paid for it again. Here the key is the *reference* weights (the base,
   LoRA excluded), the tokenised rows and the settings that change the numbers, so
   lesson 4, ``make dpo-job`` and each run of a β sweep share one pass.

Two settings of the preset, not code here: no gradient checkpointing (1.45x; a 135M
model's activations fit easily) and torch's default 2 threads (1.7x over 1).

On an Intel Xeon with AMX a profile of the step (docs/performance.md, "Training profile on AMX")
found more, now in the trainer too:

4. **Attention in fp32 under bf16 autocast** (:class:`course_utils.cpu_autocast.Fp32Attention`):
   torch's CPU flash-attention backward is ~3x slower in bf16 than in fp32, and was a quarter
   of the step. 5. **Frozen weights cast to bf16 once** per ``train()``
   (:class:`course_utils.cpu_autocast.FrozenBf16Weights`, bit-identical). 6. **The head's
   backward in one pass** (``_TokenLogProbs``: ``∂ log p_y/∂z = onehot(y) - p``).
   With them the preset ran 2.73-3.44x TRL's defaults on that machine, about 2.8x typical (``make bench``,
   the medians of five runs on 2026-12-05).

A second profile on the same machine found the rest of the step in small fp32/bf16 passes, and four more levers:

7. **Each LoRA linear as one bf16 autograd function** and 8. **the decoder norms storing bf16 once** for the
   projections they feed (:mod:`course_utils.fused_lora`: fewer fp32 round trips). 9. **The head over blocks of
   8 rows** that stay in cache (``_TokenLogProbs.CPU_ROWS``, bit-identical, 2.4x faster for the head). 10. **Grouped
   kv heads unrepeated** in the CPU's SDPA (:func:`course_utils.cpu_autocast._use_gqa_in_sdpa`, identical outputs).
   With them ``make bench`` measured 3.33x and 3.64x TRL's defaults on that machine, every round above 3
   (docs/performance.md, "Fewer fp32 round trips").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpu import cpu_path_key, cpu_supports_bf16  # noqa: F401 (cpu_supports_bf16 re-exported: it lived here)
from .models import cache_dir


# --------------------------------------------------------------------------------------------
# 1) Completion-only log-prob head
# --------------------------------------------------------------------------------------------

class _TokenLogProbs(torch.autograd.Function):
    """``log softmax(z)[y]`` per row of ``logits`` ``[N, V]`` (any float dtype; computed in fp32), plus TRL's metrics.

    Forward: a fused fp32 ``log_softmax`` straight from the (bf16) logits, ``p = exp(log p)`` for the entropy.
    Backward: ``∂ log p_y / ∂z = onehot(y) - p``, with ``p`` recomputed from the logits: one pass and a scatter, stored
    straight in the logits' dtype. The textbook autograd path (``gather(z) - logsumexp(z)``) re-derives ``p`` in its
    backward and makes several more full ``[N, V]`` fp32 passes; this was ~1/3 faster for the head.

    On a CPU both run over blocks of :attr:`CPU_ROWS` rows: an ``[8, 49152]`` fp32 block stays in the core's cache
    across the five passes, where whole ``[N, V]`` tensors went to memory and back between them. Every op is
    row-wise, so the results are the same to the bit; at ``N = 335`` it measured 2.2-2.5x faster forward + backward
    (docs/performance.md), and ``p`` is no longer kept between forward and backward (66 MB at that size).
    """

    CPU_ROWS = 8  # rows per block on a CPU; a GPU takes all rows at once

    @staticmethod
    def _blocks(logits):
        rows = logits.shape[0]
        step = rows if logits.device.type != "cpu" else _TokenLogProbs.CPU_ROWS
        return [(s, min(rows, s + step)) for s in range(0, rows, max(step, 1))]

    @staticmethod
    def forward(ctx, logits, targets):
        rows, f32 = logits.shape[0], dict(dtype=torch.float32, device=logits.device)
        picked, entropy, mean_logits = (torch.empty(rows, **f32) for _ in range(3))
        is_top1 = torch.empty(rows, dtype=torch.bool, device=logits.device)
        for s, e in _TokenLogProbs._blocks(logits):
            z, y = logits[s:e].float(), targets[s:e]  # [n, V] fp32 whatever the logits' dtype
            log_p = torch.log_softmax(z, dim=-1)
            picked[s:e] = log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            # log_p is z minus a row constant: same order and ties as the logits; fp32 argmax is 2x bf16's here
            is_top1[s:e] = log_p.argmax(-1) == y  # the first maximum, as TRL's kernel does
            entropy[s:e] = -torch.linalg.vecdot(log_p.exp(), log_p)  # H = -Σ p log p
            mean_logits[s:e] = z.mean(-1)
        ctx.save_for_backward(logits, targets)
        ctx.mark_non_differentiable(entropy, mean_logits, is_top1)
        return picked, entropy, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_picked, *unused):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s, e in _TokenLogProbs._blocks(logits):
            g, y = grad_picked[s:e].unsqueeze(-1), targets[s:e].unsqueeze(-1)  # [n, 1]
            p = torch.log_softmax(logits[s:e].float(), dim=-1).exp_()  # the forward's p, bit for bit
            torch.mul(p, -g, out=grad[s:e])  # -g p, rounded once to the logits' dtype
            grad[s:e].scatter_(-1, y, (p.gather(-1, y) * -g + g).to(grad.dtype))  # g (1 - p_y) at the targets
        return grad, None


def completion_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor):
    """Per-token log-probabilities of the next-token ``labels``, scored only where ``labels != -100``.

    Shapes: ``hidden`` ``[B, T, H]`` (already shifted: position t predicts ``labels[:, t]``),
    ``labels`` ``[B, T]``. Returns ``(log_probs, entropy, mean_logits, is_top1, mask)``, each
    ``[B, T]`` and zero where the label is -100 (TRL's ``FusedCausalLMOutput`` convention).

    Only ``log_probs`` carries a gradient; the other three are the metrics TRL logs
    (entropy, ``logits/chosen``, ``mean_token_accuracy``), computed without one.
    """
    mask = labels != -100
    h = hidden[mask]  # [N_c, H]: the completion positions only
    logits = lm_head(h)  # [N_c, V] in the autocast dtype (bf16) or fp32
    token_logps, entropy, mean_logits, is_top1 = _TokenLogProbs.apply(logits, labels[mask])

    def scatter(values, dtype=None):
        out = torch.zeros(mask.shape, dtype=dtype or values.dtype, device=values.device)
        return out.masked_scatter(mask, values)

    # masked_scatter keeps log_probs connected to the graph even when nothing is scored
    return scatter(token_logps), scatter(entropy), scatter(mean_logits), scatter(is_top1), mask


# config fields with which logits are more than ``lm_head(hidden)`` (soft-capping, scaling): such heads are not replaced
SCALED_HEAD_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                          "logits_scaling")


def scaled_head_attribute(model) -> str | None:
    """The first of :data:`SCALED_HEAD_ATTRIBUTES` that ``model``'s config sets to other than 1, else None."""
    config = model.config.get_text_config()
    return next((a for a in SCALED_HEAD_ATTRIBUTES if getattr(config, a, None) not in (None, 1.0)), None)


def install_completion_head(model) -> None:
    """Replace TRL's fused LM head on ``model`` (the base model, not the PEFT wrapper) with
    :func:`completion_logprobs`. Idempotent. Calls without ``fused_lm_head=True`` (generation,
    plain forwards) go to TRL's forward, which passes them on to the model's own.

    Only for models TRL's head treats plainly: no logit soft-capping and no logit scale.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    if getattr(model, "_course_completion_head", False):
        return
    attr = scaled_head_attribute(model)
    if attr:
        raise ValueError(f"install_completion_head: {type(model).__name__} sets {attr}; keep TRL's head for it")
    trl_forward = model.forward  # TRL's patched forward: handles every call that is not fused

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]  # [B, T-1, H]
        log_probs, entropy, mean_logits, is_top1, mask = completion_logprobs(
            hidden, self.get_output_embeddings(), labels[:, 1:])
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=entropy,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    model._course_completion_head = True


# --------------------------------------------------------------------------------------------
# 3) Reference log-probs: once, on disk
# --------------------------------------------------------------------------------------------

def reference_cache_dir() -> Path:
    """``$DPO_COURSE_REFERENCE_CACHE`` or ``<model cache>/reference-logps`` (delete it to force a fresh pass)."""
    path = Path(os.environ.get("DPO_COURSE_REFERENCE_CACHE") or cache_dir() / "reference-logps")
    path.mkdir(parents=True, exist_ok=True)
    return path


def reference_weights_hash(model) -> str:
    """SHA-256 of the weights the reference is made of: the model with every LoRA tensor left out.

    Cached on the model object: hashing 135M parameters takes about a second.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "_course_reference_hash", None):
        return base._course_reference_hash
    h = hashlib.sha256()
    for name, tensor in sorted(base.state_dict().items()):
        if "lora_" in name:  # the adapter is disabled when the reference is scored
            continue
        tensor = tensor.detach().cpu()
        h.update(name.replace(".base_layer", "").encode() + str(tensor.dtype).encode())
        h.update((tensor.float() if tensor.dtype == torch.bfloat16 else tensor).contiguous().numpy().tobytes())
    base._course_reference_hash = h.hexdigest()
    return base._course_reference_hash


def _rows_hash(dataset) -> str:
    h = hashlib.sha256()
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        h.update(json.dumps(dataset.data.column(column).to_pylist()).encode())
    return h.hexdigest()


def fixed_batch_length(datasets, max_length: int | None, multiple: int = 8) -> int:
    """The one length every batch is padded to under ``fixed_shapes``: the longest tokenised row
    (prompt + the longer answer) over ``datasets``, capped at ``max_length`` (TRL truncates there),
    rounded up to a multiple of ``multiple`` (vector-friendly; rows are rarely much shorter).

    The cost is the padding beyond each batch's own longest row: in ``make bench`` (4-pair batches)
    padding rose from 4.3% to 10.6% of the tokens (docs/performance.md).
    """
    longest = 1
    for dataset in datasets:
        columns = [dataset.data.column(c).to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
        for p, c, r in zip(*columns):
            longest = max(longest, len(p) + max(len(c), len(r)))
    longest = min(longest, max_length or longest)
    return -(-longest // multiple) * multiple  # padding past max_length is harmless: rows are cut there first


def _trainer_class():
    from trl import DPOTrainer

    class CachingDPOTrainer(DPOTrainer):
        """``trl.DPOTrainer`` whose precomputed reference log-probs persist on disk.

        The key covers everything that changes the numbers: the reference weights
        (:func:`reference_weights_hash`), the tokenised rows, the batch size (padding
        changes the last bits), bf16/fp16, the head, and the torch/TRL versions. A
        hit adds the two columns TRL's collator reads (``ref_chosen_logps``,
        ``ref_rejected_logps``); a miss runs TRL's own pass and stores it.
        ``completion_head=True`` installs :func:`install_completion_head` before TRL's
        reference pass, so reference and policy are scored by the same code.

        ``fixed_shapes=True`` pads every batch, of the reference pass and of training, to one
        length (:func:`fixed_batch_length`), so the reference is computed in exactly the
        policy's shapes and precision. Why: in bf16 a pair's log-probs depend on the shapes of
        the batch it sits in (the kernels, and so the rounding, are chosen per shape), and the
        reference pass batches the rows in another order than training does. With one shape,
        the step-1 policy reproduces the cached reference bit for bit (measured:
        ``course_utils.precision.reference_agreement``). ``reference_same_path`` says whether
        that holds for this trainer.
        """

        def __init__(self, *args, completion_head: bool = False, fixed_shapes: bool = False,
                     frozen_bf16: bool = False, fp32_attention: bool = False, fused_lora: bool = False, **kwargs):
            self.completion_head = completion_head
            self.fixed_shapes = fixed_shapes
            # cpu_autocast.py's levers, entered around the reference pass and around training
            self.frozen_bf16, self.fp32_attention = frozen_bf16, fp32_attention
            self.fused_lora = fused_lora  # fused_lora.py's LoRA linears, entered with them
            self.fixed_length = None  # the one padded length of every batch, once fixed
            self.reference_cache_hits = []  # names of the datasets whose reference came from disk
            super().__init__(*args, **kwargs)
            self._install_head()
            self._fix_shapes()  # also when no reference pass ran (a reference not precomputed)

        def autocast_levers(self) -> contextlib.ExitStack:
            """The :mod:`course_utils.cpu_autocast` context managers training runs under (enter it to score as
            training does, e.g. ``precision.reference_agreement``)."""
            from .cpu_autocast import Fp32Attention, FrozenBf16Weights
            from .fused_lora import Bf16LoraLinears

            stack = contextlib.ExitStack()
            if self.fp32_attention:
                stack.enter_context(Fp32Attention(self.model))
            if self.frozen_bf16:
                stack.enter_context(FrozenBf16Weights(self.model))
            if self.fused_lora:  # after FrozenBf16Weights: it reuses those bf16 copies
                stack.enter_context(Bf16LoraLinears(self.model))
            return stack

        def train(self, *args, **kwargs):
            with self.autocast_levers():
                return super().train(*args, **kwargs)

        def evaluate(self, *args, **kwargs):  # scored as training scores (and as the eval reference was)
            with self.autocast_levers():
                return super().evaluate(*args, **kwargs)

        @property
        def reference_same_path(self) -> bool:
            """True when the policy at step 1 runs exactly the operations that produced the reference."""
            return not self.precompute_ref_logps or self.fixed_length is not None

        def _fix_shapes(self):
            if not self.fixed_shapes or self.fixed_length is not None:
                return
            datasets = [self.train_dataset] + ([] if self.eval_dataset is None else
                                               list(self.eval_dataset.values()) if isinstance(self.eval_dataset, dict)
                                               else [self.eval_dataset])
            length = fixed_batch_length(datasets, self.args.max_length)
            # every row is at most `length` tokens, so padding to a multiple of it pads to exactly it
            self.data_collator.pad_to_multiple_of = self.fixed_length = length

        def _install_head(self):
            if self.completion_head:
                model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                install_completion_head(model)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            import trl
            from safetensors.torch import load_file, save_file

            self._install_head()  # TRL runs this pass inside __init__, before build_trainer could patch
            self._fix_shapes()
            key = hashlib.sha256(json.dumps([
                reference_weights_hash(self.model), _rows_hash(dataset), batch_size, self.args.bf16,
                self.args.fp16, self.completion_head, self.ld_alpha, torch.__version__, trl.__version__,
                self.fixed_length, cpu_path_key() if self.args.use_cpu else None,
                *(["fp32_attention"] if self.fp32_attention and self.args.bf16 else []),  # new key only where it acts
                # on a CPU the thread count changes how products and reductions are split, so the rounding: SmolLM2's
                # sequence log-probs under bf16 autocast differed by up to 0.96 nats between 1 and 2 threads
                *([f"threads={torch.get_num_threads()}"] if self.args.use_cpu else []),
            ]).encode()).hexdigest()[:24]
            path = reference_cache_dir() / f"{key}.safetensors"
            if path.is_file():
                cached = load_file(str(path))
                self.reference_cache_hits.append(name)
                print(f"Reference log-probs for the {name} dataset: loaded from the on-disk cache ({len(dataset)} pairs)")
            else:
                with self.autocast_levers():
                    computed = super()._precompute_ref_logps(dataset, name, batch_size)
                cached = {column: torch.tensor(computed.data.column(column).to_pylist()) for column in ("ref_chosen_logps", "ref_rejected_logps")}
                tmp = path.with_suffix(".tmp")
                save_file(cached, str(tmp))
                tmp.replace(path)  # atomic: a half-written file is never read as a hit
            for column in ("ref_chosen_logps", "ref_rejected_logps"):
                dataset = dataset.add_column(column, cached[column].tolist())
            return dataset

    return CachingDPOTrainer


def __getattr__(name):  # lazy: importing trl takes seconds and course_utils is imported everywhere
    if name == "CachingDPOTrainer":
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
