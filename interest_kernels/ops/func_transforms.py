"""The fused operators (C++ and Triton) under ``torch.func`` transforms (``grad``, ``vmap``...).

An operator's autograd registered with ``torch.library.register_autograd`` is an
``autograd.Function`` without ``setup_context``, which functorch refuses, and the fused
operators have no batching rule. While a transform is active, :func:`call` runs the
operator through :class:`_TransformableCall` instead: an ``autograd.Function`` with
``setup_context`` (reusing the operator's registered setup and backward) and a ``vmap``
rule. Outside transforms, and while compiling, it calls the operator directly. The
backward operators get a batching rule (:func:`register_sliced_vmap`), which
``vmap(grad(...))`` (per-sample gradients) needs.

The backward operators have no derivative themselves: the backward runs without autograd
and a nested ``grad`` (second derivatives) raises ``NotImplementedError`` rather than
returning zeros; the reference backend differentiates twice.

``Tensor[]`` arguments are flattened into separate inputs (an ``autograd.Function`` only
differentiates its direct tensor inputs) and the backward's list gradients flattened
to match. The ``vmap`` rules run the operator once per slice of the mapped dimension and
stack the results: correct for every operator, one call per mapped element.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch._functorch.pyfunctorch import GradInterpreter, JvpInterpreter, retrieve_all_functorch_interpreters

__all__ = ["TransformableOp", "call", "register_sliced_vmap"]


@dataclass(frozen=True)
class TransformableOp:
    """An operator and its registered autograd: ``setup(ctx, inputs, output)`` and
    ``backward(ctx, *grads)`` returning one gradient per input (a list for a
    ``Tensor[]`` input), exactly as given to ``torch.library.register_autograd``."""

    op: Callable[..., Any]
    setup: Callable[..., None]
    backward: Callable[..., Sequence[Any]]


def _is_tensor_list(arg: Any) -> bool:
    return isinstance(arg, (list, tuple)) and len(arg) > 0 and all(isinstance(t, torch.Tensor) for t in arg)


def _flatten(args: Sequence[Any]) -> tuple[tuple, list[torch.Tensor]]:
    """(spec, tensors): per argument ("tensor", index), ("list", start, length) or
    ("const", value)."""
    spec, tensors = [], []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            spec.append(("tensor", len(tensors)))
            tensors.append(arg)
        elif _is_tensor_list(arg):
            spec.append(("list", len(tensors), len(arg)))
            tensors.extend(arg)
        else:
            spec.append(("const", arg))
    return tuple(spec), tensors


def _unflatten(spec: tuple, tensors: Sequence[Any]) -> list[Any]:
    args = []
    for entry in spec:
        if entry[0] == "tensor":
            args.append(tensors[entry[1]])
        elif entry[0] == "list":
            args.append(list(tensors[entry[1]:entry[1] + entry[2]]))
        else:
            args.append(entry[1])
    return args


def _flatten_grads(spec: tuple, grads: Sequence[Any]) -> list[Any]:
    flat = []
    for entry, grad in zip(spec, grads):
        if entry[0] == "tensor":
            flat.append(grad)
        elif entry[0] == "list":
            flat.extend(grad if grad is not None else [None] * entry[2])
    return flat


def _per_argument(spec: tuple, flags: Sequence[bool]) -> tuple[bool, ...]:
    """``needs_input_grad`` of the flattened inputs, one flag per operator argument."""
    out = []
    for entry in spec:
        if entry[0] == "tensor":
            out.append(bool(flags[entry[1]]))
        elif entry[0] == "list":
            out.append(any(flags[entry[1]:entry[1] + entry[2]]))
        else:
            out.append(False)
    return tuple(out)


def _slice(args: Sequence[Any], in_dims: Sequence[Any], i: int) -> list[Any]:
    """Element ``i`` of the mapped dimension of every mapped tensor (in lists too)."""
    def one(arg: Any, dim: Any) -> Any:
        if isinstance(arg, (list, tuple)) and isinstance(dim, (list, tuple)):
            return type(arg)(one(a, d) for a, d in zip(arg, dim))
        return arg.select(dim, i) if dim is not None else arg
    return [one(a, d) for a, d in zip(args, in_dims)]


def _stack(parts: Sequence[Any]) -> tuple[Any, Any]:
    """(outputs, out_dims) of per-slice results of one structure, stacked along dim 0."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(parts)), 0
    stacked = [_stack(group) for group in zip(*parts)]
    return type(first)(o for o, _ in stacked), type(first)(d for _, d in stacked)


def _map_slices(fn: Callable[..., Any], batch_size: int, args: Sequence[Any], in_dims: Sequence[Any]) -> tuple:
    return _stack([fn(*_slice(args, in_dims, i)) for i in range(batch_size)])


def register_sliced_vmap(qualname: str) -> None:
    """A ``vmap`` rule for operator ``qualname``: one call per slice, results stacked."""
    op = torch._library.utils.lookup_op(qualname)

    def rule(info: Any, in_dims: tuple, *args: Any) -> tuple:
        return _map_slices(op, info.batch_size, args, in_dims)

    torch.library.register_vmap(qualname, rule)


class _TransformableCall(torch.autograd.Function):
    @staticmethod
    def forward(target: TransformableOp, spec: tuple, *tensors: torch.Tensor) -> Any:
        return target.op(*_unflatten(spec, tensors))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        target, spec, *tensors = inputs
        ctx.target, ctx.spec = target, spec
        target.setup(ctx, tuple(_unflatten(spec, tensors)), output)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:
        levels = [i for i in retrieve_all_functorch_interpreters() if isinstance(i, (GradInterpreter, JvpInterpreter))]
        if len(levels) > 1:
            raise NotImplementedError(
                f"{ctx.target.op}: second derivatives through the fused operators are not "
                "supported; run the model on the reference backend (use_backend('reference'))")
        flat_needs = ctx.needs_input_grad
        ctx.needs_input_grad = _per_argument(ctx.spec, flat_needs[2:])
        try:
            with torch.no_grad():  # the backward operators have no derivative
                result = ctx.target.backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = flat_needs
        return (None, None, *_flatten_grads(ctx.spec, result))

    @staticmethod
    def vmap(info: Any, in_dims: tuple, target: TransformableOp, spec: tuple, *tensors: torch.Tensor) -> tuple:
        return _map_slices(lambda *t: call(target, *_unflatten(spec, t)), info.batch_size, tensors,
                           in_dims[2:])


def call(target: TransformableOp, *args: Any) -> Any:
    """``target.op(*args)``, through :class:`_TransformableCall` while a ``torch.func``
    transform is active."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return target.op(*args)
    spec, tensors = _flatten(args)
    return _TransformableCall.apply(target, spec, *tensors)
