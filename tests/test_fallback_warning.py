"""Leaving the fast path is never silent: a call the preferred backend declines warns once
per (op, backend, reason), with the reason; ``info`` lists every backend's limits."""
from __future__ import annotations

import warnings

import pytest
import torch

from interest_kernels import BackendFallbackWarning, use_backend
from interest_kernels._backend import Op, _warned_fallbacks
from interest_kernels.info import report


@pytest.fixture(autouse=True)
def _forget_warnings():
    saved = set(_warned_fallbacks)
    _warned_fallbacks.clear()
    yield
    _warned_fallbacks.clear()
    _warned_fallbacks.update(saved)


def _op(name="toy_fallback"):
    """A fast backend that declines wide calls, like the Triton kernels declining a wide D."""
    op = Op(name, preference={"cpu": ("triton", "reference")})
    op.register("reference")(lambda: "reference")
    op.register("triton", why_not=lambda dim, **_: f"D = {dim} > 256" if dim > 256 else None,
                limits="D <= 256")(lambda: "triton")
    return op


def test_declined_call_warns_once_per_reason():
    op = _op()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert op.select(torch.device("cpu"), dim=64).name == "triton"
        assert op.select(torch.device("cpu"), dim=300).name == "reference"
        assert op.select(torch.device("cpu"), dim=300).name == "reference"
        assert op.select(torch.device("cpu"), dim=512).name == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, BackendFallbackWarning)]
    assert len(messages) == 2, messages  # one per distinct reason
    assert "toy_fallback" in messages[0] and "D = 300 > 256" in messages[0]
    assert "triton backend declined" in messages[0] and "reference backend" in messages[0]
    assert "D = 512 > 256" in messages[1]


def test_forced_backend_and_accepted_calls_do_not_warn():
    op = _op("toy_quiet")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        assert op.select(torch.device("cpu"), dim=8).name == "triton"
        with use_backend("reference"):
            assert op.select(torch.device("cpu"), dim=300).name == "reference"


def test_info_lists_the_limits():
    text = report()
    assert "limits:" in text
    from interest_kernels.ops.target_attention.triton import config

    assert "target_attention / triton:" in text and f"D <= {config.MAX_DIM}" in text
    assert f"at most {config.MAX_UNITS} units" in text
    assert all(str(n) in text for n in config.MAX_WEIGHT_ELEMENTS.values())
    assert "mba_update / cpu:" in text


def test_a_real_op_warns_with_the_reason_and_still_computes(monkeypatch):
    """The MBA op's compiled backend declines (simulated: no extension); the update runs on
    the reference with one warning naming the op, the backend and the reason."""
    import interest_kernels as ik
    from interest_kernels.ops.mba import op as mba_op

    monkeypatch.setattr(mba_op, "extension_unavailable_reason", lambda: "simulated: no extension")
    weight, ids, rows = torch.randn(6, 3), torch.tensor([1, 4, 1]), torch.randn(3, 3)
    counts = torch.ones(6, dtype=torch.int64)
    want = weight.clone()
    mba_op.mba_sgd_reference(want, ids, rows, counts, lr=0.1, weight_decay=0.0)
    with pytest.warns(BackendFallbackWarning, match=r"mba_update: the cpu backend declined this call "
                                                   r"\(simulated: no extension\)"):
        ik.mba_sgd_update(weight, ids, rows, counts, lr=0.1)
    assert torch.equal(weight, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        ik.mba_sgd_update(weight, ids, rows, counts, lr=0.1)  # the same reason: no second warning
