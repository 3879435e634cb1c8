"""Small pieces every op family's reference shares."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

# Set only by reference_math_in_input_dtype (the tolerance rule of testing.py); a plain
# module global, not a ContextVar, so torch.compile traces the references unchanged.
_REFERENCE_MATH_IN_INPUT_DTYPE = False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math (and optimiser state) runs in for inputs of ``dtype``:
    float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the eager references compute in: :func:`compute_dtype`, or ``dtype``
    itself inside :func:`reference_math_in_input_dtype`."""
    if _REFERENCE_MATH_IN_INPUT_DTYPE and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return compute_dtype(dtype)


@contextlib.contextmanager
def reference_math_in_input_dtype() -> Iterator[None]:
    """Within the block the references run their math in float16/bfloat16 inputs' own
    dtype instead of float32: the "low-precision reference" of flash-attention's
    tolerance rule (see ``interest_kernels.testing``). Not thread-safe; for tests."""
    global _REFERENCE_MATH_IN_INPUT_DTYPE
    saved = _REFERENCE_MATH_IN_INPUT_DTYPE
    _REFERENCE_MATH_IN_INPUT_DTYPE = True
    try:
        yield
    finally:
        _REFERENCE_MATH_IN_INPUT_DTYPE = saved


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
