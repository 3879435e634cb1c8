"""Loaders (Amazon DIEN layout, Taobao CSV), vocabularies, the generator and batching."""
import os

import pytest
import torch

from interest_kernels.data import (
    BatchIterator,
    DataFormatError,
    Vocab,
    generate_amazon,
    generate_taobao,
    load_amazon,
    load_taobao,
)
from interest_kernels.data.amazon import TEST_FILE, TRAIN_FILE, VOCAB_FILES, convert_pickled_vocab, read_amazon_file
from interest_kernels.train import auc

SMALL_AMAZON = dict(num_users=30, num_items=60, num_cats=6, train_per_user=3, test_per_user=1, max_len=8)


def _amazon_dir(tmp_path, lines):
    d = tmp_path / "amazon"
    d.mkdir()
    (d / TRAIN_FILE).write_text("".join(lines))
    (d / TEST_FILE).write_text("".join(lines[:1]))
    return str(d)


GOOD = "1\tu1\ti1\tc1\ti2\x02i3\tc2\x02c1\n"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("1\tu1\ti1\tc1\ti2\n", "expected 6 tab-separated fields, got 5"),
        ("2\tu1\ti1\tc1\ti2\tc2\n", "label must be 0 or 1"),
        ("1\tu1\ti1\tc1\ti2\x02i3\tc2\n", "item history has 2 entries, category history 1"),
        ("1\t\ti1\tc1\ti2\tc2\n", "empty user id"),
        ("0\tu1\ti1\tc1\ti2\x02\tc2\x02c3\n", "empty id in a history"),
    ],
)
def test_amazon_rejects_malformed_line_with_file_and_line(tmp_path, bad, message):
    d = _amazon_dir(tmp_path, [GOOD, GOOD, bad, GOOD])
    path = os.path.join(d, TRAIN_FILE)
    with pytest.raises(DataFormatError, match=f"^{path}:3: {message}"):
        load_amazon(d)


def test_amazon_reads_every_line_and_maps_unknown_ids_to_zero(tmp_path):
    lines = [GOOD, "0\tu2\ti4\tc3\t\t\n", "1\tu1\ti2\tc2\ti1\x02i2\x02i3\tc1\x02c2\x02c1\n"]
    d = _amazon_dir(tmp_path, lines)
    (tmp_path / "amazon" / TEST_FILE).write_text("1\tu9\ti9\tc1\ti1\x02i8\tc1\x02c1\n")
    ds = load_amazon(d, max_len=2)
    train_stats, test_stats = ds.stats[TRAIN_FILE], ds.stats[TEST_FILE]
    assert (train_stats.lines, train_stats.samples, len(ds.train)) == (3, 3, 3)
    assert train_stats.notes["histories cut to max_len"] == 1
    assert (test_stats.lines, len(ds.test)) == (1, 1)
    assert test_stats.notes["unknown user ids"] == 1
    assert test_stats.notes["unknown history ids"] == 1
    # The empty history has length 0 and no id; the cut one keeps its 2 most recent.
    assert ds.train.lengths.tolist() == [2, 0, 2]
    assert sorted(os.listdir(d)) == [TEST_FILE, TRAIN_FILE]  # nothing written into the user's folder
    items = ds.vocabs["item"]
    assert ds.train.hist_items[2].tolist() == [items.get("i2"), items.get("i3")]
    assert ds.test.user.tolist() == [0] and ds.test.hist_items[0].tolist() == [items.get("i1"), 0]
    assert ds.train.label.tolist() == [1.0, 0.0, 1.0]
    cats = ds.vocabs["cat"]
    assert ds.spec.item_category[items.get("i3")] == cats.get("c1")
    assert ds.spec.num_items == len(items) and ds.spec.context_sizes == ()


def test_vocab_round_trip_and_rejects_bad_files(tmp_path):
    v = Vocab(["a", "b", "a", "c"])
    assert len(v) == 4 and v.get("b") == 2 and v.get("zzz") == 0
    v.save(str(tmp_path / "v.txt"))
    assert Vocab.load(str(tmp_path / "v.txt")).index == v.index
    (tmp_path / "bad.txt").write_text("<unk>\t0\nx\ty\n")
    with pytest.raises(DataFormatError, match=r"bad.txt:2: index 'y' is not an integer"):
        Vocab.load(str(tmp_path / "bad.txt"))
    (tmp_path / "gap.txt").write_text("<unk>\t0\nx\t2\n")
    with pytest.raises(ValueError, match="indices must be 0..n-1"):
        Vocab.load(str(tmp_path / "gap.txt"))


def test_convert_pickled_vocab(tmp_path):
    import pickle

    with open(tmp_path / "mid_voc.pkl", "wb") as f:
        pickle.dump({"x": 1, "w": 0, "y": 2}, f)
    v = convert_pickled_vocab(str(tmp_path / "mid_voc.pkl"), str(tmp_path / "mid_voc.txt"))
    assert v.index == {"<unk>": 0, "w": 1, "x": 2, "y": 3}
    assert Vocab.load(str(tmp_path / "mid_voc.txt")).index == v.index


TAOBAO_HEADER = "user_id,item_id,category_id,behavior_type,timestamp\n"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("1,2,3,pv\n", "expected 5 comma-separated fields, got 4"),
        ("1,2,3,click,100\n", "behavior_type must be one of"),
        ("1,2,3,pv,yesterday\n", "timestamp must be an integer"),
        ("1,x,3,pv,100\n", "item_id must be a non-negative integer"),
    ],
)
def test_taobao_rejects_malformed_line_with_file_and_line(tmp_path, bad, message):
    path = tmp_path / "ub.csv"
    path.write_text(TAOBAO_HEADER + "1,2,3,pv,100\n" + bad)
    with pytest.raises(DataFormatError, match=f"^{path}:3: {message}"):
        load_taobao(str(path))


def test_taobao_samples_and_accounting(tmp_path):
    path = tmp_path / "ub.csv"
    path.write_text(
        TAOBAO_HEADER
        + "1,10,100,pv,3700\n"   # user 1: clicks 10, 11, 12 (time order differs from file order)
        + "1,12,100,pv,9000\n"
        + "1,11,200,pv,5000\n"
        + "1,11,200,buy,5001\n"
        + "2,13,300,pv,100\n"    # user 2: one click, no sample
    )
    ds = load_taobao(str(path), max_len=1, seed=3)
    stats = ds.stats[str(path)]
    assert stats.lines == 6
    assert stats.notes == {
        "header lines": 1,
        "buy rows (vocabulary only)": 1,
        "users with a single click (no sample)": 1,
        "histories cut to max_len": 1,
    }
    # Two targets (11, then 12), each a positive and a negative; the last goes to test.
    assert (len(ds.train), len(ds.test), stats.samples) == (2, 2, 4)
    assert ds.train.label.tolist() == [1.0, 0.0] and ds.test.label.tolist() == [1.0, 0.0]
    item = lambda raw: 1 + [10, 12, 11, 13].index(raw)  # vocabulary in order of appearance
    assert ds.train.item[0] == item(11) and ds.test.item[0] == item(12)
    assert ds.test.hist_items[0].tolist() == [item(11)]  # max_len 1 keeps the latest
    assert ds.train.context[0].tolist() == [3700 // 3600 % 24 + 1]
    assert ds.test.item[1] != item(12)
    assert ds.spec.item_category[ds.test.item[1]] == ds.test.cat[1]


def test_generated_files_are_deterministic_and_carry_the_signal(tmp_path):
    a = generate_amazon(str(tmp_path / "a"), seed=5, **SMALL_AMAZON)
    b = generate_amazon(str(tmp_path / "b"), seed=5, **SMALL_AMAZON)
    for name in (TRAIN_FILE, TEST_FILE, *VOCAB_FILES.values()):
        assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read()
    rows, stats = read_amazon_file(os.path.join(a, TRAIN_FILE))
    assert stats.lines == SMALL_AMAZON["num_users"] * SMALL_AMAZON["train_per_user"] == len(rows)

    ds = load_amazon(generate_amazon(str(tmp_path / "big"), seed=1), max_len=30)
    share = (ds.train.hist_cats == ds.train.cat[:, None]).sum(1) / ds.train.lengths
    assert auc(ds.train.label, share) > 0.75  # the planted signal: target category frequent in history
    assert 0.4 < float(ds.train.label.mean()) < 0.6

    csv = generate_taobao(str(tmp_path / "ub.csv"), num_users=50, seed=2)
    tb = load_taobao(csv, max_len=10)
    share = (tb.train.hist_cats == tb.train.cat[:, None]).sum(1) / tb.train.lengths
    assert auc(tb.train.label, share) > 0.75


def test_batch_iterator_order_depends_on_seed_and_epoch_only(tmp_path):
    ds = load_amazon(generate_amazon(str(tmp_path), seed=0, **SMALL_AMAZON), max_len=8)
    it = BatchIterator(ds.train, 16, seed=4)
    first = [b.user.tolist() for b in it.epoch_batches()]
    assert sum(len(u) for u in first) == len(ds.train) and len(first) == len(it)
    second = [b.user.tolist() for b in it.epoch_batches()]
    assert first != second and it.epoch == 2

    resumed = BatchIterator(ds.train, 16, seed=4)
    batches = resumed.epoch_batches()
    next(batches)
    state = resumed.state_dict()
    again = BatchIterator(ds.train, 16, seed=4)
    again.load_state_dict(state)
    assert [b.user.tolist() for b in again.epoch_batches()] == first[1:]
    with pytest.raises(ValueError, match="data order"):
        BatchIterator(ds.train, 8, seed=4).load_state_dict(state)

    batch = next(BatchIterator(ds.train, 5, seed=0).epoch_batches())
    assert batch.hist_items.shape[1] == int(batch.lengths.max())
    valid = torch.arange(batch.hist_items.shape[1]) < batch.lengths[:, None]
    assert bool((batch.hist_items[~valid] == 0).all()) and bool((batch.hist_items[valid] > 0).all())


BOM = "\ufeff"


def test_every_loader_accepts_a_bom_and_trailing_blank_lines_but_not_inner_ones(tmp_path):
    d = _amazon_dir(tmp_path, [BOM + GOOD, "0\tu2\ti4\tc3\t\t\n", "\n", "\r\n"])
    ds = load_amazon(d)
    assert len(ds.train) == 2 and ds.vocabs["user"].tokens() == ["<unk>", "u1", "u2"]
    tb = tmp_path / "ub.csv"
    tb.write_text(BOM + TAOBAO_HEADER + "1,2,3,pv,100\n1,4,3,pv,200\n\n\n")
    assert load_taobao(str(tb)).stats[str(tb)].notes["header lines"] == 1
    tb.write_text(TAOBAO_HEADER + "1,2,3,pv,100\n\n1,4,3,pv,200\n")
    with pytest.raises(DataFormatError, match=f"^{tb}:3: blank line inside the data"):
        load_taobao(str(tb))
    (tmp_path / "bad.bin").write_bytes(b"1,2,3,pv,100\n\xff\xfe,2\n")
    with pytest.raises(DataFormatError, match=r"bad.bin:2: not valid utf-8 text"):
        load_taobao(str(tmp_path / "bad.bin"))


def test_amazon_never_writes_vocabularies_and_rejects_ones_that_do_not_fit(tmp_path):
    d = generate_amazon(str(tmp_path / "a"), seed=0, **SMALL_AMAZON)  # ships fitting vocabulary files
    before = sorted(os.listdir(d))
    ds = load_amazon(d)
    assert sorted(os.listdir(d)) == before and len(ds.vocabs["user"]) == SMALL_AMAZON["num_users"] + 1
    # The data changes (a new user) but the old vocabulary stays: an error naming the file.
    with open(os.path.join(d, TRAIN_FILE), "a") as f:
        f.write("1\tnew_user\tI1\tC1\t\t\n")
    with pytest.raises(ValueError, match=f"{os.path.join(d, VOCAB_FILES['user'])} does not fit .*'new_user'"):
        load_amazon(d)
    os.remove(os.path.join(d, VOCAB_FILES["user"]))
    assert "new_user" in load_amazon(d).vocabs["user"]


def test_loaders_read_with_given_vocabularies_and_count_unknown_ids(tmp_path):
    csv = generate_taobao(str(tmp_path / "ub.csv"), num_users=20, seed=1)
    first = load_taobao(csv, max_len=5)
    again = load_taobao(csv, max_len=5, vocabs=first.vocabs)
    assert torch.equal(again.train.batch(torch.arange(10)).hist_items, first.train.batch(torch.arange(10)).hist_items)
    assert torch.equal(again.spec.item_category, first.spec.item_category)
    small = {k: Vocab(v.tokens()[1:5]) for k, v in first.vocabs.items()}  # most ids unknown now
    partial = load_taobao(csv, max_len=5, vocabs=small)
    notes = partial.stats[csv].notes
    assert notes["unknown user ids (not in the given vocabulary)"] == len(first.vocabs["user"]) - 5
    assert partial.spec.num_items == 5 and int(partial.train.item.max()) < 5
    # Unknown users keep their own sequences: same samples, same histories' lengths.
    assert torch.equal(partial.train.lengths, first.train.lengths)


def test_samples_share_histories_and_summary_counts(tmp_path):
    path = tmp_path / "ub.csv"
    path.write_text("".join(f"1,{i},7,pv,{i}\n" for i in range(1, 6)))
    ds = load_taobao(str(path), max_len=3)
    # 4 targets x (positive, negative) over one stored sequence of 5 clicks.
    assert ds.train.behaviour_items.numel() == 5 and len(ds.train) + len(ds.test) == 8
    assert ds.train.lengths.tolist() == [1, 1, 2, 2, 3, 3]
    assert ds.train.hist_items[4].tolist() == [1, 2, 3] and ds.test.hist_items[0].tolist() == [2, 3, 4]
    text = ds.summary()
    assert f"{path}: 5 lines, 8 samples" in text and "histories cut to max_len: 1" in text
    assert "train: 6 samples (3 positive), 1 users" in text
