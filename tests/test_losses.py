"""preference_loss: hand-computed values, agreement with TRL 1.16, label smoothing, errors."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpoflow.config import LOSS_TYPES
from dpoflow.models.losses import preference_loss
from tests.conftest import require_peer


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Two pairs. Log-ratios: chosen (-10) - (-12) = 2 and (-5) - (-4) = -1;
# rejected (-11) - (-10) = -1 and (-6) - (-6.5) = 0.5.  h = 3 and -1.5.
PI_C, PI_R = _t(-10.0, -5.0), _t(-11.0, -6.0)
REF_C, REF_R = _t(-12.0, -4.0), _t(-10.0, -6.5)
H = [3.0, -1.5]
LEN_C, LEN_R = torch.tensor([4, 2]), torch.tensor([5, 1])
BETA = 0.1


def _loss(loss_type: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return preference_loss(
        PI_C,
        PI_R,
        REF_C,
        REF_R,
        beta=BETA,
        loss_type=loss_type,
        chosen_lengths=LEN_C,
        rejected_lengths=LEN_R,
        **kwargs,
    )


def _close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, _t(*expected), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- hand-computed values


def test_sigmoid_by_hand():
    losses, chosen_rewards, rejected_rewards = _loss("sigmoid")
    _close(losses, [math.log(1 + math.exp(-BETA * h)) for h in H])
    _close(chosen_rewards, [BETA * 2.0, BETA * -1.0])
    _close(rejected_rewards, [BETA * -1.0, BETA * 0.5])


def test_sigmoid_label_smoothing_by_hand():
    eps = 0.2
    losses, _, _ = _loss("sigmoid", label_smoothing=eps)
    expected = [-(1 - eps) * _log_sigmoid(BETA * h) - eps * _log_sigmoid(-BETA * h) for h in H]
    _close(losses, expected)
    # Smoothing makes a confidently-correct pair cost more than under plain DPO.
    assert losses[0] > _loss("sigmoid")[0][0]


def test_ipo_by_hand():
    # Log-ratios divided by answer lengths: 2/4 - (-1)/5 = 0.7 and -1/2 - 0.5/1 = -1.
    losses, _, _ = _loss("ipo")
    _close(losses, [(h - 1 / (2 * BETA)) ** 2 for h in (0.7, -1.0)])


def test_hinge_by_hand():
    beta = 0.5  # beta*h = 1.5 (no loss) and -0.75
    losses, _, _ = preference_loss(PI_C, PI_R, REF_C, REF_R, beta=beta, loss_type="hinge")
    _close(losses, [0.0, 1.75])


def test_robust_by_hand():
    eps = 0.1
    losses, _, _ = _loss("robust", label_smoothing=eps)
    expected = [
        (-(1 - eps) * _log_sigmoid(BETA * h) + eps * _log_sigmoid(-BETA * h)) / (1 - 2 * eps)
        for h in H
    ]
    _close(losses, expected)
    # At eps = 0 robust DPO is plain DPO.
    _close(_loss("robust")[0], [math.log(1 + math.exp(-BETA * h)) for h in H])


def test_sigmoid_norm_by_hand():
    losses, chosen_rewards, _ = _loss("sigmoid_norm")
    _close(losses, [-_log_sigmoid(BETA * h) for h in (0.7, -1.0)])
    _close(chosen_rewards, [BETA * 2.0, BETA * -1.0])  # rewards stay un-normalised


def test_simpo_by_hand():
    gamma = 0.3
    # Average log-probs: -10/4 - (-11/5) = -0.3 and -5/2 - (-6/1) = 3.5.
    losses, chosen_rewards, rejected_rewards = _loss("simpo", simpo_gamma=gamma)
    _close(losses, [math.log(1 + math.exp(-(BETA * d - gamma))) for d in (-0.3, 3.5)])
    _close(chosen_rewards, [BETA * -2.5, BETA * -2.5])
    _close(rejected_rewards, [BETA * -2.2, BETA * -6.0])


def test_simpo_ignores_the_reference():
    with_ref = _loss("simpo")[0]
    without_ref = preference_loss(
        PI_C,
        PI_R,
        None,
        None,
        beta=BETA,
        loss_type="simpo",
        chosen_lengths=LEN_C,
        rejected_lengths=LEN_R,
    )[0]
    torch.testing.assert_close(with_ref, without_ref)


def test_rewards_are_detached_and_losses_have_gradients():
    pi_c = PI_C.clone().requires_grad_()
    losses, chosen_rewards, _ = preference_loss(pi_c, PI_R, REF_C, REF_R, beta=BETA)
    assert not chosen_rewards.requires_grad
    losses.sum().backward()
    # d/dx -log s(beta*h) = -beta * s(-beta*h)
    _close(pi_c.grad, [-BETA / (1 + math.exp(BETA * h)) for h in H])


def test_large_margins_are_finite():
    big = _t(1e4, -1e4)
    zero = torch.zeros(2, dtype=torch.float64)
    for loss_type in ("sigmoid", "robust"):
        losses, _, _ = preference_loss(
            big, zero, zero, zero, beta=1.0, loss_type=loss_type, label_smoothing=0.1
        )
        assert torch.isfinite(losses).all()


# ---------------------------------------------------------------- errors


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="Unknown loss_type 'kto'"):
        _loss("kto")


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "simpo"])
def test_missing_lengths(loss_type):
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        preference_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA, loss_type=loss_type)


def test_missing_reference():
    with pytest.raises(ValueError, match="reference"):
        preference_loss(PI_C, PI_R, None, None, beta=BETA, loss_type="sigmoid")


@pytest.mark.parametrize("eps", [-0.1, 0.5])
def test_label_smoothing_out_of_range(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        _loss("robust", label_smoothing=eps)


# ---------------------------------------------------------------- agreement with TRL 1.16


class _FixedOutputs:
    """Stands in for the policy model: returns prepared outputs whatever the inputs."""

    def __init__(self, outputs: SimpleNamespace):
        self.outputs = outputs

    def __call__(self, **_) -> SimpleNamespace:
        return self.outputs


def _trl_dpo_losses(loss_type, beta, eps, pi_c, pi_r, ref_c, ref_r, len_c, len_r):
    """Per-pair losses from TRL's own DPOTrainer._compute_loss, one pair per call.

    _compute_loss is called unbound on a stand-in with the attributes it reads; the stand-in
    model returns per-token log-probs whose sum is the given sequence log-prob, and a
    completion_mask whose row sums are the given answer lengths.
    """
    DPOTrainer = require_peer("trl.trainer.dpo_trainer").DPOTrainer

    accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
    )
    width = int(max(len_c.max(), len_r.max())) + 2
    losses = []
    for i in range(len(pi_c)):
        completion_mask = torch.zeros(2, width, dtype=torch.long)
        completion_mask[0, 1 : 1 + len_c[i]] = 1
        completion_mask[1, 1 : 1 + len_r[i]] = 1
        log_probs = torch.zeros(2, width - 1, dtype=torch.float64)
        log_probs[:, 0] = torch.stack([pi_c[i], pi_r[i]])
        outputs = SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.zeros(2, width - 1),
            mean_logits=torch.zeros(2, width - 1),
            is_top1=torch.zeros(2, width - 1, dtype=bool),
        )
        inputs = {
            "input_ids": torch.zeros(2, width, dtype=torch.long),
            "attention_mask": torch.ones(2, width, dtype=torch.long),
            "completion_mask": completion_mask,
            "ref_chosen_logps": ref_c[i : i + 1],
            "ref_rejected_logps": ref_r[i : i + 1],
        }
        loss = DPOTrainer._compute_loss(trainer, _FixedOutputs(outputs), inputs, False)
        losses.append(loss)
    return torch.stack(losses)


def _random_pairs(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(4, n, generator=g, dtype=torch.float64) * 60  # pi_c, pi_r, ref_c, ref_r
    lengths = torch.randint(1, 40, (2, n), generator=g)
    return (*logps, *lengths)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl_dpo_trainer(loss_type, beta):
    eps = 0.2 if loss_type == "robust" else 0.0  # TRL reads label_smoothing only for robust
    pi_c, pi_r, ref_c, ref_r, len_c, len_r = _random_pairs()
    expected = _trl_dpo_losses(loss_type, beta, eps, pi_c, pi_r, ref_c, ref_r, len_c, len_r)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        pi_c,
        pi_r,
        ref_c,
        ref_r,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        chosen_lengths=len_c,
        rejected_lengths=len_r,
    )
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-6)
    # TRL's logged rewards: beta * log-ratio.
    torch.testing.assert_close(chosen_rewards, beta * (pi_c - ref_c), rtol=0, atol=1e-6)
    torch.testing.assert_close(rejected_rewards, beta * (pi_r - ref_r), rtol=0, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(eps):
    """TRL's CPOTrainer (experimental) has SimPO; it takes length-averaged log-probs."""
    cpo = require_peer("trl.experimental.cpo.cpo_trainer")
    pi_c, pi_r, _, _, len_c, len_r = _random_pairs(seed=1)
    trainer = SimpleNamespace(
        alpha=0.0,
        beta=2.0,
        simpo_gamma=0.5,
        label_smoothing=eps,
        loss_type="simpo",
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    expected = cpo.CPOTrainer.cpo_loss(trainer, pi_c / len_c, pi_r / len_r)
    actual = preference_loss(
        pi_c,
        pi_r,
        None,
        None,
        beta=2.0,
        loss_type="simpo",
        label_smoothing=eps,
        chosen_lengths=len_c,
        rejected_lengths=len_r,
        simpo_gamma=0.5,
    )
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)


def test_loss_types_are_all_covered():
    pi_c, pi_r, ref_c, ref_r, len_c, len_r = _random_pairs(n=3)
    for loss_type in LOSS_TYPES:
        losses, _, _ = preference_loss(
            pi_c,
            pi_r,
            ref_c,
            ref_r,
            beta=0.1,
            loss_type=loss_type,
            chosen_lengths=len_c,
            rejected_lengths=len_r,
        )
        assert losses.shape == (3,) and torch.isfinite(losses).all()
