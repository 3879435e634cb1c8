"""CPU backend for target attention: the fused C++ kernels of
``csrc/target_attention_cpu.cpp`` as ``torch.library`` operators.

``torch.ops.interest_kernels.target_attention_cpu`` runs the whole layer for each
(query, head) pair in one pass over its keys: SPEC's first-layer identity
(``W_1 x = (W_q + W_d) q + (W_k - W_d) k + W_p (q * k)``, one (rows x D) x (D x H_1)
GEMM per tile of keys), the hidden layers, the scores, the normalisation and the
pooling, with the hidden activations in a per-thread workspace (nothing of size
(B, T, H) is written). Its backward recomputes them tile by tile and saves only the
attention weights (B, E, T).

Dice in training normalises each layer with batch statistics over every position of
the layer (padding included, as the reference does). Those come from
``target_attention_cpu_stats`` (mean and biased variance of layer l's pre-activation,
recomputing layers 1..l-1), an operator with its own backward; the layer then runs as
``dice(z) = z * (alpha + (1 - alpha) * sigmoid(z * scale + shift))`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` computed here in
torch, so autograd carries the statistics' gradient back through both operators.

Nothing here reads tensor values on the host: ``torch.compile(fullgraph=True)``,
``torch.export`` and ``torch.jit.trace`` see opaque operators with fake implementations.
Under ``torch.func`` transforms the operators run through ``ops/func_transforms.py``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..._extension import load as _load_extension
from ..common import compute_dtype
from ..func_transforms import TransformableOp, call, register_sliced_vmap
from ..dice.reference import DiceParams, update_running_stats

_NS = "interest_kernels"


def unavailable_reason() -> Optional[str]:
    """Why the fused CPU operators cannot run here (None when they can). Registers their
    fake implementations and autograd the first time they can."""
    if not _load_extension():
        return "the compiled extension interest_kernels._C is not available"
    if not hasattr(torch.ops.interest_kernels, "target_attention_cpu"):
        return "the compiled extension predates the fused CPU target attention; rebuild it"
    _register()
    return None


# --- fake implementations and autograd (registered once the extension is loaded) ------

_registered = False
# The operators with their autograd, for torch.func transforms (set by _register).
_FORWARD: Optional[TransformableOp] = None
_STATS: Optional[TransformableOp] = None


def _register() -> None:
    global _registered, _FORWARD, _STATS
    if _registered:
        return
    _registered = True

    @torch.library.register_fake(f"{_NS}::target_attention_cpu")
    def _fwd_fake(query, keys, key_index, lengths, mask, weights, biases, out_weight, out_bias,
                  act_params, activation, normalization):
        batch, heads, seq_len, dim = query.shape[0], keys.shape[1], keys.shape[2], keys.shape[3]
        return query.new_empty(batch, heads, dim), query.new_empty(batch, heads, seq_len)

    @torch.library.register_fake(f"{_NS}::target_attention_cpu_backward")
    def _bwd_fake(grad_out, grad_scores, scores, query, keys, key_index, lengths, mask, weights,
                  biases, out_weight, out_bias, act_params, activation, normalization):
        return (torch.empty_like(query), torch.empty_like(keys),
                [torch.empty_like(w) for w in weights], [torch.empty_like(c) for c in biases],
                torch.empty_like(out_weight), torch.empty_like(out_bias),
                [torch.empty_like(a) for a in act_params])

    @torch.library.register_fake(f"{_NS}::target_attention_cpu_stats")
    def _stats_fake(query, keys, key_index, weights, biases, act_params):
        return query.new_empty(weights[-1].shape[0], 2, weights[-1].shape[1])

    @torch.library.register_fake(f"{_NS}::target_attention_cpu_stats_backward")
    def _stats_bwd_fake(grad_stats, stats, query, keys, key_index, weights, biases, act_params):
        return (torch.empty_like(query), torch.empty_like(keys),
                [torch.empty_like(w) for w in weights], [torch.empty_like(c) for c in biases],
                [torch.empty_like(a) for a in act_params])

    def _fwd_setup(ctx, inputs, output):
        (query, keys, key_index, lengths, mask, weights, biases, out_weight, out_bias,
         act_params, activation, normalization) = inputs
        ctx.num = (len(weights), len(biases), len(act_params))
        ctx.save_for_backward(output[1], query, keys, key_index, lengths, mask, out_weight,
                              out_bias, *weights, *biases, *act_params)
        ctx.activation, ctx.normalization = activation, normalization

    def _fwd_backward(ctx, grad_out, grad_scores):
        (scores, query, keys, key_index, lengths, mask, out_weight, out_bias,
         *rest) = ctx.saved_tensors
        nw, nb, na = ctx.num
        weights, biases, act_params = rest[:nw], rest[nw:nw + nb], rest[nw + nb:]
        gq, gk, gw, gb, gwo, gbo, ga = torch.ops.interest_kernels.target_attention_cpu_backward(
            grad_out, grad_scores, scores, query, keys, key_index, lengths, mask, weights,
            biases, out_weight, out_bias, act_params, ctx.activation, ctx.normalization)
        return gq, gk, None, None, None, gw, gb, gwo, gbo, ga, None, None

    torch.library.register_autograd(
        f"{_NS}::target_attention_cpu", _fwd_backward, setup_context=_fwd_setup)
    _FORWARD = TransformableOp(torch.ops.interest_kernels.target_attention_cpu.default, _fwd_setup,
                               _fwd_backward)

    def _stats_setup(ctx, inputs, output):
        query, keys, key_index, weights, biases, act_params = inputs
        ctx.num = (len(weights), len(biases), len(act_params))
        ctx.save_for_backward(output, query, keys, key_index, *weights, *biases, *act_params)

    def _stats_backward(ctx, grad_stats):
        stats, query, keys, key_index, *rest = ctx.saved_tensors
        nw, nb, _ = ctx.num
        weights, biases, act_params = rest[:nw], rest[nw:nw + nb], rest[nw + nb:]
        gq, gk, gw, gb, ga = torch.ops.interest_kernels.target_attention_cpu_stats_backward(
            grad_stats, stats, query, keys, key_index, weights, biases, act_params)
        return gq, gk, None, gw, gb, ga

    torch.library.register_autograd(
        f"{_NS}::target_attention_cpu_stats", _stats_backward, setup_context=_stats_setup)
    _STATS = TransformableOp(torch.ops.interest_kernels.target_attention_cpu_stats.default,
                             _stats_setup, _stats_backward)
    register_sliced_vmap(f"{_NS}::target_attention_cpu_backward")
    register_sliced_vmap(f"{_NS}::target_attention_cpu_stats_backward")


# --- the backend ---------------------------------------------------------------------


def _dice_layer_params(
    params: DiceParams,
    layer: int,
    groups: int,
    units: int,
    dt: torch.dtype,
    q: torch.Tensor,
    k: torch.Tensor,
    key_index: Optional[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    act_params: list[torch.Tensor],
) -> list[torch.Tensor]:
    """[alpha, scale, shift] (G, H) of Dice layer ``layer``: batch statistics of the
    layer's pre-activation in training (running statistics updated in place), the
    running statistics in eval."""
    grouped = lambda t: t.to(dt).reshape(groups, units)  # noqa: E731
    positions = q.shape[0] * k.shape[2] * (1 if groups > 1 else k.shape[1])
    if params.training and positions == 0:
        # No positions (B or T is 0): no batch statistics, the running ones stay as they are.
        mean, var = q.new_zeros(groups, units, dtype=dt), q.new_ones(groups, units, dtype=dt)
    elif params.training:
        stats = call(_STATS, q, k, key_index, weights[: layer + 1], biases[: layer + 1], act_params)
        mean, var = stats[:, 0], stats[:, 1]
        if params.running_mean is not None and params.running_var is not None:
            update_running_stats(params.running_mean, params.running_var, mean.detach(),
                                 var.detach(), positions, params.momentum)
    else:
        mean, var = grouped(params.running_mean), grouped(params.running_var)
    scale = torch.rsqrt(var + params.eps)
    if params.weight is not None:
        scale = scale * grouped(params.weight)
    shift = -mean * scale
    if params.bias is not None:
        shift = shift + grouped(params.bias)
    return [grouped(params.alpha), scale, shift]


def target_attention_cpu(
    query: torch.Tensor,
    keys: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    out_weight: torch.Tensor,
    out_bias: Optional[torch.Tensor],
    *,
    activation: str,
    normalization: str,
    lengths: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    key_index: Optional[torch.Tensor],
    prelu_weights: Optional[Sequence[torch.Tensor]],
    dice_params: Optional[Sequence[DiceParams]],
    return_scores: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Target attention on normalised arguments (see ``op.py``); returns ``(out, scores)``.

    Shapes as :func:`interest_kernels.target_attention`; ``scores`` is None unless
    ``return_scores``. Outputs are in the dtype of ``query``; math in float32 (float64
    for float64 inputs).
    """
    out_dtype = query.dtype
    dt = compute_dtype(out_dtype)
    multi_head = keys.dim() == 4
    per_head = weights[0].dim() == 3
    dim = keys.shape[-1]
    k = keys.to(dt) if multi_head else keys.to(dt).unsqueeze(1)  # (R, E, T, D)
    q = query.to(dt) if query.dim() == 3 else query.to(dt).unsqueeze(1)  # (B, E|1, D)
    groups = k.shape[1] if per_head else 1
    units = [w.shape[-2] for w in weights]

    ws = [w.to(dt).reshape(groups, *w.shape[-2:]) for w in weights]
    cs = [
        c.to(dt).reshape(groups, h) if c is not None else q.new_zeros(groups, h)
        for c, h in zip(biases, units)
    ]
    w_o = out_weight.to(dt).reshape(groups, units[-1])
    c_o = out_bias.to(dt).reshape(groups) if out_bias is not None else q.new_zeros(groups)

    act_params: list[torch.Tensor] = []
    if activation == "prelu":
        act_params = [a.to(dt).reshape(groups, h) for a, h in zip(prelu_weights, units)]
    elif activation == "dice":
        for layer, (p, h) in enumerate(zip(dice_params, units)):
            act_params += _dice_layer_params(p, layer, groups, h, dt, q, k, key_index, ws, cs,
                                             act_params)

    out, scores = call(_FORWARD, q, k, key_index, lengths, mask, ws, cs, w_o, c_o, act_params,
                       activation, normalization)
    if not multi_head:
        out, scores = out.squeeze(1), scores.squeeze(1)
    return out.to(out_dtype), (scores.to(out_dtype) if return_scores else None)
