"""Checks that follow the precision: how far two numbers may differ when they were computed in bf16, fp16 or fp32.

A lesson's invariants ("the step-1 loss is ln 2", "the margins start at 0") are exact in
exact arithmetic. A computer rounds. Each floating-point format has a *unit roundoff* u,
the largest relative error of rounding one number to it (Higham, *Accuracy and Stability of
Numerical Algorithms*, §2.1):

=========  ==========  ==================
format     mantissa    u
=========  ==========  ==================
float32    24 bits     2^-24 ≈ 6.0e-8
float16    11 bits     2^-11 ≈ 4.9e-4
bfloat16   8 bits      2^-8  ≈ 3.9e-3
=========  ==========  ==================

To first order, a quantity of size ``M`` computed in a format with unit roundoff u carries a
relative error of about u; through a network's layers the roundings compound a little, so
the bound here allows ``COMPOUNDING = 2`` times that: each evaluation is within ``2 u M`` of
the exact value, and two computations that round differently differ by up to ``4 u M``
(:func:`rounding_bound`). Measured on SmolLM2-135M (AMD EPYC, AVX512-BF16): bf16 sequence
log-probs were within 1.15 u (worst) and 0.48 u (mean) of fp32, over 24 sequences. For DPO the
quantity is the sequence log-probability log π(y|x) = Σ_t log π(y_t | x, y_<t), of size
|log π| ≈ 100-150 nats for the course's pairs: in bf16 two evaluations may differ by ~2 nats,
in fp32 by ~4e-5 nats.

Whether they *do* round differently depends on the path. At step 1 LoRA's B = 0, so the
policy is the reference; when the policy's forward runs exactly the operations that made
the reference log-probs (same shapes, same kernels, same precision), the two agree bit for
bit and only the fp32 arithmetic after them remains (:func:`step_one_tolerances` with
``same_path=True``). When they do not (a reference precomputed in other batch shapes, or by
another kernel), the compute dtype's bound applies. ``course_utils.fast_dpo`` makes the
cpu preset's bf16 path the first kind; :func:`reference_agreement` measures it.
"""

from __future__ import annotations

import contextlib

import torch

from .models import _to_dtype

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def unit_roundoff(dtype) -> float:
    """u of a floating-point format: half the gap between 1 and the next representable number."""
    return UNIT_ROUNDOFF[_to_dtype(dtype)]


def compute_dtype(args) -> torch.dtype:
    """The matrix-product precision of a ``TrainingArguments``/``DPOConfig``: bf16, fp16 or fp32."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def training_dtype(preset, on_gpu: bool | None = None, native_bf16: bool | None = None) -> torch.dtype:
    """The precision of DPO training's matrix products for ``preset`` here (``train.dpo_config`` sets bf16/fp16 from it).

    On a GPU, the preset's ``dtype`` (fp16 or bf16 autocast; fp32 for ``cpu`` and ``tiny``). On a CPU, bf16
    autocast when the preset asks for it (``cpu_bf16``) and the CPU multiplies bf16 natively
    (:func:`course_utils.cpu.cpu_supports_bf16`; emulated bf16 is slower than fp32), fp32 otherwise.
    ``on_gpu``/``native_bf16``: None asks this machine.
    """
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    if on_gpu:
        return _to_dtype(preset.dtype)
    if not preset.cpu_bf16:
        return torch.float32
    if native_bf16 is None:
        from .cpu import cpu_supports_bf16

        native_bf16 = cpu_supports_bf16()
    return torch.bfloat16 if native_bf16 else torch.float32


DTYPE_WORDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def describe_training(preset, on_gpu: bool | None = None, native_bf16: bool | None = None) -> str:
    """One true sentence for a lesson: the model, how its weights are stored and the DPO training precision here."""
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    compute = training_dtype(preset, on_gpu, native_bf16)
    model = preset.checkpoint or preset.model_name
    if preset.load_in_4bit:
        weights = "a frozen 4-bit NF4 base with a LoRA adapter (QLoRA)"
    else:
        weights = f"{DTYPE_WORDS[_to_dtype(preset.dtype)]} weights with a plain LoRA adapter"
    if preset.load_in_4bit and not on_gpu:
        how = (f"each 4-bit layer dequantised to {DTYPE_WORDS[_to_dtype(preset.dtype)]} for its products and no "
               "autocast (a GPU preset on a CPU: slow, a test of the code path)")
    elif compute is torch.float32:
        why = ("the preset asks for no half precision" if on_gpu
               else "this CPU has no native bf16, where it would be slower than fp32" if preset.cpu_bf16
               else "the preset uses no half precision on a CPU")
        how = f"matrix products in fp32 ({why})"
    elif on_gpu:
        scaler = " with a loss scaler" if compute is torch.float16 else ""
        how = f"matrix products in {DTYPE_WORDS[compute]} autocast{scaler}"
    else:
        how = "matrix products in bf16 autocast (this CPU multiplies bf16 natively; log-softmax and loss in fp32)"
    return f"Preset {preset.name!r} trains {model} on the {'GPU' if on_gpu else 'CPU'}: {weights}, {how}."


COMPOUNDING = 2  # allowance for roundings compounding through the layers (measured worst: 1.15, see above)


def rounding_bound(dtype, magnitude: float, evaluations: int = 2) -> float:
    """How far ``evaluations`` computations of a quantity of size ``magnitude`` in ``dtype`` may spread
    (``evaluations=1``: from the exact value): ``evaluations * COMPOUNDING * u * |magnitude|``."""
    return evaluations * COMPOUNDING * unit_roundoff(dtype) * abs(magnitude)


def step_one_tolerances(dtype, beta: float, logp_chosen: float, logp_rejected: float, same_path: bool) -> dict:
    """Bounds on the step-1 DPO invariants when the policy equals the reference (LoRA's B = 0).

    ``logp_chosen``/``logp_rejected``: the sequence log-probs' size (TRL logs their means as
    ``logps/chosen``/``logps/rejected``). ``same_path``: the policy's forward runs exactly the
    operations that produced the reference (then only fp32 arithmetic differs), else the
    compute ``dtype``'s rounding does.

    With d_c, d_r the per-sequence bounds (:func:`rounding_bound`), a pair's margin
    m = (log π_c − log π_ref,c) − (log π_r − log π_ref,r) has |m| ≤ d_c + d_r, so
    ``rewards/margins`` = β·mean(m) is within β(d_c + d_r) of 0, and since −log σ(x) =
    ln 2 − x/2 + O(x²/8), the loss is within β(d_c + d_r)/2 + (β(d_c + d_r))²/8 of ln 2.
    Returns ``{"logp": ..., "margin": ..., "loss": ..., "dtype": ...}``.
    """
    rounding = torch.float32 if same_path else _to_dtype(dtype)
    d = rounding_bound(rounding, logp_chosen) + rounding_bound(rounding, logp_rejected)
    x = beta * d
    return {"logp": d / 2, "margin": x, "loss": x / 2 + x * x / 8, "dtype": str(rounding).replace("torch.", "")}


def trainer_step_one_tolerances(trainer, first_log: dict) -> dict:
    """:func:`step_one_tolerances` for a trained ``DPOTrainer`` from its step-1 log entry."""
    same_path = getattr(trainer, "reference_same_path", not trainer.args.precompute_ref_log_probs)
    return step_one_tolerances(compute_dtype(trainer.args), trainer.args.beta, first_log["logps/chosen"],
                               first_log["logps/rejected"], same_path)


def reference_agreement(trainer, max_batches: int = 8, seed: int = 1) -> dict:
    """Per-sequence |log π(y|x) − log π_ref(y|x)| of the policy *as it is now* against the reference.

    Call it before training (B = 0: policy = reference) to measure how well the reference
    the trainer uses agrees with the policy: the noise floor under everything DPO learns.
    Batches are drawn in a shuffled order of the training set, of the training batch size
    and in the training precision (the accelerator's autocast), as training draws them; the
    trainer's own random state is left alone. The reference is the precomputed one when the
    trainer precomputed it, else the model with its adapter disabled in the same batch.

    Returns ``{"mean", "max", "sequences", "logp_magnitude", "dtype", "same_path"}`` (nats).
    """
    from torch.utils.data import DataLoader, RandomSampler

    dataset = trainer.train_dataset
    loader = DataLoader(dataset, batch_size=trainer.args.per_device_train_batch_size, collate_fn=trainer.data_collator,
                        sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)))
    model = trainer.model
    was_training = model.training
    model.train()  # as in training (TRL disables dropout, so train and eval modes compute the same)
    gaps, sizes = [], []
    levers = getattr(trainer, "autocast_levers", contextlib.nullcontext)()  # the precision choices of training
    try:
        with torch.no_grad(), levers:
            for i, batch in enumerate(loader):
                if i == max_batches:
                    break
                batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
                logps = _sequence_logps(trainer, model, batch)
                if "ref_chosen_logps" in batch:
                    ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
                else:  # TRL's own reference scoring: the adapter disabled, in the accelerator's autocast
                    ref = torch.cat(trainer.compute_ref_log_probs(model, batch))
                gaps.append((logps.float() - ref.float()).abs().cpu())
                sizes.append(ref.float().abs().cpu())
    finally:
        model.train(was_training)
    gap = torch.cat(gaps)
    return {"mean": gap.mean().item(), "max": gap.max().item(), "sequences": len(gap),
            "logp_magnitude": torch.cat(sizes).mean().item(), "dtype": str(compute_dtype(trainer.args)).replace("torch.", ""),
            "same_path": bool(getattr(trainer, "reference_same_path", True))}


def _sequence_logps(trainer, model, batch) -> torch.Tensor:
    """Summed completion log-probs ``[2B]`` (chosen rows, then rejected), as ``DPOTrainer`` computes them."""
    kwargs = {k: v for k, v in batch.items() if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with trainer.accelerator.autocast():
        out = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True)
    return out.log_probs[:, -(batch["completion_mask"].size(1) - 1):].sum(1)


def describe(tolerances: dict, measured: dict | None = None) -> str:
    """One line for a lesson: the bounds, and the measured agreement when given."""
    line = (f"step-1 bounds ({tolerances['dtype']} rounding): |loss - ln 2| <= {tolerances['loss']:.2g}, "
            f"|rewards/margins| <= {tolerances['margin']:.2g}")
    if measured:
        line += (f"; measured |log pi - log pi_ref| before training: mean {measured['mean']:.2g}, "
                 f"max {measured['max']:.2g} nats over {measured['sequences']} sequences "
                 f"(|log pi| ~ {measured['logp_magnitude']:.0f})")
    return line

