"""Inputs of the GRU-family scan shared by the reference and the CPU-kernel tests."""
from __future__ import annotations

import torch


def gru_inputs(mode, batch=4, seq_len=5, input_size=3, hidden=6, dtype=torch.float32, h0=True, bias=True):
    """x (B, T, I), weights (3H, I) and (3H, H), biases (3H,), att (B, T) unless ``mode``
    is "gru", h0 (B, H): random, scaled so the gates stay away from saturation."""
    return dict(
        x=torch.randn(batch, seq_len, input_size, dtype=dtype),
        weight_ih=torch.randn(3 * hidden, input_size, dtype=dtype) * 0.6,
        weight_hh=torch.randn(3 * hidden, hidden, dtype=dtype) * 0.6,
        bias_ih=torch.randn(3 * hidden, dtype=dtype) if bias else None,
        bias_hh=torch.randn(3 * hidden, dtype=dtype) if bias else None,
        att=None if mode == "gru" else torch.rand(batch, seq_len, dtype=dtype),
        h0=torch.randn(batch, hidden, dtype=dtype) if h0 else None,
    )
