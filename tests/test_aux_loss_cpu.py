"""The C++ CPU aux loss (`interest_kernels::dien_aux_loss_cpu_*`, valid pairs only) against
the eager reference: awkward lengths and shapes, every gradient, float64 gradcheck through
the op, opcheck, and torch.compile / torch.export with lengths."""
from __future__ import annotations

import pytest
import torch

from interest_kernels import nn as iknn
from interest_kernels import use_backend
from interest_kernels.ops.aux_loss import cpu
from interest_kernels.ops.aux_loss.op import dien_aux_loss
from interest_kernels.ops.aux_loss.reference import dien_aux_loss_reference
from interest_kernels.testing import check_against_reference

pytestmark = pytest.mark.skipif(not cpu.AVAILABLE, reason="extension not built")

GRADS = ("states", "pos", "neg", "weights", "biases[0]", "out_weight", "out_bias")


def _inputs(batch, seq_len, hidden=4, emb=3, units=(6, 5), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    widths = (hidden + emb,) + tuple(units)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=dtype)

    return dict(
        states=randn(batch, seq_len, hidden), pos=randn(batch, seq_len, emb), neg=randn(batch, seq_len, emb),
        weights=[randn(widths[i + 1], widths[i]) * 0.5 for i in range(len(units))],
        biases=[randn(units[0]), None] + [randn(u) for u in units[2:]],
        out_weight=randn(1, units[-1]), out_bias=randn(1),
    )


def _cpu(**kw):
    with use_backend("cpu"):
        return dien_aux_loss(**kw)


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_with_lengths_0_1_and_t(activation, dtype):
    kw = _inputs(5, 6, dtype=dtype)
    kw.update(activation=activation, lengths=torch.tensor([0, 1, 6, 3, 2]))
    check_against_reference(_cpu, dien_aux_loss_reference, kw, grad=GRADS, dtype=dtype)


def test_matches_reference_with_a_mask_and_no_biases():
    kw = _inputs(3, 7, units=(5,))
    kw.update(biases=[None], out_bias=None, out_weight=kw["out_weight"].reshape(-1),
              mask=torch.tensor([[1, 1, 0, 1, 1, 1, 0], [0] * 7, [1] * 7], dtype=torch.bool))
    check_against_reference(_cpu, dien_aux_loss_reference, kw, grad=("states", "pos", "neg", "weights", "out_weight"))


@pytest.mark.parametrize("batch, seq_len", [(0, 5), (3, 0), (3, 1)])
def test_no_pair_gives_zero_and_zero_gradients(batch, seq_len):
    kw = _inputs(batch, seq_len)
    leaves = [kw["states"], *kw["weights"], kw["out_weight"]]
    for t in leaves:
        t.requires_grad_(True)
    loss = _cpu(**kw, lengths=torch.full((batch,), seq_len))
    assert loss.shape == () and float(loss.detach()) == 0.0
    for g in torch.autograd.grad(loss, leaves):
        assert g.shape and not g.any()


def test_gradcheck_float64():
    kw = _inputs(3, 4, hidden=2, emb=2, units=(3, 2), dtype=torch.float64)
    lengths = torch.tensor([4, 2, 1])
    names = ["states", "pos", "neg", "out_weight", "out_bias"]

    def fn(states, pos, neg, out_weight, out_bias, w0, w1, b0):
        return _cpu(states=states, pos=pos, neg=neg, weights=[w0, w1], biases=[b0, None], out_weight=out_weight,
                    out_bias=out_bias, lengths=lengths)

    args = [kw[n].requires_grad_() for n in names] + [w.requires_grad_() for w in kw["weights"]]
    args.append(kw["biases"][0].requires_grad_())
    assert torch.autograd.gradcheck(fn, args)


def test_opcheck():
    kw = _inputs(3, 5)
    valid = torch.arange(5) < torch.tensor([[5], [2], [0]])
    biases = [kw["biases"][0], torch.empty(0)]
    args = (kw["states"], kw["pos"], kw["neg"], valid, kw["weights"], biases, kw["out_weight"], kw["out_bias"],
            "sigmoid")
    torch.library.opcheck(torch.ops.interest_kernels.dien_aux_loss_cpu_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    loss, rows, saved = torch.ops.interest_kernels.dien_aux_loss_cpu_forward(*args)
    torch.library.opcheck(torch.ops.interest_kernels.dien_aux_loss_cpu_backward.default,
                          (torch.ones(()), *args, rows, saved))


def test_compile_and_export_with_lengths_match_eager():
    module = iknn.AuxiliaryLoss(4, 3, (6, 5))
    kw = _inputs(4, 6)
    lengths = torch.tensor([6, 0, 3, 1])
    states, pos, neg = (kw[n] for n in ("states", "pos", "neg"))
    with use_backend("cpu"):
        want = module(states, pos, neg, lengths=lengths)
        got = torch.compile(module, fullgraph=True, dynamic=True)(states, pos, neg, lengths=lengths)
        torch.testing.assert_close(got, want)
        batch, steps = torch.export.Dim("batch", min=2), torch.export.Dim("steps", min=2)
        program = torch.export.export(
            module, (states, pos, neg), {"lengths": lengths},
            dynamic_shapes={"states": {0: batch, 1: steps}, "pos": {0: batch, 1: steps}, "neg": {0: batch, 1: steps},
                            "lengths": {0: batch}})
        assert "dien_aux_loss_cpu_forward" in str(program.graph)
        other = _inputs(3, 8, seed=1)
        lengths = torch.tensor([8, 2, 5])
        torch.testing.assert_close(
            program.module()(other["states"], other["pos"], other["neg"], lengths=lengths),
            module(other["states"], other["pos"], other["neg"], lengths=lengths))
