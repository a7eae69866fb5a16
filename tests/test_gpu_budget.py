"""The GPU memory and step-time model (course_utils.gpu_budget) and its use by the presets.

No GPU is needed: parameter counts are checked against models built on the meta device,
the activation term against the bytes torch itself saves for backward on CPU.
"""

import importlib.util
import tempfile
from pathlib import Path

import pytest
import torch

from course_utils.gpu_budget import (
    GPUS, MISTRAL_7B, SMOLLM2_135M, ModelShape, activation_bytes_per_token, count_dpo_step_flops, predict_memory,
    predict_step_seconds, prediction_table)
from course_utils.presets import (
    PresetDoesNotFit, Runtime, _fitting_changes, detect_preset, explain_fit, fit_to_gpu, get_preset)

T4 = Runtime(cuda=True, device_name="Tesla T4", capability=(7, 5), memory_gb=15.0)
QLORA = dict(lora_r=16, gradient_checkpointing=True, compute_dtype="bfloat16")


def _smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def _mistral_config():
    from transformers import MistralConfig

    return MistralConfig(vocab_size=32002)  # defaults are Mistral-7B's shapes


@pytest.mark.parametrize("make_config, shape, approx", [(_mistral_config, MISTRAL_7B, 7.24e9),
                                                        (_smollm2_config, SMOLLM2_135M, 1.35e8)])
def test_parameter_counts_match_models_built_on_the_meta_device(make_config, shape, approx):
    from transformers import AutoModelForCausalLM

    config = make_config()
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = AutoModelForCausalLM.from_config(config)
    assert ModelShape.from_config(config) == shape
    assert shape.num_parameters() == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert shape.num_parameters() == pytest.approx(approx, rel=0.005)


def _saved(pred):
    return pred.components["saved activations"]


def test_activations_scale_linearly_in_batch_and_nearly_so_in_length():
    acts = [_saved(predict_memory(MISTRAL_7B, seq_len=1024, pairs_per_device=b, gradient_checkpointing=False,
                                  lora_r=16)) for b in (1, 2, 4)]
    assert acts[1] == pytest.approx(2 * acts[0]) and acts[2] == pytest.approx(4 * acts[0])
    # no s x s scores with SDPA: doubling the length ~doubles the bytes; only the padding mask grows as s^2
    short, long = (_saved(predict_memory(MISTRAL_7B, seq_len=s, pairs_per_device=1, gradient_checkpointing=False,
                                         lora_r=16)) for s in (1024, 2048))
    assert 2.0 < long / short < 2.02
    unpadded = [activation_bytes_per_token(MISTRAL_7B, seq_len=s, padded=False) for s in (1024, 8192)]
    assert unpadded[0] == unpadded[1]  # per token: independent of length without a mask


def test_gradient_checkpointing_lowers_predicted_activations():
    kw = dict(seq_len=1024, pairs_per_device=2, lora_r=16)
    on, off = (predict_memory(MISTRAL_7B, gradient_checkpointing=gc, **kw) for gc in (True, False))
    kept_on = _saved(on) + on.components.get("recomputed layer", 0)
    assert kept_on < _saved(off) / 5  # 32 layers' activations vs one layer + 32 residual inputs
    assert on.peak_gib < off.peak_gib


@pytest.mark.parametrize("seq_len, pairs, gc, dtype", [(256, 1, True, "float16"), (1024, 4, False, "bfloat16"),
                                                       (4096, 2, True, "bfloat16"), (512, 16, False, "float16")])
def test_precomputed_reference_never_costs_more(seq_len, pairs, gc, dtype):
    kw = dict(seq_len=seq_len, pairs_per_device=pairs, lora_r=16, gradient_checkpointing=gc, compute_dtype=dtype)
    pre, dis, copy = (predict_memory(MISTRAL_7B, reference=r, **kw)
                      for r in ("precomputed", "adapter_disabled", "separate_copy"))
    assert pre.peak_gib <= dis.peak_gib < copy.peak_gib
    assert copy.components["reference model copy"] > 4  # a second NF4 Mistral: 3.4 GiB linears + fp32 embeddings


def test_t4_preset_fits_a_t4_and_an_oversized_override_is_refused_up_front():
    pred = get_preset("t4").predicted_memory()
    assert pred.fits(15.0) and 4 < pred.peak_gib < 15  # at least the 4-bit weights, at most the card
    too_big = get_preset("t4", max_length=8192, per_device_batch_size=8, gradient_checkpointing=False)
    with pytest.raises(PresetDoesNotFit) as err:
        detect_preset(T4, max_length=8192, per_device_batch_size=8, gradient_checkpointing=False)
    message = str(err.value)
    assert f"{too_big.predicted_memory().peak_gib:.1f} GiB" in message and "15.0 GiB usable" in message
    assert "saved activations" in message and "would fit" in message
    assert isinstance(err.value, ValueError)
    # every fix the message offers is itself predicted to fit
    fixes = _fitting_changes(too_big, 15.0, None)
    assert fixes
    for change, peak in fixes:
        assert too_big.override(**change).predicted_memory().peak_gib == pytest.approx(peak) and peak <= 15.0
        assert f"predicted {peak:.1f} GiB" in message


def test_detect_preset_on_a_t4_returns_a_preset_the_model_says_fits():
    preset = detect_preset(T4)
    assert preset.name == "t4" and preset.predicted_memory().fits(T4.memory_gb)
    assert preset == get_preset("t4")  # it already fits: nothing changed


def test_fit_lowers_batch_first_keeping_the_effective_batch(capsys):
    a100 = get_preset("a100")  # 4 pairs x 2 accumulation, made for 40 GB
    fitted = fit_to_gpu(a100, 15.0)
    assert fitted.per_device_batch_size < a100.per_device_batch_size
    assert fitted.effective_batch_size == a100.effective_batch_size and fitted.max_length == a100.max_length
    assert fitted.predicted_memory().fits(15.0)
    assert "per_device_batch_size 4 ->" in capsys.readouterr().out


def test_fit_lowers_max_length_only_as_a_last_resort():
    long = get_preset("t4", max_length=8192)
    fitted = fit_to_gpu(long, 15.0, verbose=False)
    assert fitted.per_device_batch_size == 1 and fitted.max_length % 64 == 0 and fitted.max_length < 8192
    assert fitted.predicted_memory().fits(15.0)
    assert not fitted.override(max_length=fitted.max_length + 64).predicted_memory().fits(15.0)  # the longest that fits
    with pytest.raises(PresetDoesNotFit, match="You set max_length"):
        fit_to_gpu(long, 15.0, pinned={"max_length"})


def test_explain_fit_and_prediction_table_are_printable():
    text = explain_fit(get_preset("t4"), "T4")
    assert "fits" in text and "seconds per optimiser step" in text and "quantised linear weights" in text
    rows = prediction_table().splitlines()[2:]
    assert len(rows) == 5 and all("| on |" in r for r in rows)


def test_step_time_scales_with_accumulation_and_t4_has_no_bf16():
    kw = dict(seq_len=1024, pairs=1, gpu="T4", gradient_checkpointing=True, compute_dtype="float16")
    one, eight = (predict_step_seconds(MISTRAL_7B, gradient_accumulation_steps=g, **kw) for g in (1, 8))
    assert eight == pytest.approx(8 * one)
    with pytest.raises(ValueError, match="bfloat16"):
        predict_step_seconds(MISTRAL_7B, **{**kw, "compute_dtype": "bfloat16"}, gradient_accumulation_steps=1)
    assert GPUS["H100-80GB"].fp16_tflops > GPUS["A100-40GB"].fp16_tflops > GPUS["T4"].fp16_tflops


def test_flop_count_equals_a_hand_count():
    # h=4, i=6, 2 layers, 2 heads of 2 (q width 4), 1 KV head (k, v width 2), vocab 5
    tiny = ModelShape(hidden_size=4, intermediate_size=6, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=5)
    flops = count_dpo_step_flops(tiny, tokens_per_sequence=3, sequences=2, lora_r=1, gradient_checkpointing=True)
    T = 6  # 2 sequences x 3 tokens
    linear = 2 * (  # two layers of 2*T*in*out per projection
        2 * T * 4 * 4  # q_proj 4 -> 4: 192
        + 2 * T * 4 * 2 * 2  # k_proj and v_proj 4 -> 2: 96 each
        + 2 * T * 4 * 4  # o_proj 4 -> 4: 192
        + 2 * T * 4 * 6 * 3)  # gate, up 4 -> 6 and down 6 -> 4: 288 each  => 1440 per layer, 2880
    attention = 2 * 2 * (2 * 2 * 3 * 3 * 4)  # layers x sequences x (QK^T + PV: 2 * 2 s^2 h = 144): 576
    head = 2 * T * 4 * 5  # LM head 4 -> 5 on every position: 240
    lora = 2 * (2 * T * 1 * (  # two layers of 2*T*r*(in+out) per adapter
        (4 + 4) + (4 + 2) * 2 + (4 + 4) + (4 + 6) * 2 + (6 + 4)))  # q, k+v, o, gate+up, down: 696 per layer, 1392
    assert (linear, attention, head, lora) == (2880, 576, 240, 1392)
    assert flops["forward"] == linear + attention + head + lora  # 5088
    assert flops["backward"] == linear + 2.5 * attention + 2 * head + 2 * lora  # input grads only: 7584
    assert flops["recompute"] == linear + attention + lora  # checkpointed layers re-run, no head: 4848
    assert flops["reference"] == linear + attention + head  # adapter disabled: 3696
    assert flops["total"] == 5088 + 7584 + 4848 + 3696
    assert count_dpo_step_flops(tiny, 3, 2, 1, False, "precomputed")["reference"] == 0


def _small_lora_llama(weights: str, dropout: float):
    """A 4-layer Llama with peft LoRA on every linear, set up as build_trainer + TRL do."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1000, attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    if weights == "nf4":
        from peft import prepare_model_for_kbit_training

        with tempfile.TemporaryDirectory() as tmp:  # quantise on load, as for the real checkpoint
            model.save_pretrained(tmp)
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16)
            model = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, quantization_config=quant)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    if weights == "nf4":  # TRL 1.16 casts a quantised model's adapters to bf16
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return model.train(), ModelShape.from_config(config)


@pytest.mark.parametrize("weights, dropout, padded", [("fp32", 0.0, False), ("fp32", 0.05, True), ("nf4", 0.0, False),
                                                      ("nf4", 0.05, True)])
def test_predicted_activation_bytes_match_what_torch_saves_for_backward(weights, dropout, padded):
    """Calibration: sum the bytes autograd saves during a real forward of the decoder stack.

    Frozen base + LoRA + an input that requires grad, exactly the training situation. Storages
    are counted once (several ops save the same tensor) and parameters are left out. The only
    bytes the model leaves out are the rotary cos/sin tables shared by all layers (2 x 64 x 32
    fp32 = 16 KiB, 0.1-0.2% of these totals); one missing h-sized bf16 tensor per layer would
    be 1.5-3%, so 0.5% catches any per-layer tensor of width h or i.
    """
    if weights == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    model, shape = _small_lora_llama(weights, dropout)
    b, s = 2, 64
    mask = torch.ones(b, s, dtype=torch.long)
    if padded:
        mask[0, -10:] = 0  # chosen and rejected differ in length: HF passes a mask to SDPA
    embeds = model.get_input_embeddings()(torch.randint(0, 1000, (b, s))).detach().requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights == "nf4")  # the Trainer's bf16 autocast
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)  # decoder stack only
    measured = sum(saved.values())
    per_token = activation_bytes_per_token(shape, seq_len=s, weights=weights, compute_dtype="bfloat16", lora_r=8,
                                           lora_dropout=dropout > 0, padded=padded, device="cpu")
    predicted = b * s * (shape.num_layers * per_token + 4 * shape.hidden_size + 4)  # + final norm's input, 1/rms
    assert measured == pytest.approx(predicted, rel=0.005)


def test_gpu_validate_exits_with_a_clear_message_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this check is about machines without CUDA")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_validate.py"
    spec = importlib.util.spec_from_file_location("gpu_validate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        module.main(["--steps", "2"])


# --- lesson 6: the memory of merging, reloading and serving (course_utils.merge_budget) ----------------------


def _quantised_bytes(weight) -> int:
    """Bytes bitsandbytes keeps for one Linear4bit weight: packed codes + every tensor of its quant state."""
    qs = weight.quant_state
    tensors = [weight.data, qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("in_features, out_features", [(64, 128), (576, 1536), (4096, 1024)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_equal_a_real_bitsandbytes_linear4bit(in_features, out_features, double_quant):
    import bitsandbytes as bnb

    from course_utils.gpu_budget import nf4_bytes

    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float16, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight.data = torch.randn(out_features, in_features, dtype=torch.float16)
    layer = layer.to("cpu")  # quantises on the move, as from_pretrained does on the GPU
    assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.nested == double_quant
    assert _quantised_bytes(layer.weight) == nf4_bytes(in_features * out_features, double_quant)


def test_model_bytes_equal_real_models_in_float16_and_nf4():
    """Float weights against a real Mistral-7B on the meta device; NF4 against the real 4-bit tiny model."""
    from transformers import AutoModelForCausalLM

    from course_utils.gpu_budget import GIB, TINY
    from course_utils.merge_budget import base_bytes
    from course_utils.models import load_model

    with torch.device("meta"):
        mistral = AutoModelForCausalLM.from_config(_mistral_config(), dtype=torch.float16)
    fp16 = sum(p.numel() * p.element_size() for p in mistral.parameters())
    assert base_bytes(MISTRAL_7B, "float16", nf4=False) == fp16
    assert 13.4 < fp16 / GIB < 13.6  # the merged model of lesson 6 on a T4: 14.5 GB

    tiny, _ = load_model("tiny", load_in_4bit=True, dtype="float16")
    assert ModelShape.from_config(tiny.config) == TINY
    linears = [m.weight for m in tiny.modules() if type(m).__name__ == "Linear4bit"]
    others = sum(p.numel() * p.element_size() for p in tiny.parameters() if p.dtype != torch.uint8)  # tied once
    assert len(linears) == 7 * TINY.num_layers
    assert base_bytes(TINY, "float16", nf4=True) == others + sum(_quantised_bytes(w) for w in linears)
    tiny16, _ = load_model("tiny", dtype="float16")
    assert base_bytes(TINY, "float16", nf4=False) == sum(p.numel() * p.element_size() for p in tiny16.parameters())


def test_adapter_bytes_equal_peft_loading_a_half_precision_adapter_in_fp32(tmp_path):
    """peft upcasts a bf16/fp16 adapter to fp32 when it loads it onto a 4-bit base (autocast_adapter_dtype)."""
    from peft import PeftModel, get_peft_model

    from course_utils.gpu_budget import TINY
    from course_utils.merge_budget import adapter_bytes
    from course_utils.models import load_model, lora_config

    trained = get_peft_model(load_model("tiny")[0], lora_config(r=8, alpha=16, dropout=0.0))
    for name, param in trained.named_parameters():  # as a bf16 run saves them
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_model("tiny", load_in_4bit=True, dtype="float16")[0], str(tmp_path))
    lora = [p for n, p in loaded.named_parameters() if "lora_" in n]
    assert {p.dtype for p in lora} == {torch.float32}
    assert adapter_bytes(TINY, 8) == sum(p.numel() * p.element_size() for p in lora)


def test_kv_cache_bytes_equal_the_cache_transformers_builds():
    from course_utils.gpu_budget import TINY
    from course_utils.merge_budget import kv_cache_bytes
    from course_utils.models import load_model

    model, _ = load_model("tiny")
    with torch.no_grad():
        cache = model(torch.randint(0, 1000, (1, 37)), use_cache=True).past_key_values
    layers = cache.layers
    stored = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    assert stored == kv_cache_bytes(TINY, 37, "float32")


def test_device_map_placement_matches_transformers_own_auto_device_map():
    """The T4 reload: what infer_auto_device_map puts on the CPU when 90% of 14.25 GiB free may hold weights."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.accelerate import infer_auto_device_map

    from course_utils.gpu_budget import GIB
    from course_utils.merge_budget import PLAN_FRACTION, device_map_offload

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_mistral_config(), dtype=torch.float16)
    free = (15.0 - 0.75) * GIB
    device_map = infer_auto_device_map(model, max_memory={0: int(PLAN_FRACTION * free), "cpu": 100 * GIB},
                                       no_split_module_classes=model._no_split_modules)
    params = dict(model.named_parameters())
    on_cpu = sum(p.numel() * p.element_size() for n, p in params.items()
                 if next(v for k, v in device_map.items() if n == k or n.startswith(k + ".") or k == "") == "cpu")
    on_gpu, predicted_cpu = device_map_offload(MISTRAL_7B, "float16", free)
    assert predicted_cpu == on_cpu and on_gpu + on_cpu == sum(p.numel() * 2 for p in params.values())
    assert 0.5 * GIB < on_cpu < 2 * GIB  # a couple of decoder layers and the LM head: slower, but it loads


def _plan(preset, gpu, **kw):
    from course_utils.merge_budget import lesson6_plan

    return lesson6_plan(get_preset(preset), gpu, **kw)


@pytest.mark.parametrize("gpu", ["T4", T4, Runtime(cuda=True, device_name="Tesla T4", capability=(7, 5),
                                                    memory_gb=14.75)])  # 14.75: what torch reports on Colab
def test_t4_plan_frees_the_policy_merges_by_layer_and_turns_the_demo_off(gpu):
    from course_utils.gpu_budget import GIB
    from course_utils.merge_budget import base_bytes

    plan = _plan("t4", gpu)
    assert not plan.keep_policy and plan.merge_by_layer  # 4 GiB policy + 13.5 GiB merged model > 15 GiB
    assert not plan.demo_fits and plan.demo_frees_merged and "off by default" in plan.demo_reason
    assert plan.free_merged_before_chat
    assert all(step.fits for step in plan.steps.values())  # with those frees, every step fits
    merge, reload = plan.steps["merge"], plan.steps["reload merged"]
    assert merge.parts["policy (kept)"] == 0 and merge.peak_gib < 6  # the NF4 base and one layer, not 13.5 GiB
    assert reload.offload_gib > 0 and reload.parts["merged model"] + reload.offload_gib == pytest.approx(
        base_bytes(MISTRAL_7B, "float16", False) / GIB)
    # the in-memory merge, and the demo next to the merged model, are what would not have fitted
    keep_all = _plan("t4", gpu, low_memory=False)
    assert keep_all.steps["merge"].peak_gib > plan.usable_gib and not keep_all.steps["merge"].fits
    assert keep_all.steps["NF4 demo"].peak_gib > plan.usable_gib
    assert "PREDICTED" in plan.table() and "not measured" in plan.table()


@pytest.mark.parametrize("gpu", ["A100-40GB", "A100-80GB", "H100-80GB"])
def test_a100_class_plan_keeps_everything_loaded(gpu):
    plan = _plan("a100", gpu)
    assert plan.keep_policy and not plan.merge_by_layer and plan.demo_fits
    assert not plan.demo_frees_merged and not plan.free_merged_before_chat
    assert plan.steps["merge"].parts["policy (kept)"] > 3.5 and plan.steps["reload merged"].offload_gib == 0
    assert max(s.peak_gib for s in plan.steps.values()) < plan.limit_gib


@pytest.mark.parametrize("preset", ["cpu", "tiny"])
def test_cpu_plan_frees_nothing_unless_asked(preset):
    for gpu in (None, Runtime(cuda=False)):
        plan = _plan(preset, gpu)
        assert plan.device == "CPU" and plan.usable_gib is None
        assert plan.keep_policy and not plan.merge_by_layer and plan.demo_fits and not plan.free_merged_before_chat
        assert all(s.fits is None for s in plan.steps.values()) and "no CUDA context" in plan.table()
    low = _plan(preset, None, low_memory=True)  # the T4 path, as CI runs it on tiny
    assert not low.keep_policy and low.merge_by_layer and low.demo_frees_merged and low.free_merged_before_chat


def test_plan_weights_are_the_arithmetic_of_the_shapes():
    """Mistral-7B: NF4 policy = 4-bit linears + fp16 embeddings/head/norms + fp32 LoRA; merged = 2 bytes a weight."""
    from course_utils.gpu_budget import CUDA_CONTEXT_GIB, GIB, nf4_bytes

    plan = _plan("t4", "T4")
    linears = MISTRAL_7B.num_layers * sum(nf4_bytes(a * b) for a, b in MISTRAL_7B.linears().values())
    policy = (linears + 2 * MISTRAL_7B.other_parameters() + 4 * MISTRAL_7B.lora_parameters(16)) / GIB
    load = plan.steps["load policy"]
    assert load.parts["policy: base + adapter"] == pytest.approx(policy) and 3.9 < policy < 4.1
    assert load.peak_gib == pytest.approx(CUDA_CONTEXT_GIB + policy + 1.1 * load.parts["forward over the prompts"])
    # the NF4 count agrees with the training model's (predict_memory): the per-layer code tables aside
    train = predict_memory(MISTRAL_7B, seq_len=512, pairs_per_device=1, **QLORA)
    assert train.components["quantised linear weights"] == pytest.approx(linears / GIB, rel=1e-4)
