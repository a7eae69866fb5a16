"""DPO training speed on this machine: TRL's defaults against the course's CPU preset; and generation speed.

    make bench                                   # or:
    .venv/bin/python benchmarks/bench_dpo.py --steps 8 --repeats 3 --output build/bench.json
    .venv/bin/python benchmarks/bench_dpo.py --no-training --repeats 1   # generation only

Generation (``--generation``, on by default) is ``benchmarks/bench_generation.py``: transformers' ``generate`` with
its defaults against the course's decoder, interleaved with the training runs; ``generation`` in the JSON.

Both runs train SmolLM2-135M-Instruct with LoRA r=8 on the same sentiment pairs, for the
same steps, with the same recipe (learning rate, schedule, beta, seed), so their losses
must agree; only *how* the step is executed differs:

- ``trl_default``: ``DPOConfig`` defaults (bf16 autocast, gradient checkpointing, a
  reference forward inside every step, TRL's log-prob head over every position);
- ``course_cpu``: the ``cpu`` preset through ``course_utils.train.build_trainer``
  (bf16 autocast where native, no checkpointing, reference log-probs precomputed once
  and kept on disk, completion-only log-prob head; see ``course_utils/fast_dpo.py``).

Each run is a separate child process (clean peak-memory figures, no state shared), and
the runs are interleaved (a b, b a, a b ...) so a noisy neighbour slows both alike; the
speed-up is the median of the per-round ratios. Between runs the parent measures the
fp32 and bf16 matrix-product peak, so ``fraction_of_peak`` compares numbers from the
same minutes. ``--ablations`` adds runs of the course preset with one lever undone.

FLOPs are counted from the model's shapes and each batch's real sizes
(``course_utils.gpu_budget.count_dpo_step_flops``): policy forward + backward through the
frozen base, plus the reference forward when it runs inside the step. ``achieved`` FLOP/s
counts the work a step needs (recomputation is not credited, the MFU convention);
``executed`` also counts what checkpointing and TRL's head recompute.
Results: ``build/bench.json`` (schema in docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from course_utils.cpu import machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generation  # noqa: E402  (benchmarks/ is not a package)

BATCH = 4  # pairs per step, as in the baseline and the cpu preset
LORA_R, LORA_ALPHA = 8, 16
RECIPE = dict(  # what is optimised: identical in every run, so the losses must agree
    learning_rate=2e-4,  # the cpu preset's rate until 2026-12-05 (now 5e-4), kept so earlier figures compare; TRL's
    # default 1e-6 would leave the loss at ln 2 for 8 steps
    lr_scheduler_type="linear",
    warmup_steps=0,
    beta=0.1,
    seed=0,
    data_seed=0,
    per_device_train_batch_size=BATCH,
)
EXACT_TOLERANCE = 1e-3  # fp32: the head, the cached reference and no checkpointing change no math
# bf16: per-step |Δloss| of a bf16 run from another run of the same recipe is allowed the bf16 rounding bound of
# that step's loss, from the logged log-prob sizes (course_utils.precision.step_one_tolerances, different paths)

# name -> (description, how it differs from the course preset; None: TRL's defaults, {"trl": {...}}: TRL changed)
CONFIGS = {
    "trl_default": ("TRL DPOConfig defaults + LoRA r=8", None),
    "course_cpu": ("course cpu preset (LoRA r=8)", {}),
    "course_cpu_fp32": ("course cpu preset, fp32 instead of bf16 autocast", {"preset": {"cpu_bf16": False}}),
    "course_cpu_trl_head": ("course cpu preset, TRL's all-position log-prob head", {"completion_head": False}),
    "course_cpu_reference_each_step": ("course cpu preset, reference forward in every step",
                                       {"preset": {"precompute_ref_log_probs": False}}),
    "course_cpu_checkpointing": ("course cpu preset + gradient checkpointing", {"preset": {"gradient_checkpointing": True}}),
    "course_cpu_1_thread": ("course cpu preset on 1 thread", {"threads": 1}),
    "course_cpu_autocast_casts": ("course cpu preset, frozen weights re-cast to bf16 by autocast in every forward",
                                  {"frozen_bf16": False}),
    "course_cpu_bf16_attention": ("course cpu preset, attention in bf16 (autocast's choice) instead of fp32",
                                  {"fp32_attention": False}),
    "course_cpu_peft_lora": ("course cpu preset, PEFT's LoRA linears and fp32 norm outputs instead of the fused bf16 ones",
                             {"fused_lora": False}),
    "course_cpu_dynamic_shapes": ("course cpu preset, batches padded to their own length (reference shapes differ)",
                                  {"fixed_shapes": False}),
    "trl_default_fp32": ("TRL DPOConfig defaults + LoRA r=8, fp32", {"trl": {"bf16": False}}),
}
HEADLINE = ("trl_default", "course_cpu")


# ---------------------------------------------------------------------------------------------
# the machine's peak
# ---------------------------------------------------------------------------------------------

def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 0.6) -> float:
    """Best FLOP/s of an ``n×n @ n×n`` product over ~``seconds`` (best, not mean: the peak is what the cores can do)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


# ---------------------------------------------------------------------------------------------
# one run (child process)
# ---------------------------------------------------------------------------------------------

def run_child(name: str, data_path: str, steps: int, result_path: str) -> None:
    from transformers import TrainerCallback

    from course_utils.gpu_budget import ModelShape, count_dpo_step_flops
    from course_utils.models import load_model, lora_config
    from course_utils.presets import get_preset

    _, change = CONFIGS[name]
    if change and "threads" in change:
        torch.set_num_threads(change["threads"])
    rows = [json.loads(line) for line in Path(data_path).read_text().splitlines()]
    from datasets import Dataset

    train = Dataset.from_list(rows)
    model, tokenizer = load_model("smollm2-135m")
    shape = ModelShape.from_config(model.config)
    out_dir = tempfile.mkdtemp(prefix="bench-")
    common = dict(max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds = []

        def on_step_begin(self, *args, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.seconds.append(time.perf_counter() - self.t)

    timer = StepTimer()
    t0 = time.perf_counter()
    if change is None or "trl" in change:  # TRL's defaults: only the recipe and bookkeeping are set
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir=out_dir, use_cpu=True, **RECIPE, **common, **(change or {}).get("trl", {}))
        trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                             peft_config=lora_config(LORA_R, LORA_ALPHA, 0.05), callbacks=[timer])
        scores_all_positions, reference_in_step = True, True
    else:
        from course_utils.train import build_trainer

        preset = get_preset("cpu", lora_r=LORA_R, lora_alpha=LORA_ALPHA, **change.get("preset", {}))
        recipe = {k: v for k, v in RECIPE.items() if k != "per_device_train_batch_size"}
        trainer = build_trainer(preset.override(per_device_batch_size=BATCH), model, tokenizer, train,
                                output_dir=out_dir, callbacks=[timer], guard=False,
                                completion_head=change.get("completion_head"), fixed_shapes=change.get("fixed_shapes"),
                                frozen_bf16=change.get("frozen_bf16"), fp32_attention=change.get("fp32_attention"),
                                fused_lora=change.get("fused_lora"),
                                **recipe, **common)
        scores_all_positions = not trainer.model.get_base_model().__dict__.get("_course_completion_head", False)
        reference_in_step = not preset.precompute_ref_log_probs
    setup_seconds = time.perf_counter() - t0

    # FLOPs from the shapes of the batches the trainer really sees (course_utils/gpu_budget.py):
    # "model" FLOPs are the work a step needs (MFU convention: nothing recomputed is counted);
    # "executed" adds what this configuration recomputes (checkpointing, TRL's head tiles).
    model_flops, executed_flops, tokens, padded = [], [], [], []
    compute_loss = trainer.compute_loss
    checkpointing = bool(trainer.args.gradient_checkpointing)

    def counting_compute_loss(model, inputs, *args, **kwargs):
        seqs, seq_len = inputs["input_ids"].shape
        scored = (seq_len - 1) if scores_all_positions else int(inputs["completion_mask"][:, 1:].sum()) / seqs
        count = dict(lora_r=LORA_R, reference="adapter_disabled" if reference_in_step else "precomputed",
                     lm_head_tokens_per_sequence=scored)
        model_flops.append(count_dpo_step_flops(shape, seq_len, seqs, gradient_checkpointing=False,
                                                head_recomputes=False, **count))
        executed_flops.append(count_dpo_step_flops(shape, seq_len, seqs, gradient_checkpointing=checkpointing,
                                                   head_recomputes=scores_all_positions, **count))
        tokens.append(int(inputs["attention_mask"].sum()))
        padded.append(seqs * seq_len)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting_compute_loss
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = slice(1, None)  # step 1 warms up allocator and kernels; not timed
    step_seconds = timer.seconds[timed]
    seconds = sum(step_seconds)
    result = {
        "name": name,
        "description": CONFIGS[name][0],
        "threads": torch.get_num_threads(),
        "bf16_autocast": bool(trainer.args.bf16),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "reference": "forward in every step" if reference_in_step else "precomputed, cached on disk",
        "log_prob_head": "every position (TRL)" if scores_all_positions else "completion tokens only",
        "reference_cache_hit": bool(getattr(trainer, "reference_cache_hits", [])),
        "setup_seconds": setup_seconds,
        "step_seconds": timer.seconds,
        "median_step_seconds": statistics.median(step_seconds),
        "pairs_per_second": BATCH * len(step_seconds) / seconds,
        "tokens_per_second": sum(tokens[timed]) / seconds,
        "padding_fraction": 1 - sum(tokens) / sum(padded),
        "flops_per_step": statistics.mean(f["total"] for f in model_flops[timed]),
        "flops_breakdown_step_mean": {k: statistics.mean(f[k] for f in model_flops[timed]) for k in model_flops[0]},
        "executed_flops_per_step": statistics.mean(f["total"] for f in executed_flops[timed]),
        "achieved_flops_per_second": sum(f["total"] for f in model_flops[timed]) / seconds,
        "executed_flops_per_second": sum(f["total"] for f in executed_flops[timed]) / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": losses,
        "logps": [(h["logps/chosen"], h["logps/rejected"]) for h in trainer.state.log_history if "logps/chosen" in h],
        "final_loss": losses[-1],
    }
    Path(result_path).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# the parent: data, schedule, summary
# ---------------------------------------------------------------------------------------------

def bench_rows(steps: int) -> list[dict]:
    """The first ``steps × BATCH`` sentiment pairs of the cpu preset (sampled once, then cached)."""
    from course_utils.presets import get_preset
    from course_utils.sentiment import sentiment_dataset

    splits, _, _ = sentiment_dataset(get_preset("cpu"))
    need = steps * BATCH
    if len(splits["train"]) < need:
        raise SystemExit(f"error: --steps {steps} needs {need} pairs; the cpu preset has {len(splits['train'])}")
    return splits["train"].select(range(need)).to_list()


def bf16_loss_tolerance(run: dict) -> float:
    """The largest per-step bf16 bound on the DPO loss over ``run``'s logged steps (course_utils/precision.py)."""
    from course_utils.precision import step_one_tolerances

    return max(step_one_tolerances(torch.bfloat16, RECIPE["beta"], abs(c), abs(r), same_path=False)["loss"]
               for c, r in run["logps"])


def summarise(runs: list[dict], peaks: dict) -> dict:
    by_name: dict[str, list[dict]] = {}
    for r in runs:
        by_name.setdefault(r["name"], []).append(r)
    fp32_peak = statistics.median(peaks["float32"])
    bf16_peak = statistics.median(peaks["bfloat16"])

    def med(name, key):
        return statistics.median(r[key] for r in by_name[name])

    configs = {}
    for name, rs in by_name.items():
        warm = [r for r in rs if r["reference_cache_hit"]]
        configs[name] = {
            "description": rs[0]["description"],
            "runs": len(rs),
            "pairs_per_second": med(name, "pairs_per_second"),
            "tokens_per_second": med(name, "tokens_per_second"),
            "median_step_seconds": med(name, "median_step_seconds"),
            "achieved_flops_per_second": med(name, "achieved_flops_per_second"),
            "executed_flops_per_second": med(name, "executed_flops_per_second"),
            "fraction_of_fp32_peak": med(name, "achieved_flops_per_second") / fp32_peak,
            "fraction_of_bf16_peak": med(name, "achieved_flops_per_second") / bf16_peak,
            "flops_per_step": med(name, "flops_per_step"),
            "peak_rss_mb": med(name, "peak_rss_mb"),
            "setup_seconds_first_run": rs[0]["setup_seconds"],
            "setup_seconds_cache_warm": statistics.median(r["setup_seconds"] for r in warm) if warm else None,
            "final_losses": [r["final_loss"] for r in rs],
            "losses_first_run": rs[0]["losses"],
        }
    a, b = HEADLINE
    # speed-up per round: the two runs of a round ran minutes apart, under the same neighbours
    ratios = [rb["pairs_per_second"] / ra["pairs_per_second"]
              for ra in by_name[a] for rb in by_name[b] if ra["round"] == rb["round"]]
    def loss_diff(x, y):  # per-step |Δloss| between the first runs of two configurations
        if x in by_name and y in by_name:
            return max(abs(p - q) for p, q in zip(by_name[x][0]["losses"], by_name[y][0]["losses"]))
        return None

    checks = {
        "course_cpu_vs_trl_default": loss_diff(b, a),
        # same arithmetic, fp32: must agree to rounding
        "exact_fp32_course_vs_trl": loss_diff("course_cpu_fp32", "trl_default_fp32"),
        # what bf16 autocast alone does, to the course preset and to TRL's own (bf16) default
        "bf16_drift_course": loss_diff(b, "course_cpu_fp32"),
        "bf16_drift_trl_default": loss_diff(a, "trl_default_fp32"),
    }
    bf16_tolerance = bf16_loss_tolerance(by_name[b][0])
    same = checks["course_cpu_vs_trl_default"] <= bf16_tolerance
    if checks["exact_fp32_course_vs_trl"] is not None:
        same = same and checks["exact_fp32_course_vs_trl"] <= EXACT_TOLERANCE
        same = same and checks["bf16_drift_course"] <= bf16_tolerance
    first_b = by_name[b][0]
    cold_b = first_b["setup_seconds"] + sum(first_b["step_seconds"])
    cold_a = statistics.median(r["setup_seconds"] + sum(r["step_seconds"]) for r in by_name[a])
    return {
        "speedup": statistics.median(ratios),
        "speedup_per_round": ratios,
        "fraction_of_peak": configs[b]["achieved_flops_per_second"] / fp32_peak,
        "speedup_cold_cache_one_pass": cold_a / cold_b,
        "same_result": same,
        "loss_tolerance": {"exact_fp32": EXACT_TOLERANCE, "bf16": bf16_tolerance},
        "max_abs_loss_diff": checks,
        "fp32_matmul_peak_flops": fp32_peak,
        "bf16_matmul_peak_flops": bf16_peak,
        "peaks_measured": peaks,
        "configs": configs,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the headline pair (a b / b a ...)")
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the course preset with each lever undone (once, in the first round)")
    parser.add_argument("--ablation", action="append", choices=[n for n in CONFIGS if n not in HEADLINE],
                        metavar="NAME", help="run only these training ablations (repeatable; default: all of them)")
    parser.add_argument("--training", action=argparse.BooleanOptionalAction, default=True,
                        help="the training runs (TRL's defaults against the cpu preset)")
    parser.add_argument("--generation", action=argparse.BooleanOptionalAction, default=True,
                        help="the generation runs (transformers' generate against the course's decoder)")
    parser.add_argument("--output", default="build/bench.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "greedy_check":
        return bench_generation.greedy_check(args.result)
    if args.child in bench_generation.CONFIGS:
        return bench_generation.run_child(args.child, args.result)
    if args.child:
        return run_child(args.child, args.data, args.steps, args.result)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first step is not timed)")

    from tqdm.auto import tqdm

    work = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in bench_rows(args.steps)))
    env = {**os.environ, "DPO_COURSE_REFERENCE_CACHE": str(work / "reference-cache"),  # starts cold
           "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    extra = (args.ablation or [n for n in CONFIGS if n not in HEADLINE]) if args.ablations else []
    gen_headline = [n for pair in bench_generation.HEADLINE.values() for n in pair]
    gen_extra = [n for n in bench_generation.CONFIGS if n not in gen_headline] if args.ablations else []
    rounds = []
    for i in range(args.repeats):
        pair = list(HEADLINE) if i % 2 == 0 else list(reversed(HEADLINE))
        names = (pair + (extra if i == 0 else [])) if args.training else []  # each lever undone once
        if args.generation:
            gen = gen_headline if i % 2 == 0 else list(reversed(gen_headline))
            names += gen + (gen_extra + ["greedy_check"] if i == 0 else [])
        rounds.append(names)
    peaks = {"float32": [], "bfloat16": []}
    runs, gen_runs, greedy = [], [], {}
    progress = tqdm(total=sum(map(len, rounds)), desc="benchmark runs")
    for i, names in enumerate(rounds):
        for name in names:
            for dtype in peaks:
                peaks[dtype].append(matmul_peak(getattr(torch, dtype)))
            result = work / f"{name}-{i}.json"
            if name == "greedy_check":
                cmd = [sys.executable, __file__, "--child", name, "--result", str(result)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                    raise SystemExit("error: the greedy check failed")
                greedy = json.loads(result.read_text())
                progress.update()
                continue
            cmd = [sys.executable, __file__, "--child", name, "--data", str(data), "--steps", str(args.steps),
                   "--result", str(result)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                raise SystemExit(f"error: benchmark run {name!r} failed (exit {proc.returncode})")
            run = json.loads(result.read_text())
            run["round"] = i
            if name in bench_generation.CONFIGS:
                gen_runs.append(run)
                progress.set_postfix_str(f"{name}: {run['tokens_per_second']:.0f} tokens/s")
                progress.update()
                continue
            runs.append(run)
            progress.set_postfix_str(f"{name}: {run['median_step_seconds']:.2f} s/step")
            progress.update()
    progress.close()
    summary = summarise(runs, peaks) if runs else {}
    fp32_peak, bf16_peak = (statistics.median(peaks[k]) for k in ("float32", "bfloat16"))
    if runs:
        course = summary["configs"][HEADLINE[1]]
        summary["training"] = {"speedup": summary["speedup"], "fraction_of_fp32_peak": summary["fraction_of_peak"],
                               "fraction_of_bf16_peak": course["fraction_of_bf16_peak"]}
    if gen_runs:
        summary["generation"] = bench_generation.summarise(gen_runs, greedy, bf16_peak, fp32_peak)
        summary["generation_runs"] = gen_runs
    report = {
        # CPU model, cores, ISA caps and the oneDNN kernel bf16 products ran: figures from different CPUs differ
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "model": "smollm2-135m",
        "steps_per_run": args.steps,
        "timed_steps_per_run": args.steps - 1,
        "pairs_per_step": BATCH,
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA},
        "recipe": RECIPE,
        "fp32_matmul_peak_flops": fp32_peak,
        "bf16_matmul_peak_flops": bf16_peak,
        **summary,
        "runs": runs,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.is_file() else {}
    for part, ran in (("generation", gen_runs), ("training", runs)):  # a section not re-run is kept, with its date
        if not ran and part in old:
            report[part] = old[part] | {"measured": old[part].get("measured", old.get("date"))}
            if part == "generation":
                report["generation_runs"] = old.get("generation_runs", [])
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten to {out}")
    return report


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\n{m['cpu_model']}, {m['cpu_count']} cores, {m['hardware_isa']}; bf16 products ran {m['bf16_matmul_kernel']}")
    print(f"matmul peak: fp32 {report['fp32_matmul_peak_flops'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {report['bf16_matmul_peak_flops'] / 1e9:.0f} GFLOP/s")
    if "generation" in report:
        g = report["generation"]
        print(f"\n{'generation run':34s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'of bf16 peak':>12s} {'dtype':>15s}")
        for name, c in g["configs"].items():
            print(f"{name:34s} {c['tokens_per_second']:9.0f} {c['flops_per_second'] / 1e9:8.1f} "
                  f"{c['fraction_of_bf16_peak']:12.3f} {c['dtype']:>15s}")
        print(f"generation speedup (course over generate; the smaller side): {g['speedup']:.2f}  "
              f"{ {k: round(v['median'], 2) for k, v in g['speedup_by_side'].items()} }")
        print(f"what undoing each lever costs (course_policy over it): "
              f"{ {k: round(v, 2) for k, v in g['lever_speedups'].items()} }")
        print(f"greedy tokens identical to generate on the same weights: {g['greedy_identical']}; {g['greedy']}")
    if "configs" not in report:
        return
    print(f"\n{'run':34s} {'pairs/s':>8s} {'s/step':>7s} {'GFLOP/s':>8s} {'of fp32 peak':>12s} "
          f"{'peak MB':>8s} {'final loss':>10s}")
    for name, c in report["configs"].items():
        print(f"{name:34s} {c['pairs_per_second']:8.2f} {c['median_step_seconds']:7.2f} "
              f"{c['achieved_flops_per_second'] / 1e9:8.1f} {c['fraction_of_fp32_peak']:12.2f} "
              f"{c['peak_rss_mb']:8.0f} {c['final_losses'][0]:10.4f}")
    print(f"speedup (course_cpu / trl_default, median of rounds): {report['speedup']:.2f}  "
          f"{['%.2f' % r for r in report['speedup_per_round']]}")
    print(f"fraction_of_peak (course_cpu, of fp32 peak): {report['fraction_of_peak']:.2f}; of bf16 peak: "
          f"{report['training']['fraction_of_bf16_peak']:.3f}")
    print(f"speedup with a cold reference cache, one pass: {report['speedup_cold_cache_one_pass']:.2f}")
    print(f"per-step max |Δloss|: {report['max_abs_loss_diff']}")
    print(f"same result (tolerances {report['loss_tolerance']}): {report['same_result']}")


if __name__ == "__main__":
    main()
