"""The peer libraries' layers (DeepCTR-Torch, FuxiCTR, torch.nn.GRU), for the benchmark
tables and the tests that compare against them.

Neither package's ``__init__`` is run: DeepCTR-Torch's starts a network version check
and FuxiCTR's pulls ray. Each package (and each subpackage on the way) is registered as
an empty namespace over its installed files (DeepCTR-Torch's root only, its subpackages'
``__init__`` files being light; every FuxiCTR package), so only the layer files asked
for, and what they import, are executed. A missing library raises ``ImportError``.

The ``*_like`` builders make a peer layer holding the same weights as one of our
modules (the inverse of our ``from_deepctr``/``from_fuxictr`` converters, checked by
``tests/test_bench_peers.py``), so a table compares like with like.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import torch
from torch import nn


def _stub_root(root: str) -> str:
    """Register ``root`` as an empty package over its installed folder; return the folder."""
    if root not in sys.modules:
        spec = importlib.util.find_spec(root)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"peer library {root} is not installed")
        pkg = types.ModuleType(root)
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules[root] = pkg
    return sys.modules[root].__path__[0]


def load_deepctr(module: str) -> types.ModuleType:
    """E.g. ``load_deepctr("deepctr_torch.layers.sequence")``."""
    _stub_root("deepctr_torch")
    return importlib.import_module(module)


def load_fuxictr(module: str) -> types.ModuleType:
    """E.g. ``load_fuxictr("fuxictr.pytorch.layers.attentions.target_attention")``."""
    base = _stub_root("fuxictr")
    for folder, _, files in os.walk(base):
        if "__init__.py" not in files or folder == base:
            continue
        name = "fuxictr." + os.path.relpath(folder, base).replace(os.sep, ".")
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [folder]
            sys.modules[name] = pkg
    return importlib.import_module(module)


def _copy_linears(targets: list[nn.Linear], weights: list[torch.Tensor], biases: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for lin, w, b in zip(targets, weights, biases):
            lin.weight.copy_(w)
            lin.bias.copy_(b)


def deepctr_attention_like(weights: list[torch.Tensor], biases: list[torch.Tensor],
                           out_weight: torch.Tensor, out_bias: torch.Tensor,
                           normalization: str = "softmax") -> nn.Module:
    """DeepCTR-Torch ``AttentionSequencePoolingLayer`` (sigmoid units) with our functional
    target-attention weights: ``weights[l]`` (units_l, fan_in), ``biases[l]`` (units_l,),
    ``out_weight`` (1, units_L), ``out_bias`` (1,). Call it as
    ``layer(query (B, 1, D), keys (B, T, D), lengths (B, 1))`` -> (B, 1, D)."""
    seq = load_deepctr("deepctr_torch.layers.sequence")
    units = tuple(w.shape[0] for w in weights)
    layer = seq.AttentionSequencePoolingLayer(
        att_hidden_units=units, att_activation="sigmoid", weight_normalization=normalization == "softmax",
        embedding_dim=weights[0].shape[1] // 4)
    _copy_linears(list(layer.local_att.dnn.linears), weights, biases)
    _copy_linears([layer.local_att.dense], [out_weight], [out_bias])
    return layer.to(weights[0].device, weights[0].dtype)


def fuxictr_attention_like(weights: list[torch.Tensor], biases: list[torch.Tensor],
                           out_weight: torch.Tensor, out_bias: torch.Tensor,
                           normalization: str = "softmax") -> nn.Module:
    """FuxiCTR ``DIN_Attention`` (sigmoid units) with our functional target-attention
    weights (as :func:`deepctr_attention_like`). Call it as
    ``layer(query (B, D), keys (B, T, D), mask (B, T) float)`` -> (B, D)."""
    fx = load_fuxictr("fuxictr.pytorch.layers.attentions.target_attention")
    units = [w.shape[0] for w in weights]
    layer = fx.DIN_Attention(embedding_dim=weights[0].shape[1] // 4, attention_units=units,
                             hidden_activations="Sigmoid", use_softmax=normalization == "softmax")
    linears = [m for m in layer.attention_layer.modules() if isinstance(m, nn.Linear)]
    _copy_linears(linears, list(weights) + [out_weight], list(biases) + [out_bias])
    return layer.to(weights[0].device, weights[0].dtype)


def deepctr_attentional_gru_like(weight_ih: torch.Tensor, weight_hh: torch.Tensor,
                                 bias_ih: torch.Tensor, bias_hh: torch.Tensor, mode: str) -> nn.Module:
    """DeepCTR-Torch ``DynamicGRU`` with an ``AGRU``/``AUGRU`` cell and our scan's weights
    (``weight_ih`` (3H, I), ``weight_hh`` (3H, H), biases (3H,)). Its ``AUGRUCell`` adds
    its ``bias_hh`` to both projections, so there ``bias_ih`` is dropped: the same work,
    the same outputs only when ``bias_ih == bias_hh``. Call it with a ``PackedSequence`` of the inputs and one of the
    attention scores."""
    seq = load_deepctr("deepctr_torch.layers.sequence")
    layer = seq.DynamicGRU(weight_ih.shape[1], weight_hh.shape[1], gru_type=mode.upper())
    with torch.no_grad():
        layer.rnn.weight_ih.copy_(weight_ih)
        layer.rnn.weight_hh.copy_(weight_hh)
        layer.rnn.bias_hh.copy_(bias_hh)
        if mode != "augru":
            layer.rnn.bias_ih.copy_(bias_ih)
    return layer.to(weight_ih.device, weight_ih.dtype)


def torch_gru_like(weight_ih: torch.Tensor, weight_hh: torch.Tensor,
                   bias_ih: torch.Tensor, bias_hh: torch.Tensor) -> nn.GRU:
    """``torch.nn.GRU`` (cuDNN on CUDA) with our scan's weights, batch first."""
    gru = nn.GRU(weight_ih.shape[1], weight_hh.shape[1], batch_first=True)
    with torch.no_grad():
        gru.weight_ih_l0.copy_(weight_ih)
        gru.weight_hh_l0.copy_(weight_hh)
        gru.bias_ih_l0.copy_(bias_ih)
        gru.bias_hh_l0.copy_(bias_hh)
    return gru.to(weight_ih.device, weight_ih.dtype)


__all__ = ["deepctr_attention_like", "deepctr_attentional_gru_like", "fuxictr_attention_like",
           "load_deepctr", "load_fuxictr", "torch_gru_like"]
