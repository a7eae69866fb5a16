"""Evaluate a trained adapter against its reference from the command line (``python -m course_utils.evaluate``).

    python -m course_utils.evaluate --adapter build/course/dpo/adapter --prompts sentiment-heldout \\
        --judge sentiment --samples 2 --out build/eval.json
    python -m course_utils.evaluate --adapter DIR --prompts prompts.jsonl --judge reward-model=ID_OR_PATH --out e.json
    python -m course_utils.evaluate --adapter DIR --prompts prompts.txt --judge llm=smollm2-135m --out e.json

Policy (base + adapter) and reference (the same model, adapter off) answer the same prompts with the same seed;
the judge (``course_utils/judges.py``) compares each pair; the win rate with its bootstrap 95% CI is printed and
written to ``--out`` with every pair's texts, scores and lengths (and the position bias of a pairwise judge).
Bad input (a missing folder, a model that is not a reward model, an empty prompt file) is one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

JUDGES = "sentiment | reward-model=ID_OR_PATH | llm=ID_OR_PATH"


class BadInput(ValueError):
    """Input the CLI refuses, with the reason in one line."""


def load_prompts(spec: str, preset=None) -> list:
    """Prompts from ``spec``: ``sentiment-heldout`` (the preset's held-out openings, as chat prompts) or a file.

    Files: ``.txt`` (one prompt per line), ``.json`` (a list), ``.jsonl`` (one per line); an item is a string, a
    list of chat messages, or an object with a ``prompt`` field holding either.
    """
    if spec == "sentiment-heldout":
        from .presets import get_preset
        from .sentiment import sentiment_prompt, split_openings

        preset = preset or get_preset("cpu")
        return [sentiment_prompt(o) for o in split_openings(preset.train_prompts, preset.eval_prompts, preset.seed)[1]]
    path = Path(spec)
    if not path.is_file():
        raise BadInput(f"--prompts {spec}: no such file (or pass sentiment-heldout)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            items = json.loads(text) if text.strip() else []
            if not isinstance(items, list):
                raise BadInput(f"--prompts {spec}: expected a JSON list of prompts, got {type(items).__name__}")
        elif path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = [line.strip() for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise BadInput(f"--prompts {spec}: not valid JSON at line {err.lineno}: {err.msg}") from err
    prompts = []
    for row, item in enumerate(items, start=1):
        item = item.get("prompt") if isinstance(item, dict) else item
        ok = isinstance(item, str) and item.strip() or (isinstance(item, list) and item and all(
            isinstance(m, dict) and {"role", "content"} <= set(m) for m in item))
        if not ok:
            raise BadInput(f"--prompts {spec}: row {row}: field 'prompt' must be a non-empty string or a list of "
                           f"{{role, content}} messages")
        prompts.append(item)
    if not prompts:
        raise BadInput(f"--prompts {spec}: no prompts in the file")
    return prompts


def load_judge(spec: str, *, output_dir=None, criterion: str = "chat"):
    """A judge from ``sentiment``, ``reward-model=ID_OR_PATH`` or ``llm=ID_OR_PATH``."""
    from .judges import CRITERIA, LLMPairwiseJudge, SentimentJudge, reward_model_judge

    kind, _, target = spec.partition("=")
    if kind == "sentiment" and not target:
        return SentimentJudge()
    if kind == "reward-model" and target:
        return reward_model_judge(target, output_dir)
    if kind == "llm" and target:
        from .models import load_model
        from .serve import check_model_path

        check_model_path(target, "--judge llm=")
        model, tokenizer = load_model(target)
        return LLMPairwiseJudge(model, tokenizer, criterion=CRITERIA[criterion], name=f"LLM judge {target}")
    raise BadInput(f"--judge {spec}: expected {JUDGES}")


def evaluate(args) -> dict:
    import torch

    from .evaluate import sample_policy_and_reference
    from .judges import judged_win_rate, prompt_text
    from .presets import Preset
    from .report import token_lengths
    from .serve import _training_preset, check_adapter_dir, load_chat_models

    adapter = check_adapter_dir(args.adapter)
    fields = _training_preset(adapter)
    preset = Preset(**{k: v for k, v in fields.items() if k in Preset.__dataclass_fields__}) if fields else None
    base = args.base or (fields.get("model_name") if fields else None)
    if not base:
        raise BadInput(f"--adapter {args.adapter}: no preset.json beside it to name the base model; pass --base")
    prompts = load_prompts(args.prompts, preset)
    judge = load_judge(args.judge, output_dir=adapter.parent.parent,
                       criterion="sentiment" if args.prompts == "sentiment-heldout" else "chat")
    models = load_chat_models(base, adapter)
    policy, tokenizer = models.policy, models.tokenizer
    new_tokens = args.max_new_tokens or (preset.sentiment_new_tokens if preset and args.prompts == "sentiment-heldout"
                                         else preset.max_new_tokens if preset else 64)
    flat_prompts, flat_pol, flat_ref = sample_policy_and_reference(
        policy, tokenizer, prompts, num_samples=args.samples, max_new_tokens=new_tokens, seed=args.seed,
        batch_size=args.batch_size)
    with torch.inference_mode():
        out = judged_win_rate(judge, flat_prompts, flat_pol, flat_ref, seed=args.seed)
    pol_len, ref_len = token_lengths(tokenizer, flat_pol), token_lengths(tokenizer, flat_ref)
    pairs = [{"prompt": prompt_text(p), "policy": a, "reference": b, "prefer": v, "policy_tokens": int(la),
              "reference_tokens": int(lb)} for p, a, b, v, la, lb in zip(flat_prompts, flat_pol, flat_ref,
                                                                         out["prefer"], pol_len, ref_len)]
    for key in ("policy_scores", "reference_scores"):
        for pair, score in zip(pairs, out.get(key, [])):
            pair[key[:-1]] = score
    summary = {k: v for k, v in out.items() if k not in ("prefer", "policy_scores", "reference_scores")}
    return {**summary, "adapter": str(adapter), "base": base, "prompts": args.prompts, "samples": args.samples,
            "seed": args.seed, "max_new_tokens": new_tokens, "policy_tokens": float(pol_len.mean()),
            "reference_tokens": float(ref_len.mean()), "pairs": pairs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_utils.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder (lesson 4: OUTPUT_DIR/dpo/adapter)")
    parser.add_argument("--base", help="base model (course name or folder); default: from preset.json beside the adapter")
    parser.add_argument("--prompts", required=True, help="a .txt/.json/.jsonl file, or sentiment-heldout")
    parser.add_argument("--judge", required=True, help=JUDGES)
    parser.add_argument("--samples", type=int, default=1, help="completions per prompt and model")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for policy and reference")
    parser.add_argument("--max-new-tokens", type=int, help="default: the training preset's")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    parser.add_argument("--out", required=True, help="where the JSON report goes")
    args = parser.parse_args(argv)

    from .judges import JudgeLoadError
    from .models import ModelLoadError
    from .serve import ServeError

    try:
        if args.samples < 1:
            raise BadInput(f"--samples {args.samples}: must be at least 1")
        report = evaluate(args)
    except (BadInput, JudgeLoadError, ModelLoadError, ServeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    lo, hi = report["ci"]
    print(f"{report['judge']}: policy wins {report['win_rate']:.1%} [95% CI {lo:.1%}-{hi:.1%}] of {report['n']} pairs "
          f"({report['wins']}W/{report['ties']}T/{report['losses']}L); tokens {report['policy_tokens']:.1f} vs "
          f"{report['reference_tokens']:.1f}" + (f"; first-position share {report['first_position_share']:.0%}"
                                                 if "first_position_share" in report else "") + f"; -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
