"""An embedding table whose backward hands (ids, gradient rows) straight to an MBA optimiser.

``nn.Embedding(sparse=True)`` builds a sparse COO gradient that the optimiser then takes
apart; ``MBAEmbedding`` skips it: its backward records the batch's ids and the (K, D)
gradient rows for the table, and ``MBASGD`` / ``MBAAdagrad`` / ``MBAAdam`` consume them in
``step()``. No gradient tensor, sparse or dense, is ever built for the table, and
``weight.grad`` stays None. Use it only with the MBA optimisers (their ``zero_grad``
drops recorded rows that were never stepped on).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.mba.op import check_ids_in_range
from ..optim._rows import PendingRows, push_rows

__all__ = ["MBAEmbedding"]


class _MBALookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, ids: torch.Tensor, padding_idx: Optional[int]) -> torch.Tensor:
        ctx.table = weight
        ctx.ids = ids
        ctx.padding_idx = padding_idx
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, None, None]:
        table = ctx.table
        rows = grad_out.reshape(-1, table.shape[1]).to(table.dtype)
        push_rows(table, PendingRows(ctx.ids, rows, ctx.padding_idx))
        return None, None, None


class MBAEmbedding(nn.Module):
    """Lookup table (num_embeddings, embedding_dim) trained by the MBA optimisers.

    ``forward(ids)``: integer ids of any shape (B,) or (B, ...), with sample b in
    ``ids[b]`` (that is how online frequency counting sees samples) -> ``ids.shape + (D,)``
    in the table's dtype. ``padding_idx``: lookups of that id return its row (zeros at
    init), carry no gradient, and are never counted or updated.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(
                f"num_embeddings and embedding_dim must be >= 1, got {num_embeddings}, {embedding_dim}"
            )
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"padding_idx must lie in [-{num_embeddings}, {num_embeddings}), got {padding_idx}"
                )
            padding_idx %= num_embeddings
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.zeros(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 1) rows as ``nn.Embedding``, the padding row zero."""
        with torch.no_grad():
            self.weight.normal_()
            if self.padding_idx is not None:
                self.weight[self.padding_idx].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"ids must be an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.device != self.weight.device:
            raise ValueError(f"ids are on {ids.device} but the table is on {self.weight.device}")
        check_ids_in_range(ids, self.num_embeddings)
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            return F.embedding(ids, self.weight)
        return _MBALookup.apply(self.weight, ids, self.padding_idx)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "MBAEmbedding":
        """An ``MBAEmbedding`` sharing ``embedding``'s weight tensor and padding index."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.num_embeddings, module.embedding_dim = embedding.weight.shape
        module.padding_idx = embedding.padding_idx
        module.weight = embedding.weight
        return module

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"
