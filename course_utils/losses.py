"""Preference losses in plain PyTorch: DPO and its variants, on summed sequence log-probs.

Lesson 2 writes the DPO loss out in full to teach it; later lessons import it from here.
Every function works on *sequence* log-probabilities, one number per completion:

    log π(y | x) = Σ_t log π(y_t | x, y_<t)      (summed over completion tokens only)

which :func:`sequence_logps` computes from a model's logits. Notation, as in the papers:

* ``π`` is the policy being trained, ``π_ref`` the frozen reference (the SFT model).
* ``y_w`` / ``y_l`` are the chosen ("winner") and rejected ("loser") completions.
* ``Δ = [log π(y_w) - log π_ref(y_w)] - [log π(y_l) - log π_ref(y_l)]``, the margin of log-ratios.

The variants follow TRL 1.16's ``DPOTrainer._compute_loss`` (``trl/trainer/dpo_trainer.py``)
so that ``tests/test_losses.py`` can check them against a real trainer, with one deliberate
difference: TRL's ``"sigmoid"`` ignores ``label_smoothing``; here it gives conservative DPO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_TYPES",
    "completion_lengths",
    "dpo_gradient_weight",
    "implicit_reward",
    "preference_loss",
    "sequence_logps",
    "simpo_loss",
]

# Loss types of :func:`preference_loss`; the names are TRL's ``DPOConfig.loss_type`` values.
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
# Loss types that read ``label_smoothing``; the others reject a non-zero value rather than ignore it.
_SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")


# ---------------------------------------------------------------------------------------------
# From logits to sequence log-probs
# ---------------------------------------------------------------------------------------------


def token_logps(logits: torch.Tensor, labels: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of each completion token, 0 elsewhere: the terms :func:`sequence_logps` sums.

    Position ``t`` of the logits predicts token ``t + 1``, so the logits drop their last
    position and the labels and mask their first (the standard one-position shift).

    Args:
        logits: ``(B, T, V)`` model output for ``input_ids``.
        labels: ``(B, T)`` token ids, usually ``input_ids`` itself. Masked positions may hold
            any value, ``-100`` included.
        completion_mask: ``(B, T)``, 1 where the token at that position belongs to the
            completion (TRL's ``completion_mask``; or ``labels != -100``), 0 for prompt and padding.

    Returns:
        ``(B, T-1)`` float32 tensor: ``mask[t] · log softmax(logits[t-1])[labels[t]]`` at column ``t-1``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or completion_mask.shape != labels.shape:
        raise ValueError(
            f"Expected logits (B, T, V) with labels and completion_mask (B, T); got logits "
            f"{tuple(logits.shape)}, labels {tuple(labels.shape)}, completion_mask {tuple(completion_mask.shape)}."
        )
    logits = logits[:, :-1]  # (B, T-1, V): predictions for tokens 1..T-1
    mask = completion_mask[:, 1:].bool()  # (B, T-1)
    # -100 (or any masked id) would break gather; those positions are zeroed by the mask anyway.
    targets = labels[:, 1:].masked_fill(~mask, 0)  # (B, T-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()  # (B, T-1)
    # log softmax(z)[y] = z_y - logsumexp(z). One row at a time in float32: the peak extra memory
    # is one (T, V) slice, never a full (B, T, V) log_softmax copy, and bf16 logits stay accurate.
    normalizer = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # (B, T-1)
    return (picked - normalizer) * mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each sequence's completion tokens, ``log π(y|x)``: (B, T, V) logits -> (B,).

    Arguments as in :func:`token_logps`; returns ``Σ_t mask[t] · log softmax(logits[t-1])[labels[t]]``, float32.
    """
    return token_logps(logits, labels, completion_mask).sum(dim=-1)


def completion_lengths(completion_mask: torch.Tensor) -> torch.Tensor:
    """Number of completion tokens that :func:`sequence_logps` scores, ``(B, T) -> (B,)``.

    The first position is never scored (nothing predicts it), so this is ``mask[:, 1:].sum(-1)``.
    """
    return completion_mask[:, 1:].sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Rewards and the DPO gradient
# ---------------------------------------------------------------------------------------------


def implicit_reward(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The reward DPO's policy implicitly defines: ``r̂(x, y) = β (log π(y|x) - log π_ref(y|x))``.

    Eq. 5 of Rafailov et al. (2023) without the ``β log Z(x)`` term, which cancels in every
    pairwise comparison (Section 5: "your language model is secretly a reward model").

    Args:
        policy_logps, reference_logps: ``(B,)`` summed sequence log-probs.
        beta: the KL coefficient β.

    Returns:
        ``(B,)``, with gradients (detach it for logging; :func:`preference_loss` does).
    """
    _check_same_shape(policy_logps=policy_logps, reference_logps=reference_logps)
    return beta * (policy_logps - reference_logps)


def dpo_gradient_weight(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """How hard DPO pushes on each pair: ``σ(r̂_l - r̂_w)``, shape ``(B,) -> (B,)``.

    From the DPO gradient (Section 4 of Rafailov et al., 2023):
    ``∇L = -β E[σ(r̂(x,y_l) - r̂(x,y_w)) (∇log π(y_w|x) - ∇log π(y_l|x))]``.
    The weight is near 1 for pairs the implicit reward ranks wrongly and near 0 for pairs it
    already ranks right, which is what keeps DPO from degenerating like unlikelihood training.
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return torch.sigmoid(rejected_rewards - chosen_rewards)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss of DPO and its variants, against a frozen reference.

    With ``Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))``:

    * ``"sigmoid"`` - DPO, Eq. 7 of Rafailov et al. (2023): ``-log σ(βΔ)``. With
      ``label_smoothing = ε > 0`` it is conservative DPO (cDPO, Mitchell 2023), which assumes
      each label is flipped with probability ε: ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)``.
      TRL 1.16's ``"sigmoid"`` ignores ``label_smoothing`` silently; the two agree only at ε = 0.
    * ``"ipo"`` - IPO, Eq. 17 of Azar et al. (2023), β playing τ: ``(Δ' - 1/(2β))²``.
      Given ``chosen_lengths`` and ``rejected_lengths``, each log-ratio is divided by its
      completion's token count first, as TRL does (``Δ' = Δ_w/|y_w| - Δ_l/|y_l|``; TRL says the
      IPO authors confirmed their results use this form). Without lengths, ``Δ' = Δ``, the summed
      form of the paper's equation, whose scale grows with completion length.
    * ``"hinge"`` - SLiC's hinge (Zhao et al., 2023) on the log-ratio margin: ``relu(1 - βΔ)``,
      i.e. zero loss once ``Δ ≥ 1/β``.
    * ``"robust"`` - Robust DPO (Chowdhury et al., 2024), an unbiased loss for labels flipped
      with probability ε = ``label_smoothing`` ∈ [0, 0.5):
      ``[-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1 - 2ε)``, exactly as TRL 1.16 computes it.
      Note the ``+``: unlike cDPO it *subtracts* the flipped-label term; at ε = 0 both are DPO.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` summed completion log-probs under π
            (see :func:`sequence_logps`); these carry the gradient.
        reference_chosen_logps, reference_rejected_logps: ``(B,)``, the same under π_ref.
        beta: β > 0, the strength of the KL anchor to π_ref (τ in the IPO paper).
        loss_type: one of :data:`LOSS_TYPES`.
        label_smoothing: ε; read by ``"sigmoid"`` (cDPO, ε ∈ [0, 0.5]) and ``"robust"``
            (ε ∈ [0, 0.5)). Must be 0 for ``"ipo"`` and ``"hinge"``.
        chosen_lengths, rejected_lengths: ``(B,)`` completion token counts (see
            :func:`completion_lengths`), ``"ipo"`` only; both or neither. Clamped to ≥ 1 like TRL.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``. Average ``losses`` for the
        batch loss. The rewards are ``β (log π - log π_ref)`` (:func:`implicit_reward`, never
        length-normalised), detached, for logging, as in TRL.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; valid types are {', '.join(map(repr, LOSS_TYPES))}.")
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    _check_beta(beta)
    _check_label_smoothing(loss_type, label_smoothing)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("Pass both chosen_lengths and rejected_lengths, or neither.")
    if chosen_lengths is not None and loss_type != "ipo":
        raise ValueError(f"chosen_lengths/rejected_lengths are only used by loss_type='ipo', not {loss_type!r}.")
    if chosen_lengths is not None:
        _check_same_shape(
            policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths
        )

    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # βΔ, (B,)
    eps = label_smoothing

    if loss_type == "sigmoid":
        # logsigmoid rather than log(sigmoid(.)): stable for large |βΔ|.
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        if chosen_lengths is not None:
            # Per-token log-ratios, so β means the same thing for short and long completions.
            chosen_logratios = chosen_logratios / chosen_lengths.clamp(min=1)
            rejected_logratios = rejected_logratios / rejected_lengths.clamp(min=1)
        # IPO regresses the margin onto 1/(2β) instead of pushing it to infinity.
        losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    else:  # "robust"
        # Debiases the DPO loss for a known flip rate; the 1/(1-2ε) keeps it unbiased in expectation.
        losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)

    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al., 2024, Eq. 6): reference-free and length-normalised.

    ``-log σ(β/|y_w| · log π(y_w) - β/|y_l| · log π(y_l) - γ)`` with ``γ = gamma_beta_ratio · β``.
    The reward is the *average* token log-prob, so no reference model is needed and longer
    completions gain nothing from length alone; γ is a target margin between the two rewards.
    (TRL's ``CPOTrainer(loss_type="simpo")`` takes γ itself as ``simpo_gamma``.)

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` *summed* completion log-probs.
        chosen_lengths, rejected_lengths: ``(B,)`` completion token counts (clamped to ≥ 1).
        beta: β > 0; an order of magnitude above DPO's, because the rewards are per-token averages.
        gamma_beta_ratio: γ/β, tuned per setup (0.5 is the default of the SimPO reference code).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; rewards are
        ``β · logp / length``, detached.
    """
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    _check_beta(beta)
    chosen_avg = policy_chosen_logps / chosen_lengths.clamp(min=1)  # (B,) mean token log-prob
    rejected_avg = policy_rejected_logps / rejected_lengths.clamp(min=1)
    gamma = gamma_beta_ratio * beta
    losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


# ---------------------------------------------------------------------------------------------
# Input checks: fail early with a message a learner can act on
# ---------------------------------------------------------------------------------------------


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"Shapes must match; got {listed}.")
    shape = next(iter(shapes.values()))
    # The usual slip is passing per-token (B, T) log-probs; catch it instead of returning (B, T) losses.
    if len(shape) != 1:
        raise ValueError(
            f"Expected 1-D (batch,) tensors, got shape {shape}. Sum per-token log-probs over the completion "
            "first (see sequence_logps)."
        )


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}.")


def _check_label_smoothing(loss_type: str, eps: float) -> None:
    if loss_type not in _SMOOTHED_LOSS_TYPES:
        if eps != 0:
            raise ValueError(
                f"label_smoothing is only used by loss_type 'sigmoid' (cDPO) and 'robust'; "
                f"got label_smoothing={eps} with loss_type={loss_type!r}."
            )
    elif loss_type == "sigmoid" and not 0 <= eps <= 0.5:
        raise ValueError(
            f"label_smoothing for 'sigmoid' (cDPO) is the probability a label is flipped and must lie in "
            f"[0, 0.5]; got {eps}."
        )
    elif loss_type == "robust" and not 0 <= eps < 0.5:
        raise ValueError(
            f"label_smoothing for 'robust' is the label-flip probability and must lie in [0, 0.5) "
            f"(the loss divides by 1 - 2ε); got {eps}."
        )
