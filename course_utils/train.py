"""One function from (preset, model, tokenizer, dataset) to a configured TRL ``DPOTrainer``.

Shared by the notebooks and the command line::

    python -m course_utils.train --preset cpu --dataset sentiment
    python -m course_utils.train --preset auto --dataset Intel/orca_dpo_pairs   # on a GPU

The reference model is never a second copy: with LoRA, TRL scores the reference by
running the same weights with the adapter disabled (or, with
``precompute_ref_log_probs``, once before training).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .models import load_model, lora_config
from .presets import Preset, detect_preset, get_preset

PREFERENCE_COLUMNS = ["prompt", "chosen", "rejected"]


def dpo_config(preset: Preset, output_dir: str | Path, **overrides):
    """TRL ``DPOConfig`` for a preset. ``overrides`` are DPOConfig fields, applied last."""
    from trl import DPOConfig

    on_gpu = torch.cuda.is_available()
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
        bf16=preset.dtype == "bfloat16" and on_gpu,  # TRL defaults bf16=True; be explicit
        fp16=preset.dtype == "float16" and on_gpu,
        use_cpu=not on_gpu,
        # --- bookkeeping -------------------------------------------------------
        logging_steps=preset.logging_steps,
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
    **config_overrides,
):
    """A ready-to-train ``trl.DPOTrainer`` with LoRA (QLoRA when the model is 4-bit).

    Only the ``prompt``/``chosen``/``rejected`` columns are handed to TRL; extra
    columns (scores, ids) stay in the caller's dataset.
    """
    from trl import DPOTrainer

    if peft and getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        # casts norms to fp32 and enables input grads so LoRA on a frozen 4-bit base trains
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=preset.gradient_checkpointing)

    def only_preferences(ds):
        if ds is None:
            return None
        missing = [c for c in PREFERENCE_COLUMNS if c not in ds.column_names]
        if missing:
            raise ValueError(f"dataset lacks column(s) {missing}; it has {ds.column_names}")
        return ds.select_columns(PREFERENCE_COLUMNS)

    args = dpo_config(preset, output_dir, **config_overrides)
    return DPOTrainer(
        model=model,
        ref_model=None,  # LoRA: reference = base weights with the adapter disabled
        args=args,
        train_dataset=only_preferences(train_dataset),
        eval_dataset=only_preferences(eval_dataset),
        processing_class=tokenizer,
        peft_config=lora_config(preset.lora_r, preset.lora_alpha, preset.lora_dropout) if peft else None,
        callbacks=callbacks,
    )


def load_training_data(name: str, preset: Preset, tokenizer):
    """``(train, test)`` datasets for ``--dataset``: ``sentiment``, a local file, or a hub id."""
    from . import data

    if name == "sentiment":
        from .sentiment import sentiment_dataset

        splits, _, reports = sentiment_dataset(preset)
        for split, report in reports.items():
            print(f"[{split}] {report.summary()}")
        return splits["train"], splits["test"]
    if Path(name).is_file():
        dataset = data.load_preference_file(name)
    elif name.rstrip("/").endswith("orca_dpo_pairs"):
        dataset = data.load_orca_dpo_pairs(tokenizer, path_or_id=name, limit=preset.train_prompts + preset.eval_prompts)
    else:
        dataset = data.load_hub_preferences(name)
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
    parser = argparse.ArgumentParser(description="DPO-train a course model with LoRA/QLoRA.")
    parser.add_argument("--preset", default="auto", help="auto (detect), cpu, tiny, t4, a100, cuda")
    parser.add_argument("--dataset", default="sentiment", help="sentiment, a local .json/.jsonl/.csv/.parquet, or a hub id")
    parser.add_argument("--output-dir", default="build/dpo")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--beta", type=float)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any preset field, e.g. --set per_device_batch_size=2 (repeatable)")
    args = parser.parse_args(argv)

    overrides = {k: v for k, v in dict(max_steps=args.max_steps, beta=args.beta, learning_rate=args.learning_rate,
                                       seed=args.seed).items() if v is not None}
    try:
        overrides.update(parse_overrides(args.set))
    except ValueError as err:
        parser.error(str(err))
    preset = detect_preset(**overrides) if args.preset == "auto" else get_preset(args.preset, **overrides)
    print(f"Preset {preset.name}: {preset.notes}")
    model, tokenizer = load_model(preset.model_name, dtype=preset.dtype, load_in_4bit=preset.load_in_4bit,
                                  checkpoint=preset.checkpoint, seed=preset.seed,
                                  device_map="auto" if torch.cuda.is_available() else None)
    train, test = load_training_data(args.dataset, preset, tokenizer)
    trainer = build_trainer(preset, model, tokenizer, train, test, output_dir=args.output_dir)
    start = time.perf_counter()
    trainer.train()
    metrics = trainer.evaluate()
    metrics["train_seconds"] = time.perf_counter() - start
    adapter_dir = Path(args.output_dir) / "adapter"
    trainer.save_model(str(adapter_dir))
    (Path(args.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"Adapter saved to {adapter_dir}")
    return metrics


if __name__ == "__main__":
    main()
