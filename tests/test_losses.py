"""Tests for ``course_utils.losses``: hand-computed values, DPO's invariants, and parity with TRL.

The parity tests build real TRL 1.16 trainers on the tiny random Llama and recompute their loss
with ``sequence_logps`` + ``preference_loss`` from plain ``model(...).logits``. They use the
untouched fixture models for that, never the trainer's copies, because TRL patches a fused LM
head into ``forward``; our numbers must not depend on it.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from course_utils.losses import (
    LOSS_TYPES,
    completion_lengths,
    dpo_gradient_weight,
    implicit_reward,
    preference_loss,
    sequence_logps,
    simpo_loss,
)

LN2 = math.log(2)

# TRL 1.16 and transformers 5 still read the deprecated `gradient_checkpointing` name internally;
# the FutureWarning is theirs, not ours, and says nothing about the losses.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")


def softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x), the scalar form of each loss row below."""
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------
# A three-pair batch with round numbers, β = 0.5
# ---------------------------------------------------------------------------------------------

BETA = 0.5
# Row 0: chosen ratio +1, rejected ratio -1 -> Δ = 2, βΔ = 1 (policy already prefers y_w)
# Row 1: everything equal                   -> Δ = 0, βΔ = 0 (step 0)
# Row 2: chosen ratio -2, rejected ratio +2 -> Δ = -4, βΔ = -2 (policy prefers y_l)
POLICY_CHOSEN = [-10.0, -9.0, -14.0]
POLICY_REJECTED = [-12.0, -9.0, -10.0]
REF_CHOSEN = [-11.0, -9.0, -12.0]
REF_REJECTED = [-11.0, -9.0, -12.0]
CHOSEN_REWARDS = [0.5, 0.0, -1.0]  # β · (chosen ratio)
REJECTED_REWARDS = [-0.5, 0.0, 1.0]  # β · (rejected ratio)
# Token counts for IPO's length normalisation
CHOSEN_LENGTHS = [2, 4, 1]
REJECTED_LENGTHS = [1, 2, 4]


def batch(requires_grad: bool = False):
    policy_chosen = torch.tensor(POLICY_CHOSEN, requires_grad=requires_grad)
    return policy_chosen, torch.tensor(POLICY_REJECTED), torch.tensor(REF_CHOSEN), torch.tensor(REF_REJECTED)


HAND_COMPUTED = {
    "sigmoid": (
        {},
        [
            softplus(-1),  # row 0: -log σ(1)
            LN2,  # row 1: -log σ(0)
            softplus(2),  # row 2: -log σ(-2)
        ],
    ),
    "sigmoid-cdpo": (
        {"loss_type": "sigmoid", "label_smoothing": 0.2},
        [
            0.8 * softplus(-1) + 0.2 * softplus(1),  # row 0: -(0.8) log σ(1) - 0.2 log σ(-1)
            LN2,  # row 1: both terms are ln 2, weights sum to 1
            0.8 * softplus(2) + 0.2 * softplus(-2),  # row 2: -(0.8) log σ(-2) - 0.2 log σ(2)
        ],
    ),
    "ipo-summed": (
        {"loss_type": "ipo"},
        [
            (2 - 1) ** 2,  # row 0: (Δ - 1/(2β))² = (2 - 1)²
            (0 - 1) ** 2,  # row 1: (0 - 1)²
            (-4 - 1) ** 2,  # row 2: (-4 - 1)²
        ],
    ),
    "ipo-per-token": (
        {
            "loss_type": "ipo",
            "chosen_lengths": torch.tensor(CHOSEN_LENGTHS),
            "rejected_lengths": torch.tensor(REJECTED_LENGTHS),
        },
        [
            (1 / 2 - (-1) / 1 - 1) ** 2,  # row 0: Δ' = 1/2 + 1 = 1.5 -> 0.5² = 0.25
            (0 / 4 - 0 / 2 - 1) ** 2,  # row 1: Δ' = 0 -> 1
            (-2 / 1 - 2 / 4 - 1) ** 2,  # row 2: Δ' = -2 - 0.5 = -2.5 -> 3.5² = 12.25
        ],
    ),
    "hinge": (
        {"loss_type": "hinge"},
        [
            0.0,  # row 0: relu(1 - 1), the margin is exactly met
            1.0,  # row 1: relu(1 - 0)
            3.0,  # row 2: relu(1 + 2)
        ],
    ),
    "robust": (
        {"loss_type": "robust", "label_smoothing": 0.2},
        [
            (0.8 * softplus(-1) - 0.2 * softplus(1)) / 0.6,  # row 0: [-(0.8) log σ(1) + 0.2 log σ(-1)] / (1 - 0.4)
            LN2,  # row 1: (0.8 - 0.2) ln 2 / 0.6
            (0.8 * softplus(2) - 0.2 * softplus(-2)) / 0.6,  # row 2
        ],
    ),
}


@pytest.mark.parametrize("case", HAND_COMPUTED)
def test_preference_loss_hand_computed(case):
    kwargs, expected = HAND_COMPUTED[case]
    losses, chosen_rewards, rejected_rewards = preference_loss(*batch(), beta=BETA, **kwargs)
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float32))
    # Rewards are the same for every variant: unnormalised β-scaled log-ratios
    torch.testing.assert_close(chosen_rewards, torch.tensor(CHOSEN_REWARDS))
    torch.testing.assert_close(rejected_rewards, torch.tensor(REJECTED_REWARDS))


def test_every_loss_type_has_a_hand_computed_case():
    covered = {kwargs.get("loss_type", "sigmoid") for kwargs, _ in HAND_COMPUTED.values()}
    assert covered == set(LOSS_TYPES)


def test_simpo_hand_computed():
    # β = 2, γ/β = 0.5 -> γ = 1
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        torch.tensor([-4.0, -6.0]),  # chosen: means -4/2 = -2 and -6/3 = -2
        torch.tensor([-9.0, -4.0]),  # rejected: means -9/3 = -3 and -4/1 = -4
        chosen_lengths=torch.tensor([2, 3]),
        rejected_lengths=torch.tensor([3, 1]),
        beta=2.0,
        gamma_beta_ratio=0.5,
    )
    expected = [
        softplus(-1),  # row 0: -log σ(2·(-2 + 3) - 1) = -log σ(1)
        softplus(-3),  # row 1: -log σ(2·(-2 + 4) - 1) = -log σ(3)
    ]
    torch.testing.assert_close(losses, torch.tensor(expected))
    torch.testing.assert_close(chosen_rewards, torch.tensor([-4.0, -4.0]))  # β · mean log-prob
    torch.testing.assert_close(rejected_rewards, torch.tensor([-6.0, -8.0]))


def test_implicit_reward_and_gradient_weight():
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = batch()
    chosen = implicit_reward(policy_chosen, ref_chosen, BETA)
    rejected = implicit_reward(policy_rejected, ref_rejected, BETA)
    torch.testing.assert_close(chosen, torch.tensor(CHOSEN_REWARDS))
    weights = dpo_gradient_weight(chosen, rejected)
    expected = [
        1 / (1 + math.e),  # row 0: σ(-0.5 - 0.5) = σ(-1), ranked right -> small push
        0.5,  # row 1: σ(0)
        1 / (1 + math.exp(-2)),  # row 2: σ(1 + 1) = σ(2), ranked wrong -> strong push
    ]
    torch.testing.assert_close(weights, torch.tensor(expected))


# ---------------------------------------------------------------------------------------------
# DPO's invariants
# ---------------------------------------------------------------------------------------------

# Loss of each variant when policy == reference (Δ = 0), ε = 0.1 where the variant reads it
STEP0 = {
    "sigmoid": ({}, LN2),
    "ipo": ({}, 1 / (2 * BETA) ** 2),  # (0 - 1/(2β))²
    "hinge": ({}, 1.0),  # relu(1 - 0)
    "robust": ({"label_smoothing": 0.1}, LN2),  # (0.9 - 0.1) ln 2 / 0.8
}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_step0_policy_equals_reference(loss_type):
    kwargs, expected = STEP0[loss_type]
    logps_chosen, logps_rejected = -20 * torch.rand(5), -20 * torch.rand(5)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        logps_chosen, logps_rejected, logps_chosen.clone(), logps_rejected.clone(),
        beta=BETA, loss_type=loss_type, **kwargs,
    )  # fmt: skip
    # x - x is exactly 0 in floating point, so these hold exactly, not approximately
    assert torch.equal(chosen_rewards, torch.zeros(5))
    assert torch.equal(rejected_rewards, torch.zeros(5))
    torch.testing.assert_close(losses, torch.full((5,), expected), rtol=0, atol=1e-7)


def test_sigmoid_gradient_is_beta_times_weight():
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = batch(requires_grad=True)
    policy_rejected.requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=BETA
    )
    losses.mean().backward()
    # Section 4 of the DPO paper: ∂L/∂log π(y_w) = -β σ(r̂_l - r̂_w), and the opposite for y_l;
    # the batch mean divides each by B.
    weight = dpo_gradient_weight(chosen_rewards, rejected_rewards)
    n = len(POLICY_CHOSEN)
    torch.testing.assert_close(policy_chosen.grad, -BETA * weight / n)
    torch.testing.assert_close(policy_rejected.grad, BETA * weight / n)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad  # detached for logging


def test_cdpo_differs_from_robust():
    # Same ε, opposite sign on the flipped-label term: a regression guard against mixing them up
    cdpo, _, _ = preference_loss(*batch(), beta=BETA, loss_type="sigmoid", label_smoothing=0.2)
    robust, _, _ = preference_loss(*batch(), beta=BETA, loss_type="robust", label_smoothing=0.2)
    assert not torch.allclose(cdpo[[0, 2]], robust[[0, 2]])


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "kto"}, r"Unknown loss_type 'kto'; valid types are 'sigmoid', 'ipo', 'hinge', 'robust'"),
        ({"beta": 0.0}, "beta must be positive"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, r"\[0, 0.5\)"),
        ({"loss_type": "sigmoid", "label_smoothing": 0.6}, r"\[0, 0.5\]"),
        ({"loss_type": "sigmoid", "label_smoothing": -0.1}, r"\[0, 0.5\]"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "only used by loss_type 'sigmoid'"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "only used by loss_type 'sigmoid'"),
        ({"loss_type": "ipo", "chosen_lengths": torch.ones(3)}, "both chosen_lengths and rejected_lengths"),
        (
            {"loss_type": "sigmoid", "chosen_lengths": torch.ones(3), "rejected_lengths": torch.ones(3)},
            "only used by loss_type='ipo'",
        ),
        (
            {"loss_type": "ipo", "chosen_lengths": torch.ones(2), "rejected_lengths": torch.ones(3)},
            r"chosen_lengths \(2,\)",
        ),
    ],
)
def test_preference_loss_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preference_loss(*batch(), **kwargs)


def test_shape_errors_name_the_shapes():
    good = torch.zeros(3)
    with pytest.raises(ValueError, match=r"reference_rejected_logps \(4,\)"):
        preference_loss(good, good, good, torch.zeros(4))
    per_token = torch.zeros(3, 7)  # forgot to sum over tokens
    with pytest.raises(ValueError, match=r"Expected 1-D \(batch,\).*\(3, 7\)"):
        preference_loss(per_token, per_token, per_token, per_token)
    with pytest.raises(ValueError, match=r"rejected_lengths \(2,\)"):
        simpo_loss(good, good, torch.ones(3), torch.ones(2))


# ---------------------------------------------------------------------------------------------
# sequence_logps
# ---------------------------------------------------------------------------------------------


def test_sequence_logps_hand_computed():
    ln3 = math.log(3)
    logits = torch.tensor(
        [
            [[ln3, 0.0], [0.0, 0.0], [9.0, 9.0]],  # softmax rows: (3/4, 1/4), (1/2, 1/2), unused
            [[0.0, 0.0], [5.0, -5.0], [1.0, 2.0]],  # (1/2, 1/2), then masked out
        ]
    )  # (B=2, T=3, V=2)
    labels = torch.tensor(
        [
            [7, 0, 1],  # token 0 is prompt (never scored); token 1 = id 0 under row 0, token 2 = id 1 under row 1
            [7, 1, -100],  # token 1 = id 1 under (1/2, 1/2); token 2 is padding with TRL's -100
        ]
    )
    mask = torch.tensor(
        [
            [0, 1, 1],  # two completion tokens
            [0, 1, 0],  # one completion token, then padding
        ]
    )
    expected = [
        math.log(3 / 4) + math.log(1 / 2),  # row 0
        math.log(1 / 2),  # row 1
    ]
    torch.testing.assert_close(sequence_logps(logits, labels, mask), torch.tensor(expected))
    assert completion_lengths(mask).tolist() == [2, 1]


def test_sequence_logps_matches_naive_log_softmax():
    torch.manual_seed(0)
    logits = 3 * torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0]])
    naive = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(sequence_logps(logits, labels, mask), (naive * mask[:, 1:]).sum(-1))
    # bf16 logits are upcast row by row, so the result stays close to the float32 one
    torch.testing.assert_close(
        sequence_logps(logits.bfloat16(), labels, mask), sequence_logps(logits.bfloat16().float(), labels, mask)
    )


# ---------------------------------------------------------------------------------------------
# Parity with TRL 1.16 on a real trainer
# ---------------------------------------------------------------------------------------------

PAIRS = {
    "prompt": ["The sky is", "I like", "Two plus two is", "The cat"],
    "chosen": [" blue.", " apples a lot.", " four.", " sat on the mat."],
    "rejected": [" green.", " nothing.", " five, probably.", " barked."],
}


@pytest.fixture(scope="module")
def tiny_models():
    """Policy and a *different* reference (another seed), plus the tokenizer; loaded once.

    Tests hand deep copies to trainers and keep these originals unpatched for our own forward.
    """
    from course_utils.models import load_model

    policy, tokenizer = load_model("tiny")
    reference, _ = load_model("tiny", seed=1)
    return policy.eval(), reference.eval(), tokenizer


@pytest.fixture(scope="module")
def pairs():
    from datasets import Dataset

    return Dataset.from_dict(PAIRS)


def dpo_trainer(tmp_path, tiny_models, pairs, reference=None, **config):
    from trl import DPOConfig, DPOTrainer

    policy, ref, tokenizer = tiny_models
    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        bf16=False,  # float32 end to end, so 1e-5 parity is meaningful
        max_length=64,
        per_device_train_batch_size=2,
        activation_checkpointing=False,  # transformers 5's name for gradient_checkpointing (TRL defaults it on)
        use_cpu=True,
        **config,
    )
    # Copies, because TRL patches `forward` of both models with its fused LM head.
    return DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref if reference is None else reference),
        args=args,
        train_dataset=pairs,
        processing_class=tokenizer,
    )


@torch.no_grad()
def our_logps(model, batch):
    """Summed completion log-probs from plain logits, split TRL's way: [chosen; rejected] on dim 0."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    logps = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])  # (2B,)
    return logps.chunk(2)


# One trainer per variant, built by parametrize rather than by mutating `trainer.loss_types` on a
# shared trainer: building one on the tiny model costs well under a second, and a fresh trainer
# tests the config path (DPOConfig.loss_type -> trainer) that the lessons use.
TRL_CASES = {
    "sigmoid": dict(loss_type="sigmoid", beta=0.1),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "hinge": dict(loss_type="hinge", beta=0.1),
    "robust": dict(loss_type="robust", beta=0.1, label_smoothing=0.1),
}


@pytest.mark.parametrize("case", TRL_CASES)
def test_parity_with_trl_dpo_trainer(case, tmp_path, tiny_models, pairs):
    params = TRL_CASES[case]
    trainer = dpo_trainer(
        tmp_path, tiny_models, pairs,
        loss_type=[params["loss_type"]], beta=params["beta"], label_smoothing=params.get("label_smoothing", 0.0),
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    # Layout check: rows are [chosen pairs; rejected pairs] sharing prompts, as _compute_loss assumes.
    chosen_ids, rejected_ids = batch["input_ids"].chunk(2)
    chosen_mask, rejected_mask = batch["completion_mask"].chunk(2)
    for i in range(2):
        prompt_len = int(chosen_mask[i].argmax())
        assert torch.equal(chosen_ids[i, :prompt_len], rejected_ids[i, :prompt_len])

    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)

    policy, reference, _ = tiny_models
    policy_chosen, policy_rejected = our_logps(policy, batch)
    ref_chosen, ref_rejected = our_logps(reference, batch)
    lengths = {}
    if params["loss_type"] == "ipo":
        # TRL counts `completion_mask` unshifted; equal to the scored count while position 0 is prompt.
        lengths = dict(chosen_lengths=completion_lengths(chosen_mask), rejected_lengths=completion_lengths(rejected_mask))
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, **params, **lengths
    )
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=0, atol=1e-5)

    # TRL logs the batch means of the same rewards and policy log-probs
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    assert metrics["rewards/chosen"][-1] == pytest.approx(chosen_rewards.mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"][-1] == pytest.approx(rejected_rewards.mean().item(), abs=1e-5)
    assert metrics["logps/chosen"][-1] == pytest.approx(policy_chosen.mean().item(), abs=1e-4)
    assert metrics["logps/rejected"][-1] == pytest.approx(policy_rejected.mean().item(), abs=1e-4)
    # Two different random models: the rewards are not trivially zero
    assert chosen_rewards.abs().min() > 1e-3


def test_trl_sigmoid_ignores_label_smoothing(tmp_path, tiny_models, pairs):
    """TRL 1.16's "sigmoid" reads no label_smoothing: it matches our ε = 0 loss, not cDPO.

    If this starts failing, TRL has added cDPO to "sigmoid"; update the docstring of preference_loss.
    """
    trainer = dpo_trainer(tmp_path, tiny_models, pairs, loss_type=["sigmoid"], beta=1.0, label_smoothing=0.3)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    policy, reference, _ = tiny_models
    logps = (*our_logps(policy, batch), *our_logps(reference, batch))
    dpo, _, _ = preference_loss(*logps, beta=1.0)
    cdpo, _, _ = preference_loss(*logps, beta=1.0, label_smoothing=0.3)
    torch.testing.assert_close(dpo.mean(), trl_loss, rtol=0, atol=1e-5)
    assert abs(cdpo.mean().item() - trl_loss.item()) > 1e-3


def test_trl_step0_loss_is_ln2(tmp_path, tiny_models, pairs):
    """The check lesson 2 runs in the open: reference = a copy of the policy -> loss ln 2, rewards 0."""
    policy, _, _ = tiny_models
    trainer = dpo_trainer(tmp_path, tiny_models, pairs, reference=policy, loss_type=["sigmoid"], beta=0.1)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    assert trl_loss.item() == pytest.approx(LN2, abs=1e-6)
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    assert metrics["rewards/chosen"][-1] == 0.0 and metrics["rewards/margins"][-1] == 0.0


def test_simpo_parity_with_trl_cpo_trainer(tmp_path, tiny_models, pairs):
    """SimPO lives in TRL 1.16 as the experimental CPOTrainer(loss_type="simpo")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TRLExperimentalWarning on import
            from trl.experimental.cpo import CPOConfig, CPOTrainer
    except ImportError:
        pytest.skip("this TRL has no trl.experimental.cpo")

    policy, _, tokenizer = tiny_models
    beta, gamma_beta_ratio = 2.0, 0.5
    args = CPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        bf16=False,
        max_length=64,
        per_device_train_batch_size=2,
        use_cpu=True,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma_beta_ratio * beta,  # TRL takes γ itself, we take γ/β
        cpo_alpha=0.0,  # CPO's extra NLL term off: pure SimPO
    )
    trainer = CPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=pairs, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)

        # CPO's collator keeps chosen and rejected apart, with -100 labels outside the completion
        def logps_and_lengths(side):
            labels = batch[f"{side}_labels"]
            logits = policy(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"]).logits
            mask = labels != -100
            return sequence_logps(logits, labels, mask), completion_lengths(mask)

        chosen_logps, chosen_lengths = logps_and_lengths("chosen")
        rejected_logps, rejected_lengths = logps_and_lengths("rejected")
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta=beta, gamma_beta_ratio=gamma_beta_ratio
    )
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=0, atol=1e-5)
    metrics = trainer._stored_metrics["train"]
    assert metrics["rewards/chosen"][-1] == pytest.approx(chosen_rewards.mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"][-1] == pytest.approx(rejected_rewards.mean().item(), abs=1e-5)
