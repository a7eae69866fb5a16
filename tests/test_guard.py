"""The divergence guard: each failure signature provoked in a real DPOTrainer run, and no false alarm on healthy runs.

The tiny random model cannot move its log-probabilities much (its logits are close to zero
and bounded by RMSNorm), so the two signatures that need a model to *change its mind*
(log-prob collapse, margin blow-up) are provoked on SmolLM2-135M-Instruct with short pairs.
"""

import json
import math
from pathlib import Path

import pytest

from course_utils.guard import SIGNATURES, DivergenceGuard
from course_utils.models import load_model
from course_utils.train import build_trainer

HEALTHY = json.loads((Path(__file__).parent / "assets" / "healthy_cpu_log_history.json").read_text())


def _run(base, data, guard, tmp_path, model_name="tiny", changes=None, **config):
    model, tokenizer = load_model(model_name, seed=0)
    preset = base.override(model_name=model_name, logging_steps=1, **(changes or {}))
    trainer = build_trainer(preset, model, tokenizer, data, output_dir=tmp_path, guard=guard, report_to=[],
                            disable_tqdm=True, **{"save_strategy": "no", **config})
    trainer.train()
    return trainer


def _signatures(guard):
    return [d.signature for d in guard.diagnoses]


# --- no false alarms ---------------------------------------------------------------------------------------


def _replay(history, max_steps, pairs_per_step, every=1):
    """Feed a recorded log history through the guard's checks, averaging ``every`` steps per log like the Trainer."""
    guard = DivergenceGuard(verbose=False)
    guard._max_steps, guard._pairs_per_step = max_steps, pairs_per_step
    for i in range(0, len(history), every):
        chunk = history[i:i + every]
        entry = {k: sum(c[k] for c in chunk) / len(chunk) for k in chunk[0] if k != "step"}
        entry["step"] = chunk[-1]["step"]
        guard.history.append(entry)
        guard.diagnoses += [d for d in guard.check() if d.signature not in _signatures(guard)]
    return guard


@pytest.mark.parametrize("every", [1, 4], ids=["logged-every-step", "logged-every-4-steps"])
def test_no_false_alarm_on_a_measured_healthy_cpu_run(every):
    """The cpu preset's real run is noisy (per-batch accuracy ~0.63, log p swinging 40%): nothing may fire."""
    guard = _replay(HEALTHY["log_history"], HEALTHY["max_steps"], HEALTHY["pairs_per_step"], every)
    assert guard.diagnoses == []
    assert guard.summary().startswith("DivergenceGuard: no problem detected")


# --- each signature, provoked for real --------------------------------------------------------------------


def test_nan_stops_the_run_and_is_never_checkpointed(tiny_pairs, tiny_preset, tmp_path, capsys):
    """lr=1e30 turns the LoRA weights into overflowing numbers after one step: NaN at step 2."""
    guard = DivergenceGuard()  # the default stops on non_finite
    trainer = _run(tiny_preset, tiny_pairs[0]["train"], guard, tmp_path,
                   changes=dict(learning_rate=1e30, max_steps=10), save_strategy="steps", save_steps=1)
    assert _signatures(guard) == ["non_finite"]
    assert guard.diagnoses[0].step == 2 and trainer.state.global_step == 2  # stopped at once
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / "checkpoint-2").exists()
    out = capsys.readouterr().out
    assert "non finite" in out and "lower the learning rate" in out and "stopping the run" in out


def test_exploding_gradients(tiny_pairs, tiny_preset, tmp_path):
    """Warm-up to lr=1e4: the first two steps are harmless (lr 0, then the update lands), then the norm jumps."""
    guard = DivergenceGuard(verbose=False)
    _run(tiny_preset, tiny_pairs[0]["train"], guard, tmp_path, changes=dict(learning_rate=1e4, max_steps=4,
                                                                            warmup_steps=2))
    assert "exploding_gradients" in _signatures(guard)
    found = next(d for d in guard.diagnoses if d.signature == "exploding_gradients")
    assert found.step == 3 and "median" in found.seen


def test_logps_collapse(tmp_path, tiny_preset):
    """Pairs that are anagrams of each other: pushing the rejected order down drags the chosen one down too."""
    pairs = [{"prompt": f"Review {i}: the film", "chosen": " good bad good bad good bad.",
              "rejected": " bad good bad good bad good."} for i in range(40)]
    guard = DivergenceGuard(verbose=False)
    _run(tiny_preset, pairs, guard, tmp_path, model_name="smollm2-135m",
         changes=dict(learning_rate=1e-2, beta=0.01, max_steps=12, per_device_batch_size=2, max_length=64))
    assert "logps_collapse" in _signatures(guard)
    found = next(d for d in guard.diagnoses if d.signature == "logps_collapse")
    upto = [h for h in guard.history if h["step"] <= found.step]
    for key in ("logps/chosen", "logps/rejected"):  # at the step it fired, both had fallen by more than 50%
        start, now = (sum(h[key] for h in part) / 3 for part in (upto[:3], upto[-3:]))
        assert now < 1.5 * start


def test_margin_blowup_on_give_away_pairs(tmp_path, tiny_preset):
    """Chosen is always the same long rave, rejected the same two words: accuracy hits 1.0 at once, margins climb."""
    pairs = [{"prompt": f"Review {i}: the film", "chosen": " was wonderful, wonderful, wonderful.",
              "rejected": " was awful."} for i in range(48)]
    guard = DivergenceGuard(verbose=False)
    _run(tiny_preset, pairs, guard, tmp_path, model_name="smollm2-135m",
         changes=dict(learning_rate=1e-3, beta=0.1, max_steps=16, per_device_batch_size=2, max_length=96))
    assert "margin_blowup" in _signatures(guard)
    found = next(d for d in guard.diagnoses if d.signature == "margin_blowup")
    assert "raise beta" in found.fix and found.step <= 12


def test_chance_accuracy(tiny_pairs, tiny_preset, tmp_path):
    """lr=1e-9: the adapter never moves, accuracy stays at (or, with exact ties, below) a coin flip."""
    guard = DivergenceGuard(verbose=False, min_pairs=32)
    _run(tiny_preset, tiny_pairs[0]["train"], guard, tmp_path, changes=dict(learning_rate=1e-9, max_steps=16))
    assert _signatures(guard) == ["chance_accuracy"]
    assert guard.diagnoses[0].step > 8  # judged on the second half only


# --- configuration ----------------------------------------------------------------------------------------


def test_stop_on_validation():
    assert DivergenceGuard(stop_on="all").stop_on == SIGNATURES
    assert DivergenceGuard(stop_on=()).stop_on == ()
    with pytest.raises(ValueError, match="unknown signature"):
        DivergenceGuard(stop_on=("nan",))


def test_each_diagnosis_reads_as_plain_language():
    guard = DivergenceGuard(verbose=False)
    guard._max_steps = 10
    guard.history = [{"step": 1, "loss": math.nan, "grad_norm": 1.0}]
    (found,) = guard.check()
    text = str(found)
    assert text.startswith("[DivergenceGuard] step 1: non finite")
    assert "seen:   loss = nan" in text and "likely:" in text and "fix:" in text


# --- fp16: the gradient scaler's skipped steps are not a divergence ------------------------------------------


def _fp16_guard(entries):
    guard = DivergenceGuard(verbose=False)
    guard.fp16 = True
    for step, (loss, grad_norm) in enumerate(entries, start=1):
        guard.history.append({"loss": loss, "grad_norm": grad_norm, "rewards/margins": 0.0, "step": step})
        guard.diagnoses += [d for d in guard.check() if d.signature not in _signatures(guard)]
    return guard


def test_fp16_skipped_steps_are_counted_not_stopped():
    """Overflow in the first steps is normal at scale 2^16: the scaler skips them and halves its scale."""
    guard = _fp16_guard([(0.693, math.inf), (0.693, math.nan), (0.693, math.inf), (0.69, 0.8), (0.68, 0.7)])
    assert guard.diagnoses == []
    assert guard.skipped_steps == [1, 2, 3]
    assert "fp16 skipped 3 step(s)" in guard.summary()


def test_fp16_a_run_of_skipped_steps_is_a_divergence():
    n = DivergenceGuard().max_skipped_steps
    guard = _fp16_guard([(0.69, 0.5)] + [(0.69, math.inf)] * n)
    assert _signatures(guard) == ["fp16_overflow"] and guard.diagnoses[0].step == n + 1
    assert "fp16_overflow" in DivergenceGuard().stop_on  # stops by default
    assert _signatures(_fp16_guard([(0.69, math.inf)] * (n - 1))) == []  # one fewer is still healthy


def test_fp16_a_nan_loss_still_stops_at_once():
    guard = _fp16_guard([(0.69, math.inf), (math.nan, math.nan)])
    assert _signatures(guard) == ["non_finite"] and guard.diagnoses[0].step == 2


def test_without_fp16_an_infinite_grad_norm_is_non_finite():
    guard = DivergenceGuard(verbose=False)
    guard.history.append({"loss": 0.69, "grad_norm": math.inf, "step": 1})
    assert [d.signature for d in guard.check()] == ["non_finite"]
