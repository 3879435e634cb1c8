"""Argument checks shared by every op, run once at the functional boundary.

Errors name the argument and say what was expected and what came. Checks that must
read tensor *values* (length ranges, id ranges) are skipped while a CUDA graph is being
captured or torch.compile is tracing, and can be turned off with ``value_checks(False)``
or ``INTEREST_KERNELS_VALUE_CHECKS=0``. Kernels clamp such values anyway, so a skipped
check can give a wrong answer for bad input but never an out-of-bounds write.

Range checks (:func:`check_in_range`) on CUDA tensors run on the device: an asynchronous
assert (``torch._assert_async``) that stops the stream with the check's message when it
fails, and never synchronises with the host. ``value_checks("sync")`` or
``INTEREST_KERNELS_VALUE_CHECKS=sync`` is the debug mode: the values are read back to
the host and a bad one raises a ``ValueError`` naming it, at the cost of a
synchronisation per check. On CPU the checks always read the values (no device to wait
for).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from typing import Iterable, Iterator, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

_value_checks: contextvars.ContextVar[Optional[bool | str]] = contextvars.ContextVar(
    "interest_kernels_value_checks", default=None
)


@contextlib.contextmanager
def value_checks(enabled: bool | str) -> Iterator[None]:
    """Turn the checks that read tensor values on or off, or to ``"sync"``: host-side
    range checks with a ``ValueError`` on CUDA too (a debug mode that synchronises)."""
    if not isinstance(enabled, bool) and enabled != "sync":
        raise ValueError(f"value_checks takes True, False or 'sync', got {enabled!r}")
    token = _value_checks.set(enabled)
    try:
        yield
    finally:
        _value_checks.reset(token)


def _value_check_setting() -> bool | str:
    flag = _value_checks.get()
    if flag is None:
        env = os.environ.get("INTEREST_KERNELS_VALUE_CHECKS", "1")
        if env not in ("0", "1", "sync"):
            raise ValueError(f"INTEREST_KERNELS_VALUE_CHECKS must be 0, 1 or sync, got {env!r}")
        flag = "sync" if env == "sync" else env == "1"
    return flag


def checks_on_device(t: torch.Tensor) -> bool:
    """Whether a value check of ``t`` runs on its device (asynchronously) rather than
    reading the values back to the host."""
    return t.is_cuda and _value_check_setting() != "sync"


def value_checks_enabled(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether value checks run now for these tensors."""
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace the ContextVar read
        return False
    if torch.jit.is_tracing():  # nor under torch.jit.trace: the graph would keep the reads
        return False
    if torch._C._are_functorch_transforms_active():  # vmap cannot read a value
        return False
    if not _value_check_setting():
        return False
    if any(t is not None and t.is_cuda for t in tensors):
        if torch.cuda.is_current_stream_capturing():
            return False
    return True


def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = FLOAT_DTYPES,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank(s), dtype(s) and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(
                f"{name} must have {want} dimensions, got shape {tuple(t.shape)}"
            )
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(
            f"{name} must have dtype in ({_fmt_dtypes(dtypes)}), got {t.dtype}"
        )
    if device is not None and t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but the other inputs are on {device}; "
            "move every input to one device"
        )
    return t


def check_shape(name: str, t: torch.Tensor, shape: Sequence[Optional[int]], what: str = "") -> None:
    """Check ``t.shape`` against ``shape`` (None matches any size)."""
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {want}{extra}, got {tuple(t.shape)}")


def check_same_dtype(names_tensors: Sequence[tuple[str, Optional[torch.Tensor]]]) -> torch.dtype:
    """All given tensors share one dtype; returns it."""
    present = [(n, t) for n, t in names_tensors if t is not None]
    first_name, first = present[0]
    for n, t in present[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{n} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                "pass one floating dtype for all inputs"
            )
    return first.dtype


def check_in_range(
    name: str, t: torch.Tensor, low: int, high: int, what: str, *, high_inclusive: bool = True
) -> None:
    """Every value of the integer tensor ``t`` lies in [low, high] (or [low, high)).

    ``what`` names ``high`` in words. Runs only when value checks do: on the device
    without synchronising where :func:`checks_on_device` says so (the message then
    names the bound: a traced size formatted into it would be specialised), else by
    reading the minimum and maximum back.
    """
    if t.numel() == 0 or not value_checks_enabled(t):
        return
    close = "]" if high_inclusive else ")"
    if checks_on_device(t):
        inside = (t >= low) & ((t <= high) if high_inclusive else (t < high))
        torch._assert_async(inside.all(), f"{name} must lie in [{low}, {what}{close}")
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi > high or (hi == high and not high_inclusive):
        bad = lo if lo < low else hi
        raise ValueError(f"{name} must lie in [{low}, {high}{close} ({what}), found {bad}")


def check_float(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """One check for every float hyperparameter (learning rates, eps, momentum, ...):
    a real number (bool refused), finite, inside [low, high] (``low_open`` /
    ``high_open`` exclude the ends). Returns it as a Python float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    # comparisons, not math.isfinite: they also take a float Dynamo traces symbolically
    # (dynamic=True), specialising it; NaN fails both
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        if high == math.inf:
            raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value}")
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def check_mask_values(mask: torch.Tensor) -> None:
    """A non-bool mask holds only 0 and 1 (SPEC); reads values, so runs with value checks."""
    if mask.dtype == torch.bool or mask.numel() == 0 or not value_checks_enabled(mask):
        return
    bad = (mask != 0) & (mask != 1)
    if checks_on_device(mask):  # CUDA: an asynchronous assert, no host sync
        torch._assert_async(~bad.any(), "mask must hold bool or exactly 0/1 values")
        return
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"mask must hold bool or exactly 0/1 values, found {mask[position].item()} at "
            f"{position}; pass mask.bool() or (mask > threshold) to choose the valid positions"
        )


def check_valid_positions(
    lengths: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    batch: int,
    seq_len: int,
    device: torch.device,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Validate ``lengths`` (B,) or ``mask`` (B, T) as SPEC's conventions say.

    Returns ``(lengths, mask)`` with ``mask`` converted to bool. Both given is an error.
    """
    if lengths is not None and mask is not None:
        raise ValueError("pass lengths or mask, not both")
    if lengths is not None:
        check_tensor("lengths", lengths, ndim=1, dtypes=INDEX_DTYPES, device=device)
        check_shape("lengths", lengths, (batch,), "one length per row of the batch")
        check_in_range("lengths", lengths, 0, seq_len, "T")
    if mask is not None:
        check_tensor(
            "mask", mask, ndim=2, dtypes=(torch.bool,) + INDEX_DTYPES + FLOAT_DTYPES, device=device
        )
        check_shape("mask", mask, (batch, seq_len), "(B, T) like the sequence")
        check_mask_values(mask)
        if mask.dtype != torch.bool:
            mask = mask != 0
    return lengths, mask


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
