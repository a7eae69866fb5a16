"""RLOO's samples drawn with the course's decoder: TRL's ``RLOOTrainer`` with one method replaced.

An RLOO step (lessons 1 and 7) samples ``num_generations`` completions of one prompt, scores them with the
judge, and takes a policy-gradient step on them. TRL samples with ``transformers``' ``generate`` on the training
model itself: on a CPU that is the fp32 base with an unmerged LoRA adapter, in batches of 4 rows, and it was half
of every step (14 of 28 s in a 4-step lesson-7 run on the project's 2-core Intel Xeon with AMX).

Measured there, interleaved, two rounds of one lesson-7 run (4 steps of 4 x 32 tokens): sampling took 12.4 and
12.5 s with TRL's ``generate``, 8.0 and 11.0 s here; the run 24.9 / 22.3 s against 17.6 / 23.8 s. A decode step
at 4 rows is bound by reading the weights, not by arithmetic, so bf16 halves the bytes and little else pays;
making the bf16 copy (copy, merge, cast) costs 0.3 to 1 s a step.

:class:`CourseRLOOTrainer` (built by :func:`rloo_trainer_class`) overrides only
``RLOOTrainer._generate_single_turn``, the method that turns prompt token ids into completion token ids, and
draws them with :func:`course_utils.decode.decode` on :func:`course_utils.decode.sampling_model`'s weights: a bf16
copy with the adapter merged on a CPU with native bf16 products, the model itself elsewhere. What the step does
with the samples (rewards, the leave-one-out baseline, the KL to the reference, the clipped ratio) is TRL's,
unchanged: the log-probs of the loss are computed by TRL's own forward passes in the trainer's precision, on
exactly the token ids returned here.

The distribution sampled from is TRL's: its ``RLOOConfig`` defaults sample the policy itself (``top_k=0``,
``top_p=1``, no ``min_p``, no repetition penalty) at ``temperature``, which is what :func:`decode` does
(ancestral sampling). Anything else (those knobs set, ``generation_kwargs``, vLLM, continuous batching,
images, a GPU) goes to TRL's own method. With a bf16 copy the samples come from the policy rounded to bf16,
the precision the course samples its DPO pairs in; the update stays on-policy up to that rounding.

Randomness: each call seeds :func:`decode` with a number drawn from torch's global generator, which the
trainer seeds from ``args.seed``: a run is reproducible, and every step draws fresh samples.
"""

from __future__ import annotations

import functools

import torch


def course_sampling_applies(trainer, images=None, multimodal_fields=None) -> str | None:
    """None when :class:`CourseRLOOTrainer` may sample ``trainer``'s batch with the course's decoder, else why not
    (TRL's ``generate`` is then used): plain ancestral sampling, text only, on a CPU."""
    args = trainer.args
    if getattr(trainer, "use_vllm", False) or getattr(trainer, "use_transformers_continuous_batching", False):
        return "vLLM or continuous batching"
    if images is not None and any(x is not None for x in images) or multimodal_fields:
        return "images"
    if trainer.accelerator.device.type != "cpu":
        return f"device {trainer.accelerator.device.type} (TRL's generate runs there in the compute dtype)"
    knobs = {"top_k": (0, None), "top_p": (1.0, None), "min_p": (None, 0.0), "repetition_penalty": (1.0, None)}
    for name, plain in knobs.items():
        if getattr(args, name, None) not in plain:
            return f"{name}={getattr(args, name)!r} (the course's decoder samples the full distribution)"
    if args.generation_kwargs:
        return "generation_kwargs"
    return None


def _groups(prompt_ids: list[list[int]]) -> tuple[list[list[int]], int]:
    """Consecutive identical prompts as (unique prompts, copies of each) when every prompt repeats equally often
    (TRL's sampler repeats each prompt ``num_generations`` times in a row), else (the rows, 1)."""
    unique, counts = [], []
    for ids in prompt_ids:
        if unique and ids == unique[-1]:
            counts[-1] += 1
        else:
            unique.append(list(ids))
            counts.append(1)
    if len(set(counts)) == 1:
        return unique, counts[0]
    return [list(ids) for ids in prompt_ids], 1


@functools.cache
def rloo_trainer_class():
    """``CourseRLOOTrainer``: TRL's ``RLOOTrainer`` sampling with the course's decoder where it applies
    (:func:`course_sampling_applies`). Built once, on first use, so importing this module does not import TRL."""
    from trl import RLOOTrainer

    from .decode import decode, sampling_model

    class CourseRLOOTrainer(RLOOTrainer):
        course_sampling_calls = 0  # batches this trainer sampled with the course's decoder (tests and the lesson)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
            if course_sampling_applies(self, images, multimodal_fields) is not None:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields)
            prompts, copies = _groups(prompt_ids)
            seed = int(torch.randint(0, 2**31 - 1, (1,)))  # from the trainer-seeded global generator
            model = self.accelerator.unwrap_model(self.model)
            with sampling_model(model, adapter=True) as sampler:
                samples = decode(sampler, self._tokenizer, prompts, num_samples=copies,
                                 max_new_tokens=self.max_completion_length, temperature=self.temperature,
                                 seed=seed, eos_token_ids=self.eos_token_ids, desc=None)
            self.course_sampling_calls += 1
            # rows come back prompt-major, the order TRL's repeated prompts were in; each stops at the first of
            # TRL's end tokens (the tokenizer's and the generation config's) and keeps it, as TRL's completion mask does
            return samples.completion_ids

    return CourseRLOOTrainer
