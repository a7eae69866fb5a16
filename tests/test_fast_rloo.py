"""RLOO's samples from the course's decoder (course_utils/fast_rloo.py), on the tiny model and TRL's real trainer."""

import pytest
import torch

from course_utils import rlhf
from course_utils.decode import decode, sampling_model
from course_utils.fast_rloo import _groups, course_sampling_applies, rloo_trainer_class
from course_utils.generation import encode_prompts


def test_groups_fold_repeated_prompts_only_when_every_prompt_repeats_equally():
    assert _groups([[1, 2], [1, 2], [3], [3]]) == ([[1, 2], [3]], 2)
    assert _groups([[1, 2], [1, 2], [3]]) == ([[1, 2], [1, 2], [3]], 1)
    assert _groups([[5]]) == ([[5]], 1)


def _trainer(tiny_preset, tiny_pairs, tmp_path, **overrides):
    from datasets import Dataset

    from course_utils.models import load_model, lora_config
    from course_utils.sentiment import SentimentJudge

    model, tokenizer = load_model("tiny", seed=tiny_preset.seed)
    tokenizer.padding_side = "left"
    args = rlhf.rloo_config(tiny_preset, tmp_path, seed=0, learning_rate=1e-2, steps=2, beta=0.1,
                            max_completion_length=8, **overrides)
    return rloo_trainer_class()(model=model, args=args, reward_funcs=rlhf.judge_reward(SentimentJudge()),
                                processing_class=tokenizer,
                                train_dataset=Dataset.from_dict({"prompt": list(tiny_pairs[0]["train"]["prompt"])}),
                                peft_config=lora_config(4, 8, 0.0))


def test_a_batch_is_the_decoders_samples_of_the_policy(tiny_preset, tiny_pairs, tmp_path, one_thread):
    trainer = _trainer(tiny_preset, tiny_pairs, tmp_path)
    assert course_sampling_applies(trainer) is None
    tok = trainer.processing_class
    prompt = encode_prompts(tok, [tiny_pairs[0]["train"]["prompt"][0]])[0]
    torch.manual_seed(7)
    got = trainer._generate_single_turn([prompt] * 4, None, {})
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    with sampling_model(trainer.model, adapter=True) as sampler:
        want = decode(sampler, tok, [prompt], num_samples=4, max_new_tokens=8, seed=seed,
                      eos_token_ids=trainer.eos_token_ids, desc=None)
    assert got == want.completion_ids and len(got) == 4 and trainer.course_sampling_calls == 1
    assert len(set(map(tuple, got))) > 1  # four different draws of one prompt
    eos = set(trainer.eos_token_ids)
    for ids in got:  # TRL's convention: cut after the first end token, which is kept
        assert 1 <= len(ids) <= 8 and not (eos & set(ids[:-1]))


@pytest.mark.parametrize("knob", [{"top_k": 5}, {"top_p": 0.9}, {"repetition_penalty": 1.2}])
def test_other_sampling_settings_go_to_trls_generate(tiny_preset, tiny_pairs, tmp_path, knob, one_thread):
    trainer = _trainer(tiny_preset, tiny_pairs, tmp_path, **knob)
    assert course_sampling_applies(trainer) is not None
    prompt = encode_prompts(trainer.processing_class, [tiny_pairs[0]["train"]["prompt"][0]])[0]
    out = trainer._generate_single_turn([prompt] * 2, None, {})
    assert len(out) == 2 and trainer.course_sampling_calls == 0


def test_an_rloo_run_samples_with_the_decoder_and_is_reproducible(tiny_pairs, tiny_preset, tmp_path, one_thread):
    from course_utils.models import load_model
    from course_utils.sentiment import SentimentJudge

    base = load_model("tiny", seed=tiny_preset.seed)
    runs = [rlhf.run_rloo(tiny_preset, base, list(tiny_pairs[0]["train"]["prompt"]), None, SentimentJudge(), seed=s,
                          learning_rate=1e-2, steps=2, output_dir=tmp_path / str(k), max_completion_length=8)
            for k, s in enumerate((0, 0, 1))]
    assert [r["course_sampling_calls"] for r in runs] == [2, 2, 2]  # every step's batch
    assert runs[0]["train_rewards"] == runs[1]["train_rewards"] and runs[0]["kl"] == runs[1]["kl"]
    assert runs[0]["train_rewards"] != runs[2]["train_rewards"]  # another seed, other samples
    assert runs[0]["kl"][0] == 0.0 and runs[0]["clip_ratio"] == [0.0, 0.0]  # step 1 is still at the reference
