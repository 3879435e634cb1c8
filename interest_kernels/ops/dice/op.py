"""The public Dice op (SPEC section 4): argument checks and backend dispatch.

``dice`` validates its arguments once, here, then runs the first backend that
accepts the call: the fused Triton kernels on CUDA (float32/float16/bfloat16), the
fused C++ kernels on CPU (``cpu.py``, when the extension is built), the eager reference
everywhere else. ``use_backend("triton")`` runs the kernels on CPU
tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..._backend import define_op, extension_unavailable_reason, triton_unavailable_reason
from ..._validation import check_float, check_shape, check_tensor
from . import cpu
from .reference import dice_reference

__all__ = ["dice", "OP"]

OP = define_op("dice", preference={"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")})


@OP.register("reference")
def _reference(**kw: Any) -> torch.Tensor:
    return dice_reference(**kw)


def _cpu_why_not(device: torch.device, **_: Any) -> Optional[str]:
    if device.type != "cpu":
        return "the cpu backend takes CPU tensors only"
    if not cpu.AVAILABLE:
        return extension_unavailable_reason() or "interest_kernels._C has no dice_cpu_forward (rebuild it)"
    return None


@OP.register("cpu", why_not=_cpu_why_not)
def _cpu(**kw: Any) -> torch.Tensor:
    return cpu.dice_cpu(**kw)


def _triton_why_not(device: torch.device, dtype: torch.dtype, **_: Any) -> Optional[str]:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        return reason
    if dtype == torch.float64:
        return "the triton backend computes in float32; float64 inputs use the reference"
    return None


@OP.register("triton", why_not=_triton_why_not, limits="float32/float16/bfloat16 inputs")
def _triton(**kw: Any) -> torch.Tensor:
    from .triton import dice_triton  # lazy: triton is imported only when used

    return dice_triton(**kw)


def dice(
    x: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Dice activation over the channels (last dimension) of ``x``.

    ``p = sigmoid(weight * (x - mu) / sqrt(var + eps) + bias)``, ``out = p*x + (1-p)*alpha*x``.

    Args:
        x: (N, C) or (N, T, C), float32/float16/bfloat16/float64, channels last.
        alpha: (C,) slope of the negative side (any floating dtype).
        running_mean, running_var: (C,) running statistics, or both None in training
            (then nothing is tracked). In training they are updated in place as
            ``torch.nn.BatchNorm1d`` does: ``r = (1 - momentum) * r + momentum * batch``,
            with the unbiased batch variance for ``running_var``.
        weight, bias: (C,) optional affine parameters of the normalisation
            (DeepCTR-Torch uses them, FuxiCTR does not).
        training: batch statistics (biased variance over all N*T positions) when True,
            running statistics when False.
        momentum: in [0, 1].
        eps: > 0, added to the variance.

    Returns:
        A tensor of the shape and dtype of ``x``; computed in float32 for half inputs.
    """
    check_tensor("x", x, ndim=(2, 3))
    device = x.device
    channels = x.shape[-1]
    if channels == 0:
        raise ValueError(f"x must have at least one channel (last dimension), got shape {tuple(x.shape)}")
    what = f"one value per channel of x, C = {channels}"
    check_tensor("alpha", alpha, ndim=1, device=device)
    check_shape("alpha", alpha, (channels,), what)
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is not None:
            check_tensor(name, t, ndim=1, device=device)
            check_shape(name, t, (channels,), what)
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    momentum = check_float("momentum", momentum, low=0.0, high=1.0)
    eps = check_float("eps", eps, low=0.0, low_open=True)
    positions = x.numel() // channels
    if training:
        if positions < 2:
            raise ValueError(
                "Dice in training mode needs at least 2 positions (N*T) to compute batch "
                f"statistics, got x of shape {tuple(x.shape)}"
            )
    elif running_mean is None:
        raise ValueError("Dice in eval mode (training=False) needs running_mean and running_var")

    impl = OP.select(device, dtype=x.dtype)
    return impl.fn(
        x=x,
        alpha=alpha,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
        training=training,
        momentum=momentum,
        eps=eps,
    )
