"""The DPO objective family as one pure function, in the style of the DPO reference code.

All inputs are summed log-probabilities of the answer tokens, one value per pair, shape [B].
Notation: for answer y, the log-ratio is log pi(y|x) - log ref(y|x); h is the chosen log-ratio
minus the rejected log-ratio.

Conventions follow TRL 1.16 (``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss``) for
every type TRL has: sigmoid, ipo, hinge, robust, sigmoid_norm. Where we differ from TRL:

* label_smoothing on "sigmoid" / "sigmoid_norm": TRL 1.16 ignores label_smoothing for these
  two types (it only reads it for robust, exo_pair and aot). We apply the "conservative DPO"
  smoothing -(1-eps) log s(z) - eps log s(-z), as the original DPO repository and older TRL did.
  With eps = 0 (the default) the numbers are identical to TRL's.
* "simpo" is not in TRL's DPOTrainer; it matches TRL's CPOTrainer (experimental) with
  loss_type="simpo", cpo_alpha=0: -(1-eps) log s(beta*d - gamma) - eps log s(-(beta*d - gamma)),
  with d the difference of length-averaged policy log-probs.
* Lengths are clamped to >= 1 before dividing, as TRL does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpoflow.config import LOSS_TYPES

_NEEDS_LENGTHS = ("ipo", "sigmoid_norm", "simpo")


def preference_loss(
    policy_chosen_logps: Tensor,  # [B]
    policy_rejected_logps: Tensor,  # [B]
    reference_chosen_logps: Tensor | None,  # [B]; unused (may be None) for "simpo"
    reference_rejected_logps: Tensor | None,  # [B]; unused (may be None) for "simpo"
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,  # [B] number of answer tokens
    rejected_lengths: Tensor | None = None,  # [B] number of answer tokens
    simpo_gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards.

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards are detached.
    Reduce the losses yourself (TRL takes the mean).
    """
    _check_arguments(loss_type, label_smoothing, chosen_lengths, rejected_lengths)
    eps = label_smoothing

    if loss_type == "simpo":
        # Reference-free: the "reward" is the length-averaged policy log-prob.
        chosen_avg = policy_chosen_logps / _lengths(chosen_lengths)  # [B]
        rejected_avg = policy_rejected_logps / _lengths(rejected_lengths)  # [B]
        losses = _smoothed_sigmoid_loss(beta * (chosen_avg - rejected_avg) - simpo_gamma, eps)
        return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()

    if reference_chosen_logps is None or reference_rejected_logps is None:
        raise ValueError(f"loss_type {loss_type!r} needs the reference model's log-probs.")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # [B]
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # [B]
    h = chosen_logratios - rejected_logratios  # [B]

    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * h, eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        # Chowdhury et al. 2024: unbiased under label flips with probability eps.
        clean, flipped = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)  # [B], [B]
        losses = (-(1 - eps) * clean + eps * flipped) / (1 - 2 * eps)
    else:  # "ipo" and "sigmoid_norm" use per-token (length-averaged) log-ratios, as TRL does.
        h_norm = chosen_logratios / _lengths(chosen_lengths) - rejected_logratios / _lengths(
            rejected_lengths
        )  # [B]
        if loss_type == "ipo":
            # IPO eq. 17, beta plays the role of tau.
            losses = (h_norm - 1 / (2 * beta)) ** 2
        else:  # "sigmoid_norm"
            losses = _smoothed_sigmoid_loss(beta * h_norm, eps)

    chosen_rewards = beta * chosen_logratios.detach()  # [B]
    rejected_rewards = beta * rejected_logratios.detach()  # [B]
    return losses, chosen_rewards, rejected_rewards


def _smoothed_sigmoid_loss(z: Tensor, eps: float) -> Tensor:
    """-(1-eps) log s(z) - eps log s(-z): the "conservative DPO" loss; plain -log s(z) at eps=0."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)  # same shape as z


def _lengths(lengths: Tensor | None) -> Tensor:
    assert lengths is not None  # checked in _check_arguments
    return lengths.clamp(min=1)  # [B]


def _check_arguments(
    loss_type: str,
    label_smoothing: float,
    chosen_lengths: Tensor | None,
    rejected_lengths: Tensor | None,
) -> None:
    if loss_type not in LOSS_TYPES:
        expected = ", ".join(LOSS_TYPES)
        raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {expected}.")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}.")
    if loss_type in _NEEDS_LENGTHS and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"loss_type {loss_type!r} normalises by answer length: "
            "pass chosen_lengths and rejected_lengths (number of answer tokens per pair)."
        )
