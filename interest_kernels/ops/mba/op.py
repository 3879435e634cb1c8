"""The public MBA sparse-update ops (SPEC section 5): argument checks and dispatch.

Each function validates its arguments once, here, then runs the first backend that
accepts the call: the compiled kernels of ``interest_kernels._C`` ("cpu" for CPU
tensors, "cuda" for CUDA tensors, registered as ``torch.ops.interest_kernels.*``), else
the eager reference. The package works without the extension; these ops then use the
reference and ``use_backend("cpu")`` says why the compiled one cannot run.

Conventions shared by the update functions:

* ``weight`` (N, D) float32/float16/bfloat16/float64, contiguous; updated in place on
  the touched rows only.
* ``ids`` integer, any shape (K ids); ``grad_rows`` (K, D) or ``ids.shape + (D,)`` in the
  weight's dtype: the gradient of the mean batch loss for each lookup, duplicates unsummed.
* ``counts`` (N,) int64/int32: n_j, positive for every touched id (floats are refused:
  n_j counts samples).
* optimiser state (N, D) float32 (float64 for a float64 table), updated on touched rows.

The MBA optimisers run :func:`check_update_rows` before counting ids and then pass the
private ``_rows_checked=True``, which skips repeating those two checks.

An id outside [0, N), a touched id with a count that is not positive, or a non-finite
gradient row raises a ``ValueError`` naming the id, and nothing is written. (The
gradient check reads values, so it runs with the value checks, see ``value_checks``.)
"""
from __future__ import annotations


from typing import Any, Optional, Sequence

import torch

from ... import _extension
from ..._backend import define_op, extension_unavailable_reason
from ..common import compute_dtype
from ..._validation import INDEX_DTYPES, checks_on_device, check_float, check_tensor, value_checks_enabled
from .reference import (
    dedup_rows_reference,
    mba_adagrad_reference,
    mba_adam_reference,
    mba_sgd_reference,
)

__all__ = [
    "OP",
    "count_ids",
    "dedup_rows",
    "mba_adagrad_update",
    "mba_adam_update",
    "mba_sgd_update",
]

TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
COUNT_DTYPES = (torch.int64, torch.int32)  # n_j counts samples: integers

OP = define_op("mba_update", preference={"cpu": ("cpu", "reference"), "cuda": ("cuda", "reference")})

_fakes_registered = False


def compiled_ops() -> Any:
    """``torch.ops.interest_kernels`` with the fake implementations registered (once)."""
    global _fakes_registered
    if not _extension.load():
        raise RuntimeError(_extension.unavailable_reason())
    if not _fakes_registered:
        _register_fakes()
        _fakes_registered = True
    return torch.ops.interest_kernels


def _register_fakes() -> None:
    @torch.library.register_fake("interest_kernels::dedup_rows")
    def _dedup_rows_fake(ids: torch.Tensor, grad_rows: torch.Tensor, num_rows: int):
        num_unique = torch.library.get_ctx().new_dynamic_size()
        acc = compute_dtype(grad_rows.dtype)
        return (
            ids.new_empty((num_unique,), dtype=torch.int64),
            grad_rows.new_empty((num_unique, grad_rows.shape[-1]), dtype=acc),
        )

    for name in ("mba_sgd_update", "mba_adagrad_update", "mba_adam_update", "mba_sgd_step", "mba_adagrad_step",
                 "mba_adam_step"):
        torch.library.register_fake(f"interest_kernels::{name}")(lambda *args, **kwargs: None)


def _compiled_why_not(device_type: str):
    def why_not(device: torch.device, **_: Any) -> Optional[str]:
        reason = extension_unavailable_reason()
        if reason is not None:
            return reason
        if device.type != device_type:
            return f"the {device_type} backend takes {device_type.upper()} tensors only, got {device.type}"
        if device_type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "interest_kernels::mba_sgd_update", "CUDA"
        ):
            return "interest_kernels._C was built without its CUDA kernels (no nvcc or a CPU torch at build time)"
        return None

    return why_not


@OP.register("reference")
def _reference(kind: str, **kw: Any) -> None:
    {"sgd": mba_sgd_reference, "adagrad": mba_adagrad_reference, "adam": mba_adam_reference}[
        kind
    ](**kw)


def _compiled(kind: str, **kw: Any) -> None:
    # The keyword names are the registered schemas' argument names (csrc/ops.cpp).
    getattr(compiled_ops(), f"mba_{kind}_update")(**kw)
    # The kernels write through raw pointers; bump the version counters as in-place torch
    # ops do, so autograd notices a table that some graph saved and this step changed.
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(
            [kw[name] for name in ("weight", "state_sum", "exp_avg", "exp_avg_sq") if name in kw]
        )


_COMPILED_LIMITS = "needs the compiled extension interest_kernels._C (built by setup.py)"
OP.register("cpu", why_not=_compiled_why_not("cpu"), limits=_COMPILED_LIMITS)(_compiled)
OP.register("cuda", why_not=_compiled_why_not("cuda"), limits=_COMPILED_LIMITS + " with its CUDA kernels")(_compiled)


# --- argument checks -------------------------------------------------------------------


def _check_nonnegative(name: str, value: object) -> float:
    return check_float(name, value, low=0.0)


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (this update's 1-based count), got {step!r}")
    return step


def _check_ids(ids: object, device: torch.device) -> torch.Tensor:
    check_tensor("ids", ids, dtypes=INDEX_DTYPES, device=device)
    assert isinstance(ids, torch.Tensor)
    return ids if ids.dtype in (torch.int64, torch.int32) else ids.long()


def check_lookup_ids(ids: torch.Tensor, num_rows: int) -> None:
    """A lookup's ids lie in [0, num_rows): on the device without a host sync where
    ``checks_on_device`` says so, else :func:`check_ids_in_range`."""
    if ids.numel() and value_checks_enabled(ids) and checks_on_device(ids):
        torch._assert_async(((ids >= 0) & (ids < num_rows)).all(), f"ids must lie in [0, {num_rows})")
    else:
        check_ids_in_range(ids, num_rows)


def check_ids_in_range(ids: torch.Tensor, num_rows: int) -> None:
    if ids.numel() == 0 or not value_checks_enabled(ids):
        return
    flat = ids.reshape(-1)
    low, high = torch.aminmax(flat)  # one pass; the position is searched for only on failure
    if bool((low >= 0) & (high < num_rows)):
        return
    bad = (flat < 0) | (flat >= num_rows)
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"ids: id {int(flat[position])} (at position {position}) is outside the table's "
            f"rows [0, {num_rows}); nothing was written"
        )


def _check_update_args(
    weight: object,
    ids: object,
    grad_rows: object,
    counts: object,
    states: Sequence[tuple[str, object]] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and return (weight, ids as int64/int32, grad_rows as (K, D))."""
    check_tensor("weight", weight, ndim=2, dtypes=TABLE_DTYPES)
    assert isinstance(weight, torch.Tensor)
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous (an embedding table (N, D))")
    num_rows, dim = weight.shape
    device = weight.device
    ids = _check_ids(ids, device)
    check_tensor("grad_rows", grad_rows, device=device)
    assert isinstance(grad_rows, torch.Tensor)
    if grad_rows.dtype != weight.dtype:
        raise TypeError(
            f"grad_rows has dtype {grad_rows.dtype} but weight has {weight.dtype}; "
            "pass the gradient rows in the table's dtype"
        )
    k = ids.numel()
    if tuple(grad_rows.shape) not in ((k, dim), tuple(ids.shape) + (dim,)):
        raise ValueError(
            f"grad_rows must have shape ({k}, {dim}) or ids.shape + (D,) = "
            f"{tuple(ids.shape) + (dim,)}, got {tuple(grad_rows.shape)}"
        )
    check_tensor("counts", counts, ndim=1, dtypes=COUNT_DTYPES, device=device)
    assert isinstance(counts, torch.Tensor)
    if counts.shape[0] != num_rows:
        raise ValueError(f"counts must have shape ({num_rows},) (one per table row), got {tuple(counts.shape)}")
    acc = compute_dtype(weight.dtype)
    for name, state in states:
        check_tensor(name, state, ndim=2, dtypes=(acc,), device=device)
        assert isinstance(state, torch.Tensor)
        if tuple(state.shape) != (num_rows, dim) or not state.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous ({num_rows}, {dim}) tensor like weight, "
                f"got shape {tuple(state.shape)}"
            )
    return weight, ids, grad_rows.reshape(k, dim)


def check_finite_rows(ids: torch.Tensor, grad_rows: torch.Tensor) -> None:
    """ids (K,), grad_rows (K, D): raise a ``ValueError`` naming the first id whose row is
    not finite. A NaN/Inf gradient row would poison its table row and optimiser state for good."""
    if grad_rows.numel() == 0 or not value_checks_enabled(grad_rows):
        return
    if checks_on_device(grad_rows):  # CUDA: an asynchronous assert, no host sync per step
        torch._assert_async(torch.isfinite(grad_rows).all(), "grad_rows hold NaN or Inf")
        return
    # A sum is finite only if every term is: one pass proves the common case; finite rows
    # whose sum overflows fall through to the exact check.
    if bool(torch.isfinite(grad_rows.sum())):
        return
    bad = ~torch.isfinite(grad_rows).all(dim=1)
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"grad_rows: the gradient row of id {int(ids.reshape(-1)[position])} (at position "
            f"{position}) holds NaN or Inf; nothing was written (skip the step, e.g. with a "
            "gradient scaler, or find where the loss overflowed)"
        )


def check_update_rows(weight: torch.Tensor, ids: torch.Tensor, grad_rows: torch.Tensor) -> None:
    """The checks an update runs on ``ids`` and ``grad_rows`` (range, finiteness), for
    callers that must refuse a step before writing anything else (the optimisers count
    ids first)."""
    check_ids_in_range(ids, weight.shape[0])
    check_finite_rows(ids, grad_rows.reshape(-1, weight.shape[1]))


def _select(
    weight: torch.Tensor, ids: torch.Tensor, grad_rows: torch.Tensor, counts: torch.Tensor, kind: str,
    rows_checked: bool,
) -> Any:
    """The backend for this call. The compiled kernels check ids and counts themselves,
    always and before writing (one pass on the CPU, one small host copy on CUDA), so the
    same checks run here only in front of the reference; with ``rows_checked`` (the MBA
    optimisers ran :func:`check_update_rows`) the finiteness and range checks are not repeated."""
    if not rows_checked:
        check_finite_rows(ids, grad_rows)
    impl = OP.select(weight.device, kind=kind)
    if impl.name == "reference" and not rows_checked:
        check_ids_in_range(ids, weight.shape[0])
    if impl.name == "reference":
        if ids.numel() and value_checks_enabled(counts):
            n = counts[ids.reshape(-1).long()]
            bad = ~(n > 0)
            if bool(bad.any()):
                position = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"counts: id {int(ids.reshape(-1)[position])} is in the batch but its count is "
                    f"{n[position].item()}; MBA needs n_j >= 1 for every touched id (count them "
                    "with count_ids first); nothing was written"
                )
    return impl


# --- public ops --------------------------------------------------------------------------


def dedup_rows(
    ids: torch.Tensor, grad_rows: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct ids (U,) int64 and their summed gradient rows (U, D).

    ``ids`` any shape (K ids) in [0, num_rows); ``grad_rows`` (K, D) or ``ids.shape + (D,)``.
    Sums are float32 (float64 for float64 rows), duplicates added in order of position,
    so the result is the same on every run.
    """
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be an int >= 0, got {num_rows!r}")
    check_tensor("grad_rows", grad_rows)
    ids = _check_ids(ids, grad_rows.device)
    if grad_rows.dim() < 1 or grad_rows.numel() != ids.numel() * grad_rows.shape[-1]:
        raise ValueError(
            f"grad_rows must hold one row per id ({ids.numel()} ids), got shape {tuple(grad_rows.shape)}"
        )
    impl = OP.select(grad_rows.device)
    if impl.name == "reference":
        check_ids_in_range(ids, num_rows)
        return dedup_rows_reference(ids, grad_rows)
    return compiled_ops().dedup_rows(ids, grad_rows, num_rows)


def count_ids(
    ids: torch.Tensor, counts: torch.Tensor, *, padding_idx: Optional[int] = None
) -> torch.Tensor:
    """Add to ``counts`` (N,) the number of samples in which each id occurs; in place.

    ``ids`` (B,): one id per sample (each element is its own sample). ``ids`` (B, ...):
    sample b is ``ids[b]``; an id repeated inside one sample counts once.
    ``padding_idx`` (in [-N, N)): that id is never counted. Returns ``counts``.
    Cost O(K log K) in the batch's K ids, never O(N).
    """
    check_tensor("counts", counts, ndim=1, dtypes=COUNT_DTYPES)
    ids = _check_ids(ids, counts.device)
    num_rows = counts.shape[0]
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not -num_rows <= padding_idx < num_rows:
            raise ValueError(f"padding_idx must be an int in [-{num_rows}, {num_rows}), got {padding_idx!r}")
        padding_idx %= num_rows
    check_ids_in_range(ids, num_rows)
    return add_counts(ids, counts, padding_idx)


def add_counts(ids: torch.Tensor, counts: torch.Tensor, padding_idx: Optional[int]) -> torch.Tensor:
    """:func:`count_ids` without its checks, for callers that ran them (``padding_idx``
    already in [0, N))."""
    flat, keep = counted_positions(ids, padding_idx)
    counts.index_add_(0, flat, keep.to(counts.dtype))
    return counts


def counted_positions(ids: torch.Tensor, padding_idx: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat ids (K,) int64, keep (K,) bool): which of a lookup's ids :func:`count_ids`
    counts. (B,) ids count each element; (B, ...) ids count an id once per sample
    ``ids[b]`` (sorted within the sample); the padding id never counts. No shape depends
    on the data, so nothing waits for the device."""
    if ids.dim() <= 1:
        flat = ids.reshape(-1).long()
        keep = torch.ones(flat.shape, dtype=torch.bool, device=flat.device)
    else:
        per_sample = ids.flatten(1).long().sort(dim=1).values
        keep = torch.ones_like(per_sample, dtype=torch.bool)
        keep[:, 1:] = per_sample[:, 1:] != per_sample[:, :-1]
        flat, keep = per_sample.reshape(-1), keep.reshape(-1)
    if padding_idx is not None:
        keep &= flat != padding_idx
    return flat, keep


def mba_sgd_update(
    weight: torch.Tensor,
    ids: torch.Tensor,
    grad_rows: torch.Tensor,
    counts: torch.Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    _rows_checked: bool = False,
) -> None:
    """MBA SGD (DIN eq. 7) in place: ``w_j <- w_j - lr (g_j + lambda w_j / n_j)`` for j in S.

    ``weight`` (N, D), ``ids`` (K,) or any shape, ``grad_rows`` (K, D) (or ``ids.shape +
    (D,)``), ``counts`` (N,); ``weight_decay`` is lambda (>= 0). Dtypes and the rest of
    the conventions: see the module docstring.
    """
    lr = _check_nonnegative("lr", lr)
    weight_decay = _check_nonnegative("weight_decay", weight_decay)
    weight, ids, grad_rows = _check_update_args(weight, ids, grad_rows, counts)
    impl = _select(weight, ids, grad_rows, counts, "sgd", _rows_checked)
    impl.fn("sgd", weight=weight, ids=ids, grad_rows=grad_rows, counts=counts, lr=lr, weight_decay=weight_decay)


def mba_adagrad_update(
    weight: torch.Tensor,
    state_sum: torch.Tensor,
    ids: torch.Tensor,
    grad_rows: torch.Tensor,
    counts: torch.Tensor,
    *,
    lr: float,
    step: int,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    lr_decay: float = 0.0,
    _rows_checked: bool = False,
) -> None:
    """MBA Adagrad in place (``torch.optim.Adagrad``'s sparse step on ``g + lambda w / n``).

    ``state_sum`` (N, D) float32: the running sum of squared gradients. ``step`` (>= 1):
    the table's step count, this step included (it scales ``lr`` through ``lr_decay``).
    """
    lr = _check_nonnegative("lr", lr)
    weight_decay = _check_nonnegative("weight_decay", weight_decay)
    eps = _check_nonnegative("eps", eps)
    lr_decay = _check_nonnegative("lr_decay", lr_decay)
    step = _check_step(step)
    weight, ids, grad_rows = _check_update_args(
        weight, ids, grad_rows, counts, [("state_sum", state_sum)]
    )
    impl = _select(weight, ids, grad_rows, counts, "adagrad", _rows_checked)
    impl.fn(
        "adagrad", weight=weight, state_sum=state_sum, ids=ids, grad_rows=grad_rows,
        counts=counts, lr=lr, weight_decay=weight_decay, eps=eps, lr_decay=lr_decay, step=step,
    )


def mba_adam_update(
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    ids: torch.Tensor,
    grad_rows: torch.Tensor,
    counts: torch.Tensor,
    *,
    lr: float,
    step: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    _rows_checked: bool = False,
) -> None:
    """MBA Adam in place (``torch.optim.SparseAdam``'s step on ``g + lambda w / n``).

    ``exp_avg``/``exp_avg_sq`` (N, D) float32: moments, updated on touched rows only.
    ``step`` (>= 1): the table's global step count, this step included (bias correction).
    """
    lr = _check_nonnegative("lr", lr)
    weight_decay = _check_nonnegative("weight_decay", weight_decay)
    eps = _check_nonnegative("eps", eps)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1 = check_float("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    beta2 = check_float("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    step = _check_step(step)
    weight, ids, grad_rows = _check_update_args(
        weight, ids, grad_rows, counts, [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)]
    )
    impl = _select(weight, ids, grad_rows, counts, "adam", _rows_checked)
    impl.fn(
        "adam", weight=weight, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, ids=ids,
        grad_rows=grad_rows, counts=counts, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, step=step,
    )
