"""A toy preference problem small enough to check the DPO derivation exactly (lesson 2).

One prompt ``x`` and ``K`` possible responses (K = 6 in the lesson). A policy is then just a
probability vector ``π ∈ R^K``, the reference ``π_ref`` another one, and the reward a vector
``r ∈ R^K``. Every quantity of Rafailov et al. (2023), "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model", can be computed in closed form and compared:

* :func:`kl_objective` - the KL-constrained reward maximisation of Eq. 3;
* :func:`optimal_policy` / :func:`partition_function` - its closed-form solution, Eq. 4;
* :func:`implied_reward` - the reparameterisation of Eq. 5, ``β log π/π_ref`` (``+ β log Z``);
* :func:`bradley_terry` - the preference model of Eq. 1 (Eq. 6 once rewards are reparameterised);
* :func:`sample_preferences` - a preference dataset drawn from that model with the true reward;
* :func:`fit_dpo` - minimise the DPO loss (Eq. 7) over a fully parameterised policy;
* :func:`maximize_kl_objective` - plain gradient ascent on Eq. 3, for comparison with Eq. 4.

Everything is float64 torch: the toy is about exact agreement, not speed.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

DTYPE = torch.float64


def _vec(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=DTYPE)


def random_problem(num_responses: int = 6, seed: int = 0, reward_scale: float = 1.0):
    """``(ref_probs, rewards)``, each ``(K,)``: a random reference distribution and reward vector.

    The reference is ``softmax(z)`` with ``z ~ N(0, 1)`` (no response is vanishingly rare,
    so sampled preference data covers every pair); rewards are ``reward_scale · N(0, 1)``.
    """
    gen = torch.Generator().manual_seed(seed)
    ref_probs = torch.softmax(torch.randn(num_responses, generator=gen, dtype=DTYPE), dim=0)
    rewards = reward_scale * torch.randn(num_responses, generator=gen, dtype=DTYPE)
    return ref_probs, rewards


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = Σ_y p(y) log(p(y) / q(y))`` for ``(..., K)`` probability vectors; returns ``(...)``."""
    p, q = _vec(p), _vec(q)
    # 0 · log 0 = 0: a response p never produces contributes nothing
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(dim=-1).clamp(min=0.0)  # KL ≥ 0; rounding alone can give -1e-17 when p = q


def kl_objective(policy: torch.Tensor, ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 3: ``J(π) = E_{y~π}[r(y)] - β KL(π || π_ref)``, for ``(..., K)`` policies; returns ``(...)``.

    The RLHF objective: collect reward, but stay close to the reference (β sets how close).
    """
    policy = _vec(policy)
    return (policy * _vec(rewards)).sum(dim=-1) - beta * kl(policy, ref_probs)


def partition_function(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """``Z(x) = Σ_y π_ref(y|x) exp(r(x,y)/β)``, the normaliser of Eq. 4 (a scalar here)."""
    return (_vec(ref_probs) * torch.exp(_vec(rewards) / beta)).sum()


def optimal_policy(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 4: ``π*(y|x) = π_ref(y|x) exp(r(x,y)/β) / Z(x)``, the maximiser of Eq. 3; ``(K,) -> (K,)``.

    Computed in log space (a softmax of ``log π_ref + r/β``) so a small β does not overflow.
    """
    return torch.softmax(torch.log(_vec(ref_probs)) + _vec(rewards) / beta, dim=-1)


def implied_reward(policy: torch.Tensor, ref_probs: torch.Tensor, beta: float, log_z: float | torch.Tensor = 0.0):
    """Eq. 5: ``r(x,y) = β log(π(y|x) / π_ref(y|x)) + β log Z(x)``; ``(K,) -> (K,)``.

    With the default ``log_z = 0`` this is DPO's implicit reward ``r̂`` (Section 5), which is
    the true reward shifted by the constant ``-β log Z(x)``; constants cancel in Eq. 6.
    """
    return beta * (torch.log(_vec(policy)) - torch.log(_vec(ref_probs))) + beta * _vec(log_z)


def bradley_terry(reward_w: torch.Tensor, reward_l: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``p(y_w ≻ y_l) = exp(r_w) / (exp(r_w) + exp(r_l)) = σ(r_w - r_l)``, elementwise."""
    return torch.sigmoid(_vec(reward_w) - _vec(reward_l))


def preference_matrix(rewards: torch.Tensor) -> torch.Tensor:
    """``P[i, j] = p(y_i ≻ y_j)`` under Bradley-Terry for all pairs, ``(K,) -> (K, K)``."""
    rewards = _vec(rewards)
    return bradley_terry(rewards[:, None], rewards[None, :])


class Preferences(NamedTuple):
    """A sampled preference dataset on the toy problem: response indices, one pair per entry."""

    winners: torch.Tensor  # (N,) index of y_w
    losers: torch.Tensor  # (N,) index of y_l
    dropped_ties: int  # draws where both responses were the same one (no preference to label)


def sample_preferences(ref_probs: torch.Tensor, rewards: torch.Tensor, num_pairs: int, seed: int = 0) -> Preferences:
    """Draw ``y1, y2 ~ π_ref`` independently and label them with Bradley-Terry on the true reward.

    As in the paper's setup, completions come from the reference (SFT) model and a labeller
    whose preferences follow Eq. 1 decides which wins. Draws with ``y1 == y2`` are dropped,
    so slightly fewer than ``num_pairs`` pairs come back.
    """
    gen = torch.Generator().manual_seed(seed)
    ref_probs, rewards = _vec(ref_probs), _vec(rewards)
    draws = torch.multinomial(ref_probs, 2 * num_pairs, replacement=True, generator=gen).view(num_pairs, 2)
    y1, y2 = draws[:, 0], draws[:, 1]
    keep = y1 != y2
    y1, y2 = y1[keep], y2[keep]
    y1_wins = torch.rand(len(y1), generator=gen, dtype=DTYPE) < bradley_terry(rewards[y1], rewards[y2])
    return Preferences(torch.where(y1_wins, y1, y2), torch.where(y1_wins, y2, y1), int((~keep).sum()))


def dpo_loss_on_policy(logits: torch.Tensor, ref_probs: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor,
                       beta: float) -> torch.Tensor:
    """Eq. 7 on the toy problem, averaged over pairs, for a softmax policy ``π = softmax(logits)``.

    ``-mean log σ(β [log π(y_w)/π_ref(y_w) - log π(y_l)/π_ref(y_l)])``; ``logits`` is ``(K,)``,
    ``winners`` and ``losers`` are ``(N,)`` indices; returns a scalar.
    """
    log_ratio = torch.log_softmax(logits, dim=-1) - torch.log(_vec(ref_probs))  # (K,) log π/π_ref per response
    return -F.logsigmoid(beta * (log_ratio[winners] - log_ratio[losers])).mean()


def pair_counts(preferences: Preferences, num_responses: int) -> torch.Tensor:
    """``C[w, l]`` = how often ``y_w`` beat ``y_l`` in the data, ``(K, K)``; the DPO loss depends on nothing else."""
    counts = torch.zeros(num_responses, num_responses, dtype=DTYPE)
    ones = torch.ones(len(preferences.winners), dtype=DTYPE)
    return counts.index_put_((preferences.winners, preferences.losers), ones, accumulate=True)


def dpo_loss_on_counts(logits: torch.Tensor, ref_probs: torch.Tensor, counts: torch.Tensor, beta: float):
    """:func:`dpo_loss_on_policy` computed from :func:`pair_counts`: the same number, ``K²`` terms instead of ``N``."""
    log_ratio = torch.log_softmax(logits, dim=-1) - torch.log(_vec(ref_probs))  # (K,)
    margins = beta * (log_ratio[:, None] - log_ratio[None, :])  # (K, K): row = winner, column = loser
    return -(counts * F.logsigmoid(margins)).sum() / counts.sum()


class Fit(NamedTuple):
    """The result of an optimisation on the toy problem."""

    policy: torch.Tensor  # (K,) final probabilities
    losses: list[float]  # objective value at each step (a loss to minimise, or Eq. 3 to maximise)
    policies: torch.Tensor  # (steps + 1, K) the policy before each step and at the end


@contextlib.contextmanager
def _one_thread():
    """Run tiny tensor ops on one thread: for K = 6, extra threads only add synchronisation
    (tens of times slower on a busy 2-core machine). The previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _optimise(logits: torch.Tensor, loss_fn, steps: int, lr: float) -> Fit:
    logits = logits.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    # Cosine decay to 0: Adam's normalised steps do not shrink with the gradient, so a constant rate
    # keeps jittering around the optimum (and can jump away once the gradients are pure rounding noise).
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(steps, 1))
    losses, policies = [], []
    with _one_thread():
        for _ in range(steps):
            loss = loss_fn(logits)
            policies.append(torch.softmax(logits.detach(), dim=-1))
            losses.append(loss.item())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    policies.append(torch.softmax(logits.detach(), dim=-1))
    return Fit(policies[-1], losses, torch.stack(policies))


def fit_dpo(ref_probs: torch.Tensor, preferences: Preferences, beta: float, steps: int = 1500,
            lr: float = 0.2) -> Fit:
    """Minimise the DPO loss (Eq. 7) over all policies on K responses, starting from ``π = π_ref``.

    The policy is ``softmax(θ)`` with ``θ ∈ R^K`` free, so every distribution is reachable:
    the "sufficiently expressive model class" the paper's Theorem 1 assumes. Full-batch Adam with a
    cosine-decayed learning rate.
    ``Fit.losses`` holds the DPO loss before each step: ``ln 2`` at step 0, where ``π = π_ref``.
    """
    start = torch.log(_vec(ref_probs))
    # Summing over N pairs and over the K x K table of counts gives the same loss; the table is cheaper.
    counts = pair_counts(preferences, len(start))
    return _optimise(start, lambda th: dpo_loss_on_counts(th, ref_probs, counts, beta), steps, lr)


def maximize_kl_objective(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float, steps: int = 1500,
                          lr: float = 0.2) -> Fit:
    """Gradient ascent on Eq. 3 over ``π = softmax(θ)``, starting from ``π = π_ref``.

    What RLHF does with a known reward (exactly, without sampling). ``Fit.losses`` holds
    ``J(π)`` before each step, which rises towards ``β log Z`` (the value of Eq. 3 at π*).
    """
    start = torch.log(_vec(ref_probs))
    fit = _optimise(start, lambda th: -kl_objective(torch.softmax(th, dim=-1), ref_probs, rewards, beta), steps, lr)
    return fit._replace(losses=[-v for v in fit.losses])


def perturbed_policies(policy: torch.Tensor, num: int = 1000, scale: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``num`` random policies near ``policy``: ``softmax(log π + scale · N(0, I))``, shape ``(num, K)``."""
    gen = torch.Generator().manual_seed(seed)
    policy = _vec(policy)
    noise = scale * torch.randn(num, policy.shape[-1], generator=gen, dtype=DTYPE)
    return torch.softmax(torch.log(policy) + noise, dim=-1)
