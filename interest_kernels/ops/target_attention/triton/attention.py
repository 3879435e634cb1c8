"""Entry point: the public op's normalised arguments turned into the kernels' operands.

The first layer uses SPEC's identity::

    W_1 x_t = (W_q + W_d) q + c_1  +  (W_k - W_d) k_t + W_p (q * k_t)

The q-term ``(W_q + W_d) q + c_1`` is one GEMM per call (R, H1); the kernels build
``M_r = W_kd + W_p diag(q_r)`` per row. Everything here is differentiable torch code
around the custom ops, so autograd carries the packed gradients back to the parameters.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...dice.reference import DiceParams, update_running_stats
from ...func_transforms import call
from .ops import FORWARD, STATS
from .pack import pack_act_params, pack_weights


def _grouped(t: torch.Tensor, per_head: bool) -> torch.Tensor:
    return t if per_head else t.unsqueeze(0)


def _act_params(activation: str, layer: int, hidden: int, groups: int,
                prelu_weights: Optional[Sequence[torch.Tensor]],
                dice_params: Optional[Sequence[DiceParams]],
                mean: Optional[torch.Tensor] = None,
                var: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """(G, 3, H) per-unit activation parameters of one layer, or None.

    PReLU: slope in row 0. Dice: (alpha, scale, shift) with the gate
    sigmoid(z * scale + shift) = sigmoid(weight * (z - mean) / sqrt(var + eps) + bias);
    ``mean``/``var`` (G, H) replace the running statistics (training mode)."""
    if activation == "prelu":
        slope = prelu_weights[layer].float().reshape(-1, hidden).expand(groups, hidden)
        zero = slope.new_zeros(groups, hidden)
        return torch.stack([slope, zero, zero], dim=1)
    if activation != "dice":
        return None
    p = dice_params[layer]

    def grouped(t, fill):
        if t is None:
            return torch.full((groups, hidden), fill, device=p.alpha.device, dtype=torch.float32)
        return t.float().reshape(-1, hidden).expand(groups, hidden)

    if mean is None:
        mean, var = grouped(p.running_mean, 0.0), grouped(p.running_var, 1.0)
    scale = grouped(p.weight, 1.0) * torch.rsqrt(var + p.eps)
    shift = grouped(p.bias, 0.0) - mean * scale
    return torch.stack([grouped(p.alpha, 0.0), scale, shift], dim=1)


def target_attention_triton(
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
    """Target attention with the fused kernels, on arguments normalised by the public op.

    query (B, D) or (B, E, D); keys (B|U, T, D) or (B|U, E, T, D); weights/biases as
    nn.Linear (leading E for per-head MLPs); out_weight (H_L,) or (E, H_L); out_bias
    0-d, (E,) or None. Returns ``(out, scores)``: out (B, D) / (B, E, D) and scores
    (B, T) / (B, E, T) (None unless ``return_scores``), in the dtype of ``query``.
    Dice in training mode updates the running statistics in place.
    """
    multi_head = keys.dim() == 4
    per_head = weights[0].dim() == 3
    heads = keys.shape[1] if multi_head else 1
    seq_len, dim = keys.shape[-2], keys.shape[-1]
    batch = query.shape[0]
    groups = heads if per_head else 1
    rows = batch * heads
    n_layers = len(weights)
    units = [w.shape[-2] for w in weights]

    # No -1 in these reshapes: B, U or T may be 0.
    q_heads = query.shape[1] if query.dim() == 3 else 1
    q = query.reshape(batch, q_heads, dim).expand(batch, heads, dim).reshape(rows, dim).contiguous()
    k = keys.reshape(keys.shape[0] * heads, seq_len, dim).contiguous()
    ws = [_grouped(w, per_head) for w in weights]
    bs = [_grouped(c, per_head) if c is not None else ws[i].new_zeros(groups, units[i])
          for i, c in enumerate(biases)]
    w_q, w_k, w_d, w_p = ws[0].split(dim, dim=-1)
    # q-term (R, H1) fp32, the first bias included: one GEMM
    w_qd = (w_q + w_d).float()
    if per_head:
        qterm = torch.einsum("bed,ehd->beh", q.float().reshape(batch, heads, dim), w_qd)
        qterm = (qterm + bs[0].float()).reshape(rows, units[0])
    else:
        qterm = torch.addmm(bs[0].reshape(-1).float(), q.float(), w_qd.reshape(units[0], dim).t())
    w_o = out_weight.reshape(groups, units[-1])
    b_o = (out_bias.reshape(-1).expand(groups) if out_bias is not None
           else w_o.new_zeros(groups))
    wpack = pack_weights(w_k - w_d, w_p, list(zip(ws[1:], bs[1:])), w_o, b_o)

    acts: list[torch.Tensor] = []
    for layer in range(n_layers):
        mean = var = None
        if activation == "dice" and dice_params[layer].training:
            mean, var = _dice_batch_stats(qterm, q, k, key_index, wpack, pack_act_params(acts),
                                          units, layer + 1, heads, groups, rows * seq_len,
                                          dice_params[layer])
        a = _act_params(activation, layer, units[layer], groups, prelu_weights, dice_params,
                        mean, var)
        if a is not None:
            acts.append(a)

    out, scores, _ = call(
        FORWARD, qterm, q, k, key_index, lengths, mask, wpack, pack_act_params(acts), units, heads,
        activation, normalization == "softmax", bool(return_scores))
    out = out.reshape((batch, heads, dim) if multi_head else (batch, dim))
    if not return_scores:
        return out, None
    return out, scores.reshape((batch, heads, seq_len) if multi_head else (batch, seq_len))


def _dice_batch_stats(qterm, q, k, key_index, wpack, apack, units, layer, heads, groups,
                      positions, params: DiceParams):
    """Batch mean and biased variance (G, H) of layer ``layer``'s (1-based) pre-activation
    over all positions (per head for per-head MLPs), differentiable; updates the running
    statistics."""
    sums = call(STATS, qterm, q, k, key_index, wpack, apack, units, layer, heads, "dice")
    n = positions
    if groups == 1:
        sums = sums.sum(dim=0, keepdim=True)
    else:
        n = positions // heads
    sums = sums.double()  # E[z^2] - E[z]^2 cancels: take the difference in float64
    mean = sums[:, 0] / n
    var = (sums[:, 1] / n - mean * mean).clamp_min(0.0)
    if params.running_mean is not None and params.running_var is not None:
        update_running_stats(params.running_mean, params.running_var, mean, var, n,
                             params.momentum)
    return mean.float(), var.float()
