"""Public GRU-family scan: validation once, then the best backend for the device.

On CPU the fused C++ kernels (``cpu.py``) run when the compiled extension is built;
without it (``INTEREST_KERNELS_NO_EXTENSION=1``) the eager reference does.

Backends receive the public keyword names, normalised: ``lengths`` int64 or None,
``mask`` bool or None (never both), ``att`` None for mode ``gru``, biases possibly
None. Each returns ``(states or None, h_last)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._backend import define_op, extension_unavailable_reason, triton_unavailable_reason
from ..._validation import (
    FLOAT_DTYPES,
    check_choice,
    check_same_dtype,
    check_shape,
    check_tensor,
    check_valid_positions,
)
from . import cpu
from .reference import MODES, VARIANTS, gru_scan_reference

OP = define_op("gru_scan", preference={"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")})


@OP.register("reference")
def _reference(**kw):
    return gru_scan_reference(**kw)


def _cpu_why_not(device: torch.device, **_: object) -> Optional[str]:
    if device.type != "cpu":
        return "the cpu backend takes CPU tensors only"
    if not cpu.AVAILABLE:
        return extension_unavailable_reason() or "interest_kernels._C has no gru_scan_forward (rebuild it)"
    return None


@OP.register("cpu", why_not=_cpu_why_not)
def _cpu(**kw):
    return cpu.gru_scan_cpu(**kw)


def _triton_why_not(device: torch.device, dtype: Optional[torch.dtype] = None,
                    **_: object) -> Optional[str]:
    reason = triton_unavailable_reason(device)
    if reason is not None or device.type != "cuda":
        return reason
    if dtype == torch.float64:
        return "float64 scans run on the reference backend on CUDA"
    return None


@OP.register("triton", why_not=_triton_why_not)
def _triton(**kw):
    from .triton import gru_scan_triton

    return gru_scan_triton(**kw)


def gru_scan(
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
    """GRU, AIGRU, AGRU or AUGRU over a batch of sequences (SPEC section 2).

    Args:
        x: (B, T, I) float32/float16/bfloat16/float64 inputs.
        weight_ih: (3H, I), rows [r; z; n] as ``torch.nn.GRU``.
        weight_hh: (3H, H).
        bias_ih, bias_hh: (3H,) or None.
        att: (B, T) attention scores; required for ``aigru``/``agru``/``augru``,
            not accepted for ``gru``.
        mode: ``"gru"`` | ``"aigru"`` | ``"agru"`` | ``"augru"``.
        variant: ``"paper"`` (DIEN paper, DeepCTR-Torch, ``torch.nn.GRU``) or
            ``"tensorflow"`` (the original DIEN code: reset gate applied to h before
            ``W_hh``, attention scaling the keep gate in ``augru``).
        lengths: (B,) integers in [0, T]; steps ``t >= lengths[b]`` leave h unchanged.
        mask: (B, T) bool/0-1; a masked step leaves h unchanged. Not with ``lengths``.
        h0: (B, H) initial state; zeros when None.
        return_states: False returns ``None`` instead of the states.

    Weights and biases share one dtype, that of ``x`` or float32 (parameters kept in
    float32 under autocast); ``att`` and ``h0`` have x's dtype. Low-precision inputs are
    computed in float32.

    Returns:
        ``(states, h_last)``: states (B, T, H) in x's dtype, zero at invalid steps (or
        None), and h_last (B, H), the state after the last valid step (h0 if none).
    """
    check_choice("mode", mode, MODES)
    check_choice("variant", variant, VARIANTS)
    check_tensor("x", x, ndim=3)
    device = x.device
    batch, seq_len, input_size = x.shape
    check_tensor("weight_ih", weight_ih, ndim=2, device=device)
    check_tensor("weight_hh", weight_hh, ndim=2, device=device)
    if weight_hh.shape[0] != 3 * weight_hh.shape[1]:
        raise ValueError(
            f"weight_hh must have shape (3H, H) (rows [r; z; n]), got {tuple(weight_hh.shape)}"
        )
    hidden = weight_hh.shape[1]
    check_shape(
        "weight_ih", weight_ih, (3 * hidden, input_size),
        f"(3H, I) with H = {hidden} from weight_hh and I = {input_size} from x",
    )
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None:
            check_tensor(name, b, ndim=1, device=device)
            check_shape(name, b, (3 * hidden,), f"3H with H = {hidden} from weight_hh")
    param_dtype = check_same_dtype(
        [("weight_ih", weight_ih), ("weight_hh", weight_hh), ("bias_ih", bias_ih), ("bias_hh", bias_hh)]
    )
    if param_dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"weight_ih has dtype {param_dtype} but x has {x.dtype}; "
            "weights must have x's dtype or float32"
        )
    if mode == "gru":
        if att is not None:
            raise ValueError("att must be None for mode 'gru'; use 'aigru', 'agru' or 'augru'")
    else:
        if att is None:
            raise ValueError(f"att (B, T) attention scores are required for mode {mode!r}")
        check_tensor("att", att, ndim=2, dtypes=FLOAT_DTYPES, device=device)
        check_shape("att", att, (batch, seq_len), "(B, T) like x")
    if h0 is not None:
        check_tensor("h0", h0, ndim=2, device=device)
        check_shape("h0", h0, (batch, hidden), f"(B, H) with H = {hidden} from weight_hh")
    check_same_dtype([("x", x), ("att", att), ("h0", h0)])
    lengths, mask = check_valid_positions(lengths, mask, batch, seq_len, device)
    if lengths is not None:
        lengths = lengths.to(torch.int64)

    impl = OP.select(device, dtype=x.dtype)
    return impl.fn(
        x=x, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh, att=att,
        mode=mode, variant=variant, lengths=lengths, mask=mask, h0=h0, return_states=return_states,
    )
