"""Amazon (Books / Electronics) reviews in the layout of the DIEN authors' preprocessing.

A directory holds

* ``local_train_splitByUser`` and ``local_test_splitByUser``: one sample per line, six
  tab-separated fields ``label, user, item, category, item history, category history``;
  label ``0`` or ``1``; the histories are ids joined by ``\\x02`` (oldest first), of equal
  length, possibly empty.
* optionally, vocabularies ``uid_voc.txt``, ``mid_voc.txt``, ``cat_voc.txt`` in
  :class:`Vocab`'s text format (``raw_id<TAB>index`` per line, ``<unk>`` at 0). The
  authors ship pickled dicts (``*_voc.pkl``); convert them once with
  :func:`convert_pickled_vocab`. A vocabulary file must hold every id of its kind in the
  training file (else it belongs to other data: an error naming it). When absent, the
  vocabulary is built in memory from the training file (order of first appearance);
  nothing is ever written into the data directory.

Test ids missing from a vocabulary map to index 0, as in the authors' code; the loader
counts them in its :class:`LoadStats` instead of dropping anything. A malformed line is
an error naming the file and the line; a UTF-8 byte order mark and blank lines at the
end are accepted.
"""
from __future__ import annotations

import os
import pickle
from typing import Optional

import torch

from .common import UNKNOWN, DataFormatError, Dataset, FeatureSpec, LoadStats, Samples, Vocab, read_lines

__all__ = ["TRAIN_FILE", "TEST_FILE", "VOCAB_FILES", "read_amazon_file", "load_amazon", "convert_pickled_vocab"]

TRAIN_FILE = "local_train_splitByUser"
TEST_FILE = "local_test_splitByUser"
VOCAB_FILES = {"user": "uid_voc.txt", "item": "mid_voc.txt", "cat": "cat_voc.txt"}
SEP = "\x02"

RawRow = tuple[float, str, str, str, list[str], list[str]]


def read_amazon_file(path: str) -> tuple[list[RawRow], LoadStats]:
    """Parse one sample file; raises :class:`DataFormatError` (``path:line: ...``) on
    the first malformed line. Every line becomes one row."""
    rows: list[RawRow] = []
    stats = LoadStats()
    for lineno, line in read_lines(path):
        stats.lines += 1
        fields = line.split("\t")
        if len(fields) != 6:
            raise DataFormatError(path, lineno, f"expected 6 tab-separated fields, got {len(fields)}")
        label, user, item, cat, hist_items, hist_cats = fields
        if label not in ("0", "1"):
            raise DataFormatError(path, lineno, f"label must be 0 or 1, got {label!r}")
        for name, value in (("user", user), ("item", item), ("category", cat)):
            if not value:
                raise DataFormatError(path, lineno, f"empty {name} id")
        items = hist_items.split(SEP) if hist_items else []
        cats = hist_cats.split(SEP) if hist_cats else []
        if len(items) != len(cats):
            raise DataFormatError(
                path, lineno, f"item history has {len(items)} entries, category history {len(cats)}"
            )
        if any(not x for x in items) or any(not x for x in cats):
            raise DataFormatError(path, lineno, "empty id in a history")
        rows.append((float(label), user, item, cat, items, cats))
    stats.samples = len(rows)
    return rows, stats


def convert_pickled_vocab(pkl_path: str, txt_path: str) -> Vocab:
    """Convert one of the authors' pickled ``{raw_id: index}`` dicts (a trusted file:
    unpickling runs code) to the text format. Their index 0 holds a real id, and
    their code maps unknown ids to 0 as well; here every index is shifted by one so
    that 0 is ``<unk>`` alone."""
    with open(pkl_path, "rb") as f:
        raw = pickle.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{pkl_path}: expected a pickled dict, got {type(raw).__name__}")
    vocab = Vocab()
    for token, _ in sorted(raw.items(), key=lambda kv: int(kv[1])):
        if token == UNKNOWN:
            raise ValueError(f"{pkl_path}: the id {UNKNOWN!r} is reserved")
        vocab.add(str(token))
    vocab.save(txt_path)
    return vocab


def _ids(kind: str, train: list[RawRow]):
    for _, user, item, cat, items, cats in train:
        if kind == "user":
            yield user
        elif kind == "item":
            yield from items
            yield item
        else:
            yield from cats
            yield cat


def _vocab(directory: str, kind: str, train: list[RawRow], train_path: str) -> Vocab:
    """The vocabulary file of ``kind`` if the directory has one (checked to hold every
    training id), else one built in memory from the training rows."""
    path = os.path.join(directory, VOCAB_FILES[kind])
    if not os.path.exists(path):
        vocab = Vocab()
        for token in _ids(kind, train):
            vocab.add(token)
        return vocab
    vocab = Vocab.load(path)
    missing = {token for token in _ids(kind, train) if token not in vocab}
    if missing:
        raise ValueError(
            f"{path} does not fit {train_path}: {len(missing)} {kind} ids of the training file are not in it "
            f"(e.g. {sorted(missing)[0]!r}); remove it to build the vocabulary from the data"
        )
    return vocab


def _encode(rows: list[RawRow], vocabs: dict[str, Vocab], stats: LoadStats, max_len: int) -> Samples:
    encoded = []
    for label, user, item, cat, items, cats in rows:
        u, i, c = vocabs["user"].get(user), vocabs["item"].get(item), vocabs["cat"].get(cat)
        hi = [vocabs["item"].get(x) for x in items]
        hc = [vocabs["cat"].get(x) for x in cats]
        stats.note("unknown user ids", int(u == 0))
        stats.note("unknown target ids (item or category)", int(i == 0 or c == 0))
        stats.note("unknown history ids", sum(x == 0 for x in hi) + sum(x == 0 for x in hc))
        stats.note("histories cut to max_len", int(len(hi) > max_len))
        encoded.append((u, i, c, hi, hc, (), label))
    return Samples.from_rows(encoded, max_len, 0)


def _item_category(vocabs: dict[str, Vocab], *splits: list[RawRow]) -> torch.Tensor:
    table = torch.zeros(len(vocabs["item"]), dtype=torch.int64)
    for rows in splits:
        for _, _, item, cat, items, cats in rows:
            for x, c in zip(items + [item], cats + [cat]):
                table[vocabs["item"].get(x)] = vocabs["cat"].get(c)
    table[0] = 0
    return table


def load_amazon(
    directory: str,
    max_len: int = 50,
    train_file: str = TRAIN_FILE,
    test_file: str = TEST_FILE,
    vocabs: Optional[dict[str, Vocab]] = None,
) -> Dataset:
    """Load a train/test pair from ``directory`` (see the module docstring).

    Histories keep their ``max_len`` most recent behaviours. There is no context field
    in this layout (K = 0). ``vocabs`` (``{"user", "item", "cat"}``, e.g. a checkpoint's)
    replaces the vocabularies of the directory; ids they lack are counted as unknown.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no such data directory: {directory}")
    train_path = os.path.join(directory, train_file)
    train_rows, train_stats = read_amazon_file(train_path)
    test_rows, test_stats = read_amazon_file(os.path.join(directory, test_file))
    if vocabs is None:
        vocabs = {kind: _vocab(directory, kind, train_rows, train_path) for kind in VOCAB_FILES}
    train = _encode(train_rows, vocabs, train_stats, max_len)
    test = _encode(test_rows, vocabs, test_stats, max_len)
    spec = FeatureSpec(
        num_users=len(vocabs["user"]),
        num_items=len(vocabs["item"]),
        num_cats=len(vocabs["cat"]),
        context_sizes=(),
        max_len=max_len,
        item_category=_item_category(vocabs, train_rows, test_rows),
    )
    stats = {train_file: train_stats, test_file: test_stats}
    return Dataset(train, test, spec, stats, f"amazon:{directory}", vocabs)

