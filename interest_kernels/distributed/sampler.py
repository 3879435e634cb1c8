"""Negative samples of a rank's slice that equal those of the whole global batch.

DIEN and DMIN draw negatives for the auxiliary loss from the model's
:class:`NegativeSampler` (a seeded generator, the same on every rank). A rank drawing
for its slice alone would draw other values than one process drawing for the whole
batch; :class:`ShardNegativeSampler` draws the global batch's negatives (every rank the
same, so the generators stay in step) and returns the rows of this rank's slice.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.common import NegativeSampler
from .data import Shard

__all__ = ["ShardNegativeSampler", "convert_shard_samplers", "set_shard"]


class ShardNegativeSampler(NegativeSampler):
    """A :class:`NegativeSampler` for the rows ``shard.offset ..`` of a global batch of
    ``shard.global_rows`` rows. Same buffers, generator and state-dict keys."""

    shard: Shard = Shard(0, 0)

    def forward(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        rows, offset, total = shape[0], self.shard.offset, self.shard.global_rows
        if offset + rows > total:
            raise ValueError(f"a slice of {rows} rows at {offset} does not fit a global batch of {total}")
        items, cats = super().forward(torch.Size((total, *shape[1:])))
        return items[offset : offset + rows], cats[offset : offset + rows]


def convert_shard_samplers(module: nn.Module) -> nn.Module:
    """Turn every :class:`NegativeSampler` under ``module`` into a
    :class:`ShardNegativeSampler` in place (same generator and buffers). Returns ``module``."""
    for sub in module.modules():
        if type(sub) is NegativeSampler:
            sub.__class__ = ShardNegativeSampler
    return module


def set_shard(module: nn.Module, shard: Shard) -> None:
    """Tell the converted samplers under ``module`` where the next batch's rows sit."""
    for sub in module.modules():
        if isinstance(sub, ShardNegativeSampler):
            sub.shard = shard
