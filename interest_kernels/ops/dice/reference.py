"""Eager reference for Dice (SPEC section 4), channels last.

    p = sigmoid(gamma * (x - mu) / sqrt(var + eps) + beta),   dice(x) = p*x + (1-p)*alpha*x

``gamma``/``beta`` are optional (DeepCTR-Torch uses an affine BatchNorm, FuxiCTR does
not). In training, ``mu`` and ``var`` are the batch mean and biased variance over every
leading position of ``x``, and the running statistics are updated in place exactly as
``torch.nn.BatchNorm1d`` does (momentum blend, unbiased variance for ``running_var``).
In eval, the running statistics are used.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..common import reference_dtype


class DiceParams(NamedTuple):
    """Parameters and statistics of one Dice activation over H channels (all (H,))."""

    alpha: torch.Tensor
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    training: bool = True
    momentum: float = 0.1
    eps: float = 1e-8


def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    n: int,
    momentum: float,
) -> None:
    """BatchNorm's in-place update from a batch of ``n`` positions with ``mean`` and
    biased ``var`` (shaped like the running statistics, or reshapeable to them): the
    momentum blend, with the unbiased variance going into ``running_var``."""
    with torch.no_grad():
        unbiased = var * (n / (n - 1)) if n > 1 else var
        running_mean.mul_(1 - momentum).add_(momentum * mean.reshape(running_mean.shape).to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_(momentum * unbiased.reshape(running_var.shape).to(running_var.dtype))


def dice_reference(
    x: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Dice over the last dimension of ``x`` (N, C) or (N, T, C); parameters are (C,)."""
    channels = x.shape[-1]
    flat = x.reshape(-1, channels)
    if training and flat.shape[0] == 0:
        # No positions (an empty batch): no statistics, the running ones stay as they are.
        mean, var = flat.new_zeros(channels), flat.new_ones(channels)
    elif training:
        stats = flat.to(reference_dtype(flat.dtype))
        mean = stats.mean(dim=0)
        var = stats.var(dim=0, unbiased=False)
        if running_mean is not None and running_var is not None:
            update_running_stats(running_mean, running_var, mean, var, flat.shape[0], momentum)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("Dice in eval mode needs running_mean and running_var")
        # In the math's dtype: float32 statistics must not round a float64 computation.
        mean = running_mean.to(reference_dtype(flat.dtype))
        var = running_var.to(reference_dtype(flat.dtype))
    xhat = (flat - mean) / torch.sqrt(var + eps)
    if weight is not None:
        xhat = xhat * weight
    if bias is not None:
        xhat = xhat + bias
    p = torch.sigmoid(xhat)
    out = p * flat + (1 - p) * alpha * flat
    return out.to(x.dtype).reshape(x.shape)
