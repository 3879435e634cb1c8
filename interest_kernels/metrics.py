"""Evaluation metrics of click prediction (SPEC section 7): AUC, GAUC and logloss.

All take flat tensors of one split, N samples: ``labels`` (N,) in {0, 1}, ``scores``
(N,) any real scores (logits or probabilities: only their order matters to AUC and
GAUC), ``users`` (N,) integer ids. Computation is in float64 on the CPU.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

__all__ = ["auc", "gauc", "logloss", "ctr_metrics", "better", "METRICS", "HIGHER_IS_BETTER"]

METRICS = ("auc", "gauc", "logloss")
HIGHER_IS_BETTER = {"auc": True, "gauc": True, "logloss": False}


def _flat(name: str, t: torch.Tensor, n: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(t).reshape(-1).cpu()
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, labels {n}: they differ in shape")
    return t


def auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a
    random negative, ties counting one half (the Mann-Whitney statistic with average
    ranks). NaN when one class is absent."""
    labels = _flat("labels", labels).to(torch.float64)
    scores = _flat("scores", scores, labels.numel()).to(torch.float64)
    n_pos = float(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    upper = counts.cumsum(0).to(torch.float64)
    mean_rank = upper - (counts.to(torch.float64) - 1) / 2  # 1-based average rank of each tie group
    rank_sum = float((mean_rank[inverse] * labels).sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def gauc(users: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Impression-weighted mean of the per-user AUCs (the DIN paper's GAUC):
    ``sum_u n_u AUC_u / sum_u n_u`` with ``n_u`` the number of u's samples, over the
    users having both a positive and a negative sample; ties count one half within a
    user. NaN when no user has both."""
    labels = _flat("labels", labels).to(torch.float64)
    n = labels.numel()
    scores = _flat("scores", scores, n).to(torch.float64)
    users = _flat("users", users, n)
    if n == 0:
        return float("nan")
    # Group the samples by (user, score): sort by score, then stably by user.
    by_score = torch.argsort(scores, stable=True)
    order = by_score[torch.argsort(users[by_score], stable=True)]
    u, s, y = users[order], scores[order], labels[order]
    _, user_group, user_count = torch.unique_consecutive(u, return_inverse=True, return_counts=True)
    new_tie = torch.ones(n, dtype=torch.bool)
    new_tie[1:] = (u[1:] != u[:-1]) | (s[1:] != s[:-1])
    tie_group = new_tie.cumsum(0) - 1
    tie_count = torch.bincount(tie_group).to(torch.float64)
    # 1-based rank within the user, averaged over ties.
    user_start = torch.cumsum(user_count, 0) - user_count
    tie_first = torch.arange(n)[new_tie] - user_start[user_group[new_tie]]
    mean_rank = (tie_first.to(torch.float64) + 1 + (tie_count - 1) / 2)[tie_group]
    groups = user_count.numel()
    n_pos = torch.zeros(groups, dtype=torch.float64).index_add_(0, user_group, y)
    rank_sum = torch.zeros(groups, dtype=torch.float64).index_add_(0, user_group, mean_rank * y)
    total = user_count.to(torch.float64)
    n_neg = total - n_pos
    kept = (n_pos > 0) & (n_neg > 0)
    if not bool(kept.any()):
        return float("nan")
    per_user = (rank_sum[kept] - n_pos[kept] * (n_pos[kept] + 1) / 2) / (n_pos[kept] * n_neg[kept])
    return float((per_user * total[kept]).sum() / total[kept].sum())


def logloss(labels: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against ``labels`` (from the
    logits, so it stays finite for confident predictions)."""
    labels = _flat("labels", labels).to(torch.float64)
    logits = _flat("logits", logits, labels.numel()).to(torch.float64)
    if labels.numel() == 0:
        return float("nan")
    return float(F.binary_cross_entropy_with_logits(logits, labels))


def ctr_metrics(users: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """``{"auc", "gauc", "logloss"}`` of one split."""
    return {"auc": auc(labels, logits), "gauc": gauc(users, labels, logits), "logloss": logloss(labels, logits)}


def better(metric: str, new: float, best: float | None) -> bool:
    """Whether ``new`` improves on ``best`` (None: nothing yet) for ``metric``."""
    if math.isnan(new):
        return False
    if best is None:
        return True
    return new > best if HIGHER_IS_BETTER[metric] else new < best
