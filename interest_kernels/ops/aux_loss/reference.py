"""Eager reference for the DIEN auxiliary loss (SPEC section 3).

For each row b and each pair of steps (t, t+1) that are both valid, an MLP ``f`` scores
the extractor state ``h_t`` against the next clicked behaviour ``pos_{t+1}`` and a
sampled negative ``neg_{t+1}``:

    f(h, e) = w_o . act(W_L ... act(W_1 [h, e] + c_1) ... + c_L) + c_o
    L_aux = -mean_pairs( log sigmoid(f(h_t, pos_{t+1})) + log(1 - sigmoid(f(h_t, neg_{t+1}))) )

Both log terms are computed with ``logsigmoid`` so no large score gives Inf. With no
valid pair anywhere the loss is 0 (and so are its gradients).

DeepCTR-Torch's ``InterestExtractor`` averages its binary cross-entropy over the 2N
positive and negative terms, which is half of this value; the original DIEN code averages
over all B (T-1) pairs, padded ones included.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..common import reference_dtype, valid_mask

ACTIVATIONS = ("sigmoid", "relu", "identity")


def _act(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "relu":
        return torch.relu(x)
    return x


def dien_aux_loss_reference(
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
    """Auxiliary loss of states (B, T, H) against pos/neg (B, T, E); a 0-d tensor.

    ``weights`` are nn.Linear weights, the first (units_1, H + E) with the state's
    columns first; ``out_weight`` (1, units_L) or (units_L,). float16/bfloat16 inputs
    are computed in float32; the loss has the dtype of ``states``.
    """
    batch, seq_len, _ = states.shape
    cdt = reference_dtype(states.dtype)
    valid = valid_mask(lengths, mask, seq_len, states.device)
    if valid is None:
        valid = torch.ones(batch, seq_len, dtype=torch.bool, device=states.device)
    pairs = valid[:, :-1] & valid[:, 1:]  # (B, T-1): both steps of pair (t, t+1) valid
    # Padding is never read: the MLP sees zeros outside the valid pairs.
    in_pair = pairs.unsqueeze(-1)
    h = states[:, :-1].to(cdt)
    h = torch.where(in_pair, h, torch.zeros_like(h))

    def score(e: torch.Tensor) -> torch.Tensor:
        e = e[:, 1:].to(cdt)
        y = torch.cat([h, torch.where(in_pair, e, torch.zeros_like(e))], dim=-1)
        for w, b in zip(weights, biases):
            y = _act(F.linear(y, w.to(cdt), b.to(cdt) if b is not None else None), activation)
        s = y @ out_weight.to(cdt).reshape(-1)
        return s + out_bias.to(cdt).reshape(()) if out_bias is not None else s

    terms = F.logsigmoid(score(pos)) + F.logsigmoid(-score(neg))  # (B, T-1)
    total = torch.where(pairs, terms, torch.zeros_like(terms)).sum()
    count = pairs.sum().clamp(min=1).to(cdt)
    return (-total / count).to(states.dtype)
