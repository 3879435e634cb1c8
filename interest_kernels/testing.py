"""Helpers that compare any backend of an op to its eager reference.

Used by the test suite and available to users who write their own backends:

* :func:`poison_empty` makes every ``torch.empty``-family allocation start as NaN
  (integers as -1), so an element a kernel forgets to write fails the comparison.
* :func:`check_against_reference` runs a candidate and the reference on the same
  inputs, forward and backward with one random upstream gradient, and compares every
  output and every gradient with a tolerance that fits the dtype.

Tolerance rule. float32/float64: ``|x - ref| <= atol + rtol * |ref|`` elementwise
with ``rtol = 1e-5`` (float64 1e-10) and ``atol`` scaled by the largest magnitude of
the reference; a float32 candidate that misses it still passes when its largest error
is within twice that of the reference itself run in float32 (inputs so ill-conditioned
that float32 math cannot meet ``rtol``, such as a Dice variance near zero). float16/bfloat16 (the flash-attention rule): the candidate's largest
error against the reference computed in float64 must be at most ``ratio`` (2) times
the largest error of the reference itself run in the same low precision, plus a small
absolute floor. "Run in the same low precision" means the reference's math, not only
its inputs and outputs: it runs under ``reference_math_in_input_dtype``, so its
matmuls, reductions and elementwise steps round to float16/bfloat16 as a naive
low-precision implementation would. The reference's error is the larger of that run's
and of the float32-math reference rounded to the dtype (at a kink such as ReLU's, either
one alone may happen to land on the float64 side); a run that overflows (a non-finite
value the float64 reference does not have) is left out.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from .ops.common import reference_math_in_input_dtype

__all__ = ["poison_empty", "check_against_reference", "clone_inputs", "grad_leaves", "Tolerance",
           "tolerance_for"]

_EMPTY_FNS = ("empty", "empty_like", "empty_strided")


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(-1)
    return t


@contextlib.contextmanager
def poison_empty() -> Iterator[None]:
    """Within the block, ``torch.empty``, ``empty_like``, ``empty_strided`` and
    ``Tensor.new_empty`` called from Python return NaN-filled (or -1) tensors."""
    saved = {name: getattr(torch, name) for name in _EMPTY_FNS}
    saved_new_empty = torch.Tensor.new_empty

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = fn(*args, **kwargs)
            if torch.compiler.is_compiling() or out.device.type == "meta":
                return out
            with torch.no_grad():
                return _poison(out)

        poisoned.__wrapped__ = fn  # type: ignore[attr-defined]
        return poisoned

    for name, fn in saved.items():
        setattr(torch, name, wrap(fn))
    torch.Tensor.new_empty = wrap(saved_new_empty)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        torch.Tensor.new_empty = saved_new_empty  # type: ignore[method-assign]


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    ratio: Optional[float]  # low precision: allowed multiple of the reference's own error


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    if dtype == torch.float64:
        return Tolerance(rtol=1e-10, atol=1e-10, ratio=None)
    if dtype == torch.float32:
        return Tolerance(rtol=1e-5, atol=1e-5, ratio=None)
    if dtype in (torch.float16, torch.bfloat16):
        return Tolerance(rtol=0.0, atol=1e-3 if dtype == torch.float16 else 1e-2, ratio=2.0)
    raise TypeError(f"no tolerance defined for {dtype}")


def _as_tuple(out: Any) -> tuple[Optional[torch.Tensor], ...]:
    if isinstance(out, torch.Tensor) or out is None:
        return (out,)
    return tuple(out)


def clone_inputs(
    inputs: Mapping[str, Any], dtype: Optional[torch.dtype], grad_names: Sequence[str]
) -> dict[str, Any]:
    """Fresh leaf copies of ``inputs``: tensors (and lists of tensors, None entries kept)
    detached and cloned,
    floating ones cast to ``dtype`` (None keeps theirs); those named in ``grad_names``
    (``"weights"`` for a whole list, ``"weights[0]"`` for one item) require grad."""
    out: dict[str, Any] = {}
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().clone()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            t.requires_grad_(name in grad_names)
            out[name] = t
        elif (isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v)
              and all(x is None or isinstance(x, torch.Tensor) for x in v)):
            items = []
            for i, x in enumerate(v):
                if x is None:
                    items.append(None)
                    continue
                t = x.detach().clone()
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                t.requires_grad_(f"{name}[{i}]" in grad_names or name in grad_names)
                items.append(t)
            out[name] = type(v)(items)
        else:
            out[name] = v
    return out


def grad_leaves(inputs: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every input (or list item, named ``"name[i]"``) requiring grad."""
    leaves = []
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            leaves.append((name, v))
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    leaves.append((f"{name}[{i}]", x))
    return leaves


def _run(
    fn: Callable[..., Any],
    inputs: Mapping[str, Any],
    grad_outs: Optional[Sequence[Optional[torch.Tensor]]],
) -> tuple[tuple[Optional[torch.Tensor], ...], dict[str, Optional[torch.Tensor]]]:
    return _backward(_as_tuple(fn(**inputs)), inputs, grad_outs)


def _backward(
    outs: tuple[Optional[torch.Tensor], ...],
    inputs: Mapping[str, Any],
    grad_outs: Optional[Sequence[Optional[torch.Tensor]]],
) -> tuple[tuple[Optional[torch.Tensor], ...], dict[str, Optional[torch.Tensor]]]:
    grads: dict[str, Optional[torch.Tensor]] = {}
    leaves = grad_leaves(inputs)
    if grad_outs is not None and leaves:
        pairs = [
            (o, g.to(o.dtype))
            for o, g in zip(outs, grad_outs)
            if o is not None and g is not None and o.requires_grad
        ]
        if pairs:
            got = torch.autograd.grad(
                [o for o, _ in pairs],
                [t for _, t in leaves],
                [g for _, g in pairs],
                allow_unused=True,
            )
            grads = {name: g for (name, _), g in zip(leaves, got)}
    return tuple(o.detach() if o is not None else None for o in outs), grads


def _compare(
    what: str,
    got: Optional[torch.Tensor],
    ref64: Optional[torch.Tensor],
    ref_lowp: Optional[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]],
    tol: Tolerance,
) -> None:
    """``ref_lowp``: (reference with low-precision math, reference with float32 math
    rounded to the dtype), for the ratio rule."""
    if ref64 is None and got is None:
        return
    if got is None:
        # An input the candidate ignores must have a zero reference gradient.
        if float(ref64.abs().max()) == 0.0:  # type: ignore[union-attr]
            return
        raise AssertionError(f"{what}: candidate gave no value but the reference did")
    if ref64 is None:
        # An input the reference leaves out of its graph (T = 0, say) has a zero gradient.
        if got.numel() == 0 or float(got.detach().abs().max()) == 0.0:
            return
        raise AssertionError(f"{what}: reference gave no value but the candidate did")
    if got.shape != ref64.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}")
    g = got.detach().double().cpu()
    r = ref64.detach().double().cpu()
    if not torch.isfinite(g).all():
        bad = (~torch.isfinite(g)).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: candidate has NaN/Inf (unwritten or overflow) at {bad}")
    scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
    err = (g - r).abs()
    if tol.ratio is None:
        limit = tol.atol * scale + tol.rtol * r.abs()
        if (err > limit).any():
            idx = int((err - limit).argmax())
            raise AssertionError(
                f"{what}: max error {float(err.max()):.3g} exceeds tolerance "
                f"(rtol {tol.rtol}, atol {tol.atol}*{scale:.3g}); worst at flat index {idx}: "
                f"got {float(g.flatten()[idx]):.6g}, reference {float(r.flatten()[idx]):.6g}"
            )
    else:
        assert ref_lowp is not None
        ref_err = _low_precision_error(ref_lowp, r) if r.numel() else 0.0
        got_err = float(err.max()) if r.numel() else 0.0
        allowed = tol.ratio * ref_err + tol.atol * scale
        if got_err > allowed:
            raise AssertionError(
                f"{what}: max error {got_err:.3g} against the float64 reference exceeds "
                f"{tol.ratio} x the low-precision reference's own error {ref_err:.3g} "
                f"+ {tol.atol}*{scale:.3g}"
            )


def _low_precision_error(
    ref_lowp: tuple[Optional[torch.Tensor], Optional[torch.Tensor]], r: torch.Tensor
) -> float:
    """The reference's own error at the low precision, against the float64 one ``r``: the
    larger of its low-precision-math run and its float32-math run rounded to the dtype
    (either may land on the far side of a kink such as ReLU's or PReLU's, where the other
    does not); a run that overflows where ``r`` is finite is left out."""
    errors = []
    for run in ref_lowp:
        if run is None:
            continue
        c = run.detach().double().cpu()
        if torch.isfinite(c).all() or not torch.isfinite(r).all():
            errors.append(float((c - r).abs().max()))
    return max(errors, default=0.0)


def check_against_reference(
    candidate: Callable[..., Any],
    reference: Callable[..., Any],
    inputs: Mapping[str, Any],
    *,
    grad: Sequence[str] = (),
    dtype: Optional[torch.dtype] = None,
    tol: Optional[Tolerance] = None,
    poison: bool = True,
    seed: int = 0,
) -> None:
    """Assert ``candidate(**inputs)`` matches ``reference(**inputs)``, forward and backward.

    ``inputs`` maps keyword names to tensors (or lists of tensors) and plain values;
    floating tensors are cast to ``dtype`` for the candidate and the low-precision
    reference, and to float64 for the ground truth. ``grad`` names the inputs whose
    gradients are compared (``"weights"`` covers every tensor of a list, or name one
    item as ``"weights[0]"``). One random upstream gradient per floating output is
    drawn; outputs may be a tensor or a tuple (None entries are skipped).
    """
    dtype = dtype or next(
        v.dtype for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
    )
    tol = tol or tolerance_for(dtype)
    grad = tuple(grad)

    ref_inputs = clone_inputs(inputs, torch.float64, grad)
    ref_outs = _as_tuple(reference(**ref_inputs))
    gen = torch.Generator().manual_seed(seed)
    grad_outs = [
        torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
        if o is not None and o.is_floating_point()
        else None
        for o in ref_outs
    ]
    ref64, ref64_grads = _backward(ref_outs, ref_inputs, grad_outs if grad else None)

    ref_lowp: tuple[Optional[tuple], ...] = (None,) * len(ref64)
    ref_lowp_grads: dict[str, Optional[tuple]] = {}
    if tol.ratio is not None:
        with reference_math_in_input_dtype():
            lp_math, lp_math_grads = _run(
                reference, clone_inputs(inputs, dtype, grad), grad_outs if grad else None
            )
        rounded, rounded_grads = _run(
            reference, clone_inputs(inputs, dtype, grad), grad_outs if grad else None
        )
        ref_lowp = tuple(zip(lp_math, rounded))
        ref_lowp_grads = {n: (lp_math_grads.get(n), rounded_grads.get(n)) for n in rounded_grads}

    cand_inputs = clone_inputs(inputs, dtype, grad)
    ctx = poison_empty() if poison else contextlib.nullcontext()
    with ctx:
        got, got_grads = _run(candidate, cand_inputs, grad_outs if grad else None)

    if len(got) != len(ref64):
        raise AssertionError(f"candidate returned {len(got)} outputs, reference {len(ref64)}")
    for i, (g, r) in enumerate(zip(got, ref64)):
        if g is not None and r is not None and not r.is_floating_point():
            if not torch.equal(g.cpu(), r.cpu()):
                raise AssertionError(f"output {i}: integer outputs differ")
            continue
        if g is not None and g.is_floating_point() and g.dtype != dtype and dtype != torch.float64:
            raise AssertionError(f"output {i}: dtype {g.dtype}, expected the input dtype {dtype}")
    try:
        _compare_all(got, got_grads, ref64, ref64_grads, ref_lowp, ref_lowp_grads, tol)
    except AssertionError as strict:
        if dtype != torch.float32 or tol.ratio is not None:
            raise
        # Ill-conditioned inputs (a tiny Dice variance, say) can make float32 math itself
        # miss rtol; then the candidate passes if it is within twice the error of the
        # reference run in float32 (the low-precision rule, one precision up).
        ref32, ref32_grads = _run(reference, clone_inputs(inputs, dtype, grad), grad_outs if grad else None)
        relative = Tolerance(rtol=0.0, atol=tol.atol, ratio=2.0)
        try:
            _compare_all(got, got_grads, ref64, ref64_grads, tuple((r, None) for r in ref32),
                         {n: (g, None) for n, g in ref32_grads.items()}, relative)
        except AssertionError:
            raise strict from None


def _compare_all(got, got_grads, ref64, ref64_grads, ref_lowp, ref_lowp_grads, tol: Tolerance) -> None:
    """Every floating output and every gradient of the reference against the candidate's."""
    for i, (g, r, rl) in enumerate(zip(got, ref64, ref_lowp)):
        if g is not None and r is not None and not r.is_floating_point():
            continue
        _compare(f"output {i}", g, r, rl, tol)
    for name in ref64_grads:
        _compare(f"grad of {name}", got_grads.get(name), ref64_grads[name], ref_lowp_grads.get(name), tol)
