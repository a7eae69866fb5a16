"""The offline preference dataset: controlled sentiment, after Section 6.1 of the DPO paper.

The paper prompts GPT-2 with IMDb review prefixes, samples completions, and uses a
sentiment classifier as the ground-truth reward. Here, offline and on a CPU:

* prompts: a few hundred movie-review openings written for this course
  (``assets/review_openings.txt``), wrapped in a chat instruction;
* completions: sampled from the reference policy itself, the model the preset trains
  (SmolLM2-135M-Instruct on ``cpu``, Mistral-7B in 4-bit on the GPU presets, on the GPU);
  ``tiny``'s model is random, so its pairs come from SmolLM2 (:func:`pair_generator`);
* ground truth: VADER's compound sentiment score in [-1, 1] (the ``vaderSentiment``
  package ships its lexicon); per prompt, the most positive sample becomes ``chosen``
  and the least positive ``rejected``;
* a held-out split of openings that training never sees; the same judge scores the
  trained policy on them later.

Everything is deterministic for a seed and cached on disk. The ``cpu`` preset's pairs for seeds 0-2 ship with the
course (``assets/pairs``, written by ``python -m course_utils.sentiment --freeze``): sampled once, in bf16 on the
machine named in ``assets/pairs/manifest.json``, so every CPU trains on the same pairs for those seeds. A bf16 or
fp32 draw on another CPU would differ: its matrix products round differently, and one changed token changes the rest
of a sample. Other seeds and recipes are sampled on the learner's machine.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .data import validate_preferences
from .models import cache_dir

INSTRUCTION = "Continue this movie review with one or two sentences.\n\n{opening}"
GENERATOR_MODEL = "smollm2-135m"  # the generator of the cpu preset, and of tiny (whose model is random)
_DATA_VERSION = 2  # bump when the recipe changes, to invalidate caches (2: the course's own decoder, decode.py)


def load_openings() -> list[str]:
    """The course's movie-review openings, one string each."""
    text = resources.files("course_utils").joinpath("assets/review_openings.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_openings(num_train: int, num_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic disjoint (train, held_out) openings; held-out never overlaps train."""
    openings = load_openings()
    if num_train + num_eval > len(openings):
        raise ValueError(f"Asked for {num_train}+{num_eval} openings; only {len(openings)} exist.")
    order = list(range(len(openings)))
    random.Random(seed).shuffle(order)
    held_out = [openings[i] for i in order[:num_eval]]
    train = [openings[i] for i in order[num_eval : num_eval + num_train]]
    return train, held_out


def sentiment_prompt(opening: str) -> list[dict]:
    """The chat prompt for one opening (conversational format, one user turn)."""
    return [{"role": "user", "content": INSTRUCTION.format(opening=opening)}]


class SentimentJudge:
    """Ground-truth reward: VADER compound sentiment in [-1, 1] (higher = more positive)."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> list[float]:
        return [self._analyzer.polarity_scores(t)["compound"] for t in texts]


@dataclass
class PairReport:
    """What happened to every prompt: paired, or skipped and why (nothing silently lost)."""

    paired: int
    skipped: list[dict]

    def summary(self) -> str:
        reasons = Counter(s["reason"] for s in self.skipped)
        detail = "; ".join(f"{n}: {r}" for r, n in reasons.items())
        return f"{self.paired} pairs made; {len(self.skipped)} prompts skipped" + (f" ({detail})" if detail else "")


def rank_into_pairs(openings, samples, scores, min_margin: float = 0.1):
    """Turn scored samples into preference rows: best sample chosen, worst rejected.

    A prompt whose best and worst scores differ by less than ``min_margin`` carries no
    clear preference and is skipped, and listed in the report.
    """
    rows, skipped = [], []
    for i, (opening, texts, s) in enumerate(zip(openings, samples, scores, strict=True)):
        # an empty sample (the model ended its turn at once) is no candidate
        candidates = [j for j in range(len(texts)) if texts[j].strip()]
        if len(candidates) < 2:
            skipped.append({"index": i, "opening": opening, "scores": s, "reason": "fewer than 2 non-empty samples"})
            continue
        best = max(candidates, key=lambda j: (s[j], -j))
        worst = min(candidates, key=lambda j: (s[j], j))
        if s[best] - s[worst] < min_margin or texts[best].strip() == texts[worst].strip():
            skipped.append({"index": i, "opening": opening, "scores": s,
                            "reason": f"best-worst sentiment gap below {min_margin}"})
            continue
        rows.append(
            {
                "prompt": sentiment_prompt(opening),
                "chosen": [{"role": "assistant", "content": texts[best]}],
                "rejected": [{"role": "assistant", "content": texts[worst]}],
                "chosen_score": s[best],
                "rejected_score": s[worst],
                "opening": opening,
            }
        )
    validate_preferences(rows, on_error="raise", source="sentiment pairs")  # the schema every loader guarantees
    return rows, PairReport(paired=len(rows), skipped=skipped)


def pair_generator(preset) -> str:
    """The model the sentiment pairs are sampled from: the preset's own (the reference), except on ``tiny``.

    On-policy pairs (sampled from pi_ref) are what DPO's derivation assumes (see
    :mod:`course_utils.pair_origin`). ``tiny``'s model is random noise, so its pairs come
    from SmolLM2 instead: off-policy, which is fine for a test of the code path.
    """
    return GENERATOR_MODEL if preset.name == "tiny" else (preset.checkpoint or preset.model_name)


def _load_generator(preset):
    """The preset's model as it trains (4-bit on the GPU presets), placed on the GPU when there is one."""
    from .models import load_model

    if preset.name == "tiny":
        return load_model(GENERATOR_MODEL)
    return load_model(preset.model_name, dtype=preset.dtype, load_in_4bit=preset.load_in_4bit,
                      checkpoint=preset.checkpoint, seed=preset.seed,
                      device_map="auto" if torch.cuda.is_available() else None)


def _cache_path(openings, samples_per_prompt, max_new_tokens, seed, batch_size, bf16=False,
                generator: str = GENERATOR_MODEL, quantised: str = "") -> Path:
    # batch_size is part of the recipe: batched sampling draws random numbers in batch order
    recipe = [_DATA_VERSION, generator, openings, samples_per_prompt, max_new_tokens, seed, batch_size]
    # fp32 SmolLM2 keys unchanged: existing caches stay valid
    key = json.dumps(recipe + (["bf16"] if bf16 else []) + ([quantised] if quantised else []))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / "sentiment" / f"pairs-{digest}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


SHIPPED = "assets/pairs"  # inside the package: the cpu preset's pairs for seeds 0-2


def _shipped_name(openings, samples_per_prompt, max_new_tokens, seed, generator: str) -> str:
    """The shipped file for a recipe: keyed without the dtype or batch size, which only say how it was sampled."""
    recipe = [_DATA_VERSION, generator, openings, samples_per_prompt, max_new_tokens, seed]
    return f"pairs-{hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]}.jsonl.gz"


def shipped_samples(openings, samples_per_prompt, max_new_tokens, seed, generator: str = GENERATOR_MODEL):
    """The shipped records (``{"opening", "samples", "scores"}`` per opening) for this recipe, or None."""
    path = resources.files("course_utils").joinpath(SHIPPED, _shipped_name(openings, samples_per_prompt,
                                                                            max_new_tokens, seed, generator))
    if not path.is_file():
        return None
    records = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()]
    if [r["opening"] for r in records] != list(openings):
        raise ValueError(f"{path}: its openings do not match the recipe's; regenerate with "
                         "python -m course_utils.sentiment --freeze")
    return records


def pairs_are_shipped(preset) -> bool:
    """True when both of ``preset``'s splits come from the shipped pairs (the same on every CPU)."""
    if preset.load_in_4bit:
        return False
    train, held_out = split_openings(preset.train_prompts, preset.eval_prompts, seed=preset.seed)
    args = (preset.samples_per_prompt, preset.sentiment_new_tokens, preset.seed, pair_generator(preset))
    names = [_shipped_name(o, *args) for o in (train, held_out)]
    return all(resources.files("course_utils").joinpath(SHIPPED, n).is_file() for n in names)


def make_pairs(openings, *, samples_per_prompt=4, max_new_tokens=40, seed=0, min_margin=0.1,
               generator=None, batch_size=32, bf16=False, use_cache=True, preset=None, shipped=True):
    """Sample, score and rank completions for ``openings``; returns ``(rows, PairReport)``.

    ``generator`` is ``(model, tokenizer)``, or a function returning it; when omitted, ``preset``'s :func:`pair_generator`
    is loaded (SmolLM2 without a preset). Cached on disk by the recipe's parameters (the
    generator's name and quantisation included), so a second call returns instantly. With ``shipped`` (and
    ``use_cache``), the pairs that ship with the course for this recipe come first (:func:`shipped_samples`). ``bf16``:
    decode a bf16 copy of the generator (CPUs with native bf16), ``batch_size`` rows at a time
    (course_utils/decode.py; docs/performance.md has the measured speed).
    """
    name = pair_generator(preset) if preset is not None else GENERATOR_MODEL
    quantised = f"nf4-{preset.dtype}" if preset is not None and preset.load_in_4bit and preset.name != "tiny" else ""
    path = _cache_path(openings, samples_per_prompt, max_new_tokens, seed, batch_size, bf16, name, quantised)
    frozen = shipped_samples(openings, samples_per_prompt, max_new_tokens, seed, name) \
        if use_cache and shipped and not quantised else None
    if frozen is not None:
        samples, scores = [r["samples"] for r in frozen], [r["scores"] for r in frozen]
    elif use_cache and path.is_file():
        record = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        samples, scores = [r["samples"] for r in record], [r["scores"] for r in record]
    else:
        from .generation import sample_completions
        from .models import load_model

        if callable(generator):  # loaded on first need, once for both splits (sentiment_dataset)
            generator = generator()
        model, tokenizer = generator or (_load_generator(preset) if preset is not None else load_model(GENERATOR_MODEL))
        samples = sample_completions(  # bf16: a bf16 copy of the weights decodes (course_utils/decode.py)
            model, tokenizer, [sentiment_prompt(o) for o in openings], num_samples=samples_per_prompt,
            max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, desc="Sampling preference pairs",
            dtype=torch.bfloat16 if bf16 else None,
        )
        judge = SentimentJudge()
        scores = [judge(s) for s in samples]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"opening": o, "samples": s, "scores": c}) + "\n"
                               for o, s, c in zip(openings, samples, scores)), encoding="utf-8")
        tmp.replace(path)
    return rank_into_pairs(openings, samples, scores, min_margin=min_margin)


def pair_recipe(preset) -> dict:
    """What ``make_pairs`` needs from a preset (its cache key but the openings): sampling sizes, seed, batch, bf16."""
    from .cpu import cpu_supports_bf16

    return dict(samples_per_prompt=preset.samples_per_prompt, max_new_tokens=preset.sentiment_new_tokens,
                seed=preset.seed, batch_size=preset.sample_batch_size,
                bf16=preset.cpu_bf16 and cpu_supports_bf16() and not torch.cuda.is_available())


def sentiment_dataset(preset, generator=None, use_cache=True, reference=None):
    """Train and held-out preference datasets for a preset, plus the held-out openings.

    ``reference``: ``(model, tokenizer)`` of the preset's model when a lesson has it loaded
    already; used to sample (instead of loading a second copy) unless the preset samples from
    another model (``tiny``). ``generator`` forces a sampler whatever the preset.

    Returns ``(datasets.DatasetDict(train=..., test=...), held_out_openings, reports)``.
    """
    from datasets import Dataset, DatasetDict

    train_open, eval_open = split_openings(preset.train_prompts, preset.eval_prompts, seed=preset.seed)
    if generator is None and reference is not None and preset.name != "tiny":
        generator = reference
    if generator is None:  # one load for both splits, and none at all when both are cached
        loaded = []
        generator = lambda: loaded[0] if loaded else loaded.append(_load_generator(preset)) or loaded[0]  # noqa: E731
    kwargs = dict(pair_recipe(preset), generator=generator, use_cache=use_cache, preset=preset)
    train_rows, train_report = make_pairs(train_open, **kwargs)
    test_rows, test_report = make_pairs(eval_open, **kwargs)
    data = DatasetDict(train=Dataset.from_list(train_rows), test=Dataset.from_list(test_rows))
    return data, eval_open, {"train": train_report, "test": test_report}


def freeze(seeds=(0, 1, 2), preset_name: str = "cpu") -> list[Path]:
    """Sample (or take from the cache) the preset's pairs for ``seeds`` and write them into the package's
    ``assets/pairs``, with a manifest saying where and how they were sampled. Run from a source checkout."""
    from .cpu import machine_info
    from .presets import get_preset

    folder = Path(__file__).resolve().parent / SHIPPED
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    written = []
    for seed in seeds:
        preset = get_preset(preset_name, seed=seed)
        recipe = pair_recipe(preset)
        for split, openings in zip(("train", "held_out"), split_openings(preset.train_prompts, preset.eval_prompts,
                                                                        seed=seed)):
            make_pairs(openings, shipped=False, preset=preset, **recipe)  # fills the cache
            cache = _cache_path(openings, generator=pair_generator(preset), **recipe)
            name = _shipped_name(openings, preset.samples_per_prompt, preset.sentiment_new_tokens, seed,
                                 pair_generator(preset))
            (folder / name).write_bytes(gzip.compress(cache.read_bytes(), mtime=0))
            manifest[name] = {"preset": preset_name, "seed": seed, "split": split, "openings": len(openings),
                              "samples_per_prompt": preset.samples_per_prompt,
                              "max_new_tokens": preset.sentiment_new_tokens, "generator": pair_generator(preset),
                              "dtype": "bfloat16" if recipe["bf16"] else "float32", "batch_size": preset.sample_batch_size,
                              "decoder": "course_utils.decode", "machine": machine_info()}
            written.append(folder / name)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return written


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the cpu preset's pairs into the package (assets/pairs).")
    parser.add_argument("--freeze", action="store_true", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for p in freeze(parser.parse_args().seeds):
        print(p)
