"""Dice and the DIEN auxiliary loss on random configurations, every backend against the
reference: forward, every gradient, and Dice's running statistics."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from interest_kernels.ops.aux_loss.op import dien_aux_loss
from interest_kernels.ops.aux_loss.reference import ACTIVATIONS as AUX_ACTIVATIONS
from interest_kernels.ops.aux_loss.reference import dien_aux_loss_reference
from interest_kernels.ops.dice.op import dice
from interest_kernels.ops.dice.reference import dice_reference

import properties


@st.composite
def dice_cases(draw, backend: str) -> tuple[dict, torch.dtype]:
    gen = torch.Generator().manual_seed(draw(properties.seeds()))
    training = draw(st.booleans())
    channels = draw(st.integers(1, 11))
    lead = draw(st.sampled_from([(n,) for n in range(0 if not training else 2, 9)]
                                + [(n, t) for n in range(1, 4) for t in range(1, 4)]))
    if training and lead[0] * (lead[1] if len(lead) > 1 else 1) < 2:
        lead = (2,) + lead[1:]
    affine = draw(st.booleans())
    track = draw(st.booleans()) or not training
    x = torch.randn(lead + (channels,), generator=gen) * draw(st.sampled_from([0.1, 1.0, 4.0]))
    kw = dict(
        x=x + draw(st.sampled_from([0.0, 2.0])),
        alpha=torch.rand(channels, generator=gen),
        running_mean=0.1 * torch.randn(channels, generator=gen) if track else None,
        running_var=1 + torch.rand(channels, generator=gen) if track else None,
        weight=1 + 0.2 * torch.randn(channels, generator=gen) if affine else None,
        bias=0.2 * torch.randn(channels, generator=gen) if affine else None,
        training=training,
        momentum=draw(st.sampled_from([0.0, 0.01, 0.1, 1.0])),
        eps=draw(st.sampled_from([1e-9, 1e-5, 1e-3])),
    )
    return kw, draw(properties.dtypes(backend))


def _dice_with_stats(fn):
    """``fn`` returning its output and the running statistics it left, as outputs in the
    output's dtype (the comparison wants one dtype)."""

    def run(**kw):
        out = fn(**kw)
        stats = [kw[n].detach().to(out.dtype) for n in ("running_mean", "running_var") if kw[n] is not None]
        return (out, *stats)

    return run


@pytest.mark.parametrize("backend", properties.backends("dice"))
def test_dice_every_backend_matches_reference(backend):
    @settings(max_examples=properties.budget(backend))
    @given(case=dice_cases(backend))
    def check(case):
        kw, dtype = case
        grads = [n for n in ("x", "alpha", "weight", "bias") if kw[n] is not None]
        # Running statistics stay float32 whatever the input dtype.
        stats = {n: kw.pop(n) for n in ("running_mean", "running_var")}
        run = lambda fn: (lambda **k: _dice_with_stats(fn)(**k, **{  # noqa: E731
            n: None if t is None else t.clone() for n, t in stats.items()}))
        properties.check_backend(backend, run(dice), run(dice_reference), kw, grad=grads, dtype=dtype)

    properties.run_examples(check, "dice", backend)


@st.composite
def aux_cases(draw, backend: str) -> tuple[dict, torch.dtype]:
    gen = torch.Generator().manual_seed(draw(properties.seeds()))
    batch, seq_len = draw(properties.sizes(4)), draw(properties.sizes(7))
    hidden, emb = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    units = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    widths = (hidden + emb,) + units

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    kw = dict(
        states=randn(batch, seq_len, hidden),
        pos=randn(batch, seq_len, emb),
        neg=randn(batch, seq_len, emb),
        weights=[randn(widths[i + 1], widths[i]) * widths[i] ** -0.5 for i in range(len(units))],
        biases=[0.1 * randn(u) if draw(st.booleans()) else None for u in units],
        out_weight=randn(1, units[-1]) if draw(st.booleans()) else randn(units[-1]),
        out_bias=randn(1) if draw(st.booleans()) else None,
        activation=draw(st.sampled_from(AUX_ACTIVATIONS)),
    )
    kw.update(properties.valid_positions(draw, batch, seq_len, gen))
    return kw, draw(properties.dtypes(backend))


@pytest.mark.parametrize("backend", properties.backends("dien_aux_loss"))
def test_aux_loss_every_backend_matches_reference(backend):
    @settings(max_examples=properties.budget(backend))
    @given(case=aux_cases(backend))
    def check(case):
        kw, dtype = case
        grads = ["states", "pos", "neg", "weights", "biases", "out_weight"]
        grads += ["out_bias"] if kw["out_bias"] is not None else []
        properties.check_backend(backend, dien_aux_loss, dien_aux_loss_reference, kw, grad=grads,
                                 dtype=dtype)

    properties.run_examples(check, "dien_aux_loss", backend)
