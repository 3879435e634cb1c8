"""The fused C++ CPU Dice (csrc/dice_cpu.cpp) against the eager reference."""
from __future__ import annotations

import pytest
import torch

from interest_kernels import use_backend
from interest_kernels.ops.dice import cpu
from interest_kernels.ops.dice.op import dice
from interest_kernels.ops.dice.reference import dice_reference
from interest_kernels.testing import check_against_reference

pytestmark = pytest.mark.skipif(not cpu.AVAILABLE, reason="interest_kernels._C is not built")


def _inputs(shape, affine, dtype=torch.float32, training=True):
    channels = shape[-1]
    return dict(
        x=torch.randn(*shape, dtype=dtype) * 2 + 0.5,
        alpha=torch.randn(channels, dtype=dtype),
        running_mean=torch.randn(channels, dtype=dtype),
        running_var=torch.rand(channels, dtype=dtype) + 0.5,
        weight=torch.randn(channels, dtype=dtype) if affine else None,
        bias=torch.randn(channels, dtype=dtype) if affine else None,
        training=training,
        momentum=0.1,
        eps=1e-5,
    )


def _cpu_dice(**kw):
    with use_backend("cpu"):
        return dice(**kw)


def _grads(inp):
    return [k for k in ("x", "alpha", "weight", "bias") if inp[k] is not None]


# 1100 rows: more than one chunk of the column sums (1024 rows).
@pytest.mark.parametrize("shape", [(1100, 7), (6, 5, 20)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_reference(shape, affine, training, dtype):
    inp = _inputs(shape, affine, dtype, training)
    check_against_reference(_cpu_dice, dice_reference, inp, grad=_grads(inp), dtype=dtype)


@pytest.mark.parametrize("affine", [True, False])
def test_running_statistics_updated_as_reference(affine):
    inp = _inputs((50, 9), affine)
    ref = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    _cpu_dice(**inp)
    dice_reference(**ref)
    torch.testing.assert_close(inp["running_mean"], ref["running_mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inp["running_var"], ref["running_var"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64_through_the_op(training):
    inp = _inputs((12, 4), True, torch.float64, training)
    leaves = {k: inp[k].clone().requires_grad_(True) for k in ("x", "alpha", "weight", "bias")}

    def fn(x, alpha, weight, bias):
        return torch.ops.interest_kernels.dice_cpu_forward(
            x, alpha, weight, bias, inp["running_mean"], inp["running_var"], training, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()))


@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training):
    inp = _inputs((20, 6), True)
    args = (inp["x"].requires_grad_(), inp["alpha"].requires_grad_(), inp["weight"], None,
            inp["running_mean"], inp["running_var"], training, 1e-5)
    torch.library.opcheck(torch.ops.interest_kernels.dice_cpu_forward, args)


def test_eval_with_no_rows_and_non_contiguous_input():
    inp = _inputs((0, 3, 5), True, training=False)
    inp["x"].requires_grad_(True)
    out = _cpu_dice(**inp)
    out.sum().backward()
    assert out.shape == (0, 3, 5) and inp["x"].grad.shape == (0, 3, 5)
    inp = _inputs((8, 30), False)
    inp["x"] = inp["x"].t()  # (30, 8), not contiguous
    inp["alpha"], inp["running_mean"], inp["running_var"] = (torch.randn(8), torch.zeros(8), torch.ones(8))
    check_against_reference(_cpu_dice, dice_reference, inp, grad=["x", "alpha"])


def test_compiles_fullgraph_and_matches_eager():
    inp = _inputs((30, 6), True)

    def fn(x, alpha, weight, bias):
        return dice(x, alpha, None, None, weight, bias, training=True)

    args = (inp["x"], inp["alpha"], inp["weight"], inp["bias"])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), fn(*args))


def _op_args(C=8):
    x = torch.randn(3, C)
    return dict(x=x, alpha=torch.zeros(C), weight=torch.ones(C), bias=torch.zeros(C),
                running_mean=torch.zeros(C), running_var=torch.ones(C))


@pytest.mark.parametrize(
    "name, bad",
    [
        ("running_mean", torch.zeros(1)),
        ("running_var", torch.ones(1)),
        ("running_var", torch.ones(8, dtype=torch.int64)),
        ("alpha", torch.zeros(9)),
        ("alpha", torch.zeros(8, dtype=torch.int32)),
        ("weight", torch.ones(2, 8)),
        ("bias", torch.zeros(7)),
        ("x", torch.ones(3, 8, dtype=torch.int64)),
    ],
)
def test_forward_op_names_a_misshaped_argument(name, bad):
    args = _op_args()
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        torch.ops.interest_kernels.dice_cpu_forward(
            args["x"], args["alpha"], args["weight"], args["bias"], args["running_mean"],
            args["running_var"], False, 1e-5)


@pytest.mark.parametrize("name", ["grad_out", "mean", "invstd"])
def test_backward_op_names_a_misshaped_argument(name):
    args = _op_args()
    bw = dict(grad_out=torch.ones(3, 8), mean=torch.zeros(8), invstd=torch.ones(8))
    bw[name] = bw[name][:1]
    with pytest.raises(ValueError, match=name):
        torch.ops.interest_kernels.dice_cpu_backward(
            bw["grad_out"], args["x"], args["alpha"], args["weight"], args["bias"], bw["mean"],
            bw["invstd"], True)
