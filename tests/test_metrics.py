"""AUC, GAUC and logloss (SPEC section 7) against hand computations and pairwise counts."""
import math

import pytest
import torch

from interest_kernels.metrics import auc, better, ctr_metrics, gauc, logloss


def test_gauc_by_hand():
    # user 7: positive 0.9 against negatives 0.5 (won) and 0.9 (tie, one half): AUC 0.75, 3 samples
    # user 3: positives 0.2, 0.8 against negatives 0.5, 0.3: 2 of 4 pairs won: AUC 0.5, 4 samples
    # user 5 (positives only) and user 9 (a negative only) are left out of both sums.
    users = torch.tensor([7, 3, 5, 7, 3, 9, 3, 7, 3, 5])
    labels = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 0, 1])
    scores = torch.tensor([0.9, 0.2, 0.1, 0.5, 0.8, 0.7, 0.5, 0.9, 0.3, 0.4])
    assert gauc(users, labels, scores) == pytest.approx((3 * 0.75 + 4 * 0.5) / 7, abs=1e-15)
    assert math.isnan(gauc(torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([0.1, 0.2])))
    assert math.isnan(gauc(torch.tensor([], dtype=torch.long), torch.tensor([]), torch.tensor([])))


def _pairwise_auc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    return float(wins.mean())


def test_gauc_and_auc_match_pairwise_counts_on_random_data_with_ties():
    gen = torch.Generator().manual_seed(0)
    users = torch.randint(0, 40, (600,), generator=gen)
    labels = torch.randint(0, 2, (600,), generator=gen)
    scores = torch.randint(0, 6, (600,), generator=gen).float()  # many ties
    num = den = 0.0
    for u in users.unique():
        y, s = labels[users == u], scores[users == u]
        if 0 < int(y.sum()) < len(y):
            num += len(y) * _pairwise_auc(y, s)
            den += len(y)
    assert gauc(users, labels, scores) == pytest.approx(num / den, abs=1e-12)
    assert auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)
    # One user holding every sample: GAUC is the AUC.
    assert gauc(torch.zeros(600), labels, scores) == pytest.approx(auc(labels, scores), abs=1e-12)


def test_logloss_and_bundle():
    labels, logits = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = (math.log(2) + math.log(1 + math.e**2)) / 2
    assert logloss(labels, logits) == pytest.approx(expected, abs=1e-12)
    assert logloss(torch.tensor([1.0]), torch.tensor([1000.0])) == pytest.approx(0.0)
    out = ctr_metrics(torch.tensor([1, 1]), labels, logits)
    assert out == {"auc": 0.0, "gauc": 0.0, "logloss": pytest.approx(expected)}
    with pytest.raises(ValueError, match="differ in shape"):
        gauc(torch.tensor([1]), labels, logits)
    assert better("auc", 0.7, 0.6) and not better("logloss", 0.7, 0.6) and better("gauc", 0.1, None)
    assert not better("auc", float("nan"), None)
