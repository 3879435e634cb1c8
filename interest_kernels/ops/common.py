"""Small pieces every op family's reference shares."""
from __future__ import annotations

from typing import Optional

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math (and optimiser state) runs in for inputs of ``dtype``:
    float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_mask(
    lengths: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    seq_len: int,
    device: torch.device,
) -> Optional[torch.Tensor]:
    """Bool (rows, T) of the valid positions given ``lengths`` (rows,) or ``mask``
    (rows, T); None when neither is given (every position valid)."""
    if lengths is not None:
        return torch.arange(seq_len, device=device) < lengths.to(device).reshape(-1, 1)
    if mask is not None:
        return mask != 0
    return None
