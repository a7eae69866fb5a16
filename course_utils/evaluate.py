"""Did DPO help? Policy against reference on held-out prompts, by the ground-truth judge.

* win rate: paired samples (same prompt, same seed) from the policy and the reference,
  scored by the judge; ties count half; a bootstrap 95% confidence interval;
* mean ground-truth reward of each;
* KL(pi || pi_ref): the Monte-Carlo estimate E_{y~pi}[log pi(y|x) - log pi_ref(y|x)]
  from the policy's own samples (Section 6.1 of the DPO paper plots reward against it);
* implicit-reward accuracy and margin on held-out preference pairs (Eq. 5 of the paper);
* completion lengths, to check that DPO did not simply learn to write longer.

The reference is the policy with its LoRA adapter disabled: no second model in memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import numpy as np

from .generation import sample, sequence_logprobs, sequence_logprobs_of_ids


@dataclass
class WinRate:
    rate: float  # P(policy beats reference), ties counted half
    ci_low: float  # bootstrap 95% interval of `rate`
    ci_high: float
    wins: int
    ties: int
    losses: int

    def __str__(self) -> str:
        return f"{self.rate:.1%} [95% CI {self.ci_low:.1%}-{self.ci_high:.1%}] ({self.wins}W/{self.ties}T/{self.losses}L)"


def win_rate(policy_scores, reference_scores, *, seed: int = 0, resamples: int = 10_000) -> WinRate:
    """Pairwise win rate of policy over reference with a percentile-bootstrap 95% CI."""
    p, r = np.asarray(policy_scores, float), np.asarray(reference_scores, float)
    if p.shape != r.shape or p.size == 0:
        raise ValueError(f"need equally many policy and reference scores, got {p.shape} and {r.shape}")
    outcome = np.where(p > r, 1.0, np.where(p < r, 0.0, 0.5))
    rng = np.random.default_rng(seed)
    boot = outcome[rng.integers(0, outcome.size, size=(resamples, outcome.size))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return WinRate(float(outcome.mean()), float(low), float(high), int((outcome == 1).sum()),
                   int((outcome == 0.5).sum()), int((outcome == 0).sum()))


def mean_and_stderr(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0


def _reference(model):
    """Context in which ``model`` acts as the reference (LoRA adapter off)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def implicit_reward_accuracy(model, tokenizer, dataset, beta: float, return_margins: bool = False) -> dict:
    """Held-out implicit-reward accuracy and margin: r(x,y) = beta * log(pi/pi_ref), Eq. 5.

    ``return_margins``: also the per-pair ``margins`` r(chosen) - r(rejected), a list of N floats.
    """
    prompts = list(dataset["prompt"])
    logps = {}
    for side in ("chosen", "rejected"):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in dataset[side]]
        pol = sequence_logprobs(model, tokenizer, prompts, texts)
        ref = sequence_logprobs(model, tokenizer, prompts, texts, disable_adapter=True)
        logps[side] = beta * (pol - ref)
    margin = (logps["chosen"] - logps["rejected"]).numpy()
    out = {"reward_accuracy": float((margin > 0).mean()), "reward_margin": float(margin.mean()), "pairs": len(prompts)}
    return {**out, "margins": margin.tolist()} if return_margins else out


def kl_on_samples(model, tokenizer, prompts, completions) -> tuple[float, float]:
    """Monte-Carlo KL(pi || pi_ref) in nats per completion, with its standard error.

    ``completions[i]`` must be sampled from ``model`` (the policy, adapter on) for ``prompts[i]``:
    the mean of ``log pi(y|x) - log pi_ref(y|x)`` over them is then an unbiased estimate of the KL
    (single terms can be negative). The reference is ``model`` with its LoRA adapter disabled.
    """
    lp_pol = sequence_logprobs(model, tokenizer, prompts, completions)
    lp_ref = sequence_logprobs(model, tokenizer, prompts, completions, disable_adapter=True)
    return mean_and_stderr((lp_pol - lp_ref).numpy())


def kl_on_sampled_ids(model, samples) -> tuple[float, float]:
    """:func:`kl_on_samples` on exactly the sampled tokens: ``samples`` is the policy's :class:`~.decode.Samples`.

    Decoding to text and tokenising again can give other tokens than the ones sampled (tokenisation is not a
    bijection); the estimate is only unbiased over the sampled ones. A completion cut at ``max_new_tokens`` is scored
    as sampled, without an end-of-turn token.
    """
    kwargs = dict(pad_id=0, batch_size=16)
    lp_pol = sequence_logprobs_of_ids(model, samples.prompt_ids, samples.completion_ids, **kwargs)
    lp_ref = sequence_logprobs_of_ids(model, samples.prompt_ids, samples.completion_ids, disable_adapter=True, **kwargs)
    return mean_and_stderr((lp_pol - lp_ref).numpy())


def kl_k3_on_sampled_ids(model, prompt_ids, completion_ids) -> tuple[float, float]:
    """:func:`kl_k3_on_samples` on exactly the sampled tokens (``Samples.completion_ids``, or an example's
    ``policy_ids`` from :func:`evaluate_against_reference`): the same samples and tokens as :func:`kl_on_sampled_ids`,
    so the two estimators differ only in what they sum."""
    pol = sequence_logprobs_of_ids(model, prompt_ids, completion_ids, per_token=True)
    ref = sequence_logprobs_of_ids(model, prompt_ids, completion_ids, disable_adapter=True, per_token=True)
    log_r = [r - p for p, r in zip(pol, ref)]  # each (T_i,)
    return mean_and_stderr(np.array([(lr.exp() - 1 - lr).sum().item() for lr in log_r]))


def kl_k3_on_samples(model, tokenizer, prompts, completions) -> tuple[float, float]:
    """The k3 estimate of KL(pi || pi_ref) in nats per completion, with its standard error.

    Per sampled token, with ``r_t = pi_ref(y_t | x, y_<t) / pi(y_t | x, y_<t)``: ``k3 = sum_t (r_t - 1) - log r_t``
    (Schulman, "Approximating KL divergence", 2020). Each term is >= 0 (``log r <= r - 1``), and its expectation
    under ``pi`` equals k1's, because ``E_pi[r_t - 1] = 0`` at every position. Same samples and scoring as
    :func:`kl_on_samples` (lesson 5's exercise 3 compares the two; the lesson checks the learner's k3 with this).
    """
    pol = sequence_logprobs(model, tokenizer, prompts, completions, per_token=True)
    ref = sequence_logprobs(model, tokenizer, prompts, completions, disable_adapter=True, per_token=True)
    log_r = [r - p for p, r in zip(pol, ref)]  # each (T_i,)
    return mean_and_stderr(np.array([(lr.exp() - 1 - lr).sum().item() for lr in log_r]))


def sample_policy_and_reference(model, tokenizer, prompts, *, num_samples: int = 1, max_new_tokens: int = 40,
                                seed: int = 1234, batch_size: int | None = None, return_samples: bool = False):
    """Completions of the policy and of its reference (adapter off) for the same ``prompts`` and seed.

    Returns ``(prompts, policy, reference)``, three flat lists of ``len(prompts) * num_samples``, each
    prompt repeated once per sample, so position i of the three lists is one comparable pair. With
    ``return_samples=True`` a fourth item: the policy's :class:`~.decode.Samples` (its sampled token ids).
    Both sides draw the same random numbers per row (:mod:`course_utils.decode`).
    """
    kwargs = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    policy = sample(model, tokenizer, prompts, desc="Sampling policy", **kwargs)
    with _reference(model):
        reference = sample(model, tokenizer, prompts, desc="Sampling reference", **kwargs)
    flat_prompts = [p for p in prompts for _ in range(num_samples)]
    out = (flat_prompts, policy.texts, reference.texts)
    return (*out, policy) if return_samples else out


def evaluate_against_reference(model, tokenizer, prompts, judge, *, num_samples: int = 1, max_new_tokens: int = 40,
                               seed: int = 1234, batch_size: int = 128) -> dict:
    """Sample from policy and reference on ``prompts``; judge, compare, estimate KL.

    Returns a flat dict of numbers plus ``examples`` (prompt, both completions, scores)
    for a side-by-side table.
    """
    flat_prompts, flat_pol, flat_ref, pol_samples = sample_policy_and_reference(
        model, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed,
        batch_size=batch_size, return_samples=True)
    pol_scores, ref_scores = judge(flat_pol), judge(flat_ref)

    kl, kl_se = kl_on_sampled_ids(model, pol_samples)  # on the policy's own samples, the tokens it drew
    wr = win_rate(pol_scores, ref_scores, seed=seed)
    pol_reward, pol_se = mean_and_stderr(pol_scores)
    ref_reward, ref_se = mean_and_stderr(ref_scores)
    n_tok = lambda texts: float(np.mean([len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]))
    return {
        "policy_reward": pol_reward,
        "policy_reward_stderr": pol_se,
        "reference_reward": ref_reward,
        "reference_reward_stderr": ref_se,
        "win_rate": wr.rate,
        "win_rate_ci": [wr.ci_low, wr.ci_high],
        "win_rate_detail": asdict(wr),
        "kl": kl,
        "kl_stderr": kl_se,
        "policy_tokens": n_tok(flat_pol),
        "reference_tokens": n_tok(flat_ref),
        "samples": len(flat_pol),
        "examples": [  # policy_ids: the token ids the policy sampled, which the KL scored
            {"prompt": p if isinstance(p, str) else p[-1]["content"], "policy": a, "reference": b,
             "policy_score": sa, "reference_score": sb, "policy_ids": ids}
            for p, a, b, sa, sb, ids in zip(flat_prompts, flat_pol, flat_ref, pol_scores, ref_scores,
                                            pol_samples.completion_ids)
        ],
    }


if __name__ == "__main__":  # python -m course_utils.evaluate: the CLI lives in evaluate_cli.py
    from course_utils.evaluate_cli import main

    raise SystemExit(main())
