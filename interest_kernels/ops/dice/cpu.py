"""CPU backend for Dice: the fused C++ kernels of ``csrc/dice_cpu.cpp``.

``torch.ops.interest_kernels.dice_cpu_forward`` computes the batch statistics (training)
and applies Dice in three reads of x and one write; ``dice_cpu_backward`` gives the
gradients of x, alpha, weight and bias in two reads of x and the upstream gradient. The
running statistics are updated here, from the batch mean and biased variance the forward
returns, exactly as the reference does. Nothing reads tensor values on the host.

This module registers the ops' fake implementations and autograd when the compiled
extension loads; without it the ``cpu`` backend is unavailable and Dice runs the
reference (``op.py``). Under ``torch.func`` transforms the forward runs through
``ops/func_transforms.py``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..common import compute_dtype
from ..func_transforms import call
from ..registration import register_extension_op
from .reference import update_running_stats

FORWARD = "interest_kernels::dice_cpu_forward"
BACKWARD = "interest_kernels::dice_cpu_backward"


def _forward_fake(x, alpha, weight, bias, running_mean, running_var, training, eps):
    stat = x.new_empty((x.shape[1],), dtype=compute_dtype(x.dtype))
    return x.new_empty(x.shape), stat, stat.new_empty(stat.shape), stat.new_empty(stat.shape)


def _backward_fake(grad_out, x, alpha, weight, bias, mean, invstd, training):
    channels = (x.shape[1],)
    return (
        x.new_empty(x.shape),
        alpha.new_empty(channels),
        weight.new_empty(channels) if weight is not None else x.new_empty((0,)),
        bias.new_empty(channels) if bias is not None else x.new_empty((0,)),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, alpha, weight, bias, _running_mean, _running_var, training, _eps = inputs
    _out, mean, invstd, _var = output
    ctx.mark_non_differentiable(mean, invstd, _var)
    ctx.save_for_backward(x, alpha, weight, bias, mean, invstd)
    ctx.training = training


def _backward(ctx: Any, grad_out: torch.Tensor, *_grad_stats: Any) -> tuple[Optional[torch.Tensor], ...]:
    x, alpha, weight, bias, mean, invstd = ctx.saved_tensors
    d_x, d_alpha, d_weight, d_bias = torch.ops.interest_kernels.dice_cpu_backward(
        grad_out, x, alpha, weight, bias, mean, invstd, ctx.training)
    wanted = ctx.needs_input_grad
    return (
        d_x if wanted[0] else None,
        d_alpha if wanted[1] else None,
        d_weight if weight is not None and wanted[2] else None,
        d_bias if bias is not None and wanted[3] else None,
        None, None, None, None,
    )


_FORWARD = register_extension_op(FORWARD, BACKWARD, _forward_fake, _backward_fake, _setup_context, _backward)
AVAILABLE = _FORWARD is not None


def dice_cpu(
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
    """Dice of ``reference.dice_reference`` through the fused op; x (N, C) or (N, T, C)."""
    channels = x.shape[-1]
    flat = x.reshape(-1, channels)
    out, mean, _invstd, var = call(
        _FORWARD, flat, alpha, weight, bias, None if training else running_mean,
        None if training else running_var, training, eps)
    if training and running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, flat.shape[0], momentum)
    return out.reshape(x.shape)
