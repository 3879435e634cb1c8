"""``Dice``: the data-adaptive activation of DIN (SPEC section 4) as a module.

Channels last: input (N, C) or (N, T, C). Statistics are kept like
``torch.nn.BatchNorm1d`` (``running_mean``, ``running_var``, ``num_batches_tracked``
buffers, same state-dict keys as a BatchNorm with the parameters ``alpha`` and, when
``affine``, ``weight``/``bias`` beside them).

Defaults follow the DIN paper: no affine normalisation, ``eps = 1e-8``, alpha
initialised to 0, and BatchNorm's usual ``momentum = 0.1``. ``Dice.from_deepctr`` and
``Dice.from_fuxictr`` copy a layer of those libraries, with their settings
(DeepCTR-Torch: affine, eps 1e-8, momentum 0.1; FuxiCTR: not affine, eps 1e-9,
momentum 0.01).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._validation import check_float
from ..ops.dice.op import dice
from ..ops.dice.reference import DiceParams

__all__ = ["Dice"]


class Dice(nn.Module):
    """Dice over the last dimension of its input.

    Args:
        num_features: C, the number of channels (last dimension of the input).
        affine: learn a per-channel scale ``weight`` and shift ``bias`` of the
            normalised input before the sigmoid (DeepCTR-Torch's BatchNorm does).
        eps: added to the variance.
        momentum: weight of the current batch in the running statistics.
        alpha_init: initial value of the slope ``alpha`` (C,).
        device, dtype: of the parameters and buffers.
    """

    def __init__(
        self,
        num_features: int,
        *,
        affine: bool = False,
        eps: float = 1e-8,
        momentum: float = 0.1,
        alpha_init: float = 0.0,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        eps = check_float("eps", eps, low=0.0, low_open=True)
        momentum = check_float("momentum", momentum, low=0.0, high=1.0)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.affine = affine
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.alpha = nn.Parameter(torch.full((num_features,), float(alpha_init), **factory))
        if affine:
            self.weight: Optional[nn.Parameter] = nn.Parameter(torch.ones(num_features, **factory))
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C) or (N, T, C) -> same shape and dtype."""
        if self.training:
            self.num_batches_tracked.add_(1)
        return dice(
            x,
            self.alpha,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )

    def dice_params(self) -> DiceParams:
        """This module's tensors and settings as the ``DiceParams`` that the fused
        target-attention op takes for a Dice hidden layer (tensors shared, not copied:
        the op updates the running statistics in place in training). Such calls do not
        advance ``num_batches_tracked``, which nothing reads while momentum is fixed."""
        return DiceParams(
            alpha=self.alpha,
            running_mean=self.running_mean,
            running_var=self.running_var,
            weight=self.weight,
            bias=self.bias,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, affine={self.affine}, eps={self.eps}, momentum={self.momentum}"
        )

    @classmethod
    def _from_layer(cls, layer: nn.Module, library: str) -> "Dice":
        """Copy a peer library's Dice: an ``alpha`` of C values beside a BatchNorm ``bn``."""
        bn, alpha = getattr(layer, "bn", None), getattr(layer, "alpha", None)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not isinstance(alpha, torch.Tensor):
            raise TypeError(f"expected a {library} Dice layer, got {type(layer).__name__}")
        if bn.momentum is None:
            raise ValueError(
                "the layer's BatchNorm uses a cumulative average (momentum=None); "
                "Dice supports an exponential moving average only"
            )
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError("the layer's BatchNorm does not track running statistics")
        channels = bn.num_features
        if alpha.numel() != channels:
            raise ValueError(f"the layer's alpha has {alpha.numel()} values for {channels} channels")
        out = cls(
            channels,
            affine=bn.affine,
            eps=bn.eps,
            momentum=bn.momentum,
            device=alpha.device,
            dtype=alpha.dtype,
        )
        with torch.no_grad():
            out.alpha.copy_(alpha.reshape(channels))
            if bn.affine:
                out.weight.copy_(bn.weight)
                out.bias.copy_(bn.bias)
            out.running_mean.copy_(bn.running_mean)
            out.running_var.copy_(bn.running_var)
            out.num_batches_tracked.copy_(bn.num_batches_tracked)
        return out.train(layer.training)

    @classmethod
    def from_deepctr(cls, layer: nn.Module) -> "Dice":
        """A copy of a DeepCTR-Torch ``deepctr_torch.layers.activation.Dice``.

        ``dim=2`` layers take (N, C) and so does the result. ``dim=3`` layers take
        (B, T, C) and normalise over B*T per channel (they transpose to (B, C, T)
        internally); the result takes the same (B, T, C) input and returns the same
        values. Parameters, statistics and train/eval mode are copied, not shared.
        """
        return cls._from_layer(layer, "DeepCTR-Torch")

    @classmethod
    def from_fuxictr(cls, layer: nn.Module) -> "Dice":
        """A copy of a FuxiCTR ``fuxictr.pytorch.layers.activations.Dice`` (input (N, C);
        the result also takes (N, T, C)). Parameters, statistics and mode are copied."""
        return cls._from_layer(layer, "FuxiCTR")
