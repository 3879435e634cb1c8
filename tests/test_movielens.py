"""The MovieLens loader (DIN paper protocol, SPEC section 8) on small files in each GroupLens layout."""
import pytest
import torch

from interest_kernels.data import DataFormatError, load_movielens
from interest_kernels.data.movielens import TEST_USER_SHARE
from interest_kernels.train import TrainConfig, build_dataset

# (user, movie, rating, timestamp); user 1 rates out of time order in the file.
RATINGS = [(1, 10, 5, 300), (1, 20, 3, 100), (1, 30, 4, 200), (1, 40, 2, 400),
           (2, 10, 1, 50), (2, 30, 5, 60), (3, 20, 4, 10)]
MOVIES = {10: ("Toy Story (1995)", ["Animation", "Comedy"]), 20: ("Heat, The (1995)", ["Crime"]),
          30: ("Casino (1995)", ["Drama"]), 40: ("Misérables, Les (1995)", ["Drama", "Musical"])}
GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
               "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def _write(d, layout, ratings=RATINGS, extra=""):
    d.mkdir()
    if layout == "ml-100k":
        (d / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in ratings) + extra)
        lines = []
        for m, (title, genres) in MOVIES.items():
            flags = "|".join("1" if g in genres else "0" for g in GENRES_100K)
            lines.append(f"{m}|{title}|01-Jan-1995||http://x|{flags}\n")
        (d / "u.item").write_bytes("".join(lines).encode("latin-1"))  # as distributed: Latin-1
    elif layout == "ml-1m":
        (d / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in ratings) + extra)
        text = "".join(f"{m}::{title}::{'|'.join(g)}\n" for m, (title, g) in MOVIES.items())
        (d / "movies.dat").write_bytes(text.encode("latin-1"))
    else:
        (d / "ratings.csv").write_text("\ufeffuserId,movieId,rating,timestamp\n"
                                       + "".join(f"{u},{m},{r}.0,{t}\n" for u, m, r, t in ratings) + extra + "\n")
        (d / "movies.csv").write_text("movieId,title,genres\n" + "".join(
            f'{m},"{title}",{"|".join(g)}\n' for m, (title, g) in MOVIES.items()))
    return str(d)


@pytest.mark.parametrize("layout", ["ml-100k", "ml-1m", "ml-20m"])
def test_protocol_in_every_layout(tmp_path, layout):
    ds = load_movielens(_write(tmp_path / layout, layout), max_len=2, seed=0)
    movie, genre = ds.vocabs["item"].get, ds.vocabs["cat"].get
    every = {}
    for split in (ds.train, ds.test):
        for r in range(len(split)):
            b = split.batch(torch.tensor([r]))
            hist = [ds.vocabs["item"].tokens()[i] for i in b.hist_items[0, : int(b.lengths[0])].tolist()]
            every[(ds.vocabs["user"].tokens()[int(b.user)], ds.vocabs["item"].tokens()[int(b.item)])] = (
                float(b.label), hist, int(b.cat))
    # Time order 20, 30, 10, 40 for user 1: three samples, histories of earlier ratings (2 kept).
    assert every == {
        ("1", "30"): (1.0, ["20"], genre("Drama")),
        ("1", "10"): (1.0, ["20", "30"], genre("Animation")),  # first listed genre
        ("1", "40"): (0.0, ["30", "10"], genre("Drama")),
        ("2", "30"): (1.0, ["10"], genre("Drama")),
    }
    assert ds.spec.item_category[movie("20")] == genre("Crime") and ds.spec.context_sizes == ()
    notes = next(iter(ds.stats.values())).notes
    assert notes["first ratings of a user (no history, no sample)"] == 3 and notes["histories cut to max_len"] == 1
    assert "ml-" in ds.source


def test_users_split_in_the_papers_proportion(tmp_path):
    ratings = [(u, m, 1 + (u * m) % 5, m) for u in range(1, 201) for m in (10, 20, 30, 40)]
    ds = load_movielens(_write(tmp_path / "ml", "ml-1m", ratings), seed=3)
    train_users, test_users = set(ds.train.user.tolist()), set(ds.test.user.tolist())
    assert not train_users & test_users
    assert len(test_users) == round(200 * TEST_USER_SHARE) == 56
    assert len(ds.train) + len(ds.test) == 200 * 3
    other = load_movielens(str(tmp_path / "ml"), seed=4)
    assert set(other.test.user.tolist()) != test_users  # the seed draws the split


@pytest.mark.parametrize("layout, bad, message", [
    ("ml-1m", "1::10::five::7\n", "rating must be a number"),
    ("ml-100k", "1\t10\t4\n", "expected 4 fields"),
    ("ml-20m", "1,10,9.0,7\n", r"rating must be in \[0, 5\]"),
])
def test_malformed_ratings_name_file_and_line(tmp_path, layout, bad, message):
    d = _write(tmp_path / "ml", layout, extra=bad)
    name = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-20m": "ratings.csv"}[layout]
    line = len(RATINGS) + 1 + (layout == "ml-20m")
    with pytest.raises(DataFormatError, match=f"{name}:{line}: {message}"):
        load_movielens(d)


def test_missing_files_and_data_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no MovieLens ratings file"):
        load_movielens(str(tmp_path / "empty"))
    d = _write(tmp_path / "ml", "ml-1m")
    (tmp_path / "ml" / "movies.dat").unlink()
    with pytest.raises(FileNotFoundError, match="has ratings.dat but not movies.dat"):
        load_movielens(d)
    d = _write(tmp_path / "ok", "ml-1m", [(u, m, 1 + (u + m) % 5, m) for u in range(1, 30) for m in (10, 20, 30)])
    ds = build_dataset(TrainConfig(data=f"movielens:{d}", max_len=4))
    assert ds.spec.num_items == 4 and len(ds.test) > 0
