"""Small generated data sets in the Amazon and Taobao layouts, with a planted signal.

Every user prefers a few categories, and most of their behaviours fall in them. Items
belong to one category each (item ``k`` to category ``k % num_cats``).

* Amazon layout (:func:`generate_amazon`): half of the samples take as target an item
  whose category is that of a random behaviour in the history (label 1), the other half
  an item of a uniformly drawn category (label 0); then each label flips with
  probability ``noise``. A model that compares the target with the history separates
  them; one that ignores the history is at chance, up to what the user id reveals.
* Taobao layout (:func:`generate_taobao`): click streams drawn the same way, with some
  ``buy``/``cart``/``fav`` rows; the loader's sampled negatives are items of random
  categories, so the same comparison separates them.

Generation is deterministic in ``seed``. Nothing is downloaded.
"""
from __future__ import annotations

import os
import random

from .amazon import SEP, TEST_FILE, TRAIN_FILE, VOCAB_FILES
from .common import Vocab

__all__ = ["generate_amazon", "generate_taobao"]


class _World:
    def __init__(self, rng: random.Random, num_users: int, num_items: int, num_cats: int, preferred: int) -> None:
        if num_items < num_cats:
            raise ValueError(f"num_items ({num_items}) must be >= num_cats ({num_cats})")
        self.rng = rng
        self.num_items = num_items
        self.num_cats = num_cats
        self.prefs = [rng.sample(range(num_cats), min(preferred, num_cats)) for _ in range(num_users)]

    def item_of(self, cat: int) -> int:
        per_cat = (self.num_items - 1 - cat) // self.num_cats + 1
        return cat + self.num_cats * self.rng.randrange(per_cat)

    def behaviour(self, user: int, focus: float) -> tuple[int, int]:
        if self.rng.random() < focus:
            cat = self.rng.choice(self.prefs[user])
        else:
            cat = self.rng.randrange(self.num_cats)
        return self.item_of(cat), cat


def generate_amazon(
    directory: str,
    *,
    num_users: int = 1000,
    num_items: int = 500,
    num_cats: int = 20,
    train_per_user: int = 10,
    test_per_user: int = 2,
    min_len: int = 5,
    max_len: int = 30,
    preferred: int = 2,
    focus: float = 0.8,
    noise: float = 0.1,
    seed: int = 0,
) -> str:
    """Write ``local_train_splitByUser``, ``local_test_splitByUser`` and the three
    vocabulary files into ``directory`` (created if needed); returns it."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = random.Random(seed)
    world = _World(rng, num_users, num_items, num_cats, preferred)
    os.makedirs(directory, exist_ok=True)

    def line(user: int) -> str:
        hist = [world.behaviour(user, focus) for _ in range(rng.randint(min_len, max_len))]
        if rng.random() < 0.5:
            cat, label = rng.choice(hist)[1], 1
        else:
            cat, label = rng.randrange(num_cats), 0
        if rng.random() < noise:
            label = 1 - label
        items = SEP.join(f"I{i}" for i, _ in hist)
        cats = SEP.join(f"C{c}" for _, c in hist)
        return f"{label}\tU{user}\tI{world.item_of(cat)}\tC{cat}\t{items}\t{cats}\n"

    for name, per_user in ((TRAIN_FILE, train_per_user), (TEST_FILE, test_per_user)):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            for _ in range(per_user):
                for user in range(num_users):
                    f.write(line(user))
    Vocab(f"U{u}" for u in range(num_users)).save(os.path.join(directory, VOCAB_FILES["user"]))
    Vocab(f"I{i}" for i in range(num_items)).save(os.path.join(directory, VOCAB_FILES["item"]))
    Vocab(f"C{c}" for c in range(num_cats)).save(os.path.join(directory, VOCAB_FILES["cat"]))
    return directory


def generate_taobao(
    path: str,
    *,
    num_users: int = 300,
    num_items: int = 1000,
    num_cats: int = 20,
    clicks_per_user: int = 12,
    preferred: int = 2,
    focus: float = 0.8,
    other_rate: float = 0.1,
    seed: int = 0,
) -> str:
    """Write a behaviour CSV (with header) to ``path``; returns it."""
    rng = random.Random(seed)
    world = _World(rng, num_users, num_items, num_cats, preferred)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    start = 1_511_539_200  # 2017-11-25, the first day of the Tianchi data
    with open(path, "w", encoding="utf-8") as f:
        f.write("user_id,item_id,category_id,behavior_type,timestamp\n")
        for user in range(num_users):
            stamp = start + rng.randrange(86_400)
            for _ in range(clicks_per_user):
                item, cat = world.behaviour(user, focus)
                stamp += rng.randrange(60, 3_600)
                f.write(f"{user + 1},{item + 1},{cat + 1},pv,{stamp}\n")
                if rng.random() < other_rate:
                    f.write(f"{user + 1},{item + 1},{cat + 1},{rng.choice(('buy', 'cart', 'fav'))},{stamp + 1}\n")
    return path
