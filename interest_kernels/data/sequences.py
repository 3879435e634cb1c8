"""Per-user behaviour sequences held in typed arrays, for the loaders that build samples
from event logs (Taobao, MovieLens): streamed in, then sorted into time order by torch."""
from __future__ import annotations

from array import array
from typing import NamedTuple, Optional

import torch

from .common import LoadStats, Vocab

__all__ = ["SequenceTable", "Sequences", "id_maps", "remap"]


class Sequences(NamedTuple):
    """Events sorted by (user, time, file order), E events; user, item, cat (E,) int32,
    stamp (E,) int64, extra (E,) float32 (e.g. the rating); position (E,) int64: the
    event's index within its user's sequence; count (E,) int64: that sequence's length."""

    user: torch.Tensor
    item: torch.Tensor
    cat: torch.Tensor
    stamp: torch.Tensor
    extra: torch.Tensor
    position: torch.Tensor
    count: torch.Tensor


class SequenceTable:
    """Events appended one by one as local vocabulary indices (4 + 4 + 4 + 8 + 4 bytes
    each), and the category of every item index seen (``item_cat``, index 0 for <unk>)."""

    def __init__(self) -> None:
        self.user = array("i")
        self.item = array("i")
        self.cat = array("i")
        self.stamp = array("q")
        self.extra = array("f")
        self.item_cat = array("i", [0])

    def append(self, user: int, item: int, cat: int, stamp: int, extra: float = 0.0) -> None:
        self.user.append(user)
        self.item.append(item)
        self.cat.append(cat)
        self.stamp.append(stamp)
        self.extra.append(extra)

    def __len__(self) -> int:
        return len(self.user)

    def sorted(self) -> Sequences:
        def column(values: array, dtype: torch.dtype) -> torch.Tensor:
            return torch.frombuffer(values, dtype=dtype) if len(values) else torch.zeros(0, dtype=dtype)

        user = column(self.user, torch.int32)
        stamp = column(self.stamp, torch.int64)
        by_time = torch.argsort(stamp, stable=True)
        order = by_time[torch.argsort(user[by_time], stable=True)]
        user = user[order]
        _, group, count = torch.unique_consecutive(user, return_inverse=True, return_counts=True)
        start = torch.cumsum(count, 0) - count
        position = torch.arange(user.numel()) - start[group]
        return Sequences(
            user,
            column(self.item, torch.int32)[order],
            column(self.cat, torch.int32)[order],
            stamp[order],
            column(self.extra, torch.float32)[order],
            position,
            count[group],
        )


def remap(local: Vocab, fixed: Vocab, stats: LoadStats, what: str) -> torch.Tensor:
    """(len(local),) int64: the index in ``fixed`` of every id of ``local`` (0 where
    ``fixed`` lacks it, counted in ``stats``). The identity when they are one object."""
    if local is fixed:
        return torch.arange(len(local))
    table = torch.tensor([fixed.get(token) for token in local.tokens()], dtype=torch.int64)
    stats.note(f"unknown {what} ids (not in the given vocabulary)", int((table[1:] == 0).sum()))
    return table


def id_maps(local: dict[str, Vocab], vocabs: Optional[dict[str, Vocab]], item_cat: torch.Tensor,
            stats: LoadStats, what: dict[str, str]) -> tuple[dict[str, Vocab], dict[str, torch.Tensor], torch.Tensor]:
    """The vocabularies in force (``vocabs``, e.g. a checkpoint's, else the file's own
    ``local`` ones, both keyed ``"user"``, ``"item"``, ``"cat"``), the map of each local
    index into them (:func:`remap`, unknown ids counted in ``stats`` under ``what[key]``),
    and the item -> category table (num_items,) int64 from ``item_cat``, the category of
    each local item (index 0, the unknown item, has category 0)."""
    fixed = vocabs if vocabs is not None else local
    maps = {key: remap(local[key], fixed[key], stats, what[key]) for key in ("user", "item", "cat")}
    item_category = torch.zeros(len(fixed["item"]), dtype=torch.int64)
    item_category[maps["item"]] = maps["cat"][item_cat]
    item_category[0] = 0
    return fixed, maps, item_category
