"""Safe defaults: no code from a checkpoint, safetensors only, and a Hub token never in a notebook's outputs."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAKE_HF_TOKEN
from course_utils.models import ModelLoadError, load_model, tiny_model_dir

TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")  # the shape of a real Hugging Face token


def _checkpoint_with_remote_code(tmp_path, model_type=None):
    """The tiny checkpoint plus an ``auto_map`` pointing at a module that would leave a marker file if run."""
    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir(0), folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    if model_type:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "remote_code_ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n")
    return folder, marker


def test_remote_code_is_ignored_for_a_native_architecture(tmp_path):
    folder, marker = _checkpoint_with_remote_code(tmp_path)
    model, _ = load_model(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_remote_code_only_architecture_is_refused(tmp_path):
    folder, marker = _checkpoint_with_remote_code(tmp_path, model_type="evil_arch")
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        load_model(str(folder))
    assert not marker.exists()


def test_pickle_weights_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir(0), folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="only pickle weights .* safetensors only"):
        load_model(str(folder))


def test_folder_without_config_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json in it"):
        load_model(str(tmp_path / "empty"))


def test_trained_adapter_holds_no_pickle(lesson_04, course_dir):
    """Lesson 4's adapter folder: safetensors weights, the training arguments as JSON, no pickle of any kind."""
    names = {p.name for p in (course_dir / "dpo" / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "training_args.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names), sorted(names)


def test_no_token_in_any_executed_notebook(lesson_04, course_dir):
    """Every notebook executed in this session (at least lesson 4; all six in a full run) ran with HF_TOKEN set."""
    executed = sorted((course_dir / "executed").glob("*.ipynb"))
    assert executed, "no executed notebooks found"
    for path in executed:
        text = path.read_text(encoding="utf-8")
        assert FAKE_HF_TOKEN not in text, f"{path.name} contains the Hub token"
        assert not TOKEN_PATTERN.search(text), f"{path.name} contains something shaped like a Hub token"
    print(f"scanned {len(executed)} notebooks: {[p.stem for p in executed]}")
