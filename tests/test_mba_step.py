"""The MBA optimisers' one-call CPU step (`interest_kernels::mba_*_step`) against the
general path it replaces on the CPU: count every lookup's ids (`count_ids`), then apply
the concatenated rows (`mba_*_update`). Bitwise equal, padding never read, nothing
written by a refused step, the same bits for 1 and 2 threads."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from interest_kernels import _extension, use_backend
from interest_kernels.nn.mba_embedding import MBAEmbedding
from interest_kernels.ops.mba import op as mba_op
from interest_kernels.optim import MBAAdagrad, MBAAdam, MBASGD
from interest_kernels.optim._rows import push_rows, take_rows

pytestmark = pytest.mark.skipif(not _extension.load(), reason="extension not built")

N, D, PAD = 40, 6, 0
LR, LAM = 0.1, 0.3


def _optimizer(kind, table, counts=None):
    make = {"sgd": MBASGD, "adagrad": MBAAdagrad, "adam": MBAAdam}[kind]
    return make([table], lr=LR, weight_decay=LAM, counts=counts)


def _lookups_of_a_step(gen):
    """Three lookups of one table: (B, L) ids with padding and repeats inside samples,
    (B,) ids without padding (both MBAEmbedding), and a sparse .grad."""
    sample_ids = torch.randint(0, 8, (5, 4), generator=gen)
    sample_ids[1, :2] = PAD
    sample_ids[2] = 3  # one id four times in one sample: counted once
    flat_ids = torch.randint(0, 8, (7,), generator=gen)
    sparse_ids = torch.randint(0, 8, (3, 2), generator=gen)
    return sample_ids, flat_ids, sparse_ids


def _expected_step(kind, weight, states, counts, online, lookups, step):
    """The general path: count each lookup, then one update with the rows concatenated."""
    ids = torch.cat([i.reshape(-1) for i, _, _ in lookups])
    rows = torch.cat([r for _, r, _ in lookups])
    pads = torch.cat([
        (i.reshape(-1) == pad) if pad is not None else torch.zeros(i.numel(), dtype=torch.bool)
        for i, _, pad in lookups
    ])
    if online:
        for i, _, pad in lookups:
            mba_op.count_ids(i, counts, padding_idx=pad)
    ids, rows = ids[~pads], rows[~pads]
    with use_backend("cpu"):
        if kind == "sgd":
            mba_op.mba_sgd_update(weight, ids, rows, counts, lr=LR, weight_decay=LAM)
        elif kind == "adagrad":
            mba_op.mba_adagrad_update(weight, states[0], ids, rows, counts, lr=LR, step=step, weight_decay=LAM)
        else:
            mba_op.mba_adam_update(weight, states[0], states[1], ids, rows, counts, lr=LR, step=step, weight_decay=LAM)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("online", [True, False], ids=["online counts", "given counts"])
def test_step_equals_counting_then_updating(kind, online):
    gen = torch.Generator().manual_seed(5)
    padded = nn.Embedding(N, D, padding_idx=PAD, sparse=True)
    table = padded.weight
    mba_padded = MBAEmbedding.from_embedding(padded)
    mba_plain = MBAEmbedding.from_embedding(padded)
    mba_plain.padding_idx = None
    given = torch.randint(1, 9, (N,), generator=gen)
    opt = _optimizer(kind, table, None if online else given.clone())
    weight = table.detach().clone()
    states = [torch.zeros(N, D), torch.zeros(N, D)]
    counts = torch.zeros(N, dtype=torch.int64) if online else given.clone()
    for step in (1, 2):
        sample_ids, flat_ids, sparse_ids = _lookups_of_a_step(gen)
        target = torch.randn(3, D, generator=gen)
        outs = [mba_padded(sample_ids), mba_plain(flat_ids), padded(sparse_ids)]
        loss = sum(((o.sum(-2 if o.dim() == 3 else 0) - t) ** 2).sum() for o, t in zip(outs, target))
        loss.backward()
        recorded = take_rows(table)  # what MBAEmbedding recorded, handed back to the optimiser
        for rows in recorded:
            push_rows(table, rows)
        lookups = [(r.ids, r.grad_rows, r.padding_idx) for r in recorded]
        lookups.append((table.grad._indices()[0], table.grad._values(), None))
        with use_backend("cpu"):
            opt.step()
        opt.zero_grad()
        _expected_step(kind, weight, states, counts, online, lookups, step)
        state = opt.state[table]
        assert torch.equal(table.detach(), weight)
        assert torch.equal(state["counts"], counts)
        for name, want in zip(opt._state_tensors, states):
            assert torch.equal(state[name], want), name
        assert state["step"] == step
    if online:
        assert int(counts[3]) >= 1 and int(counts[PAD]) == 0


def test_padding_rows_are_never_read_nor_counted():
    weight = torch.randn(N, D)
    counts = torch.zeros(N, dtype=torch.int64)
    ids = torch.tensor([[PAD, 4, 4], [5, PAD, 4]])
    rows = torch.randn(6, D)
    rows[0] = rows[4] = float("nan")
    before = weight.clone()
    mba_op.compiled_ops().mba_sgd_step(weight, counts, [ids], [rows], [PAD], True, True, LR, LAM)
    assert torch.equal(weight[PAD], before[PAD]) and int(counts[PAD]) == 0
    assert counts[4].item() == 2 and counts[5].item() == 1  # id 4 twice in sample 0: once
    assert torch.isfinite(weight).all()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_refused_step_writes_nothing(kind):
    emb = MBAEmbedding(N, D)
    opt = _optimizer(kind, emb.weight)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[emb.weight].items()}
    weight = emb.weight.detach().clone()
    emb(torch.tensor([[3, 4], [5, 6]])).sum().backward()
    (emb(torch.tensor([7, 8])).sum() * float("inf")).backward()
    with use_backend("cpu"), pytest.raises(ValueError, match=r"id 7 \(at position 4\) holds NaN or Inf"):
        opt.step()
    assert torch.equal(emb.weight, weight)
    for key, value in opt.state[emb.weight].items():
        assert torch.equal(value, before[key]) if isinstance(value, torch.Tensor) else value == before[key], key


def test_op_refuses_bad_arguments_before_writing():
    ops = mba_op.compiled_ops()
    weight, counts = torch.randn(N, D), torch.ones(N, dtype=torch.int64)
    before = weight.clone()
    ids, rows = torch.tensor([1, 2]), torch.randn(2, D)
    with pytest.raises(ValueError, match="one entry per lookup"):
        ops.mba_sgd_step(weight, counts, [ids, ids], [rows], [-1, -1], True, True, LR, LAM)
    with pytest.raises(ValueError, match=r"id 40 \(at position 3\)"):
        ops.mba_sgd_step(weight, counts, [ids, torch.tensor([0, N])], [rows, rows], [-1, -1], True, True, LR, LAM)
    with pytest.raises(TypeError, match="grad_rows has dtype"):
        ops.mba_sgd_step(weight, counts, [ids], [rows.double()], [-1], True, True, LR, LAM)
    with pytest.raises(ValueError, match="counts: id 2"):
        ops.mba_sgd_step(weight, counts.index_fill(0, torch.tensor([2]), 0), [ids], [rows], [-1], False, True, LR, LAM)
    assert torch.equal(weight, before) and torch.equal(counts, torch.ones(N, dtype=torch.int64))


def test_same_bits_for_one_and_two_threads():
    # Enough distinct rows (d = 2: 2^17 rows per chunk) that two threads split the work.
    gen = torch.Generator().manual_seed(0)
    n, d = 400_000, 2
    ids = [torch.randint(0, n, (300_000,), generator=gen), torch.randint(0, n, (1000, 100), generator=gen)]
    rows = [torch.randn(300_000, d, generator=gen) * 100, torch.randn(100_000, d, generator=gen) * 100]
    start = torch.randn(n, d, generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            w, s, c = start.clone(), torch.zeros(n, d), torch.zeros(n, dtype=torch.int64)
            mba_op.compiled_ops().mba_adagrad_step(w, s, c, ids, rows, [-1, 5], True, True, LR, LAM, 1e-10, 0.0, 1)
            results.append((w, s, c))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_opcheck_step_ops():
    ops = mba_op.compiled_ops()
    ids = [torch.tensor([[1, 3], [3, 0]]), torch.tensor([2, 3])]
    rows = [torch.randn(4, D), torch.randn(2, D)]
    state = [torch.zeros(N, D), torch.zeros(N, D)]
    counts = torch.zeros(N, dtype=torch.int64)
    weight = torch.randn(N, D)
    samples = [
        (ops.mba_sgd_step.default, (weight, counts, ids, rows, [0, -1], True, True, LR, LAM)),
        (ops.mba_adagrad_step.default, (weight, state[0], counts, ids, rows, [0, -1], True, True, LR, LAM, 1e-10, 0.0, 1)),
        (ops.mba_adam_step.default,
         (weight, state[0], state[1], counts, ids, rows, [0, -1], True, True, LR, 0.9, 0.999, 1e-8, LAM, 1)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_count_overflow_is_refused_before_writing():
    ops = mba_op.compiled_ops()
    weight = torch.randn(N, D)
    counts = torch.full((N,), torch.iinfo(torch.int32).max, dtype=torch.int32)
    before = weight.clone()
    with pytest.raises(ValueError, match="overflows the counts' dtype"):
        ops.mba_sgd_step(weight, counts, [torch.tensor([[1], [1]])], [torch.randn(2, 1, D)], [-1],
                         True, True, LR, LAM)
    assert torch.equal(weight, before)
    assert torch.equal(counts, torch.full((N,), torch.iinfo(torch.int32).max, dtype=torch.int32))
