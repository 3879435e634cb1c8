"""MBA sparse updates (SPEC 5): functional ops, compiled kernels vs reference vs the equations."""
from __future__ import annotations

import math

import pytest
import torch

import interest_kernels.ops.mba.op as mba_op
from interest_kernels import _extension, use_backend, value_checks
from interest_kernels._backend import BackendUnavailableError
from interest_kernels.ops.mba import (
    count_ids,
    dedup_rows,
    mba_adagrad_update,
    mba_adam_update,
    mba_sgd_update,
)
from interest_kernels.ops.mba.reference import count_ids_reference, dedup_rows_reference

HAS_EXT = _extension.load()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"{_extension.unavailable_reason()}")
BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]
N, D = 40, 6


def _batch(k: int = 30, n: int = N, d: int = D, dtype=torch.float32, low: int = 0, high: int = 12):
    """Ids with many duplicates in a small range, so most touched rows repeat."""
    ids = torch.randint(low, high, (k,))
    rows = torch.randn(k, d).to(dtype)
    weight = torch.randn(n, d).to(dtype)
    counts = torch.randint(1, 5, (n,))
    return weight, ids, rows, counts


# --- the equations of SPEC 5, written out per row in float64 ---------------------------


def _summed(ids, rows):
    g: dict[int, torch.Tensor] = {}
    for i, j in enumerate(ids.reshape(-1).tolist()):
        g[j] = g.get(j, torch.zeros(rows.shape[-1], dtype=torch.float64)) + rows.reshape(-1, rows.shape[-1])[i].double()
    return g


def _spec_sgd(w, ids, rows, counts, lr, lam):
    w = w.double().clone()
    for j, gj in _summed(ids, rows).items():
        w[j] = w[j] - lr * (gj + lam * w[j] / float(counts[j]))
    return w


def _spec_adagrad(w, s, ids, rows, counts, lr, lam, eps, lr_decay, step):
    w, s = w.double().clone(), s.double().clone()
    clr = lr / (1 + (step - 1) * lr_decay)
    for j, gj in _summed(ids, rows).items():
        gp = gj + lam * w[j] / float(counts[j])
        s[j] = s[j] + gp * gp
        w[j] = w[j] - clr * gp / (s[j].sqrt() + eps)
    return w, s


def _spec_adam(w, m, v, ids, rows, counts, lr, b1, b2, eps, lam, step):
    w, m, v = w.double().clone(), m.double().clone(), v.double().clone()
    for j, gj in _summed(ids, rows).items():
        gp = gj + lam * w[j] / float(counts[j])
        m[j] = b1 * m[j] + (1 - b1) * gp
        v[j] = b2 * v[j] + (1 - b2) * gp * gp
        mhat, vhat = m[j] / (1 - b1**step), v[j] / (1 - b2**step)
        # SparseAdam's eps sits outside the bias correction of v: eps_hat = eps * sqrt(1 - b2^t).
        w[j] = w[j] - lr * mhat / (vhat.sqrt() + eps / math.sqrt(1 - b2**step))
    return w, m, v


def _close(got, want, tol=1e-5):
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


# --- dedup and counting ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dedup_rows_sums_duplicates(backend, dtype):
    _, ids, rows, _ = _batch(dtype=dtype)
    with use_backend(backend):
        unique_ids, summed = dedup_rows(ids, rows, N)
    want = _summed(ids, rows)
    assert unique_ids.tolist() == sorted(want)
    assert summed.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(summed, torch.stack([want[j] for j in sorted(want)]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dedup_rows_is_deterministic_and_handles_empty(backend):
    ids = torch.randint(0, 5, (4000,))
    rows = torch.randn(4000, 16) * torch.logspace(-6, 6, 4000).unsqueeze(1)
    with use_backend(backend):
        first = dedup_rows(ids, rows, 5)
        second = dedup_rows(ids, rows, 5)
        empty_ids, empty_rows = dedup_rows(ids[:0], rows[:0], 5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert empty_ids.shape == (0,) and empty_rows.shape == (0, 16)


@needs_ext
def test_dedup_rows_compiled_sums_in_position_order():
    """Segment sums run in order of position: bit-identical to a sequential float32 loop."""
    ids = torch.randint(0, 7, (500,))
    rows = torch.randn(500, 3) * torch.logspace(-4, 4, 500).unsqueeze(1)
    unique_ids, summed = torch.ops.interest_kernels.dedup_rows(ids, rows, 7)
    for u, j in enumerate(unique_ids.tolist()):
        acc = torch.zeros(3)
        for i in (ids == j).nonzero().flatten().tolist():
            acc = acc + rows[i]
        assert torch.equal(summed[u], acc)


def test_count_ids_counts_samples():
    ids = torch.tensor([[1, 1, 2, 0], [2, 3, 3, 0], [4, 0, 0, 0]])
    counts = torch.zeros(6, dtype=torch.int64)
    count_ids(ids, counts, padding_idx=0)
    assert counts.tolist() == [0, 1, 2, 1, 1, 0]
    assert torch.equal(counts, count_ids_reference(ids, torch.zeros(6, dtype=torch.int64), padding_idx=0))
    count_ids(torch.tensor([5, 5, 1]), counts)  # (B,): every element is its own sample
    assert counts.tolist() == [0, 2, 2, 1, 1, 2]
    with pytest.raises(ValueError, match="id 9"):
        count_ids(torch.tensor([1, 9]), counts)


def test_reference_dedup_matches_loop():
    _, ids, rows, _ = _batch()
    unique_ids, summed = dedup_rows_reference(ids.reshape(5, 6), rows.reshape(5, 6, D))
    want = _summed(ids, rows)
    _close(summed, torch.stack([want[j] for j in unique_ids.tolist()]))


# --- the three updates against the equations ------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_sgd_matches_spec(backend, lam):
    weight, ids, rows, counts = _batch()
    want = _spec_sgd(weight, ids, rows, counts, 0.3, lam)
    before = weight.clone()
    with use_backend(backend):
        mba_sgd_update(weight, ids, rows, counts, lr=0.3, weight_decay=lam)
    _close(weight, want)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(weight[untouched], before[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_adagrad_matches_spec(backend):
    weight, ids, rows, counts = _batch()
    state = torch.rand(N, D)
    want_w, want_s = _spec_adagrad(weight, state, ids, rows, counts, 0.2, 0.5, 1e-10, 0.1, 3)
    before_w, before_s = weight.clone(), state.clone()
    with use_backend(backend):
        mba_adagrad_update(weight, state, ids, rows, counts, lr=0.2, step=3, weight_decay=0.5, eps=1e-10, lr_decay=0.1)
    _close(weight, want_w)
    _close(state, want_s)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(weight[untouched], before_w[untouched])
    assert torch.equal(state[untouched], before_s[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_matches_spec(backend):
    weight, ids, rows, counts = _batch()
    m, v = torch.randn(N, D) * 0.1, torch.rand(N, D) * 0.1
    want = _spec_adam(weight, m, v, ids, rows, counts, 0.01, 0.8, 0.95, 1e-8, 0.4, 4)
    before = (weight.clone(), m.clone(), v.clone())
    with use_backend(backend):
        mba_adam_update(weight, m, v, ids, rows, counts, lr=0.01, step=4, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.4)
    for got, w in zip((weight, m, v), want):
        _close(got, w)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[ids] = False
    for got, b in zip((weight, m, v), before):
        assert torch.equal(got[untouched], b[untouched])


@needs_ext
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_compiled_matches_reference(kind):
    """Same rule, same order: the compiled backend and the reference agree to rounding."""
    for dtype in (torch.float32, torch.float64):
        weight, ids, rows, counts = _batch(k=200, n=300, d=33, dtype=dtype, high=300)
        states = [torch.rand(300, 33, dtype=mba_op.compute_dtype(dtype)) for _ in range(2)]
        results = []
        for backend in ("reference", "cpu"):
            w = weight.clone()
            s = [t.clone() for t in states]
            with use_backend(backend):
                if kind == "sgd":
                    mba_sgd_update(w, ids, rows, counts, lr=0.1, weight_decay=0.3)
                elif kind == "adagrad":
                    mba_adagrad_update(w, s[0], ids, rows, counts, lr=0.1, step=2, weight_decay=0.3)
                else:
                    mba_adam_update(w, s[0], s[1], ids, rows, counts, lr=0.1, step=2, weight_decay=0.3)
            results.append(torch.cat([w.to(s[0].dtype), *s]))
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(results[0], results[1], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_tables(backend, dtype):
    """fp16/bf16 tables, fp32 state: error vs float64 at most 2x the eager low-precision error."""
    weight, ids, rows, counts = _batch(k=64, n=80, d=16, high=40)
    m64, v64 = torch.zeros(80, 16), torch.zeros(80, 16)
    want, _, _ = _spec_adam(weight, m64, v64, ids, rows.to(dtype).double(), counts, 0.05, 0.9, 0.999, 1e-8, 0.5, 1)
    # the reference in low precision (SPEC eager semantics) sets the error budget
    ref_lp = weight.to(dtype)
    with use_backend("reference"):
        mba_adam_update(ref_lp, torch.zeros(80, 16), torch.zeros(80, 16), ids, rows.to(dtype), counts, lr=0.05, step=1, weight_decay=0.5)
    got = weight.to(dtype)
    m, v = torch.zeros(80, 16), torch.zeros(80, 16)
    with use_backend(backend):
        mba_adam_update(got, m, v, ids, rows.to(dtype), counts, lr=0.05, step=1, weight_decay=0.5)
    assert got.dtype == dtype and m.dtype == torch.float32
    ref_err = float((ref_lp.double() - want).abs().max())
    got_err = float((got.double() - want).abs().max())
    assert got_err <= 2 * ref_err + 1e-6, (got_err, ref_err)
    untouched = torch.ones(80, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(got[untouched], weight.to(dtype)[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_writes_nothing(backend):
    weight, _, _, counts = _batch()
    m, v = torch.rand(N, D), torch.rand(N, D)
    before = (weight.clone(), m.clone(), v.clone())
    ids = torch.zeros(0, dtype=torch.int64)
    with use_backend(backend):
        mba_sgd_update(weight, ids, torch.zeros(0, D), counts, lr=0.1, weight_decay=1.0)
        mba_adam_update(weight, m, v, ids, torch.zeros(0, D), counts, lr=0.1, step=1, weight_decay=1.0)
    for got, b in zip((weight, m, v), before):
        assert torch.equal(got, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_and_rows_in_batch_shape(backend):
    weight, ids, rows, counts = _batch()
    want = _spec_sgd(weight, ids, rows, counts, 0.3, 0.2)
    version = weight._version
    with use_backend(backend):
        mba_sgd_update(weight, ids.reshape(5, 6).int(), rows.reshape(5, 6, D), counts, lr=0.3, weight_decay=0.2)
    _close(weight, want)
    assert weight._version > version  # autograd sees the in-place change


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_id", [40, -1, 1000])
def test_out_of_range_id_raises_and_writes_nothing(backend, bad_id):
    weight, ids, rows, counts = _batch()
    ids[17] = bad_id
    state = torch.rand(N, D)
    before = (weight.clone(), state.clone())
    with use_backend(backend), pytest.raises(ValueError, match=f"id {bad_id}"):
        mba_adagrad_update(weight, state, ids, rows, counts, lr=0.1, step=1, weight_decay=0.1)
    assert torch.equal(weight, before[0]) and torch.equal(state, before[1])


@needs_ext
@pytest.mark.parametrize("bad_id", [40, -3])
def test_kernel_checks_ids_itself(bad_id):
    """Without the Python value checks (or called raw), the kernel still refuses before writing."""
    weight, ids, rows, counts = _batch()
    ids[3] = bad_id
    before = weight.clone()
    with value_checks(False), pytest.raises(ValueError, match=f"id {bad_id}"):
        mba_sgd_update(weight, ids, rows, counts, lr=0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match=f"id {bad_id}"):
        torch.ops.interest_kernels.mba_sgd_update(weight, ids, rows, counts, 0.1, 0.1)
    counts[ids[0]] = 0
    ids[3] = 0
    with value_checks(False), pytest.raises(ValueError, match=f"id {int(ids[0])}"):
        mba_sgd_update(weight, ids, rows, counts, lr=0.1, weight_decay=0.1)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_count_of_touched_id_raises(backend):
    weight, ids, rows, counts = _batch()
    counts[int(ids[5])] = 0
    before = weight.clone()
    with use_backend(backend), pytest.raises(ValueError, match=f"counts: id {int(ids[5])}"):
        mba_sgd_update(weight, ids, rows, counts, lr=0.1, weight_decay=0.1)
    assert torch.equal(weight, before)
    untouched = int(torch.ones(N, dtype=torch.bool).index_fill_(0, ids, False).nonzero()[0])
    counts = torch.randint(1, 5, (N,))
    counts[untouched] = 0  # only touched ids need n_j >= 1
    with use_backend(backend):
        mba_sgd_update(weight, ids, rows, counts, lr=0.1, weight_decay=0.1)


def test_bad_arguments_name_themselves():
    weight, ids, rows, counts = _batch()
    with pytest.raises(ValueError, match="weight_decay"):
        mba_sgd_update(weight, ids, rows, counts, lr=0.1, weight_decay=-0.5)
    with pytest.raises(ValueError, match="lr"):
        mba_sgd_update(weight, ids, rows, counts, lr=float("nan"))
    with pytest.raises(TypeError, match="grad_rows has dtype"):
        mba_sgd_update(weight, ids, rows.double(), counts, lr=0.1)
    with pytest.raises(TypeError, match="ids must have dtype"):
        mba_sgd_update(weight, ids.float(), rows, counts, lr=0.1)
    with pytest.raises(ValueError, match="counts is on meta"):
        mba_sgd_update(weight, ids, rows, counts.to("meta"), lr=0.1)
    with pytest.raises(ValueError, match="grad_rows must have shape"):
        mba_sgd_update(weight, ids, rows[:-1], counts, lr=0.1)
    with pytest.raises(ValueError, match="counts must have shape"):
        mba_sgd_update(weight, ids, rows, counts[:-1], lr=0.1)
    with pytest.raises(TypeError, match="state_sum must have dtype"):
        mba_adagrad_update(weight.half(), torch.zeros(N, D).half(), ids, rows.half(), counts, lr=0.1, step=1)
    with pytest.raises(ValueError, match="step"):
        mba_adam_update(weight, torch.zeros(N, D), torch.zeros(N, D), ids, rows, counts, lr=0.1, step=0)
    with pytest.raises(ValueError, match="betas"):
        mba_adam_update(weight, torch.zeros(N, D), torch.zeros(N, D), ids, rows, counts, lr=0.1, step=1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="contiguous"):
        mba_sgd_update(weight.t(), ids, rows, counts, lr=0.1)


# --- dispatch and registration ----------------------------------------------------------


def test_dispatch_explains_itself(monkeypatch):
    weight, ids, rows, counts = _batch()
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
        mba_sgd_update(weight, ids, rows, counts, lr=0.1)
    if HAS_EXT:
        assert mba_op.OP.select(weight.device).name == "cpu"
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.setattr(_extension, "_reason", "the compiled extension interest_kernels._C is not available (test)")
    assert mba_op.OP.select(weight.device).name == "reference"
    want = _spec_sgd(weight, ids, rows, counts, 0.1, 0.3)
    mba_sgd_update(weight, ids, rows, counts, lr=0.1, weight_decay=0.3)
    _close(weight, want)
    with use_backend("cpu"), pytest.raises(BackendUnavailableError, match="not available"):
        mba_sgd_update(weight, ids, rows, counts, lr=0.1)


@needs_ext
def test_opcheck_registered_ops():
    mba_op.compiled_ops()  # registers the fake implementations
    ops = torch.ops.interest_kernels
    weight, ids, rows, counts = _batch()
    state = [torch.rand(N, D), torch.rand(N, D)]
    samples = [
        (ops.dedup_rows.default, (ids, rows, N)),
        (ops.mba_sgd_update.default, (weight, ids, rows, counts, 0.1, 0.2)),
        (ops.mba_adagrad_update.default, (weight, state[0], ids, rows, counts, 0.1, 0.2, 1e-10, 0.0, 1)),
        (ops.mba_adam_update.default, (weight, state[0], state[1], ids, rows, counts, 0.1, 0.9, 0.999, 1e-8, 0.2, 1)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_reference(dtype):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("interest_kernels::mba_sgd_update", "CUDA"):
        pytest.skip("interest_kernels._C was built without CUDA kernels")
    weight, ids, rows, counts = _batch(k=3000, n=5000, d=70, dtype=dtype, high=2000)
    dev = torch.device("cuda")
    for kind in ("sgd", "adagrad", "adam"):
        outs = []
        for backend, device in (("reference", torch.device("cpu")), ("cuda", dev)):
            w, i, r, c = (t.to(device) for t in (weight, ids, rows, counts))
            s = [torch.rand(5000, 70, generator=torch.Generator().manual_seed(5)).to(device) for _ in range(2)]
            with use_backend(backend):
                if kind == "sgd":
                    mba_sgd_update(w, i, r, c, lr=0.1, weight_decay=0.3)
                elif kind == "adagrad":
                    mba_adagrad_update(w, s[0], i, r, c, lr=0.1, step=2, weight_decay=0.3)
                else:
                    mba_adam_update(w, s[0], s[1], i, r, c, lr=0.1, step=2, weight_decay=0.3)
            outs.append([t.cpu().float() for t in (w, *s)])
        for got, want in zip(outs[1], outs[0]):
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    with use_backend("cuda"):
        u, summed = dedup_rows(ids.to(dev), rows.to(dev), 5000)
        u2, summed2 = dedup_rows(ids.to(dev), rows.to(dev), 5000)
    assert torch.equal(summed, summed2)  # deterministic
    want_u, want_s = dedup_rows_reference(ids, rows)
    assert torch.equal(u.cpu(), want_u)
    torch.testing.assert_close(summed.cpu(), want_s, rtol=1e-5, atol=1e-5)
    w = weight.to(dev)
    before = w.clone()
    bad = ids.clone()
    bad[7] = 5000
    with use_backend("cuda"), pytest.raises(ValueError, match="id 5000"):
        mba_sgd_update(w, bad.to(dev), rows.to(dev), counts.to(dev), lr=0.1, weight_decay=0.1)
    assert torch.equal(w, before)
