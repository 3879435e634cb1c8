"""Eager reference for the GRU-family scans (SPEC section 2): one step at a time.

Weights in ``torch.nn.GRU``'s layout, rows ordered [r; z; n]:

    gi_t = W_ih x_t + b_ih,   gh_t = W_hh h_{t-1} + b_hh
    r_t = sigmoid(gi_r + gh_r),   z_t = sigmoid(gi_z + gh_z)
    paper:       n_t = tanh(gi_n + r_t * gh_n)
    tensorflow:  n_t = tanh(gi_n + W_hn (r_t * h_{t-1}) + b_hn)

    gru:    h_t = z_t h_{t-1} + (1 - z_t) n_t
    aigru:  x_t <- a_t x_t, then gru
    agru:   h_t = (1 - a_t) h_{t-1} + a_t n_t
    augru:  paper       u = a_t z_t,        h_t = (1 - u) h_{t-1} + u n_t
            tensorflow  u = (1 - a_t) z_t,  h_t = u h_{t-1} + (1 - u) n_t

A step that is not valid (``t >= lengths[b]`` or ``mask[b, t]`` false) leaves h unchanged
and writes a zero output; ``h_last`` is h after the last step. Padded inputs and scores
are never read (NaN there reaches no output or gradient). float16/bfloat16 inputs
are computed in float32 and the outputs returned in the input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..common import reference_dtype, valid_mask

MODES = ("gru", "aigru", "agru", "augru")
VARIANTS = ("paper", "tensorflow")


def gru_scan_reference(
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
    """Run the scan over ``x`` (B, T, I) with weights (3H, I), (3H, H), biases (3H,).

    ``att`` (B, T) for the attentional modes, ``lengths`` (B,) or ``mask`` (B, T),
    ``h0`` (B, H). Returns ``(states (B, T, H) or None, h_last (B, H))`` in x's dtype.
    """
    batch, seq_len, _ = x.shape
    hidden = weight_hh.shape[1]
    cdt = reference_dtype(x.dtype)
    w_ih, w_hh = weight_ih.to(cdt), weight_hh.to(cdt)
    b_ih = bias_ih.to(cdt) if bias_ih is not None else None
    b_hh = bias_hh.to(cdt) if bias_hh is not None else None
    w_hn = w_hh[2 * hidden :]
    b_hn = b_hh[2 * hidden :] if b_hh is not None else None
    xs = x.to(cdt)
    a = att.to(cdt) if att is not None else None
    valid = valid_mask(lengths, mask, seq_len, x.device)
    if valid is not None:
        # Padding is never read: invalid steps see zeros, so NaN there reaches nothing.
        xs = torch.where(valid.unsqueeze(-1), xs, torch.zeros_like(xs))
        if a is not None:
            a = torch.where(valid, a, torch.zeros_like(a))

    h = h0.to(cdt) if h0 is not None else torch.zeros(batch, hidden, dtype=cdt, device=x.device)
    outputs = []
    for t in range(seq_len):
        x_t = xs[:, t]
        a_t = a[:, t : t + 1] if a is not None else None
        if mode == "aigru":
            x_t = a_t * x_t
        gi = torch.nn.functional.linear(x_t, w_ih, b_ih)
        gh = torch.nn.functional.linear(h, w_hh, b_hh)
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        if variant == "paper":
            n = torch.tanh(i_n + r * h_n)
        else:
            n = torch.tanh(i_n + torch.nn.functional.linear(r * h, w_hn, b_hn))
        if mode in ("gru", "aigru"):
            h_new = z * h + (1 - z) * n
        elif mode == "agru":
            h_new = (1 - a_t) * h + a_t * n
        elif variant == "paper":
            u = a_t * z
            h_new = (1 - u) * h + u * n
        else:
            u = (1 - a_t) * z
            h_new = u * h + (1 - u) * n
        if valid is None:
            h = h_new
            outputs.append(h)
        else:
            v = valid[:, t : t + 1]
            h = torch.where(v, h_new, h)
            outputs.append(torch.where(v, h_new, torch.zeros_like(h_new)))
    states = None
    if return_states:
        states = (
            torch.stack(outputs, dim=1)
            if outputs
            else torch.zeros(batch, 0, hidden, dtype=cdt, device=x.device)
        ).to(x.dtype)
    return states, h.to(x.dtype)
