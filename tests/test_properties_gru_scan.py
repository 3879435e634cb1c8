"""GRU-family scans on random configurations, every backend against the reference.

B and T from 0, odd input and hidden widths, every mode and variant, with or without
biases and h0, lengths or masks (all-masked rows included), every dtype; states, h_last
and the gradients of x, att, h0 and all weights.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interest_kernels.ops.gru_scan.op import gru_scan
from interest_kernels.ops.gru_scan.reference import MODES, VARIANTS, gru_scan_reference

import properties

GRAD_NAMES = ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "att", "h0")


@st.composite
def cases(draw, backend: str) -> tuple[dict, torch.dtype]:
    gen = torch.Generator().manual_seed(draw(properties.seeds()))
    batch = draw(properties.sizes(4))
    seq_len = draw(properties.sizes(6 if backend == "triton" else 9))
    input_size = draw(st.integers(1, 9))
    hidden = draw(st.integers(1, 9 if backend == "triton" else 13))
    mode = draw(st.sampled_from(MODES))
    scale = hidden**-0.5

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    bias = draw(st.booleans())
    kw: dict = dict(
        x=randn(batch, seq_len, input_size),
        weight_ih=randn(3 * hidden, input_size) * scale,
        weight_hh=randn(3 * hidden, hidden) * scale,
        bias_ih=randn(3 * hidden) * 0.1 if bias else None,
        bias_hh=randn(3 * hidden) * 0.1 if bias else None,
        att=torch.rand(batch, seq_len, generator=gen) if mode != "gru" else None,
        mode=mode,
        variant=draw(st.sampled_from(VARIANTS)),
        h0=randn(batch, hidden) * 0.5 if draw(st.booleans()) else None,
        return_states=draw(st.booleans()),
    )
    kw.update(properties.valid_positions(draw, batch, seq_len, gen))
    return kw, draw(properties.dtypes(backend))


@pytest.mark.parametrize("backend", properties.backends("gru_scan"))
def test_every_backend_matches_reference(backend):
    @settings(max_examples=properties.budget(backend))
    @given(case=cases(backend))
    def check(case):
        kw, dtype = case
        grads = [n for n in GRAD_NAMES if kw.get(n) is not None]
        properties.check_backend(backend, gru_scan, gru_scan_reference, kw, grad=grads, dtype=dtype)

    properties.run_examples(check, "gru_scan", backend)
