"""Same science? One trained policy evaluated twice: the decoding before ``course_utils.decode`` and the course's now.

    .venv/bin/python benchmarks/decoder_science.py --adapter build/course/dpo/adapter

Both sides run lesson 5's evaluation on the cpu preset's 64 held-out prompts, 2 samples each, seed 1:

- **before**: transformers' ``generate`` (fp32, the adapter unmerged, 32 rows a call, ``torch.multinomial``), the texts
  tokenised again and scored with an end-of-turn token appended for the KL (the code before this change);
- **now**: ``evaluate.evaluate_against_reference`` (the course's decoder, a bf16 copy where native, the KL on the
  sampled ids).

They draw different random numbers, so single samples differ; the question is whether the win rate and the KL agree
within their confidence intervals. Writes ``build/decoder_science.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> dict:
    import torch
    from peft import PeftModel

    from bench_generation import hf_generate
    from course_utils.cpu import machine_info
    from course_utils.evaluate import evaluate_against_reference, kl_on_samples, mean_and_stderr, win_rate
    from course_utils.generation import encode_prompts
    from course_utils.models import load_model
    from course_utils.presets import get_preset
    from course_utils.sentiment import SentimentJudge, sentiment_prompt, split_openings

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", default="build/course/dpo/adapter")
    parser.add_argument("--output", default="build/decoder_science.json")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    preset = get_preset("cpu")
    base, tokenizer = load_model(preset.model_name)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    held_out = split_openings(preset.train_prompts, preset.eval_prompts, seed=preset.seed)[1]
    prompts = [sentiment_prompt(o) for o in held_out]
    judge, n, tokens = SentimentJudge(), 2, preset.sentiment_new_tokens

    start = time.perf_counter()
    ids = encode_prompts(tokenizer, prompts)
    policy_ids = hf_generate(model, tokenizer, ids, num_samples=n, max_new_tokens=tokens, seed=args.seed)
    with model.disable_adapter():
        reference_ids = hf_generate(model, tokenizer, ids, num_samples=n, max_new_tokens=tokens, seed=args.seed)
    policy = [t.strip() for t in tokenizer.batch_decode(policy_ids, skip_special_tokens=True)]
    reference = [t.strip() for t in tokenizer.batch_decode(reference_ids, skip_special_tokens=True)]
    flat_prompts = [p for p in prompts for _ in range(n)]
    wr = win_rate(judge(policy), judge(reference), seed=args.seed)
    kl, kl_se = kl_on_samples(model, tokenizer, flat_prompts, policy)
    before = {"win_rate": wr.rate, "win_rate_ci": [wr.ci_low, wr.ci_high], "kl": kl, "kl_stderr": kl_se,
              "policy_reward": mean_and_stderr(judge(policy))[0], "seconds": time.perf_counter() - start}

    start = time.perf_counter()
    now = evaluate_against_reference(model, tokenizer, prompts, judge, num_samples=n, max_new_tokens=tokens,
                                     seed=args.seed)
    now = {k: now[k] for k in ("win_rate", "win_rate_ci", "kl", "kl_stderr", "policy_reward")} | {
        "seconds": time.perf_counter() - start}

    def overlap(a, b):
        return a[0] <= b[1] and b[0] <= a[1]

    kl_gap = abs(now["kl"] - before["kl"]) / float(np.hypot(now["kl_stderr"], before["kl_stderr"]))
    report = {"machine": machine_info(kernel=False), "date": time.strftime("%Y-%m-%d"), "adapter": args.adapter,
              "torch_threads": torch.get_num_threads(), "before": before, "now": now,
              "win_rate_within_each_others_ci": before["win_rate_ci"][0] <= now["win_rate"] <= before["win_rate_ci"][1]
              and now["win_rate_ci"][0] <= before["win_rate"] <= now["win_rate_ci"][1],
              "win_rate_cis_overlap": overlap(before["win_rate_ci"], now["win_rate_ci"]),
              "kl_difference_in_standard_errors": kl_gap}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    for side in ("before", "now"):
        r = report[side]
        print(f"{side:6s} win rate {r['win_rate']:.1%} (CI {r['win_rate_ci'][0]:.1%}-{r['win_rate_ci'][1]:.1%}), "
              f"KL {r['kl']:.2f} ± {r['kl_stderr']:.2f}, {r['seconds']:.0f} s")
    print(f"win rates within each other's CI: {report['win_rate_within_each_others_ci']}; "
          f"KL difference: {kl_gap:.2f} standard errors")
    return report


if __name__ == "__main__":
    main()
