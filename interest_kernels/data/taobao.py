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
"""
from __future__ import annotations

import torch

from .common import DataFormatError, Dataset, FeatureSpec, LoadStats, Samples, Vocab, check_file

__all__ = ["BEHAVIOURS", "HEADER", "load_taobao"]

BEHAVIOURS = ("pv", "buy", "cart", "fav")
HEADER = "user_id,item_id,category_id,behavior_type,timestamp"
HOURS = 24


def _read(path: str, stats: LoadStats) -> list[tuple[str, str, str, str, int]]:
    rows = []
    with open(path, encoding="utf-8", newline="\n") as f:
        for lineno, line in enumerate(f, 1):
            stats.lines += 1
            line = line.rstrip("\n").rstrip("\r")
            if lineno == 1 and line.replace(" ", "") == HEADER:
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
            rows.append((user, item, cat, behaviour, stamp))
    return rows


def load_taobao(path: str, max_len: int = 50, seed: int = 0) -> Dataset:
    """Samples from one behaviour CSV (see the module docstring); ``seed`` draws the negatives."""
    check_file(path)
    stats = LoadStats()
    rows = _read(path, stats)
    users, items, cats = Vocab(), Vocab(), Vocab()
    item_cat: dict[int, int] = {}
    clicks: dict[int, list[tuple[int, int, int, int]]] = {}
    for order, (user, item, cat, behaviour, stamp) in enumerate(rows):
        u, i, c = users.add(user), items.add(item), cats.add(cat)
        item_cat[i] = c
        if behaviour == "pv":
            clicks.setdefault(u, []).append((stamp, order, i, c))
        else:
            stats.note(f"{behaviour} rows (vocabulary only)")
    item_category = torch.zeros(len(items), dtype=torch.int64)
    for i, c in item_cat.items():
        item_category[i] = c

    gen = torch.Generator().manual_seed(seed)
    train_rows, test_rows = [], []
    for u, seq in clicks.items():
        if len(seq) < 2:
            stats.note("users with a single click (no sample)")
            continue
        seq.sort()
        for k in range(1, len(seq)):
            stamp, _, item, cat = seq[k]
            hist = seq[max(0, k - max_len) : k]
            hi, hc = [s[2] for s in hist], [s[3] for s in hist]
            ctx = ((stamp // 3600) % HOURS + 1,)
            neg = item
            while neg == item and len(items) > 2:
                neg = int(torch.randint(1, len(items), (1,), generator=gen))
            out = test_rows if k == len(seq) - 1 else train_rows
            out.append((u, item, cat, hi, hc, ctx, 1.0))
            out.append((u, neg, int(item_category[neg]), hi, hc, ctx, 0.0))
            stats.note("histories cut to max_len", int(k > max_len))
    stats.samples = len(train_rows) + len(test_rows)
    spec = FeatureSpec(
        num_users=len(users),
        num_items=len(items),
        num_cats=len(cats),
        context_sizes=(HOURS + 1,),
        max_len=max_len,
        item_category=item_category,
    )
    return Dataset(
        Samples.from_rows(train_rows, max_len, 1),
        Samples.from_rows(test_rows, max_len, 1),
        spec,
        {path: stats},
        f"taobao:{path}",
    )
