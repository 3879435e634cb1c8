"""``nn.Embedding(sparse=True)`` that ``torch.compile(fullgraph=True)`` can train.

PyTorch 2.13 traces no sparse tensor: compiling a loss whose backward builds
``nn.Embedding``'s sparse COO gradient fails (on a data-dependent size, or on the sparse
tensor itself). :class:`SparseGradEmbedding` is an ``nn.Embedding(sparse=True)`` (same
parameters, state_dict and eager behaviour) whose lookup, while compiling with autograd
on, is the registered op ``interest_kernels::sparse_grad_embedding_lookup``: its backward
calls ``interest_kernels::accumulate_sparse_grad``, a side-effecting op that runs outside
the graph's tensor program and accumulates into ``weight.grad`` the sparse gradient eager
would have (uncoalesced, one row per looked-up id, padding ids left out). Backward hooks
registered on the weight do not see it: the accumulation is not autograd's.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .mba_embedding import lookup_fake, save_lookup_inputs

__all__ = ["SparseGradEmbedding"]


@torch.library.custom_op("interest_kernels::sparse_grad_embedding_lookup", mutates_args=())
def _lookup(weight: torch.Tensor, ids: torch.Tensor, padding_idx: Optional[int]) -> torch.Tensor:
    """``weight[ids]``: (N, D), ids of shape S -> S + (D,)."""
    return F.embedding(ids, weight)


_lookup.register_fake(lookup_fake)


@torch.library.custom_op("interest_kernels::accumulate_sparse_grad", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def _accumulate(weight: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor, padding_idx: Optional[int]) -> None:
    """``weight.grad += `` the sparse COO gradient of ``weight[ids]`` for upstream ``grad``."""
    rows = grad.reshape(-1, weight.shape[1]).to(weight.dtype, copy=True)
    index = ids.reshape(-1)
    if padding_idx is not None:
        keep = index != padding_idx
        index, rows = index[keep], rows[keep]
    sparse = torch.sparse_coo_tensor(index.unsqueeze(0), rows, weight.shape)
    weight.grad = sparse if weight.grad is None else weight.grad + sparse


@_accumulate.register_fake
def _accumulate_fake(weight: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor, padding_idx: Optional[int]) -> None:
    return None


# Its only effect is on weight.grad: keep graph passes from removing it as unused.
torch.fx.node.has_side_effect(torch.ops.interest_kernels.accumulate_sparse_grad.default)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
    weight, ids = ctx.saved_tensors
    torch.ops.interest_kernels.accumulate_sparse_grad(weight, ids, grad, ctx.padding_idx)
    return None, None, None


_lookup.register_autograd(_backward, setup_context=save_lookup_inputs)


class SparseGradEmbedding(nn.Embedding):
    """``nn.Embedding`` (use with ``sparse=True``) whose compiled training builds the same
    sparse ``weight.grad`` as eager (see the module docstring)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if (self.sparse and torch.compiler.is_compiling() and torch.is_grad_enabled()
                and self.weight.requires_grad and self.max_norm is None
                and not self.scale_grad_by_freq):
            return torch.ops.interest_kernels.sparse_grad_embedding_lookup(self.weight, ids, self.padding_idx)
        return super().forward(ids)
