"""Eager reference for target attention (SPEC section 1): the spec made runnable.

For query ``q_b`` and behaviours ``k_bt``::

    x_bt = [q_b, k_bt, q_b - k_bt, q_b * k_bt]                 (4D, built literally)
    h_l  = act(W_l h_{l-1} + c_l),  l = 1..L
    s_bt = w_o . h_L + c_o
    a_bt = softmax over valid t of s_bt   (normalization "softmax")
         = s_bt                           (normalization "none")
    a_bt = 0 at masked positions;  o_b = sum_t a_bt k_bt

Every form goes through one canonical layout with a head axis E (E = 1 for the
single-head forms): query (B, E, D), keys (B, E, T, D) (history rows gathered by
``key_index`` in the shared-history form), valid positions (B, T).

Padding is never read: masked keys enter the MLP and the pooling as zeros, so NaN or Inf
in them reaches no output and no gradient. The one exception is Dice in training mode,
whose batch statistics cover every position of the layer, padded ones included (SPEC
section 1, as both libraries compute it): there the padded keys' values count.

Low-precision inputs (float16/bfloat16) are computed in float32 and the outputs cast
back to the input dtype; float64 stays float64.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..common import reference_dtype, valid_mask
from ..dice.reference import DiceParams, dice_reference


def valid_positions(
    lengths: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    key_index: Optional[torch.Tensor],
    batch: int,
    seq_len: int,
    device: torch.device,
) -> torch.Tensor:
    """Bool (B, T): which positions of each query's history are valid.

    ``lengths``/``mask`` are indexed by history row; ``key_index`` maps queries to rows.
    """
    valid = valid_mask(lengths, mask, seq_len, device)
    if valid is None:
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if key_index is not None:
        valid = valid.index_select(0, key_index)
    return valid


def normalize_scores(scores: torch.Tensor, valid: torch.Tensor, normalization: str) -> torch.Tensor:
    """Attention weights from raw scores (..., T) and a bool mask of the same shape.

    Masked positions get weight 0; a row without any valid position gets all zeros
    (no NaN, unlike the libraries' -2**32 padding, which averages the padding).
    """
    if normalization == "none":
        return torch.where(valid, scores, torch.zeros_like(scores))
    any_valid = valid.any(dim=-1, keepdim=True)
    filled = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    # An all-masked row is softmaxed over zeros, then zeroed by the mask.
    filled = torch.where(any_valid, filled, torch.zeros_like(scores))
    # where, not a product with the mask: a NaN upstream gradient at a masked position
    # must not become 0 * NaN.
    return torch.where(valid, torch.softmax(filled, dim=-1), torch.zeros_like(scores))


def apply_activation(
    h: torch.Tensor,
    activation: str,
    layer: int,
    prelu_weights: Optional[Sequence[torch.Tensor]],
    dice_params: Optional[Sequence[DiceParams]],
) -> torch.Tensor:
    """Hidden activation of layer ``layer`` on ``h`` (B, E, T, H).

    Per-head parameters have a leading E dim: PReLU slopes (E, H), Dice tensors (E, H)
    with each head's statistics over its B*T positions; otherwise one Dice layer sees
    all B*E*T positions.
    """
    if activation == "sigmoid":
        return torch.sigmoid(h)
    if activation == "relu":
        return torch.relu(h)
    if activation == "identity":
        return h
    if activation == "prelu":
        slope = prelu_weights[layer].to(h.dtype)
        if slope.dim() == 2:
            slope = slope.unsqueeze(1)  # (E, 1, H) against (B, E, T, H)
        return torch.where(h >= 0, h, slope * h)
    if activation == "dice":
        p = dice_params[layer]
        cast = lambda t: None if t is None else t.to(h.dtype)  # noqa: E731
        if p.alpha.dim() == 2:
            heads = [
                dice_reference(
                    h[:, e], cast(p.alpha[e]),
                    None if p.running_mean is None else p.running_mean[e],
                    None if p.running_var is None else p.running_var[e],
                    None if p.weight is None else cast(p.weight[e]),
                    None if p.bias is None else cast(p.bias[e]),
                    training=p.training, momentum=p.momentum, eps=p.eps,
                )
                for e in range(h.shape[1])
            ]
            return torch.stack(heads, dim=1)
        return dice_reference(
            h, cast(p.alpha), p.running_mean, p.running_var, cast(p.weight), cast(p.bias),
            training=p.training, momentum=p.momentum, eps=p.eps,
        )
    raise ValueError(f"unknown activation {activation!r}")


def target_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Optional[Sequence[Optional[torch.Tensor]]],
    out_weight: torch.Tensor,
    out_bias: Optional[torch.Tensor] = None,
    *,
    activation: str = "sigmoid",
    normalization: str = "softmax",
    lengths: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    key_index: Optional[torch.Tensor] = None,
    prelu_weights: Optional[Sequence[torch.Tensor]] = None,
    dice_params: Optional[Sequence[DiceParams]] = None,
    return_scores: bool = False,
):
    """Target attention, eager and unvalidated (see the module docstring).

    Takes the arguments of :func:`interest_kernels.target_attention` (validate with
    that function; this one trusts its input). Returns ``out`` (B, D) or (B, E, D), and
    with ``return_scores`` also the weights ``a`` (B, T) or (B, E, T); both in the
    dtype of ``query``.
    """
    out_dtype = query.dtype
    dt = reference_dtype(out_dtype)
    multi_head = keys.dim() == 4
    per_head = weights[0].dim() == 3
    seq_len, dim = keys.shape[-2], keys.shape[-1]

    k = keys.to(dt)
    if key_index is not None:
        k = k.index_select(0, key_index)
    if not multi_head:
        k = k.unsqueeze(1)  # (B, 1, T, D)
    batch, heads = k.shape[0], k.shape[1]
    q_heads = query.shape[1] if query.dim() == 3 else 1  # no -1: B may be 0
    q = query.to(dt).reshape(batch, q_heads, dim).expand(batch, heads, dim)  # (B, E, D)

    valid = valid_positions(lengths, mask, key_index, batch, seq_len, keys.device)  # (B, T)
    k_valid = torch.where(valid[:, None, :, None], k, torch.zeros_like(k))
    dice_training = activation == "dice" and dice_params[0].training
    k_mlp = k if dice_training else k_valid

    qe = q.unsqueeze(2).expand_as(k)
    h = torch.cat([qe, k_mlp, qe - k_mlp, qe * k_mlp], dim=-1)  # (B, E, T, 4D)
    biases = biases if biases is not None else [None] * len(weights)
    for layer, (w, c) in enumerate(zip(weights, biases)):
        w = w.to(dt)
        if per_head:
            h = torch.einsum("beti,ehi->beth", h, w)
            if c is not None:
                h = h + c.to(dt).reshape(heads, 1, -1)
        else:
            h = F.linear(h, w, None if c is None else c.to(dt))
        h = apply_activation(h, activation, layer, prelu_weights, dice_params)

    hidden = h.shape[-1]
    w_o = out_weight.to(dt).reshape(heads if per_head else 1, hidden)  # (E|1, H_L)
    scores = (h * w_o.unsqueeze(1)).sum(dim=-1)  # (B, E, T)
    if out_bias is not None:
        scores = scores + out_bias.to(dt).reshape(-1, 1)

    a = normalize_scores(scores, valid.unsqueeze(1).expand_as(scores), normalization)
    out = torch.einsum("bet,betd->bed", a, k_valid)

    if not multi_head:
        out, a = out.squeeze(1), a.squeeze(1)
    out = out.to(out_dtype)
    if return_scores:
        return out, a.to(out_dtype)
    return out
