"""CPU backend of the GRU-family scans: the fused C++ kernels of ``csrc/gru_scan_cpu.cpp``.

``torch.ops.interest_kernels.gru_scan_forward`` runs the whole scan (blocks of 16 rows,
each through all its steps with its state in L1: per step the input and recurrent
products by a register-blocked kernel, then one fused gate pass over the rows still
running) and ``gru_scan_backward`` its reverse. Rows are ordered
by their number of valid steps inside C++, so nothing in Python reads the values of
``lengths`` or ``mask``: the op traces as one node under ``torch.compile(fullgraph=True)``,
``torch.export`` (dynamic B and T) and ``torch.jit.trace``.

This module registers the ops' fake implementations (shapes for tracing) and their
autograd formula when the compiled extension loads; without the extension the ``cpu``
backend is unavailable and the scan falls back to the reference (``op.py``). Under
``torch.func`` transforms the forward op runs through ``ops/func_transforms.py``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..common import compute_dtype
from ..func_transforms import call
from ..registration import register_extension_op

FORWARD = "interest_kernels::gru_scan_forward"
BACKWARD = "interest_kernels::gru_scan_backward"

# Inputs of gru_scan_forward that can receive a gradient, in schema order; the
# backward op returns one gradient for each, in this order.
_GRAD_INPUTS = ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "att", "h0")
_BACKWARD_ORDER = ("x", "att", "h0", "weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _forward_fake(
    x: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor], bias_hh: Optional[torch.Tensor], att: Optional[torch.Tensor],
    h0: Optional[torch.Tensor], lengths: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    mode: str, variant: str, return_states: bool, keep_for_backward: bool,
) -> tuple[torch.Tensor, ...]:
    batch, seq_len, _ = x.shape
    hidden = weight_hh.shape[1]
    cdt = compute_dtype(x.dtype)
    states = x.new_empty((batch, seq_len, hidden)) if return_states else x.new_empty((0,))
    shape = (batch * seq_len, hidden) if keep_for_backward else (0,)
    workspace = tuple(x.new_empty(shape, dtype=cdt) for _ in range(5))
    return (states, x.new_empty((batch, hidden))) + workspace


def _backward_fake(
    grad_states: Optional[torch.Tensor], grad_h_last: Optional[torch.Tensor], x: torch.Tensor,
    weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor],
    bias_hh: Optional[torch.Tensor], att: Optional[torch.Tensor], h0: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor], mask: Optional[torch.Tensor], workspace: Sequence[torch.Tensor],
    mode: str, variant: str, needs: Sequence[bool],
) -> tuple[torch.Tensor, ...]:
    batch, seq_len, _ = x.shape
    hidden = weight_hh.shape[1]
    shapes = (x.shape, (batch, seq_len), (batch, hidden), weight_ih.shape, weight_hh.shape,
              (3 * hidden,), (3 * hidden,))
    dtypes = (x.dtype,) * 3 + (weight_ih.dtype,) * 4
    return tuple(
        x.new_empty(tuple(shape), dtype=dtype) if need else x.new_empty((0,))
        for shape, dtype, need in zip(shapes, dtypes, needs)
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    (x, weight_ih, weight_hh, bias_ih, bias_hh, att, h0, lengths, mask, mode, variant,
     _return_states, keep_for_backward) = inputs
    workspace = output[2:]
    ctx.mark_non_differentiable(*workspace)
    ctx.set_materialize_grads(False)  # no zeros for the workspace, nor for unused outputs
    ctx.save_for_backward(x, weight_ih, weight_hh, bias_ih, bias_hh, att, h0, lengths, mask, *workspace)
    ctx.config = (mode, variant, keep_for_backward)


def _backward(ctx: Any, grad_states: Optional[torch.Tensor], grad_h_last: Optional[torch.Tensor],
              *_grad_workspace: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    x, weight_ih, weight_hh, bias_ih, bias_hh, att, h0, lengths, mask, *workspace = ctx.saved_tensors
    mode, variant, kept = ctx.config
    if not kept:
        raise RuntimeError(
            "gru_scan: the forward ran without keep_for_backward (no input required grad "
            "then, or grad mode was off), so it saved nothing to differentiate"
        )
    wanted = dict(zip(_GRAD_INPUTS, ctx.needs_input_grad[: len(_GRAD_INPUTS)]))
    needs = [bool(wanted[name]) for name in _BACKWARD_ORDER]
    grads = dict(zip(_BACKWARD_ORDER, torch.ops.interest_kernels.gru_scan_backward(
        grad_states, grad_h_last, x, weight_ih, weight_hh, bias_ih, bias_hh, att, h0,
        lengths, mask, workspace, mode, variant, needs,
    )))
    return tuple(grads[name] if wanted[name] else None for name in _GRAD_INPUTS) + (None,) * 6


_FORWARD = register_extension_op(FORWARD, BACKWARD, _forward_fake, _backward_fake, _setup_context, _backward)
AVAILABLE = _FORWARD is not None


def gru_scan_cpu(
    x: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor] = None,
    bias_hh: Optional[torch.Tensor] = None,
    att: Optional[torch.Tensor] = None,
    *,
    mode: str = "gru",
    variant: str = "paper",
    lengths: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    h0: Optional[torch.Tensor] = None,
    return_states: bool = True,
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The scan of ``reference.gru_scan_reference`` through the fused C++ op.

    Takes the normalised arguments of ``op.gru_scan``; returns ``(states or None, h_last)``.
    The forward keeps a workspace (five (B*T, H) tensors) for the backward only when grad
    mode is on and some input requires grad.
    """
    # torch.jit.trace checks its graph by tracing again under no_grad: the graph must not
    # depend on grad mode, so a traced scan keeps the workspace whenever inputs require grad.
    keep = (torch.jit.is_tracing() or torch.is_grad_enabled()) and any(
        t is not None and t.requires_grad for t in (x, weight_ih, weight_hh, bias_ih, bias_hh, att, h0)
    )
    states, h_last, *_ = call(
        _FORWARD, x, weight_ih, weight_hh, bias_ih, bias_hh, att, h0, lengths, mask, mode, variant,
        return_states, keep,
    )
    return (states if return_states else None), h_last
