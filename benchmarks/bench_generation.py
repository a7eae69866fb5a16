"""Generation speed: transformers' ``generate`` with its defaults against the course's decoder (``make bench``).

Imported by ``bench_dpo.py``, which interleaves these runs with its training runs, each in its own child process.
Every run samples ``SAMPLES`` completions of ``max_new_tokens`` (the cpu preset's pair length) for each of the
first ``PROMPTS`` held-out sentiment prompts, from:

- the **reference**, SmolLM2-135M-Instruct itself;
- the **policy**, the same with a LoRA adapter of the cpu preset's rank (B drawn at random, so the adapter changes
  the outputs; speed does not depend on its values).

``hf_generate_*`` is ``model.generate(do_sample=True, top_k=0, top_p=1.0)`` (pure ancestral sampling, what the course
asks for) with everything else left to transformers: the model as loaded (fp32), its dynamic KV cache, a PEFT
model's adapter unmerged, 32 rows a call (the course's batch size before this benchmark). ``course_*`` is
``course_utils.generation.sample`` (``course_utils/decode.py``). Each ``course_policy_*`` ablation undoes one lever.

FLOPs are counted from shapes (``frontier.generation_flops``): what the run needs, i.e. each prompt once where
the prefill is shared and once per row where it is not; no padding, norms or sampling.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

PROMPTS, SAMPLES = 48, 4  # 192 rows: two of the course's 128-row batches, so the length sort has work to do
HF_BATCH = 32
# name -> (description, model side, how it is decoded)
CONFIGS = {
    "hf_generate_reference": ("transformers generate, defaults (fp32, 32 rows)", "reference", {"hf": True}),
    "course_reference": ("course decoder (course_utils.decode)", "reference", {}),
    "hf_generate_policy": ("transformers generate, defaults (fp32, adapter unmerged, 32 rows)", "policy", {"hf": True}),
    "course_policy": ("course decoder (course_utils.decode)", "policy", {}),
    "course_policy_fp32": ("course decoder, fp32 instead of a bf16 copy (adapter still merged)", "policy",
                           {"dtype": torch.float32, "merge": True}),
    "course_policy_unmerged": ("course decoder, adapter not merged into the copy", "policy", {"merge": False}),
    "course_policy_multinomial": ("course decoder, torch.multinomial instead of one uniform per row",
                                  "policy", {"sampler": "multinomial"}),
    "course_policy_no_shared_prefill": ("course decoder, every row runs its own prompt", "policy",
                                        {"share_prefill": False}),
    "course_policy_unsorted": ("course decoder, prompts batched in their given order", "policy",
                               {"sort_by_length": False}),
    "course_policy_32_rows": ("course decoder, 32 rows a batch instead of 128", "policy", {"batch_size": 32}),
}
HEADLINE = {"reference": ("hf_generate_reference", "course_reference"), "policy": ("hf_generate_policy", "course_policy")}


def _models(side: str):
    from peft import get_peft_model

    from course_utils.models import load_model, lora_config
    from course_utils.presets import get_preset

    model, tokenizer = load_model("smollm2-135m")
    if side == "policy":
        preset = get_preset("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = get_peft_model(model, lora_config(preset.lora_r, preset.lora_alpha, 0.0))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.01)
    return model.eval(), tokenizer


def bench_prompts():
    from course_utils.presets import get_preset
    from course_utils.sentiment import sentiment_prompt, split_openings

    preset = get_preset("cpu")
    _, held_out = split_openings(preset.train_prompts, preset.eval_prompts, seed=preset.seed)
    return [sentiment_prompt(o) for o in held_out[:PROMPTS]], preset.sentiment_new_tokens


def hf_generate(model, tokenizer, prompt_ids, *, num_samples, max_new_tokens, greedy=False, seed=0,
                batch_size=HF_BATCH) -> list[list[int]]:
    """transformers' generate over left-padded batches of ``batch_size`` rows; completion ids per row, cut after the
    first end-of-turn token (generate pads finished rows; the pad can be the end-of-turn token itself)."""
    from course_utils.decode import _eos_ids

    stops = set(_eos_ids(model, tokenizer))
    rows = [p for p in prompt_ids for _ in range(num_samples)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(rows), batch_size):
                batch = tokenizer.pad({"input_ids": rows[start : start + batch_size]}, return_tensors="pt")
                ids = model.generate(**batch, do_sample=not greedy, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
                for r in ids[:, batch["input_ids"].shape[1]:].tolist():
                    end = next((k for k, t in enumerate(r) if t in stops), None)
                    out.append(r if end is None else r[: end + 1])
    finally:
        tokenizer.padding_side = side
    return out


def run_child(name: str, result_path: str) -> None:
    from course_utils.decode import decode, sampling_model
    from course_utils.frontier import generation_flops
    from course_utils.generation import encode_prompts
    from course_utils.gpu_budget import ModelShape

    description, side, how = CONFIGS[name]
    model, tokenizer = _models(side)
    prompts, max_new_tokens = bench_prompts()
    prompt_ids = encode_prompts(tokenizer, prompts)
    shape = ModelShape.from_config(model.config)
    lora_r = model.peft_config["default"].r if side == "policy" else 0
    start = time.perf_counter()
    if how.get("hf"):
        completions = hf_generate(model, tokenizer, prompt_ids, num_samples=SAMPLES, max_new_tokens=max_new_tokens)
        prefills = len(prompt_ids) * SAMPLES
        setup = 0.0
    else:
        kwargs = {k: v for k, v in how.items() if k in ("sampler", "share_prefill", "sort_by_length", "batch_size")}
        with sampling_model(model, adapter=True, dtype=how.get("dtype", "auto"), merge=how.get("merge")) as m:
            setup = time.perf_counter() - start
            lora_r = lora_r if hasattr(m, "peft_config") else 0  # merged: no LoRA products left
            samples = decode(m, tokenizer, prompt_ids, num_samples=SAMPLES, max_new_tokens=max_new_tokens, desc=None,
                             **kwargs)
            dtype = str(next(m.parameters()).dtype)
        completions = samples.completion_ids
        prefills = len(prompt_ids) * (1 if kwargs.get("share_prefill", True) else SAMPLES)
    seconds = time.perf_counter() - start
    new_tokens = sum(map(len, completions))
    mean_prompt = sum(map(len, prompt_ids)) / len(prompt_ids)
    mean_completion = new_tokens / len(completions)
    # what the run needs: every row's completion, and the prompt once per prefill row
    flops = (generation_flops(shape, prompt_tokens=mean_prompt, completion_tokens=mean_completion,
                              sequences=len(completions), lora_r=lora_r)
             - (len(completions) - prefills) * generation_flops(shape, prompt_tokens=mean_prompt, completion_tokens=0,
                                                                  sequences=1, lora_r=lora_r))
    result = {
        "name": name, "description": description, "side": side, "threads": torch.get_num_threads(),
        "dtype": "torch.float32" if how.get("hf") else dtype, "rows": len(completions), "prompts": len(prompt_ids),
        "max_new_tokens": max_new_tokens, "new_tokens": new_tokens, "seconds": seconds, "setup_seconds": setup,
        "tokens_per_second": new_tokens / seconds, "flops": flops, "flops_per_second": flops / seconds,
    }
    Path(result_path).write_text(json.dumps(result))


def greedy_check(result_path: str, prompts_used: int = 16, max_new_tokens: int = 40) -> None:
    """Greedy tokens: the course's loop against generate on the same weights and batches (fp32, and the bf16 copy),
    and how far the bf16 copy's greedy tokens are from fp32 generate's (a precision change, not the loop's)."""
    from course_utils.decode import decode, sampling_model
    from course_utils.generation import encode_prompts

    out = {}
    for side in ("reference", "policy"):
        model, tokenizer = _models(side)
        prompts, _ = bench_prompts()
        ids = encode_prompts(tokenizer, prompts[:prompts_used])
        kw = dict(num_samples=1, max_new_tokens=max_new_tokens, greedy=True, batch_size=len(ids))
        fp32_hf = hf_generate(model, tokenizer, ids, **kw)
        fp32_course = decode(model, tokenizer, ids, temperature=0, max_new_tokens=max_new_tokens, batch_size=len(ids),
                             sort_by_length=False, desc=None).completion_ids
        with sampling_model(model, adapter=True, dtype=torch.bfloat16) as m:
            bf16_hf = hf_generate(m, tokenizer, ids, **kw)
            bf16_course = decode(m, tokenizer, ids, temperature=0, max_new_tokens=max_new_tokens, batch_size=len(ids),
                                 sort_by_length=False, desc=None).completion_ids
            bf16_course_sorted = decode(m, tokenizer, ids, temperature=0, max_new_tokens=max_new_tokens,
                                        desc=None).completion_ids

        def same(a, b):
            return sum(x == y for x, y in zip(a, b)) / len(a)

        def same_tokens(a, b):  # tokens before the first difference, over all rows
            agree = 0
            for x, y in zip(a, b):
                n = 0
                while n < min(len(x), len(y)) and x[n] == y[n]:
                    n += 1
                agree += n
            return agree / sum(map(len, a))

        out[side] = {
            "rows": len(ids),
            "fp32_course_equals_generate": same(fp32_course, fp32_hf),
            "bf16_course_equals_generate": same(bf16_course, bf16_hf),
            "bf16_course_sorted_equals_unsorted": same(bf16_course_sorted, bf16_course),
            "bf16_vs_fp32_rows_identical": same(bf16_course, fp32_hf),
            "bf16_vs_fp32_tokens_before_first_difference": same_tokens(fp32_hf, bf16_course),
        }
        del model
    Path(result_path).write_text(json.dumps(out))


def summarise(runs: list[dict], greedy: dict, bf16_peak: float, fp32_peak: float) -> dict:
    import statistics

    by_name: dict[str, list[dict]] = {}
    for r in runs:
        by_name.setdefault(r["name"], []).append(r)
    configs = {}
    for name, rs in by_name.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        configs[name] = {"description": rs[0]["description"], "side": rs[0]["side"], "dtype": rs[0]["dtype"],
                         "runs": len(rs), "tokens_per_second": med("tokens_per_second"), "seconds": med("seconds"),
                         "setup_seconds": med("setup_seconds"), "flops_per_second": med("flops_per_second"),
                         "fraction_of_bf16_peak": med("flops_per_second") / bf16_peak,
                         "fraction_of_fp32_peak": med("flops_per_second") / fp32_peak}
    speedups = {}
    for side, (a, b) in HEADLINE.items():
        # per round: the two runs of a round ran minutes apart, under the same neighbours
        ratios = [rb["tokens_per_second"] / ra["tokens_per_second"]
                  for ra in by_name[a] for rb in by_name[b] if ra["round"] == rb["round"]]
        speedups[side] = {"median": statistics.median(ratios), "per_round": ratios}
    levers = {name: configs["course_policy"]["tokens_per_second"] / c["tokens_per_second"]
              for name, c in configs.items() if name.startswith("course_policy_")}
    greedy_ok = all(g["fp32_course_equals_generate"] == 1 and g["bf16_course_equals_generate"] == 1
                    for g in greedy.values())
    return {
        "speedup": min(s["median"] for s in speedups.values()),  # the smaller of reference and policy
        "speedup_by_side": speedups,
        "fraction_of_bf16_peak": configs["course_policy"]["fraction_of_bf16_peak"],
        "greedy_identical": greedy_ok,
        "greedy": greedy,
        "lever_speedups": levers,  # course_policy over each ablation: what undoing one lever costs
        "configs": configs,
    }
