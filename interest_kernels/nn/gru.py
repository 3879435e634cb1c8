"""GRU-family modules of DIEN over :func:`interest_kernels.ops.gru_scan.op.gru_scan`.

* :class:`GRU` — a single-layer GRU with ``torch.nn.GRU``'s parameter names
  (``weight_ih_l0`` ...), so an ``nn.GRU`` state dict loads as is; takes ``lengths``
  instead of packed sequences and returns ``(outputs, h_last)``.
* :class:`AttentionalGRU` — AIGRU / AGRU / AUGRU (DIEN's interest-evolving GRUs), with
  DeepCTR-Torch's ``AGRUCell``/``AUGRUCell`` parameter names.
* :class:`InterestEvolving` — DIEN's interest-evolving layer as DeepCTR-Torch builds it:
  target attention plus one of the four GRU types.
* :class:`AuxiliaryLoss` — DIEN's auxiliary next-behaviour loss with its MLP.

``from_deepctr`` converters copy DeepCTR-Torch layers. One quirk is reproduced on purpose:
DeepCTR-Torch's ``AUGRUCell`` registers its ``bias_hh`` tensor under the name
``bias_ih`` too, so that cell adds ``bias_hh`` to both the input and the hidden
projection (its own ``bias_ih`` tensor is never used). The converted module copies that
tensor into both biases, which gives the same outputs; from then on the two biases
train independently.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .._validation import check_choice
from ..ops.aux_loss.op import dien_aux_loss
from ..ops.aux_loss.reference import ACTIVATIONS as AUX_ACTIVATIONS
from ..ops.gru_scan.op import gru_scan
from ..ops.gru_scan.reference import VARIANTS
from .target_attention import TargetAttention

__all__ = ["GRU", "AttentionalGRU", "InterestEvolving", "AuxiliaryLoss"]

GRU_TYPES = ("GRU", "AIGRU", "AGRU", "AUGRU")

# InterestEvolving's attention runs over padded behaviour histories: its cpu backward
# recomputes the valid rows rather than keeping (B, T, H_l) pre-activations (identical
# results; at B 512, T 100, H 36 and lengths spread over 1..T it halves the layer's page
# faults and is as fast or faster: bench/results/cpu_gru_profile.md).
_ATTENTION_SAVES = False


def _make_gru_params(module: nn.Module, input_size: int, hidden_size: int, bias: bool, suffix: str) -> None:
    """Register ``weight_ih{suffix}`` (3H, I), ``weight_hh{suffix}`` (3H, H) and the two
    (3H,) biases (None without bias), named as the checkpoints users load expect."""
    module.register_parameter(f"weight_ih{suffix}", nn.Parameter(torch.empty(3 * hidden_size, input_size)))
    module.register_parameter(f"weight_hh{suffix}", nn.Parameter(torch.empty(3 * hidden_size, hidden_size)))
    for name in (f"bias_ih{suffix}", f"bias_hh{suffix}"):
        module.register_parameter(name, nn.Parameter(torch.empty(3 * hidden_size)) if bias else None)
    _init_gru_params(module, hidden_size)


def _init_gru_params(module: nn.Module, hidden_size: int) -> None:
    # torch.nn.GRU's default: U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias.
    bound = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.uniform_(-bound, bound)


def _lengths_on(lengths: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    # nn.GRU users keep lengths on the CPU (pack_padded_sequence wants them there).
    if lengths is None:
        return None
    if lengths.dim() == 2 and lengths.shape[1] == 1:
        lengths = lengths.reshape(-1)
    return lengths.to(device)


def _squeeze_h0(h0: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # nn.GRU's h0 is (num_layers, B, H); a single layer's (1, B, H) is accepted.
    if h0 is not None and h0.dim() == 3 and h0.shape[0] == 1:
        return h0[0]
    return h0


class GRU(nn.Module):
    """Single-layer GRU, exactly ``torch.nn.GRU``'s equations and parameters.

    Args:
        input_size: I.
        hidden_size: H.
        bias: learn ``bias_ih_l0`` and ``bias_hh_l0`` (3H,).
        batch_first: x is (B, T, I) (True) or (T, B, I).

    ``forward(x, lengths=None, h0=None, mask=None)`` returns ``(outputs, h_last)``:
    outputs (B, T, H) (or (T, B, H)), zero at steps ``t >= lengths[b]`` (what
    ``pad_packed_sequence`` gives), and h_last (B, H), the state after each row's last
    valid step. ``lengths`` (B,) may live on the CPU; ``h0`` is (B, H) or (1, B, H).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, batch_first: bool = True) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.batch_first = batch_first
        _make_gru_params(self, input_size, hidden_size, bias, suffix="_l0")  # nn.GRU's names

    def reset_parameters(self) -> None:
        _init_gru_params(self, self.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        h0: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.batch_first:
            x = x.transpose(0, 1)
        states, h_last = gru_scan(
            x, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0,
            mode="gru", lengths=_lengths_on(lengths, x.device), mask=mask, h0=_squeeze_h0(h0),
        )
        if not self.batch_first:
            states = states.transpose(0, 1)
        return states, h_last

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, bias={self.bias_ih_l0 is not None}, "
            f"batch_first={self.batch_first}"
        )

    @classmethod
    def from_torch(cls, gru: nn.GRU) -> "GRU":
        """An equivalent module from a single-layer, unidirectional ``torch.nn.GRU``."""
        if gru.num_layers != 1 or gru.bidirectional or getattr(gru, "proj_size", 0):
            raise ValueError(
                "from_torch: only single-layer, unidirectional nn.GRU is supported, got "
                f"num_layers={gru.num_layers}, bidirectional={gru.bidirectional}"
            )
        mod = cls(gru.input_size, gru.hidden_size, bias=gru.bias, batch_first=gru.batch_first)
        mod.load_state_dict(gru.state_dict())
        return mod.to(gru.weight_ih_l0.device, gru.weight_ih_l0.dtype)


class AttentionalGRU(nn.Module):
    """DIEN's attention-driven GRUs (SPEC section 2), one layer, batch first.

    Args:
        input_size: I.
        hidden_size: H.
        mode: ``"aigru"`` (attention scales the input), ``"agru"`` (attention replaces the
            update gate) or ``"augru"`` (attention scales the update gate).
        variant: ``"paper"`` (DIEN paper, DeepCTR-Torch) or ``"tensorflow"`` (the original
            DIEN code: reset gate before ``W_hh``, attention on the keep gate).
        bias: learn ``bias_ih`` and ``bias_hh`` (3H,).

    Parameters ``weight_ih`` (3H, I), ``weight_hh`` (3H, H), rows [r; z; n], named as
    DeepCTR-Torch's cells, whose state dicts load directly.

    ``forward(x (B, T, I), att_scores (B, T), lengths=None, h0=None, mask=None)`` returns
    ``(outputs (B, T, H), h_last (B, H))``; outputs are zero at invalid steps.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        mode: str = "augru",
        variant: str = "paper",
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_choice("mode", mode, ("aigru", "agru", "augru"))
        check_choice("variant", variant, VARIANTS)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.mode = mode
        self.variant = variant
        _make_gru_params(self, input_size, hidden_size, bias, suffix="")  # DeepCTR-Torch cells' names

    def reset_parameters(self) -> None:
        _init_gru_params(self, self.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        att_scores: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        h0: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if att_scores.dim() == 3 and att_scores.shape[1] == 1:
            att_scores = att_scores[:, 0]  # DeepCTR-Torch's (B, 1, T) scores
        return gru_scan(
            x, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, att_scores,
            mode=self.mode, variant=self.variant, lengths=_lengths_on(lengths, x.device),
            mask=mask, h0=_squeeze_h0(h0),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, mode={self.mode!r}, "
            f"variant={self.variant!r}, bias={self.bias_ih is not None}"
        )

    @classmethod
    def from_deepctr(cls, module: nn.Module) -> "AttentionalGRU":
        """An equivalent module from DeepCTR-Torch's ``AGRUCell``, ``AUGRUCell`` or
        ``DynamicGRU`` (paper variant). For ``AUGRUCell`` both biases are copied from its
        ``bias_hh`` tensor, which is what that cell adds to both projections (see the
        module docstring)."""
        cell = getattr(module, "rnn", module)
        kind = type(cell).__name__
        if kind not in ("AGRUCell", "AUGRUCell"):
            raise ValueError(
                f"from_deepctr: expected AGRUCell, AUGRUCell or DynamicGRU, got {type(module).__name__}"
            )
        has_bias = cell.bias_hh is not None
        mod = cls(cell.input_size, cell.hidden_size, mode="agru" if kind == "AGRUCell" else "augru", bias=has_bias)
        with torch.no_grad():
            mod.weight_ih.copy_(cell.weight_ih)
            mod.weight_hh.copy_(cell.weight_hh)
            if has_bias:
                # getattr, not the registered tensors: AUGRUCell's attribute bias_ih *is* bias_hh.
                mod.bias_ih.copy_(cell.bias_ih)
                mod.bias_hh.copy_(cell.bias_hh)
        return mod.to(cell.weight_ih.device, cell.weight_ih.dtype)


class InterestEvolving(nn.Module):
    """DIEN's interest-evolving layer, with DeepCTR-Torch's ``InterestEvolving`` semantics.

    Args:
        input_size: D, the width of the query, of the behaviours and of the GRU state.
        gru_type: ``"GRU"`` (a GRU over the behaviours, then attention pooling of its
            states), ``"AIGRU"`` (attention-scaled behaviours into a GRU, last state),
            ``"AGRU"`` / ``"AUGRU"`` (attention scores drive the GRU, last state).
        att_hidden_units: widths of the attention MLP.
        att_activation: its hidden activation (see :class:`TargetAttention`).
        att_weight_normalization: softmax over valid positions (True) or raw scores.
        variant: GRU variant for AGRU/AUGRU, ``"paper"`` (DeepCTR-Torch) or ``"tensorflow"``.

    ``forward(query (B, D) | (B, 1, D), keys (B, T, D), keys_length (B,) | (B, 1))``
    returns (B, D); rows of length 0 give zeros.
    """

    def __init__(
        self,
        input_size: int,
        gru_type: str = "AUGRU",
        att_hidden_units: Sequence[int] = (64, 16),
        att_activation: str = "sigmoid",
        att_weight_normalization: bool = False,
        variant: str = "paper",
    ) -> None:
        super().__init__()
        check_choice("gru_type", gru_type, GRU_TYPES)
        self.input_size = input_size
        self.gru_type = gru_type
        self.attention = TargetAttention(
            input_size,
            att_hidden_units,
            activation=att_activation,
            normalization="softmax" if att_weight_normalization else "none",
            return_scores=gru_type != "GRU",
            save_pre_activations=_ATTENTION_SAVES,
        )
        if gru_type in ("GRU", "AIGRU"):
            self.interest_evolution: nn.Module = GRU(input_size, input_size)
        else:
            self.interest_evolution = AttentionalGRU(
                input_size, input_size, mode=gru_type.lower(), variant=variant
            )

    def forward(self, query: torch.Tensor, keys: torch.Tensor, keys_length: torch.Tensor) -> torch.Tensor:
        lengths = _lengths_on(keys_length, keys.device)
        if self.gru_type == "GRU":
            interests, _ = self.interest_evolution(keys, lengths)
            return self.attention(query, interests, lengths=lengths)
        _, scores = self.attention(query, keys, lengths=lengths)
        if self.gru_type == "AIGRU":
            gru = self.interest_evolution
            _, h_last = gru_scan(
                keys, gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0, scores,
                mode="aigru", lengths=lengths, return_states=False,
            )
            return h_last
        _, h_last = gru_scan(
            keys, self.interest_evolution.weight_ih, self.interest_evolution.weight_hh,
            self.interest_evolution.bias_ih, self.interest_evolution.bias_hh, scores,
            mode=self.interest_evolution.mode, variant=self.interest_evolution.variant,
            lengths=lengths, return_states=False,
        )
        return h_last

    def extra_repr(self) -> str:
        return f"{self.input_size}, gru_type={self.gru_type!r}"

    @classmethod
    def from_deepctr(cls, layer: nn.Module) -> "InterestEvolving":
        """An equivalent module from DeepCTR-Torch's ``InterestEvolving`` (attention MLP
        and GRU weights copied; AUGRU's bias quirk reproduced, see the module docstring).

        That layer's forward takes ``keys`` without the zero-length rows (as its
        ``InterestExtractor`` returns them) but every row of ``query`` and
        ``keys_length``; this module takes every row of all three."""
        gru_type = layer.gru_type
        mod = cls(layer.interest_evolution.input_size, gru_type)
        mod.attention = TargetAttention.from_deepctr(layer.attention)
        mod.attention.save_pre_activations = _ATTENTION_SAVES
        if gru_type in ("GRU", "AIGRU"):
            mod.interest_evolution = GRU.from_torch(layer.interest_evolution)
        else:
            mod.interest_evolution = AttentionalGRU.from_deepctr(layer.interest_evolution)
        return mod.train(layer.training)


class AuxiliaryLoss(nn.Module):
    """DIEN's auxiliary loss (SPEC section 3) with its scoring MLP as ``nn.Linear`` layers.

    Args:
        hidden_size: H, the width of the extractor states.
        embedding_size: E, the width of the behaviours (default H).
        hidden_units: MLP widths (DIEN: (100, 50)).
        activation: hidden activation, ``"sigmoid"`` (DIEN), ``"relu"`` or ``"identity"``.

    ``forward(states (B, T, H), pos (B, T, E), neg (B, T, E), lengths=None, mask=None)``
    returns the 0-d loss; ``states[:, t]`` is scored against ``pos[:, t+1]`` and
    ``neg[:, t+1]``. DeepCTR-Torch reports half of this value (its cross-entropy
    averages over positives and negatives together).
    """

    def __init__(
        self,
        hidden_size: int,
        embedding_size: Optional[int] = None,
        hidden_units: Sequence[int] = (100, 50),
        activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        check_choice("activation", activation, AUX_ACTIVATIONS)
        hidden_units = tuple(int(u) for u in hidden_units)
        if not hidden_units:
            raise ValueError("hidden_units must hold at least one width")
        self.hidden_size = hidden_size
        self.embedding_size = embedding_size if embedding_size is not None else hidden_size
        self.activation = activation
        widths = (hidden_size + self.embedding_size,) + hidden_units
        self.layers = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(len(hidden_units)))
        self.score = nn.Linear(hidden_units[-1], 1)

    def forward(
        self,
        states: torch.Tensor,
        pos: torch.Tensor,
        neg: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return dien_aux_loss(
            states, pos, neg,
            [layer.weight for layer in self.layers], [layer.bias for layer in self.layers],
            self.score.weight, self.score.bias,
            activation=self.activation, lengths=_lengths_on(lengths, states.device), mask=mask,
        )

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, {self.embedding_size}, activation={self.activation!r}"

    @classmethod
    def from_deepctr(cls, module: nn.Module) -> "AuxiliaryLoss":
        """From DeepCTR-Torch's ``InterestExtractor`` (its ``auxiliary_net``) or that
        ``DNN`` itself: hidden layers plus a final 1-unit layer, all sigmoid (the last
        sigmoid being the probability). The states and behaviours are split evenly, as
        that extractor's input is ``[h, e]`` with equal widths."""
        dnn = getattr(module, "auxiliary_net", module)
        if not hasattr(dnn, "linears"):
            raise ValueError(
                "from_deepctr: expected an InterestExtractor built with use_neg=True, or its "
                f"auxiliary_net DNN; got {type(module).__name__}"
            )
        linears = list(dnn.linears)
        acts = {type(a).__name__ for a in dnn.activation_layers}
        if acts != {"Sigmoid"}:
            raise ValueError(f"from_deepctr: the auxiliary net must use sigmoid activations, got {sorted(acts)}")
        if len(linears) < 2 or linears[-1].out_features != 1:
            raise ValueError("from_deepctr: expected hidden layers followed by a 1-unit layer")
        if getattr(dnn, "use_bn", False) or getattr(dnn, "dropout_rate", 0) > 0:
            raise ValueError("from_deepctr: auxiliary nets with batch norm or dropout are not supported")
        fan_in = linears[0].in_features
        mod = cls(fan_in // 2, fan_in - fan_in // 2, tuple(lin.out_features for lin in linears[:-1]))
        with torch.no_grad():
            for ours, theirs in zip(list(mod.layers) + [mod.score], linears):
                ours.weight.copy_(theirs.weight)
                ours.bias.copy_(theirs.bias)
        return mod.to(linears[0].weight.device, linears[0].weight.dtype)
