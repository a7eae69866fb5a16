"""One function from (preset, model, tokenizer, dataset) to a configured TRL ``DPOTrainer``.

Shared by the notebooks and the command line::

    python -m course_utils.train --preset cpu                # the offline sentiment pairs
    python -m course_utils.train --preset auto               # on a GPU: Intel/orca_dpo_pairs

The reference model is never a second copy: with LoRA, TRL scores the reference by
running the same weights with the adapter disabled (or, with
``precompute_ref_log_probs``, once before training).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .checkpoints import ResumeMismatch, RunIdentityCallback, run_identity, train_with_resume
from .data import PreferenceDataError
from .cpu import cpu_supports_bf16
from .guard import DivergenceGuard
from .models import ModelLoadError, load_model, lora_config
from .precision import training_dtype
from .prepare import ON_LONG, prepare_preferences
from .presets import Preset, detect_preset, get_preset


def dpo_config(preset: Preset, output_dir: str | Path, **overrides):
    """TRL ``DPOConfig`` for a preset. ``overrides`` are DPOConfig fields, applied last."""
    from trl import DPOConfig

    on_gpu = torch.cuda.is_available()
    # the matrix products' precision: bf16, fp16 or fp32 (precision.training_dtype, which lessons print)
    compute = training_dtype(preset, on_gpu, native_bf16=not on_gpu and preset.cpu_bf16 and cpu_supports_bf16())
    kwargs = dict(
        output_dir=str(output_dir),
        # --- what is optimised -------------------------------------------------
        beta=preset.beta,  # KL anchor strength (Eq. 7 of the DPO paper)
        loss_type=["sigmoid"],  # the original DPO loss
        learning_rate=preset.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=preset.warmup_steps,
        max_steps=preset.max_steps,
        per_device_train_batch_size=preset.per_device_batch_size,
        per_device_eval_batch_size=preset.per_device_batch_size,
        gradient_accumulation_steps=preset.gradient_accumulation_steps,
        optim=preset.optimizer if on_gpu else "adamw_torch",  # paged 8-bit AdamW needs CUDA
        # --- memory / speed ----------------------------------------------------
        max_length=preset.max_length,  # prompt+completion tokens; TRL truncates the end beyond it
        activation_checkpointing=preset.gradient_checkpointing,  # a.k.a. gradient checkpointing
        precompute_ref_log_probs=preset.precompute_ref_log_probs,
        # TRL defaults bf16=True; be explicit. On CPU, bf16 autocast only where it is native (precision.training_dtype)
        bf16=compute is torch.bfloat16,
        fp16=compute is torch.float16,
        use_cpu=not on_gpu,
        # --- bookkeeping -------------------------------------------------------
        logging_steps=preset.logging_steps,
        logging_nan_inf_filter=False,  # log a NaN loss as NaN (the default hides it), so the guard can see it
        report_to=["tensorboard"],
        save_steps=preset.save_steps,
        save_total_limit=2,  # keep the two newest checkpoints
        seed=preset.seed,
        data_seed=preset.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def build_trainer(
    preset: Preset,
    model,
    tokenizer,
    train_dataset,
    eval_dataset=None,
    *,
    output_dir: str | Path = "build/dpo",
    callbacks=None,
    peft: bool = True,
    on_error: str = "raise",
    on_long: str = "truncate",
    guard: bool | DivergenceGuard = True,
    completion_head: bool | None = None,
    fixed_shapes: bool | None = None,
    frozen_bf16: bool | None = None,
    fp32_attention: bool | None = None,
    fused_lora: bool | None = None,
    **config_overrides,
):
    """A ready-to-train ``trl.DPOTrainer`` with LoRA (QLoRA when the model is 4-bit).

    Before TRL sees them, both datasets (a ``datasets.Dataset`` or a list of row dicts) go
    through :func:`course_utils.prepare.prepare_preferences`: a bad row raises a
    ``PreferenceDataError`` naming row and field (``on_error="drop"``: dropped and
    reported), and rows longer than ``max_length`` follow ``on_long`` (see there). Only
    ``prompt``/``chosen``/``rejected`` reach TRL; the reports are kept in
    ``trainer.data_reports``.

    ``guard``: True adds a :class:`~course_utils.guard.DivergenceGuard` with its defaults
    (stops on NaN/inf, diagnoses the other failure signatures); pass your own to configure
    it, or False for none. It is reachable as ``trainer.guard``.

    ``completion_head`` (default: on CPU) scores only completion tokens
    (:func:`course_utils.fast_dpo.install_completion_head`). The trainer is a
    :class:`~course_utils.fast_dpo.CachingDPOTrainer`: precomputed reference log-probs are kept on disk,
    and under bf16/fp16 every batch has one shape, so the step-1 policy reproduces that reference exactly
    (``fixed_shapes``, default: exactly then). Under CPU bf16 autocast, attention runs in fp32 (``fp32_attention``:
    torch's bf16 attention backward is slow on CPU) and frozen weights are cast to bf16 once, not in every forward
    (``frozen_bf16``, bit-identical); both default to on exactly then (:mod:`course_utils.cpu_autocast`). So does
    ``fused_lora``: each LoRA linear runs as one bf16 function and the decoder norms hand it bf16, fewer fp32 round
    trips (:mod:`course_utils.fused_lora`).
    """
    from .fast_dpo import CachingDPOTrainer

    if peft and getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        # casts norms to fp32 and enables input grads so LoRA on a frozen 4-bit base trains
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=preset.gradient_checkpointing)

    args = dpo_config(preset, output_dir, **config_overrides)
    reports = {}
    for split, ds in (("train", train_dataset), ("eval", eval_dataset)):
        if ds is not None:
            reports[split] = prepare_preferences(ds, tokenizer, args.max_length, on_error=on_error, on_long=on_long,
                                                 source=f"{split}_dataset")
            print(f"[{split}] {reports[split].summary()}")
    if guard is True:
        guard = DivergenceGuard()
    identity = run_identity(preset)  # written into every checkpoint; a mismatching one is never resumed
    callbacks = list(callbacks or []) + ([guard] if guard else []) + [RunIdentityCallback(identity)]
    cpu_bf16 = args.bf16 and args.use_cpu  # where course_utils.cpu_autocast's levers act
    trainer = CachingDPOTrainer(  # trl.DPOTrainer + an on-disk reference cache (fast_dpo.py)
        model=model,
        ref_model=None,  # LoRA: reference = base weights with the adapter disabled
        args=args,
        train_dataset=reports["train"].dataset,
        eval_dataset=reports["eval"].dataset if "eval" in reports else None,
        processing_class=tokenizer,
        peft_config=lora_config(preset.lora_r, preset.lora_alpha, preset.lora_dropout) if peft else None,
        callbacks=callbacks,
        # on CPU, score only completion tokens (TRL's head scores every position there; fast_dpo.py)
        completion_head=not torch.cuda.is_available() if completion_head is None else completion_head,
        # a precomputed reference in bf16/fp16: compute it in the policy's exact shapes (fast_dpo.py)
        fixed_shapes=(args.precompute_ref_log_probs and (args.bf16 or args.fp16)) if fixed_shapes is None
        else fixed_shapes,
        frozen_bf16=cpu_bf16 if frozen_bf16 is None else frozen_bf16,
        fp32_attention=cpu_bf16 if fp32_attention is None else fp32_attention,
        fused_lora=cpu_bf16 if fused_lora is None else fused_lora,
    )
    if args.fp16:
        upcast_trainable_to_fp32(trainer.model)
    trainer.data_reports, trainer.guard = reports, guard or None
    trainer.course_run = identity  # train_with_resume refuses a checkpoint whose course_run.json differs
    return trainer


def upcast_trainable_to_fp32(model) -> list[str]:
    """Make every trainable parameter fp32; returns the names that were not.

    Why: for a quantised (4-bit) model TRL 1.16 casts the LoRA weights to bf16 (QLoRA paper,
    §3), in ``DPOTrainer.__init__``. Under ``fp16=True`` accelerate builds a CUDA
    ``GradScaler`` whose unscale kernel (``_amp_foreach_non_finite_check_and_unscale_``) has
    no bf16 version, so a T4 run crashes at its first optimizer step (pytorch#127176). fp32
    master weights are also what mixed precision expects: autocast runs the products in fp16
    and the optimizer updates fp32. The optimizer is created in ``train()``, after this.
    """
    changed = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            changed.append(name)
    return changed


def load_training_data(name: str, preset: Preset, tokenizer, *, on_error: str = "raise", on_long: str = "truncate",
                       reference=None, split: str | None = None, config: str | None = None):
    """``(train, test)`` datasets for ``--dataset``: ``auto``, ``sentiment``, a local file, a folder or a hub id.

    ``auto`` is :func:`course_utils.pair_origin.default_dataset`: Intel/orca_dpo_pairs on the
    GPU presets, the sentiment pairs elsewhere. ``reference``: the loaded ``(model, tokenizer)``,
    which samples the sentiment pairs when they are not cached (instead of a second copy).
    Files and hub data are checked whole, before the split, so a message names the row of
    the file (or of the hub split) rather than of a shuffled split. The split is seeded by the
    preset, so lesson 5 gets the same held-out pairs as lesson 4. Files, folders and hub ids
    go through :func:`course_utils.layouts.read_preferences`, which recognises their layout
    (``split``/``config`` choose the part of a folder or hub id); a name ending in
    ``orca_dpo_pairs`` with Intel's columns keeps its own converter (the template's plain text).
    """
    from . import data
    from .layouts import is_file_source, read_preferences
    from .pair_origin import resolve_dataset

    name = resolve_dataset(name, preset)
    if name == "sentiment":
        from .sentiment import sentiment_dataset

        splits, _, reports = sentiment_dataset(preset, reference=reference)
        for split, report in reports.items():
            print(f"[{split}] {report.summary()}")
        return splits["train"], splits["test"]
    rows = None
    if name.rstrip("/").endswith("orca_dpo_pairs") and not is_file_source(name) and config is None:
        try:
            rows = data.load_orca_dpo_pairs(tokenizer, split=split or "train", path_or_id=name, on_error=on_error,
                                            limit=preset.train_prompts + preset.eval_prompts)
        except PreferenceDataError as err:
            if err.kind != "missing_column":  # another layout under that name (HuggingFaceH4's): detect it below
                raise
    if rows is None:
        loaded = read_preferences(name, split=split, config=config, tokenizer=tokenizer)
        print(f"[data] {loaded.report()}")
        rows = loaded.rows  # a missing or unreadable path raises, naming it
    prepared = prepare_preferences(rows, tokenizer, preset.max_length, on_error=on_error, on_long=on_long, source=name)
    print(f"[data] {prepared.summary()}")
    dataset = prepared.dataset
    if len(dataset) < 2:
        raise PreferenceDataError(f"{len(dataset)} usable pair(s): need at least 2 (one to train, one to evaluate)",
                                  source=name, kind="empty_file")
    split = dataset.train_test_split(test_size=min(preset.eval_prompts, len(dataset) // 5 or 1), seed=preset.seed)
    return split["train"], split["test"]


def parse_overrides(items: list[str]) -> dict:
    """``["per_device_batch_size=2", "beta=0.5"]`` -> preset overrides, each converted to its field's type."""
    import dataclasses

    types = {f.name: f.type for f in dataclasses.fields(Preset)}
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in types:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(types)}")
        kind = str(types[name])
        try:
            if kind.startswith("bool"):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[name] = text.lower() in ("true", "1")
            elif kind.startswith("int"):
                out[name] = int(text)
            elif kind.startswith("float"):
                out[name] = float(text)
            else:
                out[name] = None if text.lower() == "none" and "None" in kind else text
        except ValueError:
            raise ValueError(f"--set {item!r}: {text!r} is not a valid {kind} for {name}") from None
    return out


def main(argv=None) -> dict:
    """The command line (see the module docstring); returns the final metrics."""
    parser = argparse.ArgumentParser(description="DPO-train a course model with LoRA/QLoRA.")
    parser.add_argument("--preset", default="auto", help="auto (detect), cpu, tiny, t4, a100, cuda")
    parser.add_argument("--dataset", default="auto",
                        help="auto (Intel/orca_dpo_pairs on a GPU preset, sentiment on cpu/tiny), sentiment, "
                             "a local .json/.jsonl/.csv/.parquet (or .gz), a dataset folder, or a hub id; "
                             "its layout is recognised (see course_utils/layouts.py)")
    parser.add_argument("--split", help="split of a dataset folder or hub id (default: train, or the one it has)")
    parser.add_argument("--config", help="config (subset) of a dataset folder or hub id")
    parser.add_argument("--output-dir", default="build/dpo", help="checkpoints, the adapter and metrics.json go here")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--beta", type=float)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any preset field, e.g. --set per_device_batch_size=2 (repeatable)")
    parser.add_argument("--on-error", choices=["raise", "drop"], default="raise",
                        help="bad rows: stop at the first (default) or drop and report them all")
    parser.add_argument("--on-long", choices=ON_LONG, default="truncate",
                        help="rows longer than max_length: truncate (TRL keep_start, reported), drop or raise")
    parser.add_argument("--resume", default="auto",
                        help="auto: continue from the newest complete checkpoint in --output-dir if there is one; "
                             "never: start fresh; or a checkpoint folder")
    parser.add_argument("--stop-on", default="non_finite,fp16_overflow",
                        help="comma-separated divergence signatures that stop the run, 'all', or 'none' "
                             "(see course_utils/guard.py)")
    args = parser.parse_args(argv)

    overrides = {k: v for k, v in dict(max_steps=args.max_steps, beta=args.beta, learning_rate=args.learning_rate,
                                       seed=args.seed).items() if v is not None}
    try:
        overrides.update(parse_overrides(args.set))
        stop_on = args.stop_on if args.stop_on == "all" else tuple(x for x in args.stop_on.split(",") if x != "none")
        guard = DivergenceGuard(stop_on=stop_on)
    except ValueError as err:
        parser.error(str(err))
    try:
        return _run(args, overrides, guard)
    except (PreferenceDataError, ModelLoadError, FileNotFoundError, ResumeMismatch) as err:
        # A clear one-line message instead of a traceback from deep inside datasets/TRL.
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def save_adapter(trainer, directory: str | Path) -> Path:
    """Save the trained adapter for sharing: safetensors weights, adapter config, tokenizer, and no pickle.

    ``Trainer.save_model`` also writes ``training_args.bin``, a pickled ``TrainingArguments``;
    unpickling can run code, so the shared folder gets ``training_args.json`` instead (the
    checkpoints, which only this run reads back, keep theirs for resuming).
    """
    directory = Path(directory)
    trainer.save_model(str(directory))
    if trainer.is_world_process_zero():
        (directory / "training_args.bin").unlink(missing_ok=True)
        (directory / "training_args.json").write_text(trainer.args.to_json_string())
    return directory


def device_map_for(env=None, cuda: bool | None = None):
    """Where ``from_pretrained`` puts the model, for how this process was launched.

    One process on a GPU: ``"auto"``. Several processes (``accelerate launch``, torchrun):
    under DDP each process holds a whole copy on its own GPU, ``{"": LOCAL_RANK}`` ("auto"
    would spread every copy over all GPUs, which DDP cannot wrap); under FSDP or DeepSpeed
    ``None``, because the launcher places and shards the model. On CPU: ``None``.
    """
    env = os.environ if env is None else env
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return None
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return "auto"
    if env.get("ACCELERATE_USE_FSDP") == "true" or env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        return None
    return {"": int(env.get("LOCAL_RANK", "0"))}


def _run(args, overrides: dict, guard: DivergenceGuard) -> dict:
    preset = detect_preset(**overrides) if args.preset == "auto" else get_preset(args.preset, **overrides)
    print(f"Preset {preset.name}: {preset.notes}")
    model, tokenizer = load_model(preset.model_name, dtype=preset.dtype, load_in_4bit=preset.load_in_4bit,
                                  checkpoint=preset.checkpoint, seed=preset.seed, device_map=device_map_for())
    train, test = load_training_data(args.dataset, preset, tokenizer, on_error=args.on_error, on_long=args.on_long,
                                     reference=(model, tokenizer), split=args.split, config=args.config)
    trainer = build_trainer(preset, model, tokenizer, train, test, output_dir=args.output_dir,
                            on_error=args.on_error, on_long=args.on_long, guard=guard)
    start = time.perf_counter()
    resume = {"auto": True, "never": False}.get(args.resume, args.resume)
    train_with_resume(trainer, resume)
    metrics = trainer.evaluate()
    metrics["train_seconds"] = time.perf_counter() - start
    metrics["global_step"] = trainer.state.global_step
    metrics["output_dir"] = str(args.output_dir)
    metrics["train_losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics["diagnoses"] = [d.signature for d in guard.diagnoses]
    print(guard.summary())
    adapter_dir = Path(args.output_dir) / "adapter"
    save_adapter(trainer, adapter_dir)  # adapter_model.safetensors + adapter_config.json, no pickle
    if trainer.is_world_process_zero():
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps({k: v for k, v in metrics.items() if k != "train_losses"}, indent=2))
        print(f"Adapter saved to {adapter_dir}")
    return metrics


if __name__ == "__main__":
    main()
