"""Gradient rows handed from an embedding's backward straight to an MBA optimiser.

``MBAEmbedding``'s backward records, per table, the looked-up ids and the gradient rows
of the batch instead of building any gradient tensor for the table; the optimiser's
``step`` (or ``zero_grad``) takes them. Several backward passes before one step add up,
like ordinary gradient accumulation.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["PendingRows", "clear_rows", "push_rows", "take_rows"]


class PendingRows(NamedTuple):
    """One backward pass's lookups into a table of width D.

    ``ids``: the lookup ids as the module received them, (B,) or (B, ...) with sample b
    in ``ids[b]`` (used to count samples); ``grad_rows`` (ids.numel(), D);
    ``padding_idx``: an id whose lookups carry no gradient and are not counted.
    """

    ids: torch.Tensor
    grad_rows: torch.Tensor
    padding_idx: Optional[int]


_pending: WeakIdKeyDictionary = WeakIdKeyDictionary()


def push_rows(table: torch.Tensor, rows: PendingRows) -> None:
    """Record one batch of gradient rows for ``table``."""
    _pending.setdefault(table, []).append(rows)


def take_rows(table: torch.Tensor) -> list[PendingRows]:
    """Every batch recorded for ``table`` since the last take, oldest first (and forget them)."""
    return _pending.pop(table, [])


def clear_rows(table: torch.Tensor) -> None:
    """Forget the rows recorded for ``table``."""
    _pending.pop(table, None)
