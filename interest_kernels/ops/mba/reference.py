"""Eager references for the mini-batch-aware (MBA) sparse updates (SPEC section 5).

A batch's lookups into a table ``weight`` (N, D) arrive as ``ids`` (any shape, K ids in
all) and ``grad_rows`` (K, D) (or ``ids.shape + (D,)``): the gradient of the mean batch
loss with respect to each looked-up row, one row per lookup, duplicates not yet summed
(exactly what ``nn.Embedding(sparse=True)`` leaves in its uncoalesced gradient).

* :func:`dedup_rows_reference`: the touched set S (sorted distinct ids) and g_j, the
  sum of the gradient rows of id j, added in order of position (sort, then segment sum).
* :func:`count_ids_reference`: n_j += number of samples of the batch in which id j occurs.
* :func:`mba_sgd_reference`, :func:`mba_adagrad_reference`, :func:`mba_adam_reference`:
  in-place updates of the rows in S (and of their optimiser state) only. With
  ``g'_j = g_j + lambda * w_j / n_j``:

  - SGD (DIN eq. 7): ``w_j <- w_j - lr * g'_j``.
  - Adagrad, as ``torch.optim.Adagrad`` on a sparse gradient: ``s_j += g'_j^2``,
    ``w_j <- w_j - clr * g'_j / (sqrt(s_j) + eps)``, ``clr = lr / (1 + (step - 1) lr_decay)``.
  - Adam, as ``torch.optim.SparseAdam``: moments of touched rows only,
    ``m_j += (1 - b1)(g'_j - m_j)``, ``v_j += (1 - b2)(g'_j^2 - v_j)``,
    ``w_j <- w_j - lr sqrt(1 - b2^t) / (1 - b1^t) * m_j / (sqrt(v_j) + eps)`` where ``t``
    is the table's global step count (the number of steps taken on this table, this one
    included), not a per-row count; SparseAdam does the same.

Arithmetic is in float32 for float32/float16/bfloat16 tables (float64 for float64);
optimiser state is float32 (float64 for a float64 table).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..common import compute_dtype

__all__ = [
    "count_ids_reference",
    "dedup_rows_reference",
    "mba_adagrad_reference",
    "mba_adam_reference",
    "mba_sgd_reference",
]


def dedup_rows_reference(
    ids: torch.Tensor, grad_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids and their summed gradient rows.

    ``ids``: any shape, K integer ids; ``grad_rows``: (K, D) or ``ids.shape + (D,)``.
    Returns ``unique_ids`` (U,) int64 ascending and ``summed`` (U, D) in the
    accumulation dtype, each row the sum of its duplicates in order of position.
    """
    flat = ids.reshape(-1).long()
    dim = grad_rows.shape[-1]
    rows = grad_rows.reshape(-1, dim).to(compute_dtype(grad_rows.dtype))
    if flat.numel() == 0:
        return flat.new_zeros(0), rows.new_zeros(0, dim)
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    unique_ids, lengths = torch.unique_consecutive(sorted_ids, return_counts=True)
    summed = torch.stack([seg.sum(0) for seg in torch.split(rows[order], lengths.tolist())])
    return unique_ids, summed


def count_ids_reference(
    ids: torch.Tensor, counts: torch.Tensor, *, padding_idx: Optional[int] = None
) -> torch.Tensor:
    """Add to ``counts`` (N,) the number of samples in which each id occurs; in place.

    ``ids`` (B,): one id per sample. ``ids`` (B, ...): sample b is ``ids[b]``, and an id
    repeated inside one sample counts once. Ids equal to ``padding_idx`` are not counted.
    Returns ``counts``.
    """
    per_sample = ids.flatten(1) if ids.dim() > 1 else ids.reshape(-1, 1)
    for sample in per_sample.long():
        for j in torch.unique(sample).tolist():
            if j != padding_idx:
                counts[j] += 1
    return counts


def _touched(
    weight: torch.Tensor, ids: torch.Tensor, grad_rows: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unique ids, g (U, D), w (U, D), n (U, 1)) in the accumulation dtype."""
    unique_ids, g = dedup_rows_reference(ids, grad_rows)
    acc = compute_dtype(weight.dtype)
    w = weight[unique_ids].to(acc)
    n = counts[unique_ids].to(acc).unsqueeze(1)
    return unique_ids, g, w, n


@torch.no_grad()
def mba_sgd_reference(
    weight: torch.Tensor,
    ids: torch.Tensor,
    grad_rows: torch.Tensor,
    counts: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
) -> None:
    """MBA SGD on the rows of ``weight`` (N, D) named by ``ids``; ``counts`` (N,) is n."""
    unique_ids, g, w, n = _touched(weight, ids, grad_rows, counts)
    weight[unique_ids] = (w - lr * (g + weight_decay * w / n)).to(weight.dtype)


@torch.no_grad()
def mba_adagrad_reference(
    weight: torch.Tensor,
    state_sum: torch.Tensor,
    ids: torch.Tensor,
    grad_rows: torch.Tensor,
    counts: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    eps: float,
    lr_decay: float,
    step: int,
) -> None:
    """MBA Adagrad; ``state_sum`` (N, D) float32 is updated on touched rows only."""
    unique_ids, g, w, n = _touched(weight, ids, grad_rows, counts)
    g = g + weight_decay * w / n
    s = state_sum[unique_ids] + g * g
    clr = lr / (1 + (step - 1) * lr_decay)
    state_sum[unique_ids] = s
    weight[unique_ids] = (w - clr * (g / (s.sqrt() + eps))).to(weight.dtype)


@torch.no_grad()
def mba_adam_reference(
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    ids: torch.Tensor,
    grad_rows: torch.Tensor,
    counts: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """MBA Adam (SparseAdam form); ``exp_avg``/``exp_avg_sq`` (N, D) float32 in place."""
    unique_ids, g, w, n = _touched(weight, ids, grad_rows, counts)
    g = g + weight_decay * w / n
    m = exp_avg[unique_ids]
    v = exp_avg_sq[unique_ids]
    m = m + (1 - beta1) * (g - m)
    v = v + (1 - beta2) * (g * g - v)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    exp_avg[unique_ids] = m
    exp_avg_sq[unique_ids] = v
    weight[unique_ids] = (w - step_size * (m / (v.sqrt() + eps))).to(weight.dtype)
