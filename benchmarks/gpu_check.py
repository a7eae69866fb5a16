"""``make gpu-check``: the GPU presets' peak memory and step time, measured next to their predictions.

One script for one H100/H200, at most 8 minutes, no model hub. It trains a random-weight model
with Mistral-7B's exact shapes (memory and time depend on shapes, not on trained values), written
once by ``gpu_validate.write_random_checkpoint`` with SmolLM2's tokenizer, which the course ships.
Everything goes through the course's own path: ``load_model(..., load_in_4bit=True)``,
``get_preset`` and ``build_trainer``. It measures

* the ``t4`` preset in fp16, as on a T4, with torch's allocator capped to a T4's 15 GiB
  (``torch.cuda.set_per_process_memory_fraction``), and the ``a100`` preset in bf16;
* each at its ``max_length`` and at half of it, so the memory that grows with the tokens
  (the activations) is measured as a slope in GiB per 1k tokens, next to the predicted slope;
* a save, a resume and an evaluation: a t4 run saves a checkpoint at step 2 and stops there (a
  lost session), a fresh trainer continues it to step 4 with ``train_with_resume``, then
  ``trainer.evaluate()`` scores a few held-out pairs.

    python benchmarks/gpu_check.py --output build/gpu_check.json

The JSON holds, per preset and length, the measured and predicted peak memory and step time,
the GPU's name and the library versions. Run it alone on the GPU: memory that another process
holds would be counted. Exit codes:

* 0: every measured peak is within 15% of its prediction (either way), and the resume and the
  evaluation worked;
* 1: a peak more than 15% off, or out of memory; a run that stopped early or did not train in its
  preset's precision; or a resume or evaluation that went wrong;
* 2: nothing was measured. Either torch sees no CUDA GPU, in which case the script says so and
  prints what it would run, before transformers is even imported, or the GPU has no bf16 or is too
  small for the a100 preset. On a T4, use ``gpu_validate.py --preset t4``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_validate.py, beside this file
from gpu_validate import (GIB, check_vocabulary, free_gpu_memory, gpu_key, library_versions,  # noqa: E402
                          measure_training, mistral_config, prediction, step_timer, synthetic_pairs,
                          write_random_checkpoint)

from course_utils.gpu_budget import GPUS, SHAPES  # noqa: E402  (torch only: cheap without a GPU too)
from course_utils.presets import get_preset  # noqa: E402

TOLERANCE = 0.15  # a measured peak more than 15% off its prediction, in either direction, fails the check
BUDGET_SECONDS = 8 * 60  # the whole check on one H100/H200; slower than this earns a warning
PASSED, FAILED, NOT_RUN = 0, 1, 2  # exit codes (see the module docstring)
STEPS = 4  # optimizer steps per run; the first pays kernel loading and autotuning, so it is left out of the timing
PRESETS = ("t4", "a100")
T4_GIB = GPUS["T4"].memory_gib  # what torch reports on a Colab T4
HELD_OUT_WORDS = (" d", " e", " f")  # the evaluation pairs repeat other words than the training pairs
AUTOCAST = {"float16": "fp16", "bfloat16": "bf16"}  # preset dtype -> accelerate's mixed_precision


@dataclass(frozen=True)
class Run:
    """One measured training run."""

    preset: str  # a course preset, trained as it is apart from max_length and max_steps
    max_length: int  # tokens per sequence; the synthetic pairs fill it
    dtype: str  # the preset's compute dtype: float16 for t4 (a T4 has no bf16), bfloat16 for a100
    memory_cap_gib: float | None  # what torch's allocator may hold: a T4's 15 GiB, or None for the whole GPU
    memory_fraction: float  # memory_cap_gib / the GPU's total, for torch.cuda.set_per_process_memory_fraction
    steps: int  # optimizer steps


@dataclass(frozen=True)
class ResumeCheck:
    """Save, resume, evaluate, on the t4 preset: Colab sessions are the ones that get cut off."""

    preset: str
    max_length: int
    stop_after: int  # the first trainer saves a checkpoint at this step and stops: the session is lost
    max_steps: int  # a fresh trainer resumes from that checkpoint and trains to here
    eval_pairs: int  # held-out synthetic pairs for trainer.evaluate()


def plan(total_gib: float, steps: int = STEPS) -> tuple[list[Run], ResumeCheck]:
    """What the check runs on a GPU with ``total_gib`` of memory: each preset at its max_length and at half of it."""
    runs = []
    for name in PRESETS:
        preset = get_preset(name)
        cap = T4_GIB if name == "t4" else None
        fraction = 1.0 if cap is None else min(1.0, cap / total_gib)
        runs += [Run(name, length, preset.dtype, cap, fraction, steps)
                 for length in (preset.max_length, preset.max_length // 2)]
    return runs, ResumeCheck("t4", get_preset("t4").max_length // 2, stop_after=2, max_steps=4, eval_pairs=4)


def run_preset(run: Run):
    """The preset as a run trains it: its own fields, apart from length and steps, and a log entry at every step."""
    return get_preset(run.preset, max_length=run.max_length, max_steps=run.steps, warmup_steps=0, logging_steps=1,
                      save_steps=10**6)


def tokens(preset) -> int:
    """Tokens in one micro-step: chosen and rejected of each pair, padded to max_length."""
    return 2 * preset.per_device_batch_size * preset.max_length


def measured_peak_gib(measured: dict) -> float:
    """The measured counterpart of gpu_budget's ``peak_gib``, the number the presets are fitted by.

    gpu_budget's peak is allocated x FRAGMENTATION, which is what the caching allocator reserves,
    plus CUDA_CONTEXT_GIB, which it does not own. torch.cuda.max_memory_reserved measures the
    first. The device memory in use outside the allocator, read after training, measures the
    second: the CUDA context, library kernels and bitsandbytes' paged optimizer states.
    """
    return measured["max_memory_reserved_gib"] + measured["outside_allocator_gib"]


def verdicts(rows: list[dict], tolerance: float = TOLERANCE) -> list[dict]:
    """Each row with ``ratio`` (measured / predicted peak) and ``ok``: the ratio within ``tolerance`` of 1, either way.

    A row whose peak was not measured (``measured_peak_gib`` None: it ran out of memory) is not ok.
    """
    out = []
    for row in rows:
        measured, predicted = row["measured_peak_gib"], row["predicted_peak_gib"]
        ratio = None if measured is None else measured / predicted
        out.append({**row, "ratio": ratio, "ok": ratio is not None and abs(ratio - 1) <= tolerance})
    return out


def slopes(rows: list[dict]) -> list[dict]:
    """Per preset, the memory each 1k more tokens in a micro-step adds between its two lengths, measured and predicted.

    Allocated memory, not reserved: the activations are what gpu_budget counts tensor by tensor,
    the fixed parts (weights, adapters, context) cancel in the difference, and fragmentation is
    left out of both sides.
    """
    out = []
    for name in dict.fromkeys(row["preset"] for row in rows):
        pair = sorted((row for row in rows if row["preset"] == name), key=lambda row: row["tokens"])
        if len(pair) != 2:
            continue
        short, long = pair
        k = (long["tokens"] - short["tokens"]) / 1000
        predicted = (long["predicted_allocated_gib"] - short["predicted_allocated_gib"]) / k
        measured = (None if None in (short["measured_allocated_gib"], long["measured_allocated_gib"])
                    else (long["measured_allocated_gib"] - short["measured_allocated_gib"]) / k)
        out.append({"preset": name, "tokens": [short["tokens"], long["tokens"]],
                    "measured_gib_per_1k_tokens": measured, "predicted_gib_per_1k_tokens": predicted,
                    "ratio": None if measured is None else measured / predicted})
    return out


def resume_ok(result: dict, spec: ResumeCheck) -> bool:
    """Saved where the session was lost, resumed from there, trained to the end, and evaluated to finite numbers."""
    return (result["saved_at_step"] == result["resumed_from_step"] == spec.stop_after
            and result["final_step"] == spec.max_steps
            and math.isfinite(result["evaluation"].get("eval_loss", math.nan)))


def problems(rows: list[dict], resume: dict | None, spec: ResumeCheck, tolerance: float = TOLERANCE) -> list[str]:
    """Why the check fails, one line each; empty when it passes."""
    found = []
    for row in rows:
        where = f"{row['preset']} at max_length {row['max_length']}"
        if row["out_of_memory"]:
            found.append(f"{where}: out of memory ({row['out_of_memory']})")
        elif not row["ok"]:
            found.append(f"{where}: measured peak {row['measured_peak_gib']:.2f} GiB is {row['ratio'] - 1:+.0%} "
                         f"off the predicted {row['predicted_peak_gib']:.2f} GiB (tolerance {tolerance:.0%})")
        if not row["out_of_memory"] and row["steps_done"] < row["steps"]:
            found.append(f"{where}: stopped after {row['steps_done']} of {row['steps']} steps "
                         f"(divergence guard: {', '.join(row['diagnoses']) or 'nothing diagnosed'})")
        if row["mixed_precision"] != AUTOCAST[row["dtype"]]:
            found.append(f"{where}: trained with mixed precision {row['mixed_precision']!r}, "
                         f"not the preset's {AUTOCAST[row['dtype']]!r}")
    if resume is not None and not resume_ok(resume, spec):
        found.append(f"save/resume/evaluate: saved at step {resume['saved_at_step']}, resumed from "
                     f"{resume['resumed_from_step']}, ended at {resume['final_step']} (expected {spec.stop_after}, "
                     f"{spec.stop_after}, {spec.max_steps}); eval_loss {resume['evaluation'].get('eval_loss')}")
    return found


def _num(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict], slope_rows: list[dict]) -> str:
    """The printed summary: one line per run, then the activation slopes."""
    lines = [f"{'preset':<7}{'dtype':<10}{'length':>6}{'cap GiB':>9}  {'peak GiB measured / predicted':>30}"
             f"{'ratio':>7}  {'verdict':<9}{'s/step measured / predicted':>28}"]
    for row in rows:
        peak = ("out of memory" if row["out_of_memory"]
                else f"{row['measured_peak_gib']:.2f} / {row['predicted_peak_gib']:.2f}")
        step = f"{_num(row['measured_step_seconds'], '.1f')} / {_num(row['predicted_step_seconds'], '.1f')}"
        cap, verdict = _num(row["memory_cap_gib"], ".1f"), "ok" if row["ok"] else "FAIL"
        lines.append(f"{row['preset']:<7}{row['dtype']:<10}{row['max_length']:>6}{cap:>9}  {peak:>30}"
                     f"{_num(row['ratio']):>7}  {verdict:<9}{step:>28}")
    for s in slope_rows:
        lines.append(f"activation slope, {s['preset']}: {_num(s['measured_gib_per_1k_tokens'], '.3f')} GiB per 1k "
                     f"tokens measured, {s['predicted_gib_per_1k_tokens']:.3f} predicted (ratio {_num(s['ratio'])})")
    return "\n".join(lines)


def describe(runs: list[Run], spec: ResumeCheck, key: str, total_gib: float) -> str:
    """What the check would run, with the predictions it will be held to, on the GPU ``key`` of ``GPUS``."""
    shape = SHAPES[get_preset(spec.preset).model_name]
    lines, train_seconds = [], 0.0
    for run in runs:
        preset = run_preset(run)
        pred = prediction(preset, shape, key)
        cap = ("the whole GPU" if run.memory_cap_gib is None else
               f"allocator capped to {run.memory_cap_gib:g} GiB ({run.memory_fraction:.3f} of {total_gib:g} GiB)")
        lines.append(f"  {run.preset:<5}{run.dtype:<9} max_length {run.max_length:>4}, {preset.per_device_batch_size} "
                     f"pair(s) x {preset.gradient_accumulation_steps} accumulation, {run.steps} steps, {cap}: "
                     f"predicted peak {pred['peak_gib']:.2f} GiB, {pred['step_seconds']:.1f} s/step")
        train_seconds += run.steps * pred["step_seconds"]
    resume = get_preset(spec.preset, max_length=spec.max_length)
    train_seconds += spec.max_steps * prediction(resume, shape, key)["step_seconds"]
    lines.append(f"  then {spec.preset} at max_length {spec.max_length}: a checkpoint at step {spec.stop_after} and "
                 f"a stop, a fresh trainer resumes it to step {spec.max_steps}, trainer.evaluate() on "
                 f"{spec.eval_pairs} held-out pairs")
    lines.append(f"  training predicted at {train_seconds:.0f} s on an {key} (gpu_budget's assumed utilisation), plus "
                 f"writing the {shape.num_parameters() * 2 / 1e9:.1f} GB random checkpoint once and one 4-bit load "
                 f"per preset")
    return "\n".join(lines)


def unsuitable(props) -> str | None:
    """Why this GPU cannot run the check, or None."""
    total = props.total_memory / GIB
    need = get_preset("a100").predicted_memory().peak_gib
    if (props.major, props.minor) < (8, 0):
        return f"{props.name} has no bfloat16, which the a100 preset trains in"
    if total < need:
        return f"{props.name} has {total:.1f} GiB; the a100 preset is predicted to need {need:.1f} GiB"
    return None


def release(trainer):
    """The trainer's 4-bit base model without its LoRA adapter; the rest of the trainer can then be freed.

    Loading the 7 B model takes longer than a run here, so each preset loads it once. ``unload()``
    takes the adapter out (not merged), and the next ``build_trainer`` adds a fresh one, as a new
    session would.
    """
    base = trainer.model.unload()
    trainer.accelerator.free_memory()  # drops accelerate's references to the model, optimizer and scheduler
    return base


def measure(run: Run, model, tokenizer, workdir: Path, shape, key: str | None):
    """Train ``run`` on ``model`` (the 4-bit base, no adapter). Returns its row and the base model."""
    from course_utils.train import build_trainer

    preset = run_preset(run)
    pairs = synthetic_pairs(tokenizer, run.max_length, preset.effective_batch_size * run.steps)
    check_vocabulary(tokenizer, pairs, shape.vocab_size)
    timer = step_timer()
    trainer = build_trainer(preset, model, tokenizer, pairs, output_dir=str(workdir / f"{run.preset}-{run.max_length}"),
                            callbacks=[timer], report_to="none", save_strategy="no")
    try:
        measured, oom = measure_training(trainer, timer), None
    except torch.cuda.OutOfMemoryError as err:  # under the T4 cap this is the finding, not a crash
        measured, oom = None, str(err).splitlines()[0]
    predicted = prediction(preset, shape, key)
    row = {**asdict(run), "tokens": tokens(preset), "out_of_memory": oom,
           "mixed_precision": str(trainer.accelerator.mixed_precision),
           "steps_done": trainer.state.global_step, "skipped_steps": len(trainer.guard.skipped_steps),
           "diagnoses": [d.signature for d in trainer.guard.diagnoses],
           "measured_peak_gib": None if oom else measured_peak_gib(measured),
           "predicted_peak_gib": predicted["peak_gib"],
           "measured_reserved_gib": None if oom else measured["max_memory_reserved_gib"],
           "predicted_reserved_gib": predicted["reserved_gib"],
           "measured_allocated_gib": None if oom else measured["max_memory_allocated_gib"],
           "predicted_allocated_gib": predicted["allocated_gib"],
           "measured_step_seconds": None if oom else measured["median_step_seconds"],
           "predicted_step_seconds": predicted["step_seconds"],
           "measured": measured, "predicted": predicted}
    return row, release(trainer)


def check_resume(spec: ResumeCheck, model, tokenizer, workdir: Path):
    """A lost session and the next one: save at ``stop_after``, resume in a fresh trainer, evaluate.

    Returns the result and the base model.
    """
    from transformers import TrainerCallback

    from course_utils.checkpoints import checkpoint_step, latest_checkpoint, train_with_resume
    from course_utils.train import build_trainer

    class LoseSession(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after this step's checkpoint is due
            if state.global_step >= spec.stop_after:
                control.should_training_stop = True
            return control

    out = workdir / "resume"
    shutil.rmtree(out, ignore_errors=True)  # the resume must find the checkpoint saved here, not an older run's
    preset = get_preset(spec.preset, max_length=spec.max_length, max_steps=spec.max_steps, save_steps=spec.stop_after,
                        warmup_steps=0, logging_steps=1)
    train = synthetic_pairs(tokenizer, spec.max_length, preset.effective_batch_size * spec.max_steps)
    held_out = synthetic_pairs(tokenizer, spec.max_length, spec.eval_pairs, words=HELD_OUT_WORDS)
    first = build_trainer(preset, model, tokenizer, train, output_dir=str(out), callbacks=[LoseSession()],
                          report_to="none")
    train_with_resume(first)  # nothing saved yet: a fresh start
    saved = latest_checkpoint(out)
    model = release(first)
    del first
    free_gpu_memory()  # its optimizer states and gradients
    second = build_trainer(preset, model, tokenizer, train, held_out, output_dir=str(out), report_to="none")
    train_with_resume(second)
    metrics = second.evaluate()
    result = {"saved_at_step": None if saved is None else checkpoint_step(saved),
              "resumed_from_step": None if second.resumed_from is None else checkpoint_step(second.resumed_from),
              "final_step": second.state.global_step, "max_steps": spec.max_steps,
              "evaluation": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    result["ok"] = resume_ok(result, spec)
    return result, release(second)


def run_check(args, props) -> dict:
    """Every run of the plan on this GPU; the report that goes into the JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights and the shipped tokenizer: nothing to download
    from course_utils.models import load_model, load_tokenizer

    start, seconds = time.perf_counter(), {}
    total_gib = props.total_memory / GIB
    key = gpu_key(props.name, total_gib)
    runs, spec = plan(total_gib, args.steps)
    shape = SHAPES[get_preset(spec.preset).model_name]  # both presets train Mistral-7B
    workdir = Path(args.workdir)

    tick = time.perf_counter()
    tokenizer = load_tokenizer("tiny", source="offline")  # SmolLM2's, shipped with the course
    folder = write_random_checkpoint(workdir / "random-mistral-7b", mistral_config(shape), tokenizer, device="cuda")
    seconds["random checkpoint"] = time.perf_counter() - tick

    rows, resume = [], None
    for name in PRESETS:
        group = [run for run in runs if run.preset == name]
        torch.cuda.set_per_process_memory_fraction(group[0].memory_fraction, 0)  # before loading, as on a T4
        tick = time.perf_counter()
        model, tokenizer = load_model(str(folder), dtype=group[0].dtype, load_in_4bit=True, device_map={"": 0})
        seconds[f"load {name}"] = time.perf_counter() - tick
        for run in group:
            tick = time.perf_counter()
            row, model = measure(run, model, tokenizer, workdir, shape, key)
            rows.append(row)
            seconds[f"{name} {run.max_length}"] = time.perf_counter() - tick
            print(table(verdicts([row], args.tolerance), []), flush=True)
        if name == spec.preset:
            tick = time.perf_counter()
            resume, model = check_resume(spec, model, tokenizer, workdir)
            seconds["save, resume, evaluate"] = time.perf_counter() - tick
        del model
        free_gpu_memory()  # the next preset loads its own copy (another compute dtype)
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    seconds["total"] = time.perf_counter() - start

    checked = verdicts(rows, args.tolerance)
    found = problems(checked, resume, spec, args.tolerance)
    return {"passed": not found, "problems": found, "tolerance": args.tolerance,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "gpu": {"name": props.name, "total_gib": total_gib, "capability": [props.major, props.minor],
                    "gpu_budget_key": key, "cuda": torch.version.cuda},
            "versions": library_versions(), "runs": checked, "slopes": slopes(checked), "resume": resume,
            "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--output", default="build/gpu_check.json")
    parser.add_argument("--workdir", default="build/gpu_check", help="the random checkpoint (kept for reruns) and runs")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run (at least 2)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="allowed |measured / predicted peak - 1|")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is left out of the timing")
    if not torch.cuda.is_available():
        h200 = GPUS["H200"].memory_gib
        runs, spec = plan(h200, args.steps)
        print(f"gpu_check needs a CUDA GPU: torch sees none here, so nothing was measured and nothing was written "
              f"(exit code {NOT_RUN}). On an H200 it would run:\n{describe(runs, spec, 'H200', h200)}", file=sys.stderr)
        return NOT_RUN
    props = torch.cuda.get_device_properties(0)
    reason = unsuitable(props)
    if reason:
        print(f"gpu_check cannot run here: {reason}. Nothing was measured (exit code {NOT_RUN}). It needs an "
              f"A100/H100/H200-class GPU; on a T4, run benchmarks/gpu_validate.py --preset t4.", file=sys.stderr)
        return NOT_RUN

    output = Path(args.output)
    output.unlink(missing_ok=True)  # a run that crashes must not leave an older run's verdict behind
    report = run_check(args, props)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print("\n" + table(report["runs"], report["slopes"]))
    resume = report["resume"]
    print(f"save/resume/evaluate: saved at step {resume['saved_at_step']}, resumed from {resume['resumed_from_step']}, "
          f"ended at {resume['final_step']}, eval_loss {_num(resume['evaluation'].get('eval_loss'), '.4f')}: "
          f"{'ok' if resume['ok'] else 'FAIL'}")
    total = report["seconds"]["total"]
    print(f"{report['gpu']['name']}, {total:.0f} s in all"
          + (f" (over the {BUDGET_SECONDS} s budget)" if total > BUDGET_SECONDS else "") + f". Written to {output}")
    for line in report["problems"]:
        print(f"FAIL {line}")
    print("gpu_check: passed" if report["passed"] else f"gpu_check: FAILED ({len(report['problems'])} problem(s))")
    return PASSED if report["passed"] else FAILED


if __name__ == "__main__":
    sys.exit(main())
