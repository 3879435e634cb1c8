"""Sample containers, vocabularies and a resumable batch iterator shared by the loaders.

Every id field is mapped to a dense index; index 0 of every vocabulary is reserved for
padding and for ids the vocabulary does not know, so embedding tables are built with
``padding_idx=0`` and history padding never trains a row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional, Sequence

import torch

__all__ = [
    "UNKNOWN",
    "Vocab",
    "Batch",
    "FeatureSpec",
    "Samples",
    "LoadStats",
    "BatchIterator",
    "DataFormatError",
    "Dataset",
    "read_lines",
    "hold_out_users",
    "check_file",
    "eval_batches",
]

UNKNOWN = "<unk>"


class DataFormatError(ValueError):
    """A malformed input line; the message starts with ``file:line:``."""

    def __init__(self, path: str, lineno: int, message: str) -> None:
        super().__init__(f"{path}:{lineno}: {message}")
        self.path = path
        self.lineno = lineno


class Vocab:
    """Raw id (a string) -> dense index; index 0 is ``<unk>`` (padding and unseen ids).

    File format (text, UTF-8): one entry per line, ``raw_id<TAB>index``; the indices
    must be exactly 0..n-1 with 0 for ``<unk>``, in any order.
    """

    def __init__(self, tokens: Sequence[str] = ()) -> None:
        self.index: dict[str, int] = {UNKNOWN: 0}
        for token in tokens:
            self.add(token)

    def add(self, token: str) -> int:
        found = self.index.get(token)
        if found is None:
            found = self.index[token] = len(self.index)
        return found

    def get(self, token: str) -> int:
        return self.index.get(token, 0)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, token: str) -> bool:
        return token in self.index

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for token, i in self.index.items():
                f.write(f"{token}\t{i}\n")

    def tokens(self) -> list[str]:
        """The raw ids in index order (``<unk>`` first): what a checkpoint stores."""
        out = [""] * len(self.index)
        for token, i in self.index.items():
            out[i] = token
        return out

    @classmethod
    def from_tokens(cls, tokens: Sequence[str]) -> "Vocab":
        """The inverse of :meth:`tokens`."""
        if not tokens or tokens[0] != UNKNOWN:
            raise ValueError(f"a vocabulary's token list must start with {UNKNOWN!r}")
        vocab = cls(tokens[1:])
        if len(vocab) != len(tokens):
            raise ValueError("a vocabulary's token list holds a duplicate")
        return vocab

    @classmethod
    def load(cls, path: str) -> "Vocab":
        vocab = cls.__new__(cls)
        vocab.index = {}
        for lineno, line in read_lines(path):
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0]:
                raise DataFormatError(path, lineno, f"expected 'raw_id<TAB>index', got {line!r}")
            try:
                i = int(parts[1])
            except ValueError:
                raise DataFormatError(path, lineno, f"index {parts[1]!r} is not an integer") from None
            if parts[0] in vocab.index:
                raise DataFormatError(path, lineno, f"duplicate id {parts[0]!r}")
            vocab.index[parts[0]] = i
        if sorted(vocab.index.values()) != list(range(len(vocab.index))) or vocab.index.get(UNKNOWN) != 0:
            raise ValueError(f"{path}: indices must be 0..n-1 with {UNKNOWN!r} at 0")
        return vocab


class Batch(NamedTuple):
    """One mini-batch, all tensors on one device.

    user (B,) int64; item, cat (B,) int64 (the target); hist_items, hist_cats (B, T) int64,
    0 past each row's length; lengths (B,) int64 in [0, T]; context (B, K) int64 (K may be
    0); label (B,) float32 in {0, 1}.
    """

    user: torch.Tensor
    item: torch.Tensor
    cat: torch.Tensor
    hist_items: torch.Tensor
    hist_cats: torch.Tensor
    lengths: torch.Tensor
    context: torch.Tensor
    label: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in self))

    @property
    def size(self) -> int:
        return int(self.label.shape[0])


@dataclass
class FeatureSpec:
    """Vocabulary sizes the models build their tables from.

    ``item_category`` (num_items,) int64: the category index of each item index (0 for
    padding/unknown), used to give sampled negative items their category.
    """

    num_users: int
    num_items: int
    num_cats: int
    context_sizes: tuple[int, ...]
    max_len: int
    item_category: torch.Tensor

    def __post_init__(self) -> None:
        if self.item_category.shape != (self.num_items,):
            raise ValueError(
                f"item_category must have shape ({self.num_items},), got {tuple(self.item_category.shape)}"
            )


@dataclass
class LoadStats:
    """What a loader read and what became of every line (nothing is dropped unreported)."""

    lines: int = 0
    samples: int = 0
    notes: dict[str, int] = field(default_factory=dict)

    def note(self, what: str, n: int = 1) -> None:
        self.notes[what] = self.notes.get(what, 0) + n

    def __str__(self) -> str:
        extra = "".join(f", {k}: {v}" for k, v in sorted(self.notes.items()))
        return f"{self.lines} lines, {self.samples} samples{extra}"


@dataclass
class Samples:
    """A whole split in memory, N samples.

    Target fields user, item, cat (N,), context (N, K) and label (N,) float32. Histories
    are slices of shared behaviour arrays, so samples that share a user's sequence
    (Taobao, MovieLens) do not copy it: the history of sample r is
    ``behaviour_items[hist_start[r] : hist_start[r] + lengths[r]]`` (oldest first), and
    the same slice of ``behaviour_cats``. Ids may be stored in any integer dtype (the
    large loaders use int32); :meth:`batch` returns int64 tensors.
    """

    user: torch.Tensor
    item: torch.Tensor
    cat: torch.Tensor
    hist_start: torch.Tensor
    lengths: torch.Tensor
    context: torch.Tensor
    label: torch.Tensor
    behaviour_items: torch.Tensor
    behaviour_cats: torch.Tensor
    max_len: int

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def _histories(self, index: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        steps = torch.arange(width)
        lengths = self.lengths[index].to(torch.int64)
        valid = steps < lengths[:, None]
        if self.behaviour_items.numel() == 0:
            zeros = torch.zeros(index.numel(), width, dtype=torch.int64)
            return zeros, zeros.clone()
        pos = (self.hist_start[index].to(torch.int64)[:, None] + steps).clamp(max=self.behaviour_items.numel() - 1)
        items = torch.where(valid, self.behaviour_items[pos].to(torch.int64), 0)
        cats = torch.where(valid, self.behaviour_cats[pos].to(torch.int64), 0)
        return items, cats

    @property
    def hist_items(self) -> torch.Tensor:
        """(N, max_len) int64, 0 past each length (materialised: for small splits)."""
        return self._histories(torch.arange(len(self)), self.max_len)[0]

    @property
    def hist_cats(self) -> torch.Tensor:
        """(N, max_len) int64, 0 past each length (materialised: for small splits)."""
        return self._histories(torch.arange(len(self)), self.max_len)[1]

    def batch(self, index: torch.Tensor) -> Batch:
        """The samples at ``index``; histories padded to the longest among them (>= 1)."""
        longest = max(int(self.lengths[index].max()), 1) if index.numel() else 1
        hist_items, hist_cats = self._histories(index, longest)
        return Batch(
            self.user[index].to(torch.int64),
            self.item[index].to(torch.int64),
            self.cat[index].to(torch.int64),
            hist_items,
            hist_cats,
            self.lengths[index].to(torch.int64),
            self.context[index].to(torch.int64),
            self.label[index].to(torch.float32),
        )

    def subset(self, index: torch.Tensor) -> "Samples":
        """The samples at ``index`` (sharing the behaviour arrays)."""
        return Samples(
            self.user[index], self.item[index], self.cat[index], self.hist_start[index], self.lengths[index],
            self.context[index], self.label[index], self.behaviour_items, self.behaviour_cats, self.max_len,
        )

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[tuple[int, int, int, Sequence[int], Sequence[int], Sequence[int], float]],
        max_len: int,
        num_context: int,
    ) -> "Samples":
        """rows: (user, item, cat, hist_items, hist_cats, context, label); histories keep
        their most recent ``max_len`` entries (the end of the list is the most recent)."""
        flat_items: list[int] = []
        flat_cats: list[int] = []
        starts, lengths, contexts = [], [], []
        for _, _, _, hi, hc, ctx, _ in rows:
            hi, hc = list(hi)[-max_len:] if max_len else [], list(hc)[-max_len:] if max_len else []
            starts.append(len(flat_items))
            lengths.append(len(hi))
            flat_items += hi
            flat_cats += hc
            contexts.append(list(ctx))
        return cls(
            torch.tensor([r[0] for r in rows], dtype=torch.int64),
            torch.tensor([r[1] for r in rows], dtype=torch.int64),
            torch.tensor([r[2] for r in rows], dtype=torch.int64),
            torch.tensor(starts, dtype=torch.int64),
            torch.tensor(lengths, dtype=torch.int64),
            torch.tensor(contexts, dtype=torch.int64).reshape(len(rows), num_context),
            torch.tensor([r[6] for r in rows], dtype=torch.float32),
            torch.tensor(flat_items, dtype=torch.int64),
            torch.tensor(flat_cats, dtype=torch.int64),
            max_len,
        )


class BatchIterator:
    """Shuffled mini-batches with a position that can be saved and restored.

    The order of epoch e is a permutation drawn from ``seed`` and e alone, so the
    position (epoch, batch index) is the whole state: restoring it reproduces the same
    next batches. The last, smaller batch of an epoch is kept.
    """

    def __init__(self, samples: Samples, batch_size: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.samples = samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.samples))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.samples), generator=gen)

    def epoch_batches(self) -> Iterator[Batch]:
        """The remaining batches of the current epoch; the position advances as they are
        taken, and moves to the start of the next epoch with the last one."""
        order = self._order(self.epoch)
        while self.position < len(self):
            index = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
            self.position += 1
            if self.position == len(self):
                # Roll over before handing out the last batch, so a state saved after it
                # reads "next epoch, start" rather than "this epoch, nothing left".
                self.epoch += 1
                self.position = 0
                yield self.samples.batch(index)
                return
            yield self.samples.batch(index)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise ValueError(
                f"the checkpoint's data order (seed {state['seed']}, batch size {state['batch_size']}) "
                f"differs from this run's (seed {self.seed}, batch size {self.batch_size})"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def check_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path}")
    return path


def eval_batches(samples: Samples, batch_size: int) -> Iterator[Batch]:
    """Every sample once, in order."""
    for start in range(0, len(samples), batch_size):
        yield samples.batch(torch.arange(start, min(start + batch_size, len(samples))))


_BOM = b"\xef\xbb\xbf"


def read_lines(path: str, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending) of every line of a text file, streamed.

    A UTF-8 byte order mark at the start is dropped and blank lines at the end are
    accepted and skipped; a blank line followed by more data is an error naming it.
    Undecodable bytes are an error naming the line.
    """
    check_file(path)
    blank = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                line = raw.decode(encoding).rstrip("\n").rstrip("\r")
            except UnicodeDecodeError as e:
                raise DataFormatError(path, lineno, f"not valid {encoding} text ({e.reason})") from None
            if not line.strip():
                blank = blank or lineno
                continue
            if blank:
                raise DataFormatError(path, blank, "blank line inside the data")
            yield lineno, line


def hold_out_users(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """Split ``samples`` into (kept, held out) by user: a ``fraction`` of the users, drawn
    from ``seed``, go with all their samples to the held-out part."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    users = torch.unique(samples.user)
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    chosen = users[torch.randperm(users.numel(), generator=gen)[: round(users.numel() * fraction)]]
    out = torch.isin(samples.user, chosen)
    return samples.subset(torch.nonzero(~out).flatten()), samples.subset(torch.nonzero(out).flatten())


@dataclass
class Dataset:
    """A train/test pair (and a validation split, when one is held out) with the spec the
    models need, the vocabularies that map raw ids to indices (saved in checkpoints) and
    the loaders' line accounting."""

    train: Samples
    test: Samples
    spec: FeatureSpec
    stats: dict[str, LoadStats]
    source: str
    vocabs: dict[str, Vocab] = field(default_factory=dict)
    valid: Optional[Samples] = None

    def splits(self) -> dict[str, Samples]:
        out = {"train": self.train}
        if self.valid is not None:
            out["valid"] = self.valid
        out["test"] = self.test
        return out

    def check(self) -> None:
        """Every split has samples of both labels (else AUC and training are meaningless)."""
        for name, samples in self.splits().items():
            positives = int((samples.label > 0.5).sum())
            negatives = len(samples) - positives
            if len(samples) == 0:
                raise ValueError(f"{self.source}: the {name} split is empty")
            if positives == 0 or negatives == 0:
                raise ValueError(
                    f"{self.source}: the {name} split has {positives} positive and {negatives} negative "
                    f"samples; it needs both"
                )

    def summary(self) -> str:
        """What was read (per file) and what the splits hold, for the user to check."""
        lines = [f"data {self.source}:"]
        for path, stats in self.stats.items():
            lines.append(f"  {path}: {stats}")
        for name, samples in self.splits().items():
            positives = int((samples.label > 0.5).sum())
            lines.append(
                f"  {name}: {len(samples)} samples ({positives} positive), "
                f"{int(torch.unique(samples.user).numel())} users"
            )
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.vocabs.items())
        if sizes:
            lines.append(f"  vocabularies (with <unk>): {sizes}")
        return "\n".join(lines)
