"""Every rank's embedding-gradient rows, handed to every replica's MBA optimiser.

With replicated tables each rank's backward records the (ids, gradient rows) of its own
slice of the global batch (``MBAEmbedding`` records them for the optimiser;
``nn.Embedding(sparse=True)`` leaves a sparse ``.grad``). :func:`exchange_rows`
all-gathers them, so that each rank's optimiser then consumes the rows of the whole
global batch, in the global batch's row order: the same ids, the same gradient rows and
the same frequency counts n_j as one process training on the whole batch, and so the
same MBA step on every replica. Cost: proportional to the rows touched, never to N.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from ..optim._rows import PendingRows, push_rows, take_rows

__all__ = ["all_gather_1d", "exchange_rows"]


def _local_entries(table: torch.Tensor) -> list[PendingRows]:
    """The lookups recorded for ``table`` since the last step, each with ids of at least
    one dimension; a sparse ``.grad`` becomes one more entry (whose every lookup counts
    once, as the MBA optimisers count a sparse gradient) and is cleared."""
    entries = [PendingRows(e.ids.reshape(1) if e.ids.dim() == 0 else e.ids, e.grad_rows, e.padding_idx)
               for e in take_rows(table)]
    grad = table.grad
    if grad is not None:
        if not grad.is_sparse:
            raise TypeError(
                f"a replicated table (shape {tuple(table.shape)}) has a dense gradient: use "
                "MBAEmbedding or nn.Embedding(sparse=True)"
            )
        entries.append(PendingRows(grad._indices()[0], grad._values().reshape(-1, table.shape[1]), None))
        table.grad = None
    return entries


def all_gather_1d(tensor: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Each rank's 1-D ``tensor`` (rank r holds ``sizes[r]`` elements), in rank order."""
    longest = max(sizes)
    padded = tensor
    if tensor.numel() < longest:
        padded = torch.cat([tensor, tensor.new_zeros(longest - tensor.numel())])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [part[:size] for part, size in zip(parts, sizes)]


def exchange_rows(tables: Sequence[torch.Tensor]) -> None:
    """Replace the gradient rows recorded on this rank for each of ``tables`` by the
    rows of all ranks, concatenated in rank order (rank r's rows being the r-th slice of
    the global batch). Every rank calls it with the same tables in the same order, after
    the backward pass and before the MBA optimiser's ``step``.
    """
    if not tables:
        return
    world = dist.get_world_size()
    device = tables[0].device
    local = [_local_entries(t) for t in tables]
    entries = [e for group in local for e in group]
    owners = [t for t, group in zip(tables, local) for _ in group]
    widths = [math.prod(e.ids.shape[1:]) for e in entries]

    # One small all-gather of the layout: lookups per table, then per lookup the number
    # of samples (the only thing the ranks' shapes may differ in) and the ids per sample.
    layout = [len(group) for group in local] + [v for e, w in zip(entries, widths) for v in (e.ids.shape[0], w)]
    layouts = [x.tolist() for x in all_gather_1d(torch.tensor(layout, device=device), [len(layout)] * world)]
    if any(lay[: len(tables)] != layout[: len(tables)] or lay[len(tables) + 1 :: 2] != widths for lay in layouts):
        raise RuntimeError(
            "the ranks looked up their embedding tables differently in this step (lookups per table "
            f"{[lay[: len(tables)] for lay in layouts]}); every rank must run the same model code"
        )
    if not entries:
        return
    samples = [lay[len(tables) :: 2] for lay in layouts]  # samples[r][k]: rank r's rows of lookup k

    id_counts = [[n * w for n, w in zip(samples[r], widths)] for r in range(world)]
    ids = all_gather_1d(torch.cat([e.ids.reshape(-1).long() for e in entries]), [sum(c) for c in id_counts])
    id_parts = [ids[r].split(id_counts[r]) for r in range(world)]

    rows: list[list[torch.Tensor]] = [[] for _ in entries]  # rows[k]: each rank's rows of lookup k
    for dtype in sorted({t.dtype for t in owners}, key=str):
        keys = [k for k, t in enumerate(owners) if t.dtype == dtype]
        sizes = [[id_counts[r][k] * owners[k].shape[1] for k in keys] for r in range(world)]
        mine = torch.cat([entries[k].grad_rows.reshape(-1).to(dtype) for k in keys])
        for r, part in enumerate(all_gather_1d(mine, [sum(s) for s in sizes])):
            for k, piece in zip(keys, part.split(sizes[r])):
                rows[k].append(piece.reshape(-1, owners[k].shape[1]))

    for k, (table, entry) in enumerate(zip(owners, entries)):
        trailing = entry.ids.shape[1:]
        merged = torch.cat([id_parts[r][k].reshape(samples[r][k], *trailing) for r in range(world)])
        push_rows(table, PendingRows(merged, torch.cat(rows[k]), entry.padding_idx))
