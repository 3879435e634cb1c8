"""MovieLens ratings (GroupLens files as distributed) as click prediction, the DIN paper's protocol.

``DIR`` holds one of

* ml-100k: ``u.data`` (``user<TAB>movie<TAB>rating<TAB>timestamp``) and ``u.item``
  (``movie|title|release|video release|url|`` then 19 genre flags, Latin-1);
* ml-1m: ``ratings.dat`` (``user::movie::rating::timestamp``) and ``movies.dat``
  (``movie::title::Genre|Genre``, Latin-1);
* ml-20m / ml-25m (and ml-latest): ``ratings.csv`` (``userId,movieId,rating,timestamp``)
  and ``movies.csv`` (``movieId,title,genres``, quoted CSV, UTF-8), each with its header.

Samples (SPEC section 8): each user's ratings in time order (ties keep file order); every
rating after the user's first is a sample whose target is the movie, whose label is 1 when
the rating is >= 4 and 0 otherwise, and whose history is the movies the user rated
before it (the most recent ``max_len`` kept). A movie's category is its first listed
genre. Users are split at random (from ``seed``) into training and test users, all
samples of a user on one side, in the paper's proportion for ML-20M, 100,000 : 38,493
(:data:`TEST_USER_SHARE` of the users go to test, rounded, on smaller sets too).
No context field (K = 0).

Counted in the load summary, never dropped silently: the first rating of every user
(no history, no sample), ratings of movies missing from the movie file (category
``<unk>``).
"""
from __future__ import annotations

import csv
import os
from typing import Iterator, Optional

import torch

from .common import DataFormatError, Dataset, FeatureSpec, LoadStats, Samples, Vocab, read_lines
from .sequences import SequenceTable, id_maps

__all__ = ["LAYOUTS", "TEST_USER_SHARE", "POSITIVE_RATING", "load_movielens"]

TEST_USER_SHARE = 38_493 / 138_493
POSITIVE_RATING = 4.0

# (ratings file, movies file, ratings separator, header line of the ratings file or None)
LAYOUTS = {
    "ml-100k": ("u.data", "u.item", "\t", None),
    "ml-1m": ("ratings.dat", "movies.dat", "::", None),
    "ml-20m": ("ratings.csv", "movies.csv", ",", "userId,movieId,rating,timestamp"),
}
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


def _layout(directory: str) -> str:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no such data directory: {directory}")
    for name, (ratings, movies, _, _) in LAYOUTS.items():
        if os.path.isfile(os.path.join(directory, ratings)):
            if not os.path.isfile(os.path.join(directory, movies)):
                raise FileNotFoundError(f"{directory} has {ratings} but not {movies} ({name} layout)")
            return name
    wanted = "; ".join(f"{r} + {m}" for r, m, _, _ in LAYOUTS.values())
    raise FileNotFoundError(f"{directory} holds no MovieLens ratings file (looked for {wanted})")


def _genres(path: str, layout: str) -> dict[str, str]:
    """Movie id -> first genre."""
    out: dict[str, str] = {}
    if layout == "ml-20m":
        lines = read_lines(path)
        numbers: list[int] = []

        def text() -> Iterator[str]:
            for lineno, line in lines:
                numbers.append(lineno)
                yield line

        for fields in csv.reader(text()):
            lineno = numbers[-1]
            if lineno == numbers[0] and fields == ["movieId", "title", "genres"]:
                continue
            if len(fields) != 3 or not fields[0].isdigit():
                raise DataFormatError(path, lineno, f"expected 'movieId,title,genres', got {fields!r}")
            out[fields[0]] = fields[2].split("|")[0]
        return out
    for lineno, line in read_lines(path, encoding="latin-1"):
        if layout == "ml-100k":
            fields = line.split("|")
            flags = fields[-len(GENRES_100K):]
            if len(fields) < len(GENRES_100K) + 2 or any(f not in ("0", "1") for f in flags):
                raise DataFormatError(path, lineno, f"expected 'movie|title|...|' and {len(GENRES_100K)} 0/1 genre flags")
            first = flags.index("1") if "1" in flags else 0
            out[fields[0]] = GENRES_100K[first]
        else:
            fields = line.split("::")
            if len(fields) < 3:
                raise DataFormatError(path, lineno, "expected 'movie::title::genres'")
            out[fields[0]] = fields[-1].split("|")[0]
    return out


def _read_ratings(path: str, layout: str, genre: dict[str, str], stats: LoadStats,
                  users: Vocab, movies: Vocab, genres: Vocab) -> SequenceTable:
    _, _, sep, header = LAYOUTS[layout]
    table = SequenceTable()
    missing: set[str] = set()
    for lineno, line in read_lines(path, encoding="latin-1" if layout != "ml-20m" else "utf-8"):
        stats.lines += 1
        if header is not None and stats.lines == 1 and line.strip() == header:
            stats.note("header lines")
            continue
        fields = line.split(sep)
        if len(fields) != 4:
            raise DataFormatError(path, lineno, f"expected 4 fields separated by {sep!r}, got {len(fields)}")
        user, movie, rating, stamp = (x.strip() for x in fields)
        if not user.isdigit() or not movie.isdigit():
            raise DataFormatError(path, lineno, f"user and movie ids must be non-negative integers, got {user!r}, {movie!r}")
        try:
            value, when = float(rating), int(stamp)
        except ValueError:
            raise DataFormatError(path, lineno, f"rating must be a number and timestamp an integer, got {rating!r}, {stamp!r}") from None
        if not 0 <= value <= 5:
            raise DataFormatError(path, lineno, f"rating must be in [0, 5], got {value}")
        g = genre.get(movie)
        if g is None and movie not in missing:
            missing.add(movie)
        u, i = users.add(user), movies.add(movie)
        c = genres.add(g) if g is not None else 0
        if i == len(table.item_cat):
            table.item_cat.append(c)
        table.append(u, i, c, when, value)
    if missing:
        stats.note("movies missing from the movie file (category <unk>)", len(missing))
    return table


def load_movielens(directory: str, max_len: int = 50, seed: int = 0,
                   vocabs: Optional[dict[str, Vocab]] = None) -> Dataset:
    """Samples from the MovieLens files in ``directory`` (see the module docstring).
    ``vocabs`` (``{"user", "item", "cat"}``, e.g. a checkpoint's) fixes the id -> index
    maps; ids they lack become index 0 and are counted."""
    layout = _layout(directory)
    ratings_file, movies_file, _, _ = LAYOUTS[layout]
    ratings_path = os.path.join(directory, ratings_file)
    stats = LoadStats()
    genre = _genres(os.path.join(directory, movies_file), layout)
    users, movies, genres = Vocab(), Vocab(), Vocab()
    table = _read_ratings(ratings_path, layout, genre, stats, users, movies, genres)
    seq = table.sorted()
    first = seq.position == 0
    stats.note("first ratings of a user (no history, no sample)", int(first.sum()))
    target = torch.nonzero(~first).flatten()
    stats.note("histories cut to max_len", int((seq.position[target] > max_len).sum()))

    fixed, maps, item_category = id_maps(
        {"user": users, "item": movies, "cat": genres}, vocabs,
        torch.frombuffer(table.item_cat, dtype=torch.int32).long(), stats,
        {"user": "user", "item": "movie", "cat": "genre"})
    user_map, item_map, cat_map = maps["user"], maps["item"], maps["cat"]

    lengths = seq.position[target].clamp(max=max_len)
    samples = Samples(
        user=user_map[seq.user[target].long()].to(torch.int32),
        item=item_map[seq.item[target].long()].to(torch.int32),
        cat=cat_map[seq.cat[target].long()].to(torch.int32),
        hist_start=target - lengths,
        lengths=lengths.to(torch.int32),
        context=torch.zeros(target.numel(), 0, dtype=torch.int32),
        label=(seq.extra[target] >= POSITIVE_RATING).to(torch.float32),
        behaviour_items=item_map[seq.item.long()].to(torch.int32),
        behaviour_cats=cat_map[seq.cat.long()].to(torch.int32),
        max_len=max_len,
    )
    stats.samples = len(samples)
    # Split the users of this file (local ids, so unknown users stay apart) at random.
    local_users = torch.arange(1, len(users))
    gen = torch.Generator().manual_seed(seed)
    test_users = local_users[torch.randperm(local_users.numel(), generator=gen)[: round(local_users.numel() * TEST_USER_SHARE)]]
    is_test = torch.isin(seq.user[target].long(), test_users)
    spec = FeatureSpec(
        num_users=len(fixed["user"]),
        num_items=len(fixed["item"]),
        num_cats=len(fixed["cat"]),
        context_sizes=(),
        max_len=max_len,
        item_category=item_category,
    )
    return Dataset(
        samples.subset(torch.nonzero(~is_test).flatten()),
        samples.subset(torch.nonzero(is_test).flatten()),
        spec,
        {ratings_path: stats},
        f"movielens:{directory} ({layout} layout)",
        fixed,
    )
