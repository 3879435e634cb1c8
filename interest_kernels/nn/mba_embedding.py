"""An embedding table whose backward hands (ids, gradient rows) straight to an MBA optimiser.

``nn.Embedding(sparse=True)`` builds a sparse COO gradient that the optimiser then takes
apart; ``MBAEmbedding`` skips it: its backward records the batch's ids and the (K, D)
gradient rows for the table, and ``MBASGD`` / ``MBAAdagrad`` / ``MBAAdam`` consume them in
``step()``. No gradient tensor, sparse or dense, is ever built for the table, and
``weight.grad`` stays None. Use it only with the MBA optimisers (their ``zero_grad``
drops recorded rows that were never stepped on).

The lookup is the registered op ``interest_kernels::mba_embedding_lookup`` (fake
implementation, ``register_autograd``); its backward calls
``interest_kernels::mba_embedding_record_rows``, an op marked side-effectful, so
``torch.compile(fullgraph=True)`` traces forward and backward into graphs that still
record the rows. Without autograd (eval, ``torch.no_grad``, export) and under
``torch.func`` transforms the module is a plain ``F.embedding``: there the table gets an
ordinary dense gradient, which is what ``torch.func.grad`` asks for.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.mba.op import check_lookup_ids
from ..optim._rows import PendingRows, push_rows

__all__ = ["MBAEmbedding"]


@torch.library.custom_op("interest_kernels::mba_embedding_lookup", mutates_args=())
def _lookup(weight: torch.Tensor, ids: torch.Tensor, padding_idx: Optional[int]) -> torch.Tensor:
    """``weight[ids]``: (N, D), ids of shape S -> S + (D,)."""
    return F.embedding(ids, weight)


def lookup_fake(weight: torch.Tensor, ids: torch.Tensor, padding_idx: Optional[int]) -> torch.Tensor:
    """The fake (shape-only) lookup of a table op (weight, ids, padding_idx): S + (D,)."""
    return weight.new_empty(ids.shape + (weight.shape[1],))


_lookup.register_fake(lookup_fake)


# cudagraph_unsafe: a CUDA-graph replay would skip this Python side effect and lose the rows.
@torch.library.custom_op("interest_kernels::mba_embedding_record_rows", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def _record_rows(weight: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor, padding_idx: Optional[int]) -> None:
    """Record (ids, gradient rows) for the optimiser of ``weight``. The rows are copied:
    a compiled backward may reuse ``grad``'s memory once this op has run."""
    rows = grad.reshape(-1, weight.shape[1]).to(weight.dtype, copy=True)
    push_rows(weight, PendingRows(ids, rows, padding_idx))


@_record_rows.register_fake
def _record_rows_fake(weight: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor, padding_idx: Optional[int]) -> None:
    return None


# Its only effect is the recording: keep graph passes from removing it as unused.
torch.fx.node.has_side_effect(torch.ops.interest_kernels.mba_embedding_record_rows.default)


def save_lookup_inputs(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    """``setup_context`` of a table lookup op: saves weight and ids, keeps padding_idx."""
    weight, ids, padding_idx = inputs
    ctx.save_for_backward(weight, ids)
    ctx.padding_idx = padding_idx


def _runs_eagerly(grad: torch.Tensor) -> bool:
    """Whether this backward runs on real tensors, outside any tracing (AOTAutograd,
    compiled autograd, make_fx): then ``grad`` is the engine's own tensor, nothing reuses
    its memory before the step, and the rows are kept as they are (as the sparse COO
    gradient of ``nn.Embedding(sparse=True)`` keeps them)."""
    return type(grad) is torch.Tensor and torch._C._len_torch_dispatch_stack() == 0 and not (
        torch.compiler.is_compiling() or torch._is_functional_tensor(grad)
    )


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
    weight, ids = ctx.saved_tensors
    if _runs_eagerly(grad) and grad.dtype == weight.dtype:
        push_rows(weight, PendingRows(ids, grad.reshape(-1, weight.shape[1]), ctx.padding_idx))
    else:
        torch.ops.interest_kernels.mba_embedding_record_rows(weight, ids, grad, ctx.padding_idx)
    return None, None, None


_lookup.register_autograd(_backward, setup_context=save_lookup_inputs)


def _under_functorch() -> bool:
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active()


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
        check_lookup_ids(ids, self.num_embeddings)
        if not torch.is_grad_enabled() or not self.weight.requires_grad or _under_functorch():
            return F.embedding(ids, self.weight, self.padding_idx)
        return torch.ops.interest_kernels.mba_embedding_lookup(self.weight, ids, self.padding_idx)

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
