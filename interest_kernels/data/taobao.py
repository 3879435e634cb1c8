"""Taobao user behaviour (Tianchi ``UserBehavior.csv``) turned into click-prediction samples.

Input: CSV lines ``user_id,item_id,category_id,behavior_type,timestamp`` with integer
ids, ``behavior_type`` one of ``pv`` (click), ``buy``, ``cart``, ``fav`` and a Unix
timestamp in seconds; an optional header line naming exactly those columns.

Samples: each user's clicks in time order (ties keep file order). Every click after
the first is a target: one positive sample (history: the clicks before it, the most
recent ``max_len`` kept; label 1) and one negative sample with the same history and an
item drawn uniformly from the item vocabulary (redrawn while it equals the clicked item;
label 0). Each user's last click goes to the test split, the others to training.
Context: the hour of day (UTC) of the target's timestamp, index ``hour + 1``.

Nothing is dropped silently: rows of other behaviour types only enter the vocabularies,
and users with a single click give no sample; both are counted in :class:`LoadStats`.

Memory: the file is streamed; each click is kept as a few numbers in typed arrays, and
the samples share each user's click sequence (:class:`Samples`), so memory grows with
the rows and the vocabularies, never with ``max_len``
(``bench/bench_taobao_memory.py`` measures the peak per row).
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import DataFormatError, Dataset, FeatureSpec, LoadStats, Samples, Vocab, read_lines
from .sequences import SequenceTable, id_maps

__all__ = ["BEHAVIOURS", "HEADER", "load_taobao"]

BEHAVIOURS = ("pv", "buy", "cart", "fav")
HEADER = "user_id,item_id,category_id,behavior_type,timestamp"
HOURS = 24


def _read(path: str, stats: LoadStats, users: Vocab, items: Vocab, cats: Vocab) -> SequenceTable:
    table = SequenceTable()
    item_cat = table.item_cat
    for lineno, line in read_lines(path):
        stats.lines += 1
        if stats.lines == 1 and line.replace(" ", "") == HEADER:
            stats.note("header lines")
            continue
        fields = line.split(",")
        if len(fields) != 5:
            raise DataFormatError(path, lineno, f"expected 5 comma-separated fields, got {len(fields)}")
        user, item, cat, behaviour, ts = (x.strip() for x in fields)
        for name, value in (("user_id", user), ("item_id", item), ("category_id", cat)):
            if not value.isdigit():
                raise DataFormatError(path, lineno, f"{name} must be a non-negative integer, got {value!r}")
        if behaviour not in BEHAVIOURS:
            raise DataFormatError(path, lineno, f"behavior_type must be one of {BEHAVIOURS}, got {behaviour!r}")
        try:
            stamp = int(ts)
        except ValueError:
            raise DataFormatError(path, lineno, f"timestamp must be an integer, got {ts!r}") from None
        u, i, c = users.add(user), items.add(item), cats.add(cat)
        if i == len(item_cat):
            item_cat.append(c)
        else:
            item_cat[i] = c
        if behaviour == "pv":
            table.append(u, i, c, stamp)
        else:
            stats.note(f"{behaviour} rows (vocabulary only)")
    return table


def load_taobao(path: str, max_len: int = 50, seed: int = 0, vocabs: Optional[dict[str, Vocab]] = None) -> Dataset:
    """Samples from one behaviour CSV (see the module docstring); ``seed`` draws the
    negatives. ``vocabs`` (``{"user", "item", "cat"}``, e.g. a checkpoint's) fixes the
    id -> index maps; ids they lack become index 0 and are counted."""
    stats = LoadStats()
    users, items, cats = Vocab(), Vocab(), Vocab()
    table = _read(path, stats, users, items, cats)
    seq = table.sorted()
    item_cat = torch.frombuffer(table.item_cat, dtype=torch.int32).long()
    del table  # the unsorted columns
    first = seq.position == 0
    last = seq.position == seq.count - 1
    stats.note("users with a single click (no sample)", int((first & last).sum()))
    target = torch.nonzero(~first).flatten()
    stats.note("histories cut to max_len", int((seq.position[target] > max_len).sum()))

    fixed, maps, item_category = id_maps(
        {"user": users, "item": items, "cat": cats}, vocabs, item_cat, stats,
        {"user": "user", "item": "item", "cat": "category"})
    user_map, item_map, cat_map = maps["user"], maps["item"], maps["cat"]

    # Everything the samples need, per target (int32) and per click; then the sorted
    # columns go, so that they and the samples are never all held at once.
    i32 = torch.int32
    index_dtype = i32 if seq.user.numel() < 2**31 else torch.int64
    lengths = seq.position[target].clamp(max=max_len).to(i32)
    starts = (target - lengths).to(index_dtype)
    users_of = user_map[seq.user[target].long()].to(i32)
    pos_items = item_map[seq.item[target].long()].to(i32)
    pos_cats = cat_map[seq.cat[target].long()].to(i32)
    hours = ((seq.stamp[target] // 3600) % HOURS + 1).to(i32)
    is_test = last[target]
    behaviour_items = item_map[seq.item.long()].to(i32)
    behaviour_cats = cat_map[seq.cat.long()].to(i32)
    del seq, first, last, target

    gen = torch.Generator().manual_seed(seed)
    neg_items = torch.randint(1, max(len(fixed["item"]), 2), pos_items.shape, generator=gen, dtype=i32)
    while len(fixed["item"]) > 2:
        clash = torch.nonzero(neg_items == pos_items).flatten()
        if clash.numel() == 0:
            break
        neg_items[clash] = torch.randint(1, len(fixed["item"]), clash.shape, generator=gen, dtype=i32)

    def split(chosen: torch.Tensor) -> Samples:
        """The positive and negative samples of the targets ``chosen`` (a mask over them)."""

        def pair(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:  # (positive, negative) per target
            return torch.stack([pos[chosen], neg[chosen]], 1).flatten()

        def both(x: torch.Tensor) -> torch.Tensor:
            return pair(x, x)

        neg_cats = item_category[neg_items[chosen].long()].to(i32)
        count = int(chosen.sum())
        return Samples(
            user=both(users_of),
            item=pair(pos_items, neg_items),
            cat=torch.stack([pos_cats[chosen], neg_cats], 1).flatten(),
            hist_start=both(starts),
            lengths=both(lengths),
            context=both(hours)[:, None],
            label=torch.stack([torch.ones(count), torch.zeros(count)], 1).flatten(),
            behaviour_items=behaviour_items,
            behaviour_cats=behaviour_cats,
            max_len=max_len,
        )

    train, test = split(~is_test), split(is_test)
    stats.samples = len(train) + len(test)
    spec = FeatureSpec(
        num_users=len(fixed["user"]),
        num_items=len(fixed["item"]),
        num_cats=len(fixed["cat"]),
        context_sizes=(HOURS + 1,),
        max_len=max_len,
        item_category=item_category,
    )
    return Dataset(
        train,
        test,
        spec,
        {path: stats},
        f"taobao:{path}",
        fixed,
    )
