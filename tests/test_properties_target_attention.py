"""Target attention on random configurations, every backend against the reference.

Shapes from zero (B = 0, T = 0), odd widths and unit counts, every activation and
normalisation, the shared-history and multi-head forms, lengths or masks (bool, integer
or float 0/1, all-masked rows), float32/float64/float16/bfloat16; forward (output and
scores) and every gradient.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interest_kernels.ops.target_attention.op import ACTIVATIONS, NORMALIZATIONS, target_attention
from interest_kernels.ops.target_attention.reference import target_attention_reference

import properties
from target_attention_cases import call, grad_names


@st.composite
def cases(draw, backend: str) -> tuple[dict, torch.dtype]:
    gen = torch.Generator().manual_seed(draw(properties.seeds()))
    triton = backend == "triton"
    batch = draw(properties.sizes(4))
    seq_len = draw(properties.sizes(7 if triton else 9))
    dim = draw(st.integers(1, 9))
    units = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    activation = draw(st.sampled_from(ACTIVATIONS))
    form = draw(st.sampled_from(["plain", "plain", "shared", "heads"]))
    heads = draw(st.integers(1, 3)) if form == "heads" else None
    per_head = heads is not None and draw(st.booleans())
    query_per_head = heads is not None and (per_head or draw(st.booleans()))
    rows = draw(st.integers(1, 3)) if form == "shared" or (heads and draw(st.booleans())) else None

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    lead = (heads,) if per_head else ()
    n_rows = rows if rows is not None else batch
    widths = (4 * dim,) + units
    inp: dict = {
        "query": randn(*((batch, heads, dim) if query_per_head else (batch, dim))),
        "keys": randn(*((n_rows,) + ((heads,) if heads else ()) + (seq_len, dim))),
        "weights": [randn(*lead, widths[i + 1], widths[i]) * widths[i] ** -0.5
                    for i in range(len(units))],
        "biases": [0.1 * randn(*lead, h) if draw(st.booleans()) else None for h in units],
        "out_weight": randn(*lead, 1, units[-1]),
        "out_bias": randn(*lead, 1) if draw(st.booleans()) else None,
        "activation": activation,
        "normalization": draw(st.sampled_from(NORMALIZATIONS)),
    }
    if inp["out_bias"] is None:
        del inp["out_bias"]
    inp.update(properties.valid_positions(draw, n_rows, seq_len, gen))
    if rows is not None:
        inp["key_index"] = torch.randint(0, rows, (batch,), generator=gen)
    if activation == "prelu":
        shared = draw(st.booleans())
        inp["prelu_weights"] = [0.1 + 0.3 * torch.rand(lead + ((1,) if shared else (h,)), generator=gen)
                                for h in units]
    if activation == "dice":
        training = draw(st.booleans())
        for i, h in enumerate(units):
            inp[f"dice_alpha{i}"] = torch.rand(lead + (h,), generator=gen)
            inp[f"dice_weight{i}"] = 1 + 0.2 * randn(*lead, h)
            inp[f"dice_bias{i}"] = 0.2 * randn(*lead, h)
        inp["dice_training"] = training
        inp["dice_stats"] = [(0.1 * randn(*lead, h), 1 + torch.rand(lead + (h,), generator=gen))
                             for h in units]
    return inp, draw(properties.dtypes(backend))


@pytest.mark.parametrize("backend", properties.backends("target_attention"))
def test_every_backend_matches_reference(backend):
    @settings(max_examples=properties.budget(backend))
    @given(case=cases(backend))
    def check(case):
        inp, dtype = case
        properties.check_backend(backend, call(target_attention), call(target_attention_reference),
                                 inp, grad=grad_names(inp), dtype=dtype)

    properties.run_examples(check, "target_attention", backend)
