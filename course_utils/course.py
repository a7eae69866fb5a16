"""The course's main job, end to end on the CPU default (``make course``).

1. make the offline sentiment preference pairs (sampled from SmolLM2, ranked by VADER);
2. DPO-train SmolLM2-135M-Instruct with LoRA;
3. evaluate against the reference model (same weights, adapter off) on held-out prompts;
4. print a summary and write it to ``build/summary.json``.

    python -m course_utils.course                 # CPU default
    python -m course_utils.course --preset tiny   # the CI-sized run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from .checkpoints import train_with_resume
from .evaluate import evaluate_against_reference, implicit_reward_accuracy
from .models import load_model
from .presets import get_preset
from .sentiment import SentimentJudge, sentiment_dataset, sentiment_prompt
from .train import build_trainer, save_adapter


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}"


def run_course(preset_name: str = "cpu", output_dir: str | Path = "build", **overrides) -> dict:
    """Run the whole loop for a preset; returns (and writes) the summary dict."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    preset = get_preset(preset_name, **overrides)
    timings = {}
    print(f"== Preset {preset.name}: {preset.notes}")

    t = time.perf_counter()
    splits, held_out, reports = sentiment_dataset(preset)
    timings["data_seconds"] = time.perf_counter() - t
    for split, report in reports.items():
        print(f"   [{split}] {report.summary()}")

    model, tokenizer = load_model(preset.model_name, dtype=preset.dtype, load_in_4bit=preset.load_in_4bit,
                                  seed=preset.seed)
    t = time.perf_counter()
    trainer = build_trainer(preset, model, tokenizer, splits["train"], splits["test"],
                            output_dir=output_dir / "dpo")  # includes the one reference pass
    timings["setup_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    train_with_resume(trainer)  # a rerun after an interruption continues from the newest checkpoint
    timings["train_seconds"] = time.perf_counter() - t
    save_adapter(trainer, output_dir / "dpo" / "adapter")
    policy = trainer.model
    history = [h for h in trainer.state.log_history if "loss" in h]

    t = time.perf_counter()
    judge = SentimentJudge()
    test_acc = implicit_reward_accuracy(policy, tokenizer, splits["test"], preset.beta)
    versus = evaluate_against_reference(policy, tokenizer, [sentiment_prompt(o) for o in held_out], judge,
                                        num_samples=2, max_new_tokens=preset.sentiment_new_tokens, seed=preset.seed + 1)
    timings["eval_seconds"] = time.perf_counter() - t

    summary = {
        "preset": preset.name,
        "model": preset.model_name,
        "machine": machine_description(),
        "train_pairs": len(splits["train"]),
        "held_out_pairs": len(splits["test"]),
        "held_out_prompts": len(held_out),
        "steps": trainer.state.global_step,
        "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None,
        "guard_diagnoses": [d.signature for d in trainer.guard.diagnoses],
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        # TRL's metrics on the last logged training batches (the full train set would cost minutes more)
        "train_reward_accuracy": history[-1]["rewards/accuracies"] if history else None,
        "train_reward_margin": history[-1]["rewards/margins"] if history else None,
        "held_out_reward_accuracy": test_acc["reward_accuracy"],
        "held_out_reward_margin": test_acc["reward_margin"],
        **{k: v for k, v in versus.items() if k != "examples"},
        **timings,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "examples.json").write_text(json.dumps(versus["examples"], indent=2))
    print_summary(summary)
    print(f"Summary written to {output_dir / 'summary.json'}")
    return summary


def print_summary(s: dict) -> None:
    print("\n== DPO vs reference on held-out prompts (ground truth: VADER sentiment, -1..1)")
    rows = [
        ("mean reward, DPO policy", f"{s['policy_reward']:+.3f} ± {s['policy_reward_stderr']:.3f}"),
        ("mean reward, reference", f"{s['reference_reward']:+.3f} ± {s['reference_reward_stderr']:.3f}"),
        ("win rate of DPO", f"{s['win_rate']:.1%}  (95% CI {s['win_rate_ci'][0]:.1%}-{s['win_rate_ci'][1]:.1%})"),
        ("KL(pi || pi_ref), nats", f"{s['kl']:.2f} ± {s['kl_stderr']:.2f}"),
        ("implicit-reward accuracy, last train batches", f"{s['train_reward_accuracy']:.1%}"),
        ("implicit-reward accuracy, held-out", f"{s['held_out_reward_accuracy']:.1%}"),
        ("completion tokens, DPO / ref", f"{s['policy_tokens']:.1f} / {s['reference_tokens']:.1f}"),
        ("loss, first / last logged", f"{s['first_loss']:.3f} / {s['last_loss']:.3f}"),
        ("seconds: data / reference pass / train / eval",
         f"{s['data_seconds']:.0f} / {s['setup_seconds']:.0f} / {s['train_seconds']:.0f} / {s['eval_seconds']:.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"   {k:<{width}}  {v}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Run the DPO course's main job end to end.")
    parser.add_argument("--preset", default="cpu", help="cpu (default) or tiny")
    parser.add_argument("--output-dir", default="build")
    parser.add_argument("--max-steps", type=int)
    args = parser.parse_args(argv)
    overrides = {"max_steps": args.max_steps} if args.max_steps else {}
    return run_course(args.preset, args.output_dir, **overrides)


if __name__ == "__main__":
    main()
