"""Lesson 6 (merge, generate, serve): the notebook on tiny, then the export helpers on their own.

The chat page (course_utils/serve.py) has its own end-to-end tests in test_serve.py.
"""

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from course_utils.export import (compare_logits, dequantize_4bit_model, find_adapter, hub_token, load_base,
                                 merge_adapter, push_to_hub)
from course_utils.models import load_model, lora_config

NOTEBOOK_04 = Path(__file__).resolve().parent.parent / "notebooks" / "04_dpo_training.ipynb"
PROMPTS = [[{"role": "user", "content": "Continue this movie review: The harbour at dawn"}], "plain, pre-formatted text"]


# --- the notebook -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_adapter(request, course_dir):
    """Lesson 4's adapter in ``course_dir/dpo``: from the lesson 4 notebook, or from the training CLI until it exists."""
    if NOTEBOOK_04.is_file():
        request.getfixturevalue("lesson_04")
    elif not (course_dir / "dpo" / "adapter" / "adapter_config.json").is_file():
        from course_utils.train import main

        main(["--preset", "tiny", "--dataset", "sentiment", "--max-steps", "2", "--output-dir", str(course_dir / "dpo")])
    return course_dir / "dpo" / "adapter"


@pytest.fixture(scope="module")
def lesson_06(trained_adapter, run_lesson):
    return run_lesson("06")


@pytest.fixture(scope="module")
def lesson_06_low_memory(trained_adapter, tmp_path_factory):
    """Lesson 6 on tiny down a T4's path (LOW_MEMORY=True), in its own OUTPUT_DIR with a copy of lesson 4's adapter."""
    import shutil

    from course_utils.lessons import execute_lesson, lesson_paths

    out = tmp_path_factory.mktemp("low_memory")
    shutil.copytree(trained_adapter, out / "dpo" / "adapter")
    if (trained_adapter.parent / "preset.json").is_file():
        shutil.copy(trained_adapter.parent / "preset.json", out / "dpo" / "preset.json")
    return execute_lesson(lesson_paths(["06"])[0], out, {"PRESET": "tiny", "OUTPUT_DIR": str(out), "LOW_MEMORY": True},
                          html=False)


def test_notebook_merge_matches_base_plus_adapter(lesson_06):
    assert lesson_06["base_was_4bit"] is False  # tiny trains on an fp32 base
    assert lesson_06["merge_max_abs_diff"] < 1e-4
    assert lesson_06["reload_max_abs_diff"] < 1e-4  # plain transformers reload
    # on a CPU the plan frees nothing: merged in memory, the policy loaded once
    assert lesson_06["merged_by_layer"] is False and lesson_06["policy_freed_before_merge"] is False
    assert lesson_06["policy_reloaded_for_chat"] is False


def test_notebook_records_a_predicted_peak_for_every_step(lesson_06):
    from course_utils.merge_budget import STEPS, lesson6_plan
    from course_utils.presets import Runtime, get_preset

    predicted = lesson_06["predicted_peak_gib"]
    assert list(predicted) == list(STEPS) and all(0 < v < 2 for v in predicted.values())  # tiny: megabytes (+ context)
    expected = lesson6_plan(get_preset("tiny"), Runtime.current()).steps
    assert predicted == {k: round(s.peak_gib, 3) for k, s in expected.items()}


def test_notebook_low_memory_path_matches_the_default_one(lesson_06, lesson_06_low_memory):
    """What a T4 runs (policy freed, merge by layer, merged model set aside and reloaded, policy reloaded for
    the chat page) gives the same numbers as the default path: same checkpoint, bit for bit."""
    low = lesson_06_low_memory
    assert low["policy_freed_before_merge"] is True and low["merged_by_layer"] is True
    assert low["policy_reloaded_for_chat"] is True
    assert low["merge_max_abs_diff"] == low["reload_max_abs_diff"] == lesson_06["reload_max_abs_diff"] < 1e-4
    for key in ("dequant_merge_4bit_max_abs_diff", "naive_4bit_merge_max_abs_diff", "adapter_effect_max_abs",
                "generated_tokens"):
        assert low[key] == lesson_06[key], key  # the demo ran after the merged model was set aside
    assert low["demo_response_received"] is True and low["demo_streamed_updates"] > 3


def test_notebook_4bit_demo_dequantise_beats_naive_merge(lesson_06):
    assert lesson_06["dequant_merge_4bit_max_abs_diff"] < 1e-4
    assert lesson_06["naive_4bit_merge_max_abs_diff"] > 10 * lesson_06["dequant_merge_4bit_max_abs_diff"]
    assert lesson_06["adapter_effect_max_abs"] > 0  # the adapter does something, so the comparison means something


def test_notebook_generates_and_serves(lesson_06):
    assert lesson_06["generated_tokens"] > 0
    assert lesson_06["demo_response_received"] is True
    assert lesson_06["demo_streamed_updates"] > 3  # the Gradio page streamed, token by token
    assert lesson_06["pushed"] is False  # HUB_REPO_ID is None by default: nothing is ever pushed in CI
    assert 0 < lesson_06["seconds"] < 600


def test_missing_adapter_says_run_lesson_4(tmp_path, tiny_preset):
    with pytest.raises(FileNotFoundError, match="run lesson 4 first"):
        find_adapter(tmp_path, tiny_preset)


# --- merging ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory):
    """A fresh LoRA on the tiny model with a random, non-zero B (a new adapter's B is zero: merging would be a no-op)."""
    from peft import get_peft_model

    model, tokenizer = load_model("tiny", seed=0)
    peft_model = get_peft_model(model, lora_config(r=8, alpha=16, dropout=0.0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("random_adapter")
    peft_model.save_pretrained(path)
    return path, peft_model.eval(), tokenizer


def test_fp32_merge_equals_peft_and_reloads_with_plain_transformers(random_adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, peft_model, tokenizer = random_adapter
    report = merge_adapter("tiny", adapter_dir, tmp_path / "merged")
    assert report.dequantized is False and report.dtype == "float32"
    assert compare_logits(report.model, peft_model, tokenizer, PROMPTS) < 1e-5
    with peft_model.disable_adapter():  # the adapter changes the logits, so the equality above is not vacuous
        assert compare_logits(report.model, peft_model, tokenizer, PROMPTS) > 1e-3

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # nothing from course_utils or peft
    assert compare_logits(reloaded, peft_model, tokenizer, PROMPTS) < 1e-5
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "merge_info.json"} <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files)  # safetensors only, no pickles
    assert json.loads((tmp_path / "merged" / "merge_info.json").read_text())["base_was_4bit"] is False


# Runs in a fresh interpreter that cannot import course_utils or peft: the export must need transformers only.
RELOAD_ONLY_WITH_TRANSFORMERS = r"""
import json, sys
for blocked in ("course_utils", "peft"):
    sys.modules[blocked] = None  # `import` now fails, and importlib.util.find_spec reports it missing
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
         for p in prompts]
batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
with torch.no_grad():
    torch.save(model(**batch).logits[batch["attention_mask"].bool()], out)  # (real tokens, vocab)
print(json.dumps({"modules": sorted(m for m, v in sys.modules.items() if v is not None),
                  "chat_template": bool(tokenizer.chat_template)}))
"""


def test_export_reloads_in_a_fresh_process_with_transformers_only(random_adapter, tmp_path):
    """The merged folder is a self-contained transformers checkpoint.

    Tolerance 1e-5 on logits: the merged layer computes ``(W + s*B@A) x`` in one matmul, base + adapter
    computes ``W x + s*B(A x)``; in float32 the two round differently: measured 4.8e-7 at most on tiny,
    with logits of order 1 (float32 epsilon is 1.2e-7). A merge that lost the update would be off by the
    adapter's whole effect, measured 0.95 here; the last assert keeps that gap from shrinking unnoticed.
    """
    import subprocess
    import sys

    from course_utils.export import prompt_logits

    adapter_dir, peft_model, tokenizer = random_adapter
    merge_adapter("tiny", adapter_dir, tmp_path / "merged")
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)  # no pickled weights
    template_in_config = "chat_template" in json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())
    assert "chat_template.jinja" in files or template_in_config

    result = subprocess.run([sys.executable, "-c", RELOAD_ONLY_WITH_TRANSFORMERS, str(tmp_path / "merged"),
                             str(tmp_path / "logits.pt"), json.dumps(PROMPTS)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["chat_template"]
    assert not [m for m in report["modules"] if m.split(".")[0] in ("course_utils", "peft")]
    reloaded = torch.load(tmp_path / "logits.pt")
    expected = prompt_logits(peft_model, tokenizer, PROMPTS)  # base + adapter, in this process
    assert reloaded.shape == expected.shape
    assert (reloaded - expected).abs().max().item() < 1e-5
    with peft_model.disable_adapter():
        assert (reloaded - prompt_logits(peft_model, tokenizer, PROMPTS)).abs().max().item() > 1e-3


def test_4bit_base_dequantise_then_merge(random_adapter, tmp_path):
    """Tolerance 1e-5: with bitsandbytes' CPU bf16 kernel off, NF4 layers multiply in fp32 like the merged model."""
    import warnings

    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir, _, tokenizer = random_adapter
    qlora = PeftModel.from_pretrained(load_base("tiny", load_in_4bit=True)[0], str(adapter_dir)).eval()
    report = merge_adapter("tiny", adapter_dir, tmp_path / "merged", load_in_4bit=True)
    assert report.dequantized and not any(isinstance(m, bnb.nn.Linear4bit) for m in report.model.modules())
    right = compare_logits(report.model, qlora, tokenizer, PROMPTS)
    assert right < 1e-5

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = PeftModel.from_pretrained(load_base("tiny", load_in_4bit=True)[0], str(adapter_dir)).merge_and_unload()
    assert compare_logits(naive, qlora, tokenizer, PROMPTS) > 100 * max(right, 1e-7)  # re-quantising loses the update

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules())
    assert compare_logits(reloaded, qlora, tokenizer, PROMPTS) < 1e-5


def _saved_tensors(folder):
    """Every tensor of a saved checkpoint (single file or shards), by name."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(f).items()}


def _untied_mistral_dir(tmp_path):
    """A tiny Mistral with its own LM head, as Mistral-7B has (the tiny model ties it to the embeddings)."""
    from transformers import MistralConfig, MistralForCausalLM

    from course_utils.models import TINY_SHAPES, load_tokenizer

    tokenizer = load_tokenizer("tiny")
    config = MistralConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                           **TINY_SHAPES)
    torch.manual_seed(2)
    folder = tmp_path / "untied-mistral"
    MistralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("base, four_bit, dtype", [("tiny", False, "float32"), ("tiny", True, "float32"),
                                                   ("tiny", True, "float16"), ("untied", True, "float32")])
def test_merge_by_layer_writes_the_same_checkpoint_bit_for_bit(random_adapter, tmp_path, base, four_bit, dtype):
    """The T4 path (never a whole merged model in memory) and the in-memory merge save identical weights.

    4-bit: NF4 dequantised one layer at a time; float16 as on a T4 (fp32 LoRA update added into
    fp16 weights); shards forced small (64 kB) so that transformers reads back the sharded format.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    adapter_dir = random_adapter[0]
    if base == "untied":
        base = str(_untied_mistral_dir(tmp_path))
        model = AutoModelForCausalLM.from_pretrained(base)
        peft_model = get_peft_model(model, lora_config(r=4, alpha=8, dropout=0.0))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.05)
        adapter_dir = tmp_path / "untied-adapter"
        peft_model.save_pretrained(adapter_dir)
    whole = merge_adapter(base, adapter_dir, tmp_path / "whole", load_in_4bit=four_bit, dtype=dtype)
    shards = merge_adapter(base, adapter_dir, tmp_path / "by_layer", load_in_4bit=four_bit, dtype=dtype,
                           by_layer=True, max_shard_bytes=64_000)
    assert shards.model is None and shards.dequantized == four_bit and "layer by layer" in shards.info["method"]
    expected, written = _saved_tensors(tmp_path / "whole"), _saved_tensors(tmp_path / "by_layer")
    assert written.keys() == expected.keys()
    assert all(written[k].dtype == expected[k].dtype and torch.equal(written[k], expected[k]) for k in expected)
    files = {p.name for p in (tmp_path / "by_layer").iterdir()}
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 2
    index = json.loads((tmp_path / "by_layer" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(written)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("whole", "by_layer")]
    assert [{k: v for k, v in c.items() if k != "transformers_version"} for c in configs][0] == \
        {k: v for k, v in configs[1].items() if k != "transformers_version"}
    assert "quantization_config" not in configs[1]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "by_layer", dtype="auto")  # plain transformers
    assert next(reloaded.parameters()).dtype == getattr(torch, dtype)
    assert compare_logits(reloaded, whole.model, whole.tokenizer, PROMPTS) == 0.0


def test_merge_by_layer_holds_one_shard_at_a_time(random_adapter, tmp_path, monkeypatch):
    """What keeps a 7B merge inside free Colab's RAM: each shard's merged weights are dropped once written.

    Measured on CPU (a 212M-parameter 4-bit Mistral shape, 100 MB shards): the merge itself added 0.40-0.53 GB
    to the process's peak RSS by layer (about twice its largest shard, a 201 MB embedding matrix), 0.84-0.87 GB
    in memory (the whole fp32 merged model is 0.84 GB).
    """
    import gc
    import weakref

    import safetensors.torch
    from peft import PeftModel

    from course_utils.export import save_merged_by_layer

    peft_model = PeftModel.from_pretrained(load_base("tiny", load_in_4bit=True)[0], str(random_adapter[0]))
    own = {p.data_ptr() for p in peft_model.parameters()}
    written, alive, real_save = [], [], safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        gc.collect()
        assert not [r for r in alive if r() is not None]  # the previous shard's merged weights are gone
        alive[:] = [weakref.ref(t) for t in tensors.values() if t.data_ptr() not in own]  # made for this shard
        written.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    names = save_merged_by_layer(peft_model, tmp_path, "float32", max_shard_bytes=100_000)
    largest = max(p.numel() * 4 for n, p in peft_model.named_parameters() if "lora_" not in n)  # the embeddings
    assert len(names) == len(written) > 3 and alive
    assert all(size <= 100_000 or size == largest for size in written)


def test_merge_by_layer_replaces_an_earlier_merge(random_adapter, tmp_path):
    """Shards from a larger earlier merge must not linger next to a new single-file one (and vice versa)."""
    adapter_dir = random_adapter[0]
    merge_adapter("tiny", adapter_dir, tmp_path / "merged", by_layer=True, max_shard_bytes=64_000)
    merge_adapter("tiny", adapter_dir, tmp_path / "merged", by_layer=True)
    assert sorted(p.name for p in (tmp_path / "merged").glob("model*")) == ["model.safetensors"]
    merge_adapter("tiny", adapter_dir, tmp_path / "merged", by_layer=True, max_shard_bytes=64_000)
    merge_adapter("tiny", adapter_dir, tmp_path / "merged")  # in memory, save_pretrained
    assert sorted(p.name for p in (tmp_path / "merged").glob("model*")) == ["model.safetensors"]


def test_compare_logits_takes_stored_logits(random_adapter):
    """Lesson 6 keeps the policy's logits, frees the policy, and compares later models with them."""
    from course_utils.export import prompt_logits

    _, peft_model, tokenizer = random_adapter
    stored = prompt_logits(peft_model, tokenizer, PROMPTS)
    assert compare_logits(peft_model, stored, tokenizer, PROMPTS) == 0.0
    with peft_model.disable_adapter():
        assert compare_logits(peft_model, stored, tokenizer, PROMPTS) > 1e-3
    with pytest.raises(ValueError, match="not the same prompts"):
        compare_logits(peft_model, stored, tokenizer, PROMPTS[:1])


def test_dequantise_survives_bitsandbytes_cpu_repacking():
    """On AVX512-BF16 CPUs the first eval forward repacks NF4 weights; dequantising must undo that first."""
    from bitsandbytes.functional import dequantize_4bit

    model, _ = load_model("tiny", load_in_4bit=True)
    packed = model.model.layers[0].mlp.up_proj.weight
    before = dequantize_4bit(packed.data, packed.quant_state).clone()
    with torch.no_grad():
        model.eval()(torch.tensor([[1, 2, 3]]))
    if not getattr(model.model.layers[0].mlp.up_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes did not repack")
    dequantize_4bit_model(model)
    after = model.model.layers[0].mlp.up_proj.weight
    # block scales were rounded to bf16 by the repacking (8 mantissa bits), nothing worse
    assert torch.allclose(after, before, rtol=1e-2, atol=1e-6)


# --- the Hub token ------------------------------------------------------------------------------------------


def test_hub_token_absent_without_env(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert hub_token() is None


def test_hub_token_from_env_and_colab_secrets(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_env_secret_123")
    assert hub_token() == "hf_env_secret_123"
    monkeypatch.delenv("HF_TOKEN")
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=lambda key: {"HF_TOKEN": "hf_colab_secret_456"}[key])
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert hub_token() == "hf_colab_secret_456"

    def missing(key):
        raise RuntimeError("SecretNotFoundError")  # what Colab raises for an unknown (or not yet granted) secret

    colab.userdata = types.SimpleNamespace(get=missing)
    assert hub_token() is None  # a missing secret is "no token", not a crash
    out = capsys.readouterr()
    assert "hf_env_secret_123" not in out.out + out.err and "hf_colab_secret_456" not in out.out + out.err


def test_push_to_hub_skips_without_token(monkeypatch, capsys, tmp_path):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kw: pytest.fail("must not contact the Hub"))
    assert push_to_hub(tmp_path, "someone/model") is None
    assert "skipping" in capsys.readouterr().out


def test_push_to_hub_never_prints_the_token(monkeypatch, capsys, tmp_path):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["private"]))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs["repo_id"]))

    monkeypatch.setenv("HF_TOKEN", "hf_do_not_print_789")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub(tmp_path, "someone/model") == "https://huggingface.co/someone/model"
    assert calls == [("token", "hf_do_not_print_789"), ("create", "someone/model", True), ("upload", "someone/model")]
    out = capsys.readouterr()
    assert "hf_do_not_print_789" not in out.out + out.err

