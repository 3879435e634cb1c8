"""MBA sparse updates, dedup and counting on random batches, every backend against the
reference: touched rows and their optimiser state match, untouched rows stay bit for bit."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from interest_kernels import BackendUnavailableError, use_backend
from interest_kernels.ops.mba.op import (
    count_ids,
    dedup_rows,
    mba_adagrad_update,
    mba_adam_update,
    mba_sgd_update,
)
from interest_kernels.ops.mba.reference import (
    count_ids_reference,
    dedup_rows_reference,
    mba_adagrad_reference,
    mba_adam_reference,
    mba_sgd_reference,
)

import properties

BACKENDS = properties.backends("mba_update")


@st.composite
def batches(draw, backend: str) -> dict:
    gen = torch.Generator().manual_seed(draw(properties.seeds()))
    num_rows = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 11))
    ids_shape = draw(st.sampled_from([(k,) for k in range(0, 30)] + [(b, s) for b in range(0, 5) for s in (1, 3)]))
    # Few distinct values: duplicates in almost every batch.
    high = draw(st.sampled_from([1, 3, num_rows]))
    dtype = draw(properties.dtypes(backend))
    ids = torch.randint(0, min(high, num_rows), ids_shape, generator=gen)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(
        weight=torch.randn(num_rows, dim, generator=gen).to(dtype),
        ids=ids.to(draw(st.sampled_from([torch.int64, torch.int32]))),
        grad_rows=torch.randn(ids_shape + (dim,), generator=gen).to(dtype),
        counts=torch.randint(1, 5, (num_rows,), generator=gen),
        state_a=torch.rand(num_rows, dim, generator=gen).to(acc),
        state_b=torch.rand(num_rows, dim, generator=gen).to(acc),
        kind=draw(st.sampled_from(["sgd", "adagrad", "adam"])),
        lr=draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0])),
        weight_decay=draw(st.sampled_from([0.0, 0.01, 0.5])),
        step=draw(st.integers(1, 5)),
        lr_decay=draw(st.sampled_from([0.0, 0.1])),
        betas=draw(st.sampled_from([(0.9, 0.999), (0.0, 0.5)])),
    )


def _update(ops: dict, b: dict) -> list[torch.Tensor]:
    """Run one update on fresh copies of ``b``'s tensors; returns the tensors it changed."""
    weight, s_a, s_b = b["weight"].clone(), b["state_a"].clone(), b["state_b"].clone()
    common = dict(ids=b["ids"], grad_rows=b["grad_rows"], counts=b["counts"], lr=b["lr"],
                  weight_decay=b["weight_decay"])
    if b["kind"] == "sgd":
        ops["sgd"](weight, **common)
        return [weight]
    if b["kind"] == "adagrad":
        ops["adagrad"](weight, s_a, **common, eps=1e-10, lr_decay=b["lr_decay"], step=b["step"])
        return [weight, s_a]
    ops["adam"](weight, s_a, s_b, **common, eps=1e-8, step=b["step"], **ops["betas"](b["betas"]))
    return [weight, s_a, s_b]


OPS = dict(sgd=mba_sgd_update, adagrad=mba_adagrad_update, adam=mba_adam_update,
           betas=lambda betas: dict(betas=betas))
REFERENCES = dict(sgd=mba_sgd_reference, adagrad=mba_adagrad_reference, adam=mba_adam_reference,
                  betas=lambda betas: dict(beta1=betas[0], beta2=betas[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_updates_match_reference(backend):
    @settings(max_examples=properties.budget(backend))
    @given(b=batches(backend))
    def check(b):
        with use_backend(backend):
            try:
                got = _update(OPS, b)
            except BackendUnavailableError:
                reject()
        want = _update(REFERENCES, b)
        touched = torch.zeros(b["weight"].shape[0], dtype=torch.bool)
        touched[b["ids"].reshape(-1).long()] = True
        before = [b["weight"], b["state_a"], b["state_b"]]
        for name, g, w, old in zip(("weight", "state 1", "state 2"), got, want, before):
            assert torch.equal(g[~touched], old[~touched]), f"{name}: an untouched row changed"
            torch.testing.assert_close(g, w, msg=lambda m: f"{name}: {m}")

    properties.run_examples(check, "mba_update", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dedup_and_count_match_reference(backend):
    @settings(max_examples=properties.budget(backend))
    @given(b=batches(backend), padding=st.booleans())
    def check(b, padding):
        num_rows = b["weight"].shape[0]
        with use_backend(backend):
            try:
                ids, sums = dedup_rows(b["ids"], b["grad_rows"], num_rows)
            except BackendUnavailableError:
                reject()
            counts = count_ids(b["ids"], torch.zeros(num_rows, dtype=torch.int64),
                               padding_idx=0 if padding else None)
        want_ids, want_sums = dedup_rows_reference(b["ids"], b["grad_rows"])
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(sums, want_sums)
        want_counts = count_ids_reference(b["ids"], torch.zeros(num_rows, dtype=torch.int64),
                                          padding_idx=0 if padding else None)
        assert torch.equal(counts, want_counts)

    properties.run_examples(check, "mba_update", backend)
