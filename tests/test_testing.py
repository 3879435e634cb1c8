"""The comparison helper itself must be able to fail."""
import pytest
import torch

from interest_kernels.testing import check_against_reference, poison_empty


def _ref(x, w):
    return torch.tanh(x @ w).sum(-1)


def test_identical_functions_pass():
    x, w = torch.randn(5, 3), torch.randn(3, 4)
    check_against_reference(_ref, _ref, {"x": x, "w": w}, grad=("x", "w"))


def test_wrong_forward_fails():
    x, w = torch.randn(5, 3), torch.randn(3, 4)
    with pytest.raises(AssertionError, match="output 0"):
        check_against_reference(lambda x, w: _ref(x, w) * 1.001, _ref, {"x": x, "w": w})


def test_wrong_gradient_fails():
    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2.01

    x = torch.randn(6)
    with pytest.raises(AssertionError, match="grad of x"):
        check_against_reference(lambda x: Bad.apply(x), lambda x: x * 2, {"x": x}, grad=("x",))


def test_unwritten_output_fails():
    def forgetful(x):
        out = torch.empty_like(x)
        out[:-1] = x[:-1] * 2
        return out

    x = torch.randn(7)
    with pytest.raises(AssertionError, match="NaN"):
        check_against_reference(forgetful, lambda x: x * 2, {"x": x})


def test_low_precision_ratio_rule():
    x = torch.randn(64)
    check_against_reference(lambda x: x * 3, lambda x: x * 3, {"x": x}, dtype=torch.float16)
    with pytest.raises(AssertionError, match="low-precision"):
        check_against_reference(
            lambda x: (x * 3 + 0.05).to(x.dtype), lambda x: x * 3, {"x": x}, dtype=torch.float16
        )


def test_poison_empty_restores_torch():
    before = torch.empty
    with poison_empty():
        assert torch.isnan(torch.empty(3)).all()
        assert (torch.empty(2, dtype=torch.int64) == -1).all()
    assert torch.empty is before
