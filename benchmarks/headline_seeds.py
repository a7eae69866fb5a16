"""The course's headline over pair seeds: DPO against the reference on held-out prompts, once per seed.

    .venv/bin/python benchmarks/headline_seeds.py                        # seeds 0 1 2, the cpu preset
    .venv/bin/python benchmarks/headline_seeds.py --seeds 0 --set max_steps=128

Each seed is the whole job of ``make dpo-job`` (``course_utils.course.run_course``) with the preset's ``seed`` set:
it picks the train / held-out split of the movie-review openings, samples the pairs, initialises LoRA and seeds the
evaluation's samples. The README's headline table is this script's output, ``build/headline.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main(argv=None) -> dict:
    from course_utils.course import run_course
    from course_utils.cpu import machine_info
    from course_utils.train import parse_overrides

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a preset field, e.g. --set max_steps=128 (repeatable)")
    parser.add_argument("--output", default="build/headline.json")
    args = parser.parse_args(argv)

    overrides = parse_overrides(args.set)
    keep = ("win_rate", "win_rate_ci", "kl", "kl_stderr", "policy_reward", "reference_reward",
            "held_out_reward_accuracy", "held_out_reward_margin", "train_pairs", "steps", "last_loss",
            "policy_tokens", "reference_tokens", "data_seconds", "setup_seconds", "train_seconds", "eval_seconds")
    seeds = {}
    for seed in args.seeds:
        start = time.perf_counter()
        out = Path(args.output).with_suffix("") / f"seed-{seed}"
        summary = run_course(args.preset, out, seed=seed, **overrides)
        seeds[seed] = {k: summary[k] for k in keep} | {"seconds": time.perf_counter() - start}
    rates = [s["win_rate"] for s in seeds.values()]
    report = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset,
        "overrides": overrides,
        "seeds": seeds,
        "mean_win_rate": statistics.mean(rates),
        "lowest_ci_low": min(s["win_rate_ci"][0] for s in seeds.values()),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    for seed, s in seeds.items():
        print(f"seed {seed}: win rate {s['win_rate']:.1%} (CI {s['win_rate_ci'][0]:.1%}-{s['win_rate_ci'][1]:.1%}), "
              f"KL {s['kl']:.2f}, held-out accuracy {s['held_out_reward_accuracy']:.1%}, {s['seconds']:.0f} s")
    print(f"mean win rate {report['mean_win_rate']:.1%}; lowest CI bound {report['lowest_ci_low']:.1%}")
    return report


if __name__ == "__main__":
    main()
