"""Judges: who decides that one completion is better than another, behind one interface.

Two kinds, after the evaluation literature (Zheng et al., 2023, "Judging LLM-as-a-judge"):

* a **pointwise** judge gives a number per (prompt, completion): ``score(prompts, completions) -> (N,)``;
  higher is better. :class:`SentimentJudge` (VADER, the sentiment task's ground truth),
  :class:`RewardModelJudge` (any ``AutoModelForSequenceClassification`` reward model, applied through its own
  chat template), :class:`ImplicitRewardJudge` (DPO's ``beta * log pi/pi_ref``, Eq. 5 of Rafailov et al., 2023);
* a **pairwise** judge says which of two completions is better: ``compare(prompts, first, second)`` returns a
  :class:`PairwiseVerdicts`. :class:`LLMPairwiseJudge` asks an instruct model "A or B?" and reads the next-token
  log-probs of ``A`` and ``B`` (no generation), in **both orders**: a verdict that flips with the order is a tie,
  and the share of first-position wins measures position bias.

A judge is only as good as its agreement with something trusted. :func:`judge_agreement` measures it on
preference pairs whose order the ground truth set (the sentiment pairs, ranked by VADER), with a bootstrap 95% CI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .evaluate import win_rate

# What an LLM judge is asked about, per task. The sentiment task's criterion is its ground truth's.
CRITERIA = {
    "sentiment": "Which continuation of the movie review is more positive in sentiment?",
    "chat": "Which response answers the user's request better: more helpful, correct and clear?",
}


class JudgeLoadError(RuntimeError):
    """A judge model could not be used; the message names the path and the reason."""


def as_chat(prompt) -> list[dict]:
    """A prompt as chat messages: text becomes one user turn, a message list stays as it is."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_text(prompt) -> str:
    """The last user message of a prompt (what a judge is shown as the question)."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


# --- pointwise judges ----------------------------------------------------------------------------


class SentimentJudge:
    """VADER's compound sentiment in [-1, 1] (:class:`course_utils.sentiment.SentimentJudge`); ignores the prompt."""

    name = "VADER sentiment"
    kind = "pointwise"

    def __init__(self):
        from .sentiment import SentimentJudge as Vader

        self._vader = Vader()

    def score(self, prompts, completions) -> np.ndarray:
        return np.asarray(self._vader(list(completions)), float)


class RewardModelJudge:
    """r(x, y) of a scalar reward model, read at the last token of the chat-templated conversation.

    The conversation is rendered with the *reward model's* tokenizer and chat template (it was trained on those),
    which need not be the policy's. Batches of similar length, on the model's device; scores shape ``(N,)``.
    """

    kind = "pointwise"

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int = 2048, name: str | None = None):
        if getattr(model.config, "num_labels", None) != 1:
            raise JudgeLoadError(f"{name or model.config.name_or_path}: a reward model has one output (num_labels=1), "
                                 f"this one has {getattr(model.config, 'num_labels', '?')}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:  # the classifier finds the last token by the pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.name = name or f"reward model {model.config.name_or_path}"

    @classmethod
    def load(cls, id_or_path: str, *, dtype=None, device: str | None = None, **kwargs) -> "RewardModelJudge":
        """Load a reward model from a local folder or hub id; a GPU when there is one, fp16/bf16 there.

        Raises :class:`JudgeLoadError` (one line) when the path does not exist, is not a sequence classifier, or
        has no chat template.
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from .models import SAFE_LOADING

        local = Path(id_or_path).expanduser()
        if (id_or_path.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").is_file():
            raise JudgeLoadError(f"{id_or_path}: no such model folder (no config.json there)")
        try:
            config = AutoConfig.from_pretrained(str(local) if local.exists() else id_or_path, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise JudgeLoadError(f"{id_or_path}: cannot read a model config ({str(err).splitlines()[0]})") from err
        archs = getattr(config, "architectures", None) or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise JudgeLoadError(f"{id_or_path}: not a sequence classifier (architectures: {archs or 'none'}); "
                                 "a reward-model judge needs an AutoModelForSequenceClassification with num_labels=1")
        cuda = torch.cuda.is_available()
        device = device or ("cuda" if cuda else "cpu")
        if dtype is None:
            # bf16 on Ampere or newer; a T4 (sm75) emulates bf16 slowly, so fp16 there, as the T4 preset trains
            ampere = device == "cuda" and torch.cuda.get_device_capability()[0] >= 8
            dtype = torch.float32 if device != "cuda" else (torch.bfloat16 if ampere else torch.float16)
        path = str(local) if local.exists() else id_or_path
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, **SAFE_LOADING).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        if not tokenizer.chat_template:
            raise JudgeLoadError(f"{id_or_path}: its tokenizer has no chat template, so a conversation cannot be "
                                 "rendered the way it was trained")
        return cls(model, tokenizer, name=kwargs.pop("name", f"reward model {id_or_path}"), **kwargs)

    @torch.inference_mode()
    def score(self, prompts, completions) -> np.ndarray:
        tok = self.tokenizer
        rows = []
        for p, c in zip(prompts, completions, strict=True):
            ids = tok.apply_chat_template(as_chat(p) + [{"role": "assistant", "content": c}], tokenize=True,
                                          return_dict=True)["input_ids"]
            rows.append(list(ids)[-self.max_length:])  # keep the end: the reward is read at the last token
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths per batch: less padding
        out = np.empty(len(rows))
        device = next(self.model.parameters()).device
        for start in range(0, len(rows), self.batch_size):
            chunk = order[start : start + self.batch_size]
            ids = torch.full((len(chunk), max(len(rows[i]) for i in chunk)), tok.pad_token_id)
            attn = torch.zeros_like(ids)
            for j, i in enumerate(chunk):  # right padding; the classifier reads the last non-pad token
                ids[j, : len(rows[i])], attn[j, : len(rows[i])] = torch.tensor(rows[i]), 1
            logits = self.model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits  # (B, 1)
            out[chunk] = logits[:, 0].float().cpu().numpy()
        return out


def tiny_reward_model(tokenizer, seed: int = 0):
    """A random 2-layer Llama sequence classifier (num_labels=1) with ``tokenizer``'s vocabulary, built locally.

    The CI stand-in for a hub reward model: the same code path, no download; its scores are noise.
    """
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from .models import TINY_SHAPES

    config = LlamaConfig(vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TINY_SHAPES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    model.config.name_or_path = f"tiny-random-classifier-seed{seed}"
    return model


LESSON1_REWARD_MODEL = "01_rlhf_background/reward_model/final"  # under OUTPUT_DIR: where lesson 1 saves its reward model


def reward_model_judge(spec: str, output_dir=None, **kwargs) -> RewardModelJudge:
    """The reward-model judge a preset names (``Preset.judge_reward_model``), loaded.

    ``"lesson-1"``: the Bradley-Terry model lesson 1 trained on the sentiment pairs (``OUTPUT_DIR``/
    :data:`LESSON1_REWARD_MODEL`); ``"tiny-random"``: :func:`tiny_reward_model` with the real tokenizer; anything
    else: a local folder or hub id of a sequence classifier.
    """
    if spec == "tiny-random":
        from .models import load_tokenizer

        tokenizer = load_tokenizer("tiny")
        return RewardModelJudge(tiny_reward_model(tokenizer), tokenizer, name="tiny random reward model", **kwargs)
    if spec == "lesson-1":
        path = Path(output_dir or ".") / LESSON1_REWARD_MODEL
        if not (path / "config.json").is_file():
            raise JudgeLoadError(f"no reward model in {path}: run lesson 1 (01_rlhf_background.ipynb) with the same "
                                 "OUTPUT_DIR first; it saves the one it trains there")
        return RewardModelJudge.load(str(path), name="lesson-1 reward model", **kwargs)
    return RewardModelJudge.load(spec, **kwargs)


class ImplicitRewardJudge:
    """DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` (Eq. 5); the reference is the adapter off."""

    kind = "pointwise"
    name = "DPO implicit reward"

    def __init__(self, model, tokenizer, beta: float):
        self.model, self.tokenizer, self.beta = model, tokenizer, beta

    def score(self, prompts, completions) -> np.ndarray:
        from .generation import sequence_logprobs

        pol = sequence_logprobs(self.model, self.tokenizer, list(prompts), list(completions))
        ref = sequence_logprobs(self.model, self.tokenizer, list(prompts), list(completions), disable_adapter=True)
        return (self.beta * (pol - ref)).numpy()


# --- pairwise judges -----------------------------------------------------------------------------


@dataclass
class PairwiseVerdicts:
    """Verdicts on N pairs judged in both orders.

    ``prefer``: (N,) +1 first better, -1 second better, 0 tie (the two orders disagreed, or the judge was indifferent);
    ``margin_ab``, ``margin_ba``: (N,) log p("A") - log p("B") with (first, second) shown as (A, B), and as (B, A).
    """

    prefer: np.ndarray
    margin_ab: np.ndarray
    margin_ba: np.ndarray

    @property
    def first_position_share(self) -> float:
        """Share of the 2N single-order verdicts won by whatever was shown first; 0.5 is no position bias."""
        return float(np.concatenate([self.margin_ab > 0, self.margin_ba > 0]).mean())

    @property
    def consistency(self) -> float:
        """Share of pairs whose verdict survived swapping the order."""
        return float((self.prefer != 0).mean())


class LLMPairwiseJudge:
    """An instruct model asked "which is better, A or B?"; the answer is read from next-token log-probs.

    Each pair is shown as (first=A, second=B) and as (second=A, first=B). The pair goes to the side that wins in
    both orders; otherwise it is a tie. One forward pass per order and pair, batched; no sampling.
    """

    kind = "pairwise"

    def __init__(self, model, tokenizer, *, criterion: str = CRITERIA["chat"], batch_size: int = 16,
                 name: str | None = None):
        self.model, self.tokenizer, self.criterion, self.batch_size = model.eval(), tokenizer, criterion, batch_size
        self.name = name or f"LLM judge {model.config.name_or_path or type(model).__name__}"
        ids = [tokenizer.encode(x, add_special_tokens=False) for x in ("A", "B")]
        if any(len(i) != 1 for i in ids):
            raise JudgeLoadError(f"{self.name}: 'A' and 'B' must be single tokens of its tokenizer, got {ids}")
        self.token_a, self.token_b = ids[0][0], ids[1][0]

    def _question(self, prompt, a: str, b: str) -> str:
        return (f"{self.criterion}\n\n[Request]\n{prompt_text(prompt)}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
                "Answer with a single letter, A or B.")

    @torch.inference_mode()
    def margins(self, prompts, a_texts, b_texts) -> np.ndarray:
        """log p("A") - log p("B") at the first answer token, for each (prompt, A, B); shape (N,)."""
        tok = self.tokenizer
        texts = [tok.apply_chat_template([{"role": "user", "content": self._question(p, a, b)}], tokenize=False,
                                         add_generation_prompt=True) for p, a, b in zip(prompts, a_texts, b_texts,
                                                                                        strict=True)]
        side, tok.padding_side = tok.padding_side, "left"  # left padding: the last position is the next token for all
        out = []
        try:
            device = next(self.model.parameters()).device
            for start in range(0, len(texts), self.batch_size):
                batch = tok(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
                logp = torch.log_softmax(self.model(**batch).logits[:, -1].float(), dim=-1)  # (B, vocab)
                out.append((logp[:, self.token_a] - logp[:, self.token_b]).cpu())
        finally:
            tok.padding_side = side
        return torch.cat(out).numpy() if out else np.zeros(0)

    def compare(self, prompts, first, second) -> PairwiseVerdicts:
        ab = self.margins(prompts, first, second)  # > 0: first (shown as A) preferred
        ba = self.margins(prompts, second, first)  # > 0: second (shown as A) preferred
        return verdicts_from_margins(ab, ba)


def verdicts_from_margins(margin_ab, margin_ba) -> PairwiseVerdicts:
    """Combine the two orders: first wins if it wins as A (ab > 0) and as B (ba < 0); the mirror for second; else tie."""
    ab, ba = np.asarray(margin_ab, float), np.asarray(margin_ba, float)
    prefer = np.where((ab > 0) & (ba < 0), 1, np.where((ab < 0) & (ba > 0), -1, 0))
    return PairwiseVerdicts(prefer=prefer, margin_ab=ab, margin_ba=ba)


# --- using any judge -----------------------------------------------------------------------------


def compare(judge, prompts, first, second) -> tuple[np.ndarray, PairwiseVerdicts | None]:
    """(N,) +1/0/-1 verdicts of ``first`` against ``second`` from any judge, plus the pairwise detail (or None)."""
    if judge.kind == "pairwise":
        verdicts = judge.compare(prompts, first, second)
        return verdicts.prefer, verdicts
    a, b = judge.score(prompts, first), judge.score(prompts, second)
    return np.sign(a - b).astype(int), None


def judge_agreement(judge, prompts, chosen, rejected, *, seed: int = 0) -> dict:
    """How often ``judge`` prefers the ground truth's ``chosen`` over its ``rejected``; ties count half.

    Returns ``agreement`` with a bootstrap 95% ``ci`` (the pair bootstrap of :func:`course_utils.evaluate.win_rate`),
    ``n``, ``ties``, and for a pairwise judge ``first_position_share`` and ``consistency``.
    """
    prefer, verdicts = compare(judge, prompts, chosen, rejected)
    wr = win_rate(prefer, np.zeros(len(prefer)), seed=seed)
    out = {"judge": judge.name, "agreement": wr.rate, "ci": [wr.ci_low, wr.ci_high], "n": len(prefer),
           "ties": wr.ties}
    if verdicts is not None:
        out.update(first_position_share=verdicts.first_position_share, consistency=verdicts.consistency)
    return out


def judged_win_rate(judge, prompts, policy, reference, *, seed: int = 0) -> dict:
    """Win rate of ``policy`` over ``reference`` completions (paired, same prompt) by ``judge``, bootstrap 95% CI.

    Returns ``win_rate``, ``ci``, ``n``, ``wins``/``ties``/``losses``, per-pair ``prefer`` (+1/0/-1), the pointwise
    ``policy_scores``/``reference_scores`` when the judge has them, and ``first_position_share`` for a pairwise judge.
    """
    if judge.kind == "pairwise":
        verdicts = judge.compare(prompts, policy, reference)
        prefer, extra = verdicts.prefer, {"first_position_share": verdicts.first_position_share,
                                          "consistency": verdicts.consistency}
        pol, ref = prefer.astype(float), np.zeros(len(prefer))
    else:
        pol, ref = judge.score(prompts, policy), judge.score(prompts, reference)
        prefer, extra = np.sign(pol - ref).astype(int), {"policy_scores": pol.tolist(), "reference_scores": ref.tolist()}
    wr = win_rate(pol, ref, seed=seed)
    return {"judge": judge.name, "win_rate": wr.rate, "ci": [wr.ci_low, wr.ci_high], "n": len(prefer), "wins": wr.wins,
            "ties": wr.ties, "losses": wr.losses, "prefer": prefer.tolist(), **extra}


def length_regression(prefer, length_diff, *, seed: int = 0, resamples: int = 2000) -> dict:
    """Win rate at equal length: least squares of the outcome (1 win, 0.5 tie, 0 loss) on the length difference.

    ``outcome = a + b * d`` with ``d = policy_tokens - reference_tokens``, shapes (N,), (N,). ``a`` is the win rate
    the line predicts for two answers of the same length (the length-controlled win rate), ``b`` the change per
    token of extra length; a pair bootstrap gives ``a``'s 95% CI. A linear-probability model: crude, but it needs
    no tolerance to choose, unlike length-matched bins (:func:`course_utils.report.win_rate_by_length`).
    """
    y = (np.asarray(prefer, float) + 1) / 2
    d = np.asarray(length_diff, float)
    if y.shape != d.shape or y.size < 3:
        raise ValueError(f"need at least 3 pairs with a length difference each, got {y.shape} and {d.shape}")

    def fit(idx):
        x = np.stack([np.ones(idx.size), d[idx]], axis=1)
        return np.linalg.lstsq(x, y[idx], rcond=None)[0]  # (2,): intercept, slope; d constant -> min-norm solution

    a, b = fit(np.arange(y.size))
    rng = np.random.default_rng(seed)
    boot = np.array([fit(rng.integers(0, y.size, y.size))[0] for _ in range(resamples)])
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"win_rate_at_equal_length": float(a), "ci": [float(low), float(high)], "per_token": float(b),
            "n": int(y.size)}
