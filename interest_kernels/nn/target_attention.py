"""``TargetAttention``: the DIN attention unit + pooling as a module, and converters.

A thin layer over :func:`interest_kernels.ops.target_attention.target_attention`. The
parameters are ordinary ``nn.Linear`` layers (``self.layers``, ``self.score``) so DIN
checkpoints map onto them; PReLU slopes live in ``nn.PReLU`` modules and Dice in
:class:`AttentionDice` (parameters plus running-statistics buffers).

Converters build an equivalent module from a peer library's layer, copying weights:

* :meth:`TargetAttention.from_deepctr` — DeepCTR-Torch ``AttentionSequencePoolingLayer``.
  That layer returns (B, 1, D), or only the scores (B, 1, T) when ``return_score``;
  ours returns ``out`` (B, D), or ``(out, scores)`` with scores (B, T). Get its shapes
  with ``out.unsqueeze(1)`` / ``scores.unsqueeze(1)``. Its ``keys_length`` (B, 1) can be
  passed as ``lengths`` directly.
* :meth:`TargetAttention.from_fuxictr` — FuxiCTR ``DIN_Attention`` (returns (B, D) as ours).

Rows with no valid position: both libraries return an average of the padded keys (their
``-2**32 + 1`` / ``-1e9`` padding trick under softmax); this module returns zeros.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .._validation import check_choice
from ..ops.dice.reference import DiceParams
from .dice import Dice
from ..ops.target_attention.op import ACTIVATIONS, MAX_LAYERS, NORMALIZATIONS, target_attention

__all__ = ["TargetAttention", "AttentionDice", "PerHeadLinear"]


class PerHeadLinear(nn.Module):
    """E independent linear maps: ``weight`` (E, out, in), ``bias`` (E, out)."""

    def __init__(self, num_heads: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_heads, out_features)) if bias else None
        bound = in_features ** -0.5  # nn.Linear's default initialisation range
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)


class AttentionDice(nn.Module):
    """Dice parameters of one hidden layer: ``alpha``, optional affine ``weight``/``bias``,
    and ``running_mean``/``running_var`` buffers; shape (H,), or (E, H) per head."""

    def __init__(
        self, shape: Sequence[int], *, eps: float = 1e-8, momentum: float = 0.1, affine: bool = True
    ) -> None:
        super().__init__()
        shape = tuple(shape)
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.zeros(shape))
        self.weight = nn.Parameter(torch.ones(shape)) if affine else None
        self.bias = nn.Parameter(torch.zeros(shape)) if affine else None
        self.register_buffer("running_mean", torch.zeros(shape))
        self.register_buffer("running_var", torch.ones(shape))

    def params(self) -> DiceParams:
        return DiceParams(
            self.alpha, self.running_mean, self.running_var, self.weight, self.bias,
            training=self.training, momentum=self.momentum, eps=self.eps,
        )


class TargetAttention(nn.Module):
    """DIN target attention: an MLP on ``[q, k, q - k, q * k]`` scores each behaviour,
    the scores are normalised over valid positions and pool the keys (SPEC section 1).

    Args:
        embedding_dim: D.
        hidden_units: 1..3 hidden widths, e.g. (80, 40).
        activation: "sigmoid", "relu", "prelu", "dice" or "identity".
        normalization: "softmax" or "none" (DIN paper, unnormalised weights).
        return_scores: forward returns ``(out, scores)``.
        num_heads: E for the multi-head form (keys (B, E, T, D)); None for one head.
            With one MLP shared by the heads, the module also accepts any E at call time.
        per_head_mlp: one MLP per head (needs ``num_heads``); weights with a leading E dim.
        prelu_shared: one PReLU slope per layer instead of one per unit.
        prelu_init: initial PReLU slope.
        dice_eps, dice_momentum, dice_affine: Dice normalisation (DeepCTR-Torch: 1e-8,
            0.1, affine; FuxiCTR: 1e-9, 0.01, not affine).
        save_pre_activations: what the cpu backend keeps for the backward (see
            :func:`~interest_kernels.ops.target_attention.op.target_attention`); None
            for its default. An attribute, not state: checkpoints are unaffected.

    Shapes: ``forward(query (B, D) | (B, 1, D) | (B, E, D), keys (B, T, D) | (U, T, D) |
    (B, E, T, D), lengths (B,) | (B, 1) | None, mask (B, T) | None, key_index (B,) | None)``
    returns ``out`` (B, D) (or (B, E, D)) and with ``return_scores`` the scores (B, T)
    (or (B, E, T)).
    """

    def __init__(
        self,
        embedding_dim: int,
        hidden_units: Sequence[int] = (80, 40),
        activation: str = "sigmoid",
        normalization: str = "softmax",
        return_scores: bool = False,
        num_heads: Optional[int] = None,
        per_head_mlp: bool = False,
        prelu_shared: bool = False,
        prelu_init: float = 0.25,
        dice_eps: float = 1e-8,
        dice_momentum: float = 0.1,
        dice_affine: bool = True,
        save_pre_activations: Optional[bool] = None,
    ) -> None:
        super().__init__()
        hidden_units = tuple(int(h) for h in hidden_units)
        if not 1 <= len(hidden_units) <= MAX_LAYERS:
            raise ValueError(f"hidden_units must hold 1 to {MAX_LAYERS} widths, got {hidden_units}")
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("normalization", normalization, NORMALIZATIONS)
        if per_head_mlp and not num_heads:
            raise ValueError("per_head_mlp=True needs num_heads")
        self.embedding_dim = embedding_dim
        self.hidden_units = hidden_units
        self.activation = activation
        self.normalization = normalization
        self.return_scores = return_scores
        self.num_heads = num_heads
        self.per_head_mlp = per_head_mlp
        self.save_pre_activations = save_pre_activations

        widths = (4 * embedding_dim,) + hidden_units
        lead = (num_heads,) if per_head_mlp else ()
        if per_head_mlp:
            self.layers = nn.ModuleList(
                PerHeadLinear(num_heads, widths[i], widths[i + 1]) for i in range(len(hidden_units))
            )
            self.score = PerHeadLinear(num_heads, hidden_units[-1], 1)
        else:
            self.layers = nn.ModuleList(
                nn.Linear(widths[i], widths[i + 1]) for i in range(len(hidden_units))
            )
            self.score = nn.Linear(hidden_units[-1], 1)
        self.prelu = (
            nn.ModuleList(
                nn.PReLU(1 if prelu_shared else (num_heads if per_head_mlp else 1) * h, init=prelu_init)
                for h in hidden_units
            )
            if activation == "prelu"
            else None
        )
        self.dice = (
            nn.ModuleList(
                AttentionDice(lead + (h,), eps=dice_eps, momentum=dice_momentum, affine=dice_affine)
                for h in hidden_units
            )
            if activation == "dice"
            else None
        )

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        key_index: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if lengths is not None and lengths.dim() == 2 and lengths.shape[1] == 1:
            lengths = lengths.reshape(-1)
        prelu_weights = None
        if self.prelu is not None:
            lead = (self.num_heads,) if self.per_head_mlp else ()
            prelu_weights = [
                p.weight.reshape(lead + (h,))
                if p.weight.numel() > 1
                else p.weight.reshape((1,) * len(lead) + (1,)).expand(lead + (1,))
                for p, h in zip(self.prelu, self.hidden_units)
            ]
        return target_attention(
            query,
            keys,
            [layer.weight for layer in self.layers],
            [layer.bias for layer in self.layers],
            self.score.weight,
            self.score.bias,
            activation=self.activation,
            normalization=self.normalization,
            lengths=lengths,
            mask=mask,
            key_index=key_index,
            prelu_weights=prelu_weights,
            dice_params=[d.params() for d in self.dice] if self.dice is not None else None,
            return_scores=self.return_scores,
            save_pre_activations=self.save_pre_activations,
        )

    def extra_repr(self) -> str:
        heads = f", num_heads={self.num_heads}, per_head_mlp={self.per_head_mlp}" if self.num_heads else ""
        return (
            f"embedding_dim={self.embedding_dim}, hidden_units={self.hidden_units}, "
            f"activation={self.activation!r}, normalization={self.normalization!r}, "
            f"return_scores={self.return_scores}{heads}"
        )

    # --- converters ----------------------------------------------------------------

    @classmethod
    def from_deepctr(cls, layer: nn.Module) -> "TargetAttention":
        """An equivalent module from DeepCTR-Torch's ``AttentionSequencePoolingLayer``.

        Copies the attention MLP (``local_att.dnn.linears``, ``local_att.dense``) and the
        activation: sigmoid, relu, linear (identity), PReLU (one shared slope), Dice
        (affine BatchNorm statistics, its eps/momentum, alpha (H, 1) -> (H,)).
        ``weight_normalization`` maps to softmax / none, ``return_score`` to
        ``return_scores`` (see the module docstring for the output shapes). The module
        is left in the layer's train/eval mode.
        """
        unit = layer.local_att
        dnn = unit.dnn
        if getattr(dnn, "use_bn", False):
            raise ValueError("from_deepctr: attention MLPs with use_bn=True are not supported")
        if getattr(dnn, "dropout_rate", 0) > 0:
            raise ValueError("from_deepctr: attention MLPs with dropout_rate > 0 are not supported")
        linears = list(dnn.linears)
        acts = list(dnn.activation_layers)
        activation, kinds = _common_activation("from_deepctr", acts)
        hidden = tuple(lin.out_features for lin in linears)
        dice = kinds[0] if activation == "dice" else None
        mod = cls(
            embedding_dim=linears[0].in_features // 4,
            hidden_units=hidden,
            activation=activation,
            normalization="softmax" if layer.weight_normalization else "none",
            return_scores=bool(layer.return_score),
            prelu_shared=True,
            dice_eps=dice.bn.eps if dice is not None else 1e-8,
            dice_momentum=dice.bn.momentum if dice is not None else 0.1,
            dice_affine=bool(dice.bn.affine) if dice is not None else True,
        )
        mod._copy_from(linears, unit.dense, acts)
        return mod.to(unit.dense.weight.device).train(layer.training)

    @classmethod
    def from_fuxictr(cls, layer: nn.Module) -> "TargetAttention":
        """An equivalent module from FuxiCTR's ``DIN_Attention``.

        Reads ``attention_layer.mlp`` (Linear, activation, ..., Linear(H_L, 1)):
        activations ReLU, Sigmoid, Identity, PReLU (per unit or shared), Dice (non-affine
        BatchNorm statistics, its eps/momentum). ``use_softmax`` maps to softmax / none.
        Configurations the module cannot reproduce raise ``ValueError``: dropout,
        batch_norm, an ``output_activation`` on the score, mixed hidden activations.
        """
        seq = list(layer.attention_layer.mlp)
        linears: list[nn.Linear] = []
        acts: list[Optional[nn.Module]] = []
        for m in seq:
            if isinstance(m, nn.Linear):
                linears.append(m)
                acts.append(None)
            elif isinstance(m, nn.Dropout):
                raise ValueError("from_fuxictr: DIN_Attention with dropout_rate > 0 is not supported")
            elif isinstance(m, nn.BatchNorm1d):
                raise ValueError("from_fuxictr: DIN_Attention with batch_norm=True is not supported")
            elif len(linears) == 0 or acts[-1] is not None:
                raise ValueError(f"from_fuxictr: unexpected module {type(m).__name__} in the attention MLP")
            else:
                acts[-1] = m
        if len(linears) < 2 or linears[-1].out_features != 1:
            raise ValueError("from_fuxictr: expected hidden layers followed by a Linear(H, 1) score layer")
        if acts[-1] is not None:
            raise ValueError(
                "from_fuxictr: DIN_Attention with an output_activation on the score "
                f"({type(acts[-1]).__name__}) is not supported; the op uses the raw score"
            )
        hidden_linears, hidden_acts = linears[:-1], acts[:-1]
        hidden_acts = [nn.Identity() if a is None else a for a in hidden_acts]
        activation, kinds = _common_activation("from_fuxictr", hidden_acts)
        dice_bn = kinds[0].bn if activation == "dice" else None
        prelu_shared = activation == "prelu" and kinds[0].weight.numel() == 1
        mod = cls(
            embedding_dim=hidden_linears[0].in_features // 4,
            hidden_units=tuple(lin.out_features for lin in hidden_linears),
            activation=activation,
            normalization="softmax" if layer.use_softmax else "none",
            prelu_shared=prelu_shared,
            dice_eps=dice_bn.eps if dice_bn is not None else 1e-9,
            dice_momentum=dice_bn.momentum if dice_bn is not None else 0.01,
            dice_affine=bool(dice_bn.affine) if dice_bn is not None else False,
        )
        mod._copy_from(hidden_linears, linears[-1], hidden_acts)
        return mod.to(linears[-1].weight.device).train(layer.training)

    @torch.no_grad()
    def _copy_from(self, linears: Sequence[nn.Linear], dense: nn.Linear, acts: Sequence[nn.Module]) -> None:
        for ours, theirs in zip(self.layers, linears):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        self.score.weight.copy_(dense.weight)
        self.score.bias.copy_(dense.bias)
        if self.prelu is not None:
            for ours, theirs in zip(self.prelu, acts):
                if ours.weight.numel() != theirs.weight.numel():
                    raise ValueError(
                        f"PReLU with {theirs.weight.numel()} slopes does not match "
                        f"a layer of {ours.weight.numel()}"
                    )
                ours.weight.copy_(theirs.weight)
        if self.dice is not None:
            for ours, theirs in zip(self.dice, acts):
                # nn.Dice's converter checks the peer layer (moving-average BatchNorm with
                # running statistics, one alpha per unit) and reads it out.
                src = Dice._from_layer(theirs, "DeepCTR-Torch or FuxiCTR")
                ours.alpha.copy_(src.alpha.reshape(ours.alpha.shape))
                ours.running_mean.copy_(src.running_mean)
                ours.running_var.copy_(src.running_var)
                if ours.weight is not None:
                    ours.weight.copy_(src.weight)
                    ours.bias.copy_(src.bias)


def _activation_name(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.Sigmoid):
        return "sigmoid"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.PReLU):
        return "prelu"
    if isinstance(m, nn.Identity) or type(m).__name__ == "Identity":
        return "identity"
    # Both libraries' Dice: a BatchNorm1d for the statistics and an alpha parameter.
    if type(m).__name__ == "Dice" and isinstance(getattr(m, "bn", None), nn.BatchNorm1d):
        return "dice"
    return None


def _common_activation(who: str, acts: Sequence[nn.Module]) -> tuple[str, list[nn.Module]]:
    names = [_activation_name(a) for a in acts]
    for a, n in zip(acts, names):
        if n is None:
            raise ValueError(f"{who}: hidden activation {type(a).__name__} is not supported; use one of {ACTIVATIONS}")
    if len(set(names)) != 1:
        raise ValueError(f"{who}: the hidden layers use different activations {names}; the op takes one")
    return names[0], list(acts)
