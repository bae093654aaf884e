"""Each loss against a hand-computed 2x3 example, with and without padding.

scores  [[1, 2, 0], [0.5, -1, 3]]      targets [[1, 0, 0], [0, 2, 1]]
Padded: the last candidate of query 2 is padding (its score and target are garbage and must not matter), so
query 2 is just (0.5, -1) with targets (0, 2).
"""
from math import exp, log, log2

import pytest
import torch

from crossrank.training.losses import LOSSES

SCORES = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
TARGETS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
FULL = torch.ones(2, 3, dtype=torch.bool)
PADDED = torch.tensor([[True, True, True], [True, True, False]])


def sig(x: float) -> float:
    return 1 / (1 + exp(-x))


def nll(positive: float, *scores: float) -> float:
    return -positive + log(sum(exp(s) for s in scores))


def kl(targets: list[float], scores: list[float]) -> float:
    zt, zs = sum(exp(t) for t in targets), sum(exp(s) for s in scores)
    return sum(exp(t) / zt * (t - log(zt) - (s - log(zs))) for t, s in zip(targets, scores))


EXPECTED = {
    # q1: the relevant is column 0 (score 1); q2: column 1 (target 2, score -1)
    "lce": ((nll(1, 1, 2, 0) + nll(-1, 0.5, -1, 3)) / 2,
            (nll(1, 1, 2, 0) + nll(-1, 0.5, -1)) / 2),
    # labels t > 0: q1 (1, 0, 0), q2 (0, 1, 1)
    "bce": (-(log(sig(1)) + log(1 - sig(2)) + log(1 - sig(0))
              + log(1 - sig(0.5)) + log(sig(-1)) + log(sig(3))) / 6,
            -(log(sig(1)) + log(1 - sig(2)) + log(1 - sig(0)) + log(1 - sig(0.5)) + log(sig(-1))) / 5),
    # pairs t_i > t_j: q1 (0,1), (0,2); q2 (1,0), (1,2), (2,0); padded q2 only (1,0)
    "rank_net": ((log(1 + exp(2 - 1)) + log(1 + exp(0 - 1)) + log(1 + exp(0.5 + 1)) + log(1 + exp(3 + 1))
                  + log(1 + exp(0.5 - 3))) / 5,
                 (log(1 + exp(2 - 1)) + log(1 + exp(0 - 1)) + log(1 + exp(0.5 + 1))) / 3),
    "list_net": ((kl([1, 0, 0], [1, 2, 0]) + kl([0, 2, 1], [0.5, -1, 3])) / 2,
                 (kl([1, 0, 0], [1, 2, 0]) + kl([0, 2], [0.5, -1])) / 2),
    # target ranks: q1 (1, 2.5, 2.5) [tie], q2 (3, 1, 2); padded q2 (2, 1)
    "adr_mse": ((((1 - (1 + sig(1) + sig(-1))) ** 2) / log2(2)
                 + ((2.5 - (1 + sig(-1) + sig(-2))) ** 2) / log2(3.5)
                 + ((2.5 - (1 + sig(1) + sig(2))) ** 2) / log2(3.5)
                 + ((3 - (1 + sig(-1.5) + sig(2.5))) ** 2) / log2(4)
                 + ((1 - (1 + sig(1.5) + sig(4))) ** 2) / log2(2)
                 + ((2 - (1 + sig(-2.5) + sig(-4))) ** 2) / log2(3)) / 6,
                (((1 - (1 + sig(1) + sig(-1))) ** 2) / log2(2)
                 + ((2.5 - (1 + sig(-1) + sig(-2))) ** 2) / log2(3.5)
                 + ((2.5 - (1 + sig(1) + sig(2))) ** 2) / log2(3.5)
                 + ((2 - (1 + sig(-1.5))) ** 2) / log2(3)
                 + ((1 - (1 + sig(1.5))) ** 2) / log2(2)) / 5),
    # margins (s_i - s_j) - (t_i - t_j): q1 -2, 0 (q1's pair (1, 2) has equal targets: not used); q2 3.5, -1.5,
    # -5; padded q2 only 3.5
    "margin_mse": ((4 + 0 + 12.25 + 2.25 + 25) / 5, (4 + 0 + 12.25) / 3),
}


def test_every_loss_is_tested():
    assert set(LOSSES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loss_matches_hand_computed_value(name):
    full, padded = EXPECTED[name]
    assert LOSSES[name](SCORES, TARGETS, FULL).item() == pytest.approx(full, rel=1e-5)
    # garbage in the padded slot must change nothing, neither the value nor the gradient
    scores = SCORES.clone().requires_grad_(True)
    garbage_scores = SCORES.clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(1e4))
    garbage_targets = TARGETS.clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(99.0))
    loss = LOSSES[name](scores, TARGETS, PADDED)
    assert loss.item() == pytest.approx(padded, rel=1e-5)
    assert LOSSES[name](garbage_scores, garbage_targets, PADDED).item() == pytest.approx(padded, rel=1e-5)
    loss.backward()
    assert scores.grad[1, 2].item() == 0.0
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loss_decreases_when_scores_follow_targets(name):
    """Scores that order candidates like the targets must cost less than the reversed order."""
    good = LOSSES[name](TARGETS * 3 - 1, TARGETS, FULL)
    bad = LOSSES[name](-TARGETS * 3 + 1, TARGETS, FULL)
    assert good.item() < bad.item()


def test_pairwise_losses_with_no_pairs_are_zero_not_nan():
    ties = torch.ones(2, 3)
    for name in ("rank_net", "margin_mse"):
        scores = SCORES.clone().requires_grad_(True)
        loss = LOSSES[name](scores, ties, torch.tensor([[True, False, False], [True, False, False]]))
        assert loss.item() == 0.0
        loss.backward()
