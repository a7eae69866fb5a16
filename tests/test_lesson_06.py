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


def test_notebook_merge_matches_base_plus_adapter(lesson_06):
    assert lesson_06["base_was_4bit"] is False  # tiny trains on an fp32 base
    assert lesson_06["merge_max_abs_diff"] < 1e-4
    assert lesson_06["reload_max_abs_diff"] < 1e-4  # plain transformers reload


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

