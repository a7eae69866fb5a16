"""The course's decoding loop (course_utils/decode.py) against transformers' generate, on the tiny model."""

import copy

import pytest
import torch

from course_utils.decode import decode, draw_tokens, sampling_model
from course_utils.evaluate import kl_on_sampled_ids
from course_utils.generation import encode_prompts, sample, sequence_logprobs_of_ids
from course_utils.sentiment import sentiment_prompt


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from course_utils.models import load_model

    model, _ = load_model("tiny", seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer, tiny_pairs):
    # openings of different lengths, so left padding and the length sort both matter
    return encode_prompts(tokenizer, [sentiment_prompt(o) for o in tiny_pairs[1][:6]])


def hf_greedy(model, tokenizer, prompt_ids, max_new_tokens):
    """transformers' generate, greedy, one left-padded batch: the reference the loop must match token for token."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_equal_generate(tiny, tokenizer, prompt_ids, dtype):
    model = copy.deepcopy(tiny).to(dtype)
    ref = hf_greedy(model, tokenizer, prompt_ids, 12)
    mine = decode(model, tokenizer, prompt_ids, temperature=0, max_new_tokens=12, batch_size=len(prompt_ids),
                  sort_by_length=False, desc=None)
    assert len(mine.completion_ids) == len(ref)
    for r, c, done in zip(ref, mine.completion_ids, mine.finished):
        assert c == r[: len(c)], "the loop changed a greedy token"
        # after an end-of-turn token generate pads; the loop stops the row there instead
        assert all(t == tokenizer.pad_token_id for t in r[len(c):]) and (done or len(c) == 12)


def test_greedy_in_fp32_does_not_depend_on_batching(tiny, tokenizer, prompt_ids):
    one = decode(tiny, tokenizer, prompt_ids, temperature=0, max_new_tokens=10, batch_size=1, desc=None)
    many = decode(tiny, tokenizer, prompt_ids, temperature=0, max_new_tokens=10, batch_size=64, sort_by_length=False,
                  desc=None)
    assert one.completion_ids == many.completion_ids


def test_sampling_is_reproducible_and_rows_keep_their_random_numbers(tiny, tokenizer, prompt_ids):
    kwargs = dict(num_samples=3, max_new_tokens=10, seed=7, desc=None)
    a = decode(tiny, tokenizer, prompt_ids, batch_size=6, **kwargs)
    b = decode(tiny, tokenizer, prompt_ids, batch_size=6, **kwargs)
    assert a.completion_ids == b.completion_ids and a.texts == b.texts
    # other batch sizes, no shared prefill: each row still draws its own uniforms, so in fp32 the samples agree
    c = decode(tiny, tokenizer, prompt_ids, batch_size=4, share_prefill=False, sort_by_length=False, **kwargs)
    assert c.completion_ids == a.completion_ids
    other = decode(tiny, tokenizer, prompt_ids, batch_size=6, **{**kwargs, "seed": 8})
    assert other.completion_ids != a.completion_ids
    assert len(a.texts) == 18 and [len(g) for g in a.grouped()] == [3] * 6
    assert a.prompt_ids[4] == prompt_ids[1]  # prompt-major rows


def test_samples_keep_their_ids_and_end_at_the_end_of_turn(tiny, tokenizer, prompt_ids):
    s = decode(tiny, tokenizer, prompt_ids, num_samples=4, max_new_tokens=30, seed=1, desc=None)
    eos = tiny.generation_config.eos_token_id or tokenizer.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    for ids, done, text in zip(s.completion_ids, s.finished, s.texts):
        assert 1 <= len(ids) <= 30
        assert (ids[-1] in eos) == done and not any(t in eos for t in ids[:-1])
        assert text == tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert s.stats["new_tokens"] == sum(map(len, s.completion_ids))


def test_draw_tokens_follows_the_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 300, generator=gen) * 2  # 300: not a multiple of the 256-entry block
    logits[0, 17] = -float("inf")
    n = 60_000
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    for temperature in (1.0, 0.5):
        tokens = draw_tokens(logits.expand(n, -1), u, temperature)
        empirical = torch.bincount(tokens, minlength=300).double() / n
        p = torch.softmax(logits[0].double() / temperature, -1)
        assert 0.5 * (empirical - p).abs().sum() < 0.03  # total variation; ~0.01 expected from sampling noise
        assert empirical[17] == 0 and tokens.max() < 300
    # the inverse CDF exactly: the first token whose cumulative probability exceeds u
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)[0]
    for x in (0.0, 0.3, 0.77, 0.999999):
        want = int(torch.searchsorted(cdf, torch.tensor([x], dtype=torch.float64), right=True))
        assert int(draw_tokens(logits, torch.tensor([x], dtype=torch.float64), 1.0)) == want
    assert draw_tokens(logits, u[:1], 0).item() == logits.argmax().item()


def moved_lora(tiny, seed):
    """The tiny model with a LoRA adapter whose B is drawn at random: a policy that differs from its reference."""
    from peft import get_peft_model

    from course_utils.models import lora_config

    model = get_peft_model(copy.deepcopy(tiny), lora_config(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    return model


def test_sampling_model_merges_the_policy_and_drops_it_for_the_reference(tiny, tokenizer, prompt_ids):
    model = moved_lora(tiny, seed=0)
    ids = torch.tensor([prompt_ids[0]])
    with torch.inference_mode():
        policy, reference = model(input_ids=ids).logits, None
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with sampling_model(model, adapter=True, dtype=torch.float32) as m:
            assert m is model  # same dtype: the model itself, adapter on
        with sampling_model(model, adapter=True, dtype=torch.bfloat16) as m:
            assert m is not model and not hasattr(m, "disable_adapter") and next(m.parameters()).dtype == torch.bfloat16
            merged = m(input_ids=ids).logits.float()
        with sampling_model(model, adapter=False, dtype=torch.bfloat16) as m:
            base = m(input_ids=ids).logits.float()
    assert (policy - reference).abs().max() > 0.05  # the adapter matters...
    assert (merged - policy).abs().max() < 0.05 and (base - reference).abs().max() < 0.05  # ...and bf16 copies keep it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model itself is untouched
    # inside disable_adapter(), sample() decodes the reference
    with model.disable_adapter():
        ref_samples = sample(model, tokenizer, [sentiment_prompt("A film")], max_new_tokens=6, seed=2, dtype=None,
                             desc=None)
    plain = decode(tiny, tokenizer, ref_samples.prompt_ids, max_new_tokens=6, seed=2, desc=None)
    assert ref_samples.completion_ids == plain.completion_ids


def test_kl_is_taken_on_the_sampled_ids(tiny, tokenizer, prompt_ids):
    model = moved_lora(tiny, seed=1)
    s = sample(model, tokenizer, [sentiment_prompt("The plot")] * 3, num_samples=2, max_new_tokens=8, seed=0,
               dtype=None, desc=None)
    kl, se = kl_on_sampled_ids(model, s)
    # by hand: one sequence at a time, the log-prob of each sampled token under both models
    diffs = []
    for p, c in zip(s.prompt_ids, s.completion_ids):
        ids = torch.tensor([p + c])
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1 : -1].double(), -1)
            with model.disable_adapter():
                lr = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1 : -1].double(), -1)
        tok = torch.tensor(c)
        diffs.append(float(lp[range(len(c)), tok].sum() - lr[range(len(c)), tok].sum()))
    assert kl == pytest.approx(sum(diffs) / len(diffs), abs=1e-4)
    per_token = sequence_logprobs_of_ids(model, s.prompt_ids, s.completion_ids, per_token=True)
    assert [len(t) for t in per_token] == [len(c) for c in s.completion_ids]


def test_a_4bit_model_decodes_itself_on_its_device(tokenizer, prompt_ids):
    """The GPU presets' path: a 4-bit model is never copied or cast (a 7B copy would not fit); it decodes in place,
    with the adapter switched off for the reference. bitsandbytes' NF4 runs on the CPU too."""
    from peft import get_peft_model

    from course_utils.decode import default_batch_size, sampling_dtype
    from course_utils.models import load_model, lora_config

    base, _ = load_model("tiny", load_in_4bit=True, dtype="float32")
    model = get_peft_model(base, lora_config(r=4, alpha=8, dropout=0.0))
    assert sampling_dtype(model) == torch.float32  # no bf16 copy of a quantised model
    with sampling_model(model, adapter=True) as m:
        assert m is model
        s = decode(m, tokenizer, prompt_ids[:2], num_samples=2, max_new_tokens=4, desc=None)
    with sampling_model(model, adapter=False) as m:
        assert m is model and any(getattr(x, "disable_adapters", False) for x in m.modules())
    assert len(s.completion_ids) == 4
    assert default_batch_size("cuda") == 32 and default_batch_size("cpu") == 128


@pytest.mark.parametrize("course_head", [False, True])
def test_a_bf16_copy_of_a_trained_model_runs_its_own_weights(tiny, tokenizer, prompt_ids, course_head):
    """Training patches ``forward`` (TRL's fused LM head, then the course's completion head) with closures that call
    the original model; the bf16 sampling copy must not dispatch to the fp32 original through them."""
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from course_utils.fast_dpo import install_completion_head
    from course_utils.models import lora_config

    base = copy.deepcopy(tiny)
    add_fused_lm_head(base)
    if course_head:
        install_completion_head(base)
    model = get_peft_model(base, lora_config(r=4, alpha=8, dropout=0.0))
    ids = torch.tensor([prompt_ids[0]])
    with torch.inference_mode(), sampling_model(model, adapter=True, dtype=torch.bfloat16) as twin:
        logits = twin(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16  # the fp32 original would answer in fp32
        twin.get_output_embeddings().weight.zero_()  # the copy's own head: its logits follow it
        assert twin(input_ids=ids).logits.abs().max() == 0
    # the trained model keeps its fused head, and its weights
    labels = ids.clone()
    with torch.inference_mode():
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        assert out.log_probs.shape == (1, ids.shape[1] - 1) and model(input_ids=ids).logits.abs().max() > 0


def test_a_caller_can_stop_on_more_end_tokens(tiny, tokenizer, prompt_ids):
    """TRL's trainers end a completion on the tokenizer's end token as well as the generation config's: RLOO's
    batches from the course's decoder (fast_rloo) pass that set, and a row stops at the first of them, keeping it."""
    full = decode(tiny, tokenizer, prompt_ids[:1], temperature=0, max_new_tokens=8, desc=None).completion_ids[0]
    stop = full[2]
    cut = decode(tiny, tokenizer, prompt_ids[:1], temperature=0, max_new_tokens=8, desc=None,
                 eos_token_ids=[tokenizer.eos_token_id, stop])
    assert cut.completion_ids[0] == full[: full.index(stop) + 1] and cut.finished[0]
