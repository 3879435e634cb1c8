"""Each rank's share of every global mini-batch.

All ranks walk the same shuffled order (a :class:`BatchIterator` over the global batch
of ``batch_size * world_size`` samples, drawn from the seed alone) and each takes its
contiguous slice of rows: rank r of W gets ``tensor_split(rows, W)[r]``. The slice keeps
the global batch's history width T, so the model sees the same shapes (and draws the
same negatives) as one process training on the whole batch; a 1-process run with
``batch_size * W`` sees exactly the same global batches.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from ..data.common import Batch, BatchIterator, Samples

__all__ = ["Shard", "ShardedBatches"]


class Shard(NamedTuple):
    """Where a rank's rows sit in the global batch: ``offset`` and the global row count."""

    offset: int
    global_rows: int


class ShardedBatches:
    """This rank's slices of the global batches, with the resumable position of the
    global :class:`BatchIterator` (``epoch``, ``position``, ``state_dict``)."""

    def __init__(self, samples: Samples, batch_size: int, *, rank: int, world_size: int, seed: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.rank = rank
        self.world_size = world_size
        self.batches = BatchIterator(samples, batch_size * world_size, seed=seed)
        self.shard = Shard(0, 0)

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    @property
    def position(self) -> int:
        return self.batches.position

    def __len__(self) -> int:
        return len(self.batches)

    def epoch_batches(self) -> Iterator[Batch]:
        """This rank's slice of each remaining global batch of the epoch; :attr:`shard`
        says where the slice yielded last sits in its global batch."""
        for full in self.batches.epoch_batches():
            rows = torch.arange(full.size).tensor_split(self.world_size)[self.rank]
            lo = int(rows[0]) if rows.numel() else full.size
            hi = lo + rows.numel()
            self.shard = Shard(lo, full.size)
            yield Batch(*(t[lo:hi] for t in full))

    def state_dict(self) -> dict[str, int]:
        """The global iterator's state (its ``batch_size`` is the global batch size)."""
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches.load_state_dict(state)
