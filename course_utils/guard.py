"""A divergence guard: read TRL's DPO metrics as they are logged and say, in plain words, what went wrong.

A DPO run can fail in ways a loss curve hides. :class:`DivergenceGuard` is a
``transformers.TrainerCallback`` that watches every training log of ``DPOTrainer`` and
recognises six signatures (thresholds are fields of the guard):

``non_finite``
    loss, gradient norm, rewards or log-probs are NaN/inf. Everything after is garbage;
    by default the run stops, and that step is not saved as a checkpoint.
``exploding_gradients``
    the (pre-clipping) gradient norm jumps above ``grad_factor`` x the median of the
    earlier logs: the step size is too large for the loss surface.
``logps_collapse``
    the log-probabilities of *both* chosen and rejected answers fall by more than
    ``logp_drop`` of their starting magnitude (a moving average of ``window`` logs). DPO
    only needs the chosen-minus-rejected gap to grow (Eq. 7 of Rafailov et al. 2023), and
    it can get it by pushing both down; the model then forgets how to write the answers it
    is told to prefer (Pal et al. 2024, "Smaug": DPO-Positive).
``margin_blowup``
    reward accuracy saturates (>= ``saturated``) within the first ``early_fraction`` of the
    run while the reward margin keeps rising past ``margin_limit``: the pairs are too easy
    to tell apart (a give-away such as length or format), so the loss keeps pushing the
    policy away from the reference with nothing left to learn.
``fp16_overflow``
    under fp16 mixed precision, ``max_skipped_steps`` logs in a row had a finite loss but a
    non-finite gradient norm. One such log is normal: the gradient scaler found an overflow,
    skipped that optimizer step and halved its scale (it starts at 2^16, so the first steps
    often overflow). Each skipped step halves the scale; after 16 in a row it has fallen from
    2^16 to 1, and gradients that still overflow at scale 1 cannot be represented in fp16 at
    all: the run has diverged. Skipped steps are counted in ``guard.skipped_steps``. A
    non-finite *loss* is ``non_finite`` and stops at once, fp16 or not.
``chance_accuracy``
    over the pairs seen since ``chance_after`` of the run (at least ``min_pairs``), reward
    accuracy is no better than a coin flip: at most 0.5 plus ``chance_se`` binomial standard
    errors. Nothing is being learned. (One standard error, not two: a healthy CPU run of the
    course is only ~63% accurate per training batch, and two would flag it.)

Each diagnosis is printed once, with the numbers seen, the likely causes and the fix, and
kept in ``guard.diagnoses``. Signatures listed in ``stop_on`` also stop training.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from transformers import TrainerCallback

SIGNATURES = ("non_finite", "fp16_overflow", "exploding_gradients", "logps_collapse", "margin_blowup",
              "chance_accuracy")
WATCHED = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")

ADVICE = {
    "non_finite": (
        "the learning rate is far too high, fp16 overflowed (use bf16 or fp32), or a batch holds a degenerate "
        "example (an empty answer, a token id outside the vocabulary)",
        "lower the learning rate 10x, keep max_grad_norm=1.0, use bf16 instead of fp16, and check the data with "
        "course_utils.prepare.prepare_preferences; resume from the last checkpoint before this step"),
    "fp16_overflow": (
        "fp16's range is exceeded at every loss scale: the learning rate is too high, or activations overflow "
        "fp16 (a long context, an fp16-intolerant model)",
        "lower the learning rate, use bf16 where the GPU has it (Ampere or newer), or fp32; resume from the last "
        "checkpoint before the skipped steps began"),
    "exploding_gradients": (
        "the learning rate is too high for this model and batch, or warm-up is too short",
        "lower the learning rate (2-10x) or add warmup_steps; max_grad_norm clips each step but does not fix the "
        "cause"),
    "logps_collapse": (
        "DPO is widening the margin by making both answers less likely: the learning rate is high, beta is small, "
        "or the chosen answers are unlike anything the model would write (off-policy data, wrong chat template)",
        "lower the learning rate, raise beta, add an SFT term on the chosen answers (TRL: rpo_alpha), and check the "
        "chat template with course_utils.templates.inspect_example"),
    "margin_blowup": (
        "the pairs are too easy: something other than quality separates chosen from rejected (length, format, a "
        "repeated phrase), or beta is so small that nothing holds the policy near the reference",
        "raise beta, train fewer steps, try the bounded IPO loss (loss_type='ipo'), and look for a give-away in "
        "the data (compare lengths of chosen and rejected)"),
    "chance_accuracy": (
        "the learning rate is too low, the labels are noise or swapped, or the model cannot see the difference "
        "(answers truncated at max_length, a chat template that hides the answer)",
        "raise the learning rate, check a few pairs by eye, check truncation in the data report and the template "
        "with course_utils.templates.inspect_example"),
}


@dataclass
class Diagnosis:
    """One detected failure: what was seen (with numbers), why it usually happens, what to do."""

    signature: str
    step: int
    seen: str
    cause: str
    fix: str

    def __str__(self) -> str:
        return (f"[DivergenceGuard] step {self.step}: {self.signature.replace('_', ' ')}\n"
                f"  seen:   {self.seen}\n  likely: {self.cause}\n  fix:    {self.fix}")


@dataclass
class DivergenceGuard(TrainerCallback):
    """Watches DPOTrainer's logs for the signatures in the module docstring; see there for each threshold."""

    stop_on: tuple[str, ...] | str = ("non_finite", "fp16_overflow")  # signatures that stop training; "all": every one
    max_skipped_steps: int = 16  # fp16: logs in a row with a skipped step before it counts as divergence (see above)
    grad_factor: float = 10.0  # exploding: grad norm above this x median of earlier logs ...
    grad_floor: float = 1.0  # ... and above this absolute value (tiny norms jumping around are harmless)
    logp_drop: float = 0.5  # collapse: both log-probs fell by this fraction of their starting magnitude
    saturated: float = 0.95  # accuracy this high counts as saturated
    early_fraction: float = 0.25  # ... when reached within this fraction of max_steps
    margin_limit: float = 5.0  # blow-up: reward margin (beta x log-ratio gap) above this, still rising
    chance_after: float = 0.5  # chance: judged on the pairs seen after this fraction of max_steps ...
    min_pairs: int = 64  # ... once there are this many of them ...
    chance_se: float = 1.0  # ... against 0.5 + this many binomial standard errors
    window: int = 3  # logs averaged to smooth batch-to-batch noise
    verbose: bool = True
    diagnoses: list[Diagnosis] = field(default_factory=list)
    history: list[dict] = field(default_factory=list, repr=False)

    def __post_init__(self):
        stops = SIGNATURES if self.stop_on == "all" else tuple(self.stop_on)
        unknown = set(stops) - set(SIGNATURES)
        if unknown:
            raise ValueError(f"unknown signature(s) {sorted(unknown)}; choose from {SIGNATURES} or 'all'")
        self.stop_on = stops
        self._pairs_per_step = 1
        self._max_steps = 0
        self.fp16 = False  # set from the TrainingArguments when training begins

    @property
    def skipped_steps(self) -> list[int]:
        """Steps (of the logs seen) that the fp16 gradient scaler skipped: finite loss, non-finite grad norm."""
        return [h["step"] for h in self.history if self._skipped(h)]

    def _skipped(self, entry: dict) -> bool:
        return (self.fp16 and math.isfinite(entry.get("loss", math.nan))
                and not math.isfinite(entry.get("grad_norm", 0.0)))

    # --- TrainerCallback hooks -------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._pairs_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self._max_steps = state.max_steps
        self.fp16 = bool(getattr(args, "fp16", False))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:  # evaluation and end-of-training summaries
            return
        entry = {k: float(logs[k]) for k in WATCHED if k in logs}
        entry["step"] = state.global_step
        self.history.append(entry)
        for found in self.check():
            if any(d.signature == found.signature for d in self.diagnoses):
                continue  # say it once
            self.diagnoses.append(found)
            if self.verbose:
                print(found, flush=True)
            if found.signature in self.stop_on:
                control.should_training_stop = True
                print(f"[DivergenceGuard] stopping the run ({found.signature} is in stop_on).", flush=True)
                if found.signature == "non_finite":
                    control.should_save = False  # never checkpoint NaN weights: resume must find the last good one
        return control

    # --- the checks (pure functions of self.history, so they can be tested on any sequence of logs) ------

    def check(self) -> list[Diagnosis]:
        """Every signature present in the history so far."""
        checks = (self._non_finite, self._overflow, self._exploding, self._collapse, self._blowup, self._chance)
        return [d for d in (c() for c in checks) if d is not None]

    def _diagnosis(self, signature: str, seen: str) -> Diagnosis:
        cause, fix = ADVICE[signature]
        return Diagnosis(signature, self.history[-1]["step"], seen, cause, fix)

    def _series(self, key: str) -> list[float]:
        return [h[key] for h in self.history if key in h]

    def _non_finite(self):
        last = self.history[-1]
        bad = [k for k, v in last.items() if k != "step" and not math.isfinite(v)
               and not (k == "grad_norm" and self._skipped(last))]  # a skipped fp16 step is not a NaN
        if bad:
            return self._diagnosis("non_finite", f"{', '.join(bad)} = {self.history[-1][bad[0]]}")

    def _overflow(self):
        run = 0
        for entry in reversed(self.history):
            if not self._skipped(entry):
                break
            run += 1
        if run >= self.max_skipped_steps:
            return self._diagnosis("fp16_overflow", f"{run} logs in a row with a finite loss and grad_norm = "
                                                    f"{self.history[-1]['grad_norm']} (skipped steps)")

    def _exploding(self):
        norms = [g for g in self._series("grad_norm") if math.isfinite(g)]
        if len(norms) < 3:  # a median needs at least two earlier logs
            return None
        median = statistics.median(norms[:-1])
        if norms[-1] > max(self.grad_floor, self.grad_factor * median):
            return self._diagnosis("exploding_gradients",
                                   f"gradient norm {norms[-1]:.3g}, {norms[-1] / median:.0f}x the median {median:.3g} "
                                   "of earlier logs")

    def _collapse(self):
        chosen, rejected = self._series("logps/chosen"), self._series("logps/rejected")
        w = self.window
        if len(chosen) < 2 * w or len(rejected) < 2 * w:
            return None
        start_c, start_r = statistics.fmean(chosen[:w]), statistics.fmean(rejected[:w])
        now_c, now_r = statistics.fmean(chosen[-w:]), statistics.fmean(rejected[-w:])
        fell_c, fell_r = start_c - now_c, start_r - now_r
        if fell_c > self.logp_drop * abs(start_c) and fell_r > self.logp_drop * abs(start_r):
            return self._diagnosis("logps_collapse",
                                   f"log p(chosen) {start_c:.1f} -> {now_c:.1f} and log p(rejected) {start_r:.1f} -> "
                                   f"{now_r:.1f} nats per answer (mean of {w} logs): both fell by more than "
                                   f"{self.logp_drop:.0%}")

    def _blowup(self):
        acc, margins = self._series("rewards/accuracies"), self._series("rewards/margins")
        w = self.window
        if len(acc) < w or len(margins) < w:
            return None
        saturated_at = self._saturated_at()
        early = saturated_at is not None and saturated_at <= self.early_fraction * max(self._max_steps, 1)
        recent = margins[-w:]
        rising = all(b > a for a, b in zip(recent, recent[1:]))
        if early and rising and recent[-1] > self.margin_limit:
            return self._diagnosis("margin_blowup",
                                   f"reward accuracy saturated by step {saturated_at} of {self._max_steps} and "
                                   f"the reward margin keeps rising: {', '.join(f'{m:.2f}' for m in recent)} "
                                   f"(limit {self.margin_limit})")

    def _saturated_at(self) -> int | None:
        """The step at which the mean accuracy over ``window`` logs first reached ``saturated``."""
        logs = [h for h in self.history if "rewards/accuracies" in h]
        for i in range(self.window - 1, len(logs)):
            if statistics.fmean(h["rewards/accuracies"] for h in logs[i - self.window + 1:i + 1]) >= self.saturated:
                return logs[i]["step"]
        return None

    def _chance(self):
        if not self._max_steps:
            return None
        start = self.chance_after * self._max_steps
        pairs, correct, previous = 0, 0.0, 0
        for h in self.history:
            seen = (h["step"] - previous) * self._pairs_per_step  # a log averages the steps since the previous one
            previous = h["step"]
            if h["step"] > start and "rewards/accuracies" in h:
                pairs += seen
                correct += seen * h["rewards/accuracies"]
        if pairs < self.min_pairs:
            return None
        accuracy = correct / pairs
        ceiling = 0.5 + self.chance_se * 0.5 / math.sqrt(pairs)  # standard error of a coin flip's mean
        if accuracy <= ceiling:
            return self._diagnosis("chance_accuracy",
                                   f"reward accuracy {accuracy:.2f} over the last {pairs} pairs (steps after "
                                   f"{start:.0f}), not above a coin flip ({ceiling:.2f} = 0.5 + {self.chance_se:g} standard error)")

    def summary(self) -> str:
        """One line for the end of a run."""
        skipped = self.skipped_steps
        note = f"; fp16 skipped {len(skipped)} step(s) on overflow (at {skipped[:8]})" if skipped else ""
        if not self.diagnoses:
            return f"DivergenceGuard: no problem detected in {len(self.history)} logs{note}."
        return "DivergenceGuard: " + "; ".join(f"{d.signature} at step {d.step}" for d in self.diagnoses) + note
