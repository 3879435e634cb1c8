"""CPU backend for target attention: the fused C++ kernels of
``csrc/target_attention_cpu.cpp`` as ``torch.library`` operators.

``torch.ops.interest_kernels.target_attention_cpu`` runs the whole layer for each
(query, head) pair in one pass over its keys: SPEC's first-layer identity
(``W_1 x = (W_q + W_d) q + (W_k - W_d) k + W_p (q * k)``, one (rows x D) x (D x H_1)
GEMM per tile of keys), the hidden layers, the scores, the normalisation and the
pooling, with the hidden activations in a per-thread workspace (nothing of size
(B, T, H) is written). Its backward recomputes them tile by tile. It serves inference
and, by default, training.

``target_attention_cpu_train`` is the same layer keeping each layer's pre-activation
(B, E, T, H_l) for its backward, which then skips the recomputation: no faster with the
AVX-512 kernels, even with full histories (writing and faulting in the buffers costs as
much as the GEMMs they save: ``bench/results/cpu_attention_avx512.md``), so it is used when
asked (``save_pre_activations=True``) and for Dice in training: its batch statistics cover
every position of the layer (padding included, SPEC section 1), so the operator goes one
layer at a time over the batch, computes each layer's mean and biased variance, and its
backward adds the statistics' gradient. The running statistics are updated here from the
statistics it returns.

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

# Whether a forward that needs gradients keeps the pre-activations (B, E, T, sum H_l) for
# its backward or lets the backward recompute them (less memory; on an AVX-512 CPU as fast
# with full histories and faster with padded ones, bench/results/cpu_attention_avx512.md;
# with the AVX2 kernels 1-11% slower with full histories). Dice with batch statistics
# always keeps them.
SAVE_PRE_ACTIVATIONS = False


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
_TRAIN: Optional[TransformableOp] = None


def _register() -> None:
    global _registered, _FORWARD, _TRAIN
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

    @torch.library.register_fake(f"{_NS}::target_attention_cpu_train")
    def _train_fake(query, keys, key_index, lengths, mask, weights, biases, out_weight, out_bias,
                    act_params, activation, normalization, dice_eps):
        batch, heads, seq_len, dim = query.shape[0], keys.shape[1], keys.shape[2], keys.shape[3]
        pre = [query.new_empty(batch, heads, seq_len, w.shape[1]) for w in weights]
        stats = ([query.new_empty(w.shape[0], 2, w.shape[1]) for w in weights]
                 if dice_eps is not None else [])
        return query.new_empty(batch, heads, dim), query.new_empty(batch, heads, seq_len), pre, stats

    @torch.library.register_fake(f"{_NS}::target_attention_cpu_train_backward")
    def _train_bwd_fake(grad_out, grad_scores, scores, pre_activations, stats, query, keys,
                        key_index, lengths, mask, weights, biases, out_weight, out_bias,
                        act_params, activation, normalization, dice_eps):
        return _bwd_fake(grad_out, grad_scores, scores, query, keys, key_index, lengths, mask,
                         weights, biases, out_weight, out_bias, act_params, activation,
                         normalization)

    def _fwd_setup(ctx, inputs, output):
        (query, keys, key_index, lengths, mask, weights, biases, out_weight, out_bias,
         act_params, activation, normalization) = inputs
        ctx.num = (len(weights), len(biases), len(act_params))
        ctx.save_for_backward(output[1], query, keys, key_index, lengths, mask, out_weight,
                              out_bias, *weights, *biases, *act_params)
        ctx.activation, ctx.normalization = activation, normalization
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None

    def _fwd_backward(ctx, grad_out, grad_scores):
        (scores, query, keys, key_index, lengths, mask, out_weight, out_bias,
         *rest) = ctx.saved_tensors
        nw, nb, na = ctx.num
        weights, biases, act_params = rest[:nw], rest[nw:nw + nb], rest[nw + nb:]
        if grad_out is None:
            grad_out = torch.zeros_like(query.expand(-1, keys.shape[1], -1))
        gq, gk, gw, gb, gwo, gbo, ga = torch.ops.interest_kernels.target_attention_cpu_backward(
            grad_out, grad_scores, scores, query, keys, key_index, lengths, mask, weights,
            biases, out_weight, out_bias, act_params, ctx.activation, ctx.normalization)
        return gq, gk, None, None, None, gw, gb, gwo, gbo, ga, None, None

    torch.library.register_autograd(
        f"{_NS}::target_attention_cpu", _fwd_backward, setup_context=_fwd_setup)
    _FORWARD = TransformableOp(torch.ops.interest_kernels.target_attention_cpu.default, _fwd_setup,
                               _fwd_backward)

    def _train_setup(ctx, inputs, output):
        (query, keys, key_index, lengths, mask, weights, biases, out_weight, out_bias,
         act_params, activation, normalization, dice_eps) = inputs
        _, scores, pre, stats = output
        ctx.mark_non_differentiable(*pre, *stats)
        # Unused outputs' gradients stay None: no zeros of the pre-activations' size.
        ctx.set_materialize_grads(False)
        ctx.num = (len(weights), len(biases), len(act_params), len(pre), len(stats))
        ctx.save_for_backward(scores, query, keys, key_index, lengths, mask, out_weight,
                              out_bias, *weights, *biases, *act_params, *pre, *stats)
        ctx.activation, ctx.normalization, ctx.dice_eps = activation, normalization, dice_eps

    def _train_backward(ctx, grad_out, grad_scores, grad_pre, grad_stats):
        (scores, query, keys, key_index, lengths, mask, out_weight, out_bias,
         *rest) = ctx.saved_tensors
        sizes = ctx.num
        parts, at = [], 0
        for n in sizes:
            parts.append(rest[at:at + n])
            at += n
        weights, biases, act_params, pre, stats = parts
        if grad_out is None:
            grad_out = torch.zeros_like(query.expand(-1, keys.shape[1], -1))
        gq, gk, gw, gb, gwo, gbo, ga = torch.ops.interest_kernels.target_attention_cpu_train_backward(
            grad_out, grad_scores, scores, pre, stats, query, keys, key_index, lengths, mask,
            weights, biases, out_weight, out_bias, act_params, ctx.activation, ctx.normalization,
            ctx.dice_eps)
        return gq, gk, None, None, None, gw, gb, gwo, gbo, ga, None, None, None

    torch.library.register_autograd(
        f"{_NS}::target_attention_cpu_train", _train_backward, setup_context=_train_setup)
    _TRAIN = TransformableOp(torch.ops.interest_kernels.target_attention_cpu_train.default,
                             _train_setup, _train_backward)
    register_sliced_vmap(f"{_NS}::target_attention_cpu_backward")
    register_sliced_vmap(f"{_NS}::target_attention_cpu_train_backward")


# --- the backend ---------------------------------------------------------------------


def _dice_running_params(params: DiceParams, groups: int, units: int, dt: torch.dtype) -> list[torch.Tensor]:
    """[alpha, scale, shift] (G, H) of a Dice layer normalised by its running statistics
    (eval), or with no positions to take batch statistics from (mean 0, variance 1; the
    running ones stay as they are)."""
    grouped = lambda t: t.to(dt).reshape(groups, units)  # noqa: E731
    if params.training:
        mean, var = torch.zeros(groups, units, dtype=dt), torch.ones(groups, units, dtype=dt)
    else:
        mean, var = grouped(params.running_mean), grouped(params.running_var)
    scale = torch.rsqrt(var + params.eps)
    if params.weight is not None:
        scale = scale * grouped(params.weight)
    shift = -mean * scale
    if params.bias is not None:
        shift = shift + grouped(params.bias)
    return [grouped(params.alpha), scale, shift]


def _dice_batch_params(params: DiceParams, groups: int, units: int, dt: torch.dtype) -> list[torch.Tensor]:
    """[alpha, gamma, beta] (G, H) of a Dice layer normalised by batch statistics (the
    kernel computes them); gamma 1 and beta 0 without the affine part."""
    grouped = lambda t: t.to(dt).reshape(groups, units)  # noqa: E731
    gamma = grouped(params.weight) if params.weight is not None else torch.ones(groups, units, dtype=dt)
    beta = grouped(params.bias) if params.bias is not None else torch.zeros(groups, units, dtype=dt)
    return [grouped(params.alpha), gamma, beta]


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
    save_pre_activations: Optional[bool] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Target attention on normalised arguments (see ``op.py``); returns ``(out, scores)``.

    Shapes as :func:`interest_kernels.target_attention`; ``scores`` is None unless
    ``return_scores``. Outputs are in the dtype of ``query``; math in float32 (float64
    for float64 inputs). ``save_pre_activations`` None takes ``SAVE_PRE_ACTIVATIONS``.
    """
    out_dtype = query.dtype
    dt = compute_dtype(out_dtype)
    multi_head = keys.dim() == 4
    per_head = weights[0].dim() == 3
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

    positions = q.shape[0] * k.shape[2] * (1 if per_head else k.shape[1])
    batch_stats = activation == "dice" and dice_params[0].training and positions > 0
    act_params: list[torch.Tensor] = []
    if activation == "prelu":
        act_params = [a.to(dt).reshape(groups, h) for a, h in zip(prelu_weights, units)]
    elif batch_stats:
        for p, h in zip(dice_params, units):
            act_params += _dice_batch_params(p, groups, h, dt)
    elif activation == "dice":
        for p, h in zip(dice_params, units):
            act_params += _dice_running_params(p, groups, h, dt)

    args = (q, k, key_index, lengths, mask, ws, cs, w_o, c_o, act_params, activation, normalization)
    # A jit trace must not depend on the grad mode (its check re-traces under no_grad): it
    # records the recomputing operator.
    needs_grad = (torch.is_grad_enabled() and not torch.jit.is_tracing() and any(
        t.requires_grad for t in (q, k, *ws, *cs, w_o, c_o, *act_params)))
    if batch_stats:
        out, scores, _, stats = call(_TRAIN, *args, [p.eps for p in dice_params])
        for p, st in zip(dice_params, stats):
            if p.running_mean is not None and p.running_var is not None:
                update_running_stats(p.running_mean, p.running_var, st[:, 0], st[:, 1], positions, p.momentum)
    elif needs_grad and (SAVE_PRE_ACTIVATIONS if save_pre_activations is None else save_pre_activations):
        out, scores, _, _ = call(_TRAIN, *args, None)
    else:
        out, scores = call(_FORWARD, *args)
    if not multi_head:
        out, scores = out.squeeze(1), scores.squeeze(1)
    return out.to(out_dtype), (scores.to(out_dtype) if return_scores else None)
