"""CPU backend for target attention: plain torch, without the (B, T, 4D) concat.

SPEC's identity splits the first layer's weight by input block,
``W_1 = [W_q | W_k | W_d | W_p]``, so that

    W_1 x_bt = (W_q + W_d) q_b + (W_k - W_d) k_bt + W_p (q_b * k_bt)
             = (W_q + W_d) q_b + M_b^T k_bt,     M_b = (W_k - W_d)^T + diag(q_b) W_p^T  (D, H_1)

The q-term is one (B, D) x (D, H_1) matmul and the key term one batched matmul with
a per-row (D, H_1) matrix: a quarter of the first layer's multiply-adds and none of
its (B, T, 4D) input. Every activation applies after it unchanged; PReLU and Dice run
through torch's fused kernels (``prelu``, ``batch_norm``). Autograd provides the backward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..dice.reference import DiceParams
from ..common import compute_dtype
from .reference import apply_activation, normalize_scores, valid_positions


def _activate(
    h: torch.Tensor,
    activation: str,
    layer: int,
    per_head: bool,
    prelu_weights: Optional[Sequence[torch.Tensor]],
    dice_params: Optional[Sequence[DiceParams]],
) -> torch.Tensor:
    """The reference's activations on ``h`` (B, E, T, H), PReLU and Dice through torch's
    fused kernels (one pass each way instead of several elementwise ones)."""
    units = h.shape[-1]
    if activation == "prelu" and not per_head:
        return F.prelu(h.reshape(-1, units), prelu_weights[layer].to(h.dtype)).reshape(h.shape)
    if activation != "dice":
        return apply_activation(h, activation, layer, prelu_weights, dice_params)
    p = dice_params[layer]
    # Per-head Dice keeps separate statistics per head: heads x units channels.
    x = h.transpose(1, 2).reshape(-1, h.shape[1] * units) if per_head else h.reshape(-1, units)
    if p.training and x.shape[0] < 2:
        # One position: the running variance update needs the reference's n = 1 rule.
        return apply_activation(h, activation, layer, prelu_weights, dice_params)
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    stats = [flat(p.running_mean), flat(p.running_var)]
    work = [None if t is None else t.to(x.dtype) for t in stats]
    xhat = torch.batch_norm(
        x, None if p.weight is None else flat(p.weight).to(x.dtype),
        None if p.bias is None else flat(p.bias).to(x.dtype), work[0], work[1],
        p.training, p.momentum, p.eps, False,
    )
    if p.training:
        with torch.no_grad():
            for buf, new in zip(stats, work):
                if buf is not None and new is not buf:
                    buf.copy_(new)
    gate = torch.sigmoid(xhat)
    alpha = flat(p.alpha).to(x.dtype)
    y = x * (alpha + (1 - alpha) * gate)
    if per_head:
        return y.reshape(h.shape[0], h.shape[2], h.shape[1], units).transpose(1, 2)
    return y.reshape(h.shape)


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
    seq_len, dim = keys.shape[-2], keys.shape[-1]

    k = keys.to(dt)
    if key_index is not None:
        k = k.index_select(0, key_index)
    if not multi_head:
        k = k.unsqueeze(1)  # (B, 1, T, D)
    batch, heads = k.shape[0], k.shape[1]
    q_heads = query.shape[1] if query.dim() == 3 else 1  # no -1: B may be 0
    q = query.to(dt).reshape(batch, q_heads, dim)  # (B, E, D) or (B, 1, D) shared by the heads
    # Padding is never read (the reference's rule): masked keys count as zeros, except in
    # Dice's training statistics, which cover every position.
    valid = valid_positions(lengths, mask, key_index, batch, seq_len, keys.device)
    k_valid = torch.where(valid[:, None, :, None], k, torch.zeros_like(k))
    k_mlp = k if activation == "dice" and dice_params[0].training else k_valid

    w1 = weights[0].to(dt)  # (H, 4D) or (E, H, 4D)
    w_q, w_k, w_d, w_p = w1.split(dim, dim=-1)
    w_qd = (w_q + w_d).transpose(-1, -2)  # (E|-, D, H)
    w_kd = (w_k - w_d).transpose(-1, -2)
    w_pt = w_p.transpose(-1, -2)
    # (B, E|1, H): the query term and bias.
    q_term = (q.unsqueeze(-2) @ w_qd).squeeze(-2)
    if biases[0] is not None:
        q_term = q_term + biases[0].to(dt)
    # (B, E|1, D, H): the per-row matrix that maps each key to its hidden units.
    m = w_kd + q.unsqueeze(-1) * w_pt
    units = m.shape[-1]
    if m.shape[1] == 1:
        # One matrix per row for all heads: fold the heads into the sequence.
        groups, rows_per_group = batch, heads * seq_len
    else:
        groups, rows_per_group = batch * heads, seq_len
    h = torch.baddbmm(
        q_term.reshape(groups, 1, units),
        k_mlp.reshape(groups, rows_per_group, dim),
        m.reshape(groups, dim, units),
    ).reshape(batch, heads, seq_len, units)
    h = _activate(h, activation, 0, per_head, prelu_weights, dice_params)

    for layer in range(1, len(weights)):
        w = weights[layer].to(dt)
        c = biases[layer]
        if per_head:
            h = h @ w.transpose(-1, -2)
            if c is not None:
                h = h + c.to(dt).unsqueeze(1)
        else:
            h = F.linear(h, w, None if c is None else c.to(dt))
        h = _activate(h, activation, layer, per_head, prelu_weights, dice_params)

    w_o = out_weight.to(dt)
    if per_head:
        scores = (h @ w_o.unsqueeze(-1)).squeeze(-1)  # (B, E, T, H) @ (E, H, 1)
    else:
        scores = h @ w_o
    if out_bias is not None:
        scores = scores + out_bias.to(dt).reshape(-1, 1)

    a = normalize_scores(scores, valid.unsqueeze(1).expand_as(scores), normalization)
    out = (a.unsqueeze(-2) @ k_valid).squeeze(-2)  # (B, E, D)

    if not multi_head:
        out, a = out.squeeze(1), a.squeeze(1)
    return out.to(out_dtype), (a.to(out_dtype) if return_scores else None)
