"""CPU backend for DIEN's auxiliary loss: the operators of ``csrc/aux_loss_cpu.cpp``.

``torch.ops.interest_kernels.dien_aux_loss_cpu_forward`` scores only the valid pairs
(t, t + 1) (the reference scores all B (T - 1), padded ones zeroed, to keep its shapes
static); their number is data-dependent but stays inside the operator, whose loss is
0-d. It also returns the pairs' rows and each layer's activations (fake shapes with an
unbacked size), which ``dien_aux_loss_cpu_backward`` reuses. Python passes the (B, T)
valid mask built from ``lengths`` or ``mask`` without reading any value, so
``torch.compile(fullgraph=True)`` and ``torch.export`` trace the call.

This module registers the fake implementations and autograd when the compiled extension
loads; without it the ``cpu`` backend is unavailable and the reference runs.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..common import compute_dtype, valid_mask
from ..func_transforms import call
from ..registration import register_extension_op

FORWARD = "interest_kernels::dien_aux_loss_cpu_forward"
BACKWARD = "interest_kernels::dien_aux_loss_cpu_backward"


def _forward_fake(states, pos, neg, valid, weights, biases, out_weight, out_bias, activation):
    pairs = torch.library.get_ctx().new_dynamic_size()
    acc = compute_dtype(states.dtype)
    saved = [states.new_empty((2 * pairs, w.shape[0]), dtype=acc) for w in weights]
    saved.append(states.new_empty((2 * pairs,), dtype=acc))
    return states.new_empty(()), states.new_empty((pairs,), dtype=torch.int64), saved


def _backward_fake(grad, states, pos, neg, valid, weights, biases, out_weight, out_bias, activation, rows, saved):
    return (
        states.new_empty(states.shape), pos.new_empty(pos.shape), neg.new_empty(neg.shape),
        [w.new_empty(w.shape) for w in weights],
        [b.new_empty(b.shape) for b in biases],
        out_weight.new_empty(out_weight.shape),
        out_bias.new_empty(out_bias.shape) if out_bias is not None else out_weight.new_empty((0,)),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    states, pos, neg, valid, weights, biases, out_weight, out_bias, activation = inputs
    _loss, rows, saved = output
    ctx.mark_non_differentiable(rows, *saved)
    ctx.layers = len(weights)
    ctx.activation = activation
    ctx.save_for_backward(states, pos, neg, valid, out_weight, out_bias, rows, *weights, *biases, *saved)


def _backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[Any, ...]:
    states, pos, neg, valid, out_weight, out_bias, rows, *rest = ctx.saved_tensors
    weights, biases, saved = rest[: ctx.layers], rest[ctx.layers: 2 * ctx.layers], rest[2 * ctx.layers:]
    d_states, d_pos, d_neg, d_weights, d_biases, d_out_weight, d_out_bias = (
        torch.ops.interest_kernels.dien_aux_loss_cpu_backward(
            grad, states, pos, neg, valid, weights, biases, out_weight, out_bias, ctx.activation, rows, saved))
    wanted = ctx.needs_input_grad
    return (
        d_states if wanted[0] else None,
        d_pos if wanted[1] else None,
        d_neg if wanted[2] else None,
        None,
        list(d_weights),
        [d if b.numel() else None for d, b in zip(d_biases, biases)],
        d_out_weight if wanted[6] else None,
        d_out_bias if out_bias is not None and wanted[7] else None,
        None,
    )


_FORWARD = register_extension_op(FORWARD, BACKWARD, _forward_fake, _backward_fake, _setup_context, _backward)
AVAILABLE = _FORWARD is not None


def dien_aux_loss_cpu(
    states: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    out_weight: torch.Tensor,
    out_bias: Optional[torch.Tensor] = None,
    *,
    activation: str = "sigmoid",
    lengths: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``reference.dien_aux_loss_reference`` through the operator (arguments checked by ``op.py``)."""
    batch, seq_len, _ = states.shape
    valid = valid_mask(lengths, mask, seq_len, states.device)
    if valid is None:
        valid = torch.ones(batch, seq_len, dtype=torch.bool, device=states.device)
    # An absent bias is passed as a (0,) tensor (autograd takes no None inside a list).
    biases = [b if b is not None else w.new_empty((0,)) for w, b in zip(weights, biases)]
    loss, _rows, _saved = call(_FORWARD, states, pos, neg, valid, list(weights), biases, out_weight, out_bias,
                               activation)
    return loss
