"""Public DIEN auxiliary loss: validation once, then the backend for the device.

On CPU the ``cpu`` backend (``cpu.py``, the C++ operator of ``csrc/aux_loss_cpu.cpp``)
scores only the valid pairs, when the extension is built; elsewhere the eager reference
runs (a few batched GEMMs over all B (T - 1) pairs, padded ones zeroed).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..._backend import define_op, extension_unavailable_reason
from ..._validation import (
    check_choice,
    check_same_dtype,
    check_shape,
    check_tensor,
    check_valid_positions,
)
from . import cpu
from .reference import ACTIVATIONS, dien_aux_loss_reference

OP = define_op("dien_aux_loss", preference={"cuda": ("reference",), "cpu": ("cpu", "reference")})


@OP.register("reference")
def _reference(**kw):
    return dien_aux_loss_reference(**kw)


def _cpu_why_not(device: torch.device, **_: object) -> Optional[str]:
    if device.type != "cpu":
        return "the cpu backend takes CPU tensors only"
    if not cpu.AVAILABLE:
        return extension_unavailable_reason() or "interest_kernels._C has no dien_aux_loss_cpu_forward (rebuild it)"
    return None


@OP.register("cpu", why_not=_cpu_why_not)
def _cpu(**kw):
    return cpu.dien_aux_loss_cpu(**kw)


def dien_aux_loss(
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
    """DIEN auxiliary next-behaviour loss (SPEC section 3), a 0-d tensor.

    Args:
        states: (B, T, H) interest-extractor states.
        pos: (B, T, E) clicked behaviours; ``pos[:, t+1]`` is the positive for ``states[:, t]``.
        neg: (B, T, E) sampled negatives, aligned like ``pos``.
        weights: L >= 1 hidden-layer weights, nn.Linear layout: (U_1, H + E), (U_l, U_{l-1}).
        biases: L biases (U_l,), entries may be None.
        out_weight: (1, U_L) or (U_L,) score layer.
        out_bias: (1,), 0-d or None.
        activation: hidden activation, ``"sigmoid"`` (DIEN) | ``"relu"`` | ``"identity"``.
        lengths: (B,) in [0, T], or ``mask`` (B, T); a pair counts when both steps are valid.

    Returns -mean over valid pairs of ``log s(f(h_t, pos_{t+1})) + log(1 - s(f(h_t, neg_{t+1})))``,
    0 when there is no valid pair; in the dtype of ``states`` (computed in float32 for
    float16/bfloat16).
    """
    check_choice("activation", activation, ACTIVATIONS)
    check_tensor("states", states, ndim=3)
    device = states.device
    batch, seq_len, hidden = states.shape
    check_tensor("pos", pos, ndim=3, device=device)
    emb = pos.shape[2]
    check_shape("pos", pos, (batch, seq_len, None), "(B, T, E) aligned with states")
    check_tensor("neg", neg, ndim=3, device=device)
    check_shape("neg", neg, (batch, seq_len, emb), "(B, T, E) like pos")
    weights, biases = list(weights), list(biases)
    if not weights:
        raise ValueError("weights must hold at least one hidden layer")
    if len(biases) != len(weights):
        raise ValueError(f"biases must have one entry per weight ({len(weights)}), got {len(biases)}")
    fan_in = hidden + emb
    for i, (w, b) in enumerate(zip(weights, biases)):
        check_tensor(f"weights[{i}]", w, ndim=2, device=device)
        check_shape(f"weights[{i}]", w, (None, fan_in),
                    "H + E inputs" if i == 0 else f"{fan_in} inputs from the previous layer")
        if b is not None:
            check_tensor(f"biases[{i}]", b, ndim=1, device=device)
            check_shape(f"biases[{i}]", b, (w.shape[0],), f"one per unit of weights[{i}]")
        fan_in = w.shape[0]
    check_tensor("out_weight", out_weight, ndim=(1, 2), device=device)
    if out_weight.numel() != fan_in or (out_weight.dim() == 2 and out_weight.shape[0] != 1):
        raise ValueError(
            f"out_weight must have shape (1, {fan_in}) or ({fan_in},), got {tuple(out_weight.shape)}"
        )
    if out_bias is not None:
        check_tensor("out_bias", out_bias, ndim=(0, 1), device=device)
        if out_bias.numel() != 1:
            raise ValueError(f"out_bias must hold one value, got shape {tuple(out_bias.shape)}")
    check_same_dtype([("states", states), ("pos", pos), ("neg", neg)])
    check_same_dtype(
        [(f"weights[{i}]", w) for i, w in enumerate(weights)]
        + [(f"biases[{i}]", b) for i, b in enumerate(biases)]
        + [("out_weight", out_weight), ("out_bias", out_bias)]
    )
    if weights[0].dtype not in (states.dtype, torch.float32):
        raise TypeError(
            f"weights[0] has dtype {weights[0].dtype} but states has {states.dtype}; "
            "weights must have the dtype of states or float32"
        )
    lengths, mask = check_valid_positions(lengths, mask, batch, seq_len, device)
    impl = OP.select(device, dtype=states.dtype)
    return impl.fn(
        states=states, pos=pos, neg=neg, weights=weights, biases=biases, out_weight=out_weight,
        out_bias=out_bias, activation=activation, lengths=lengths, mask=mask,
    )
