"""The comparison helper itself must be able to fail."""
import pytest
import torch

from interest_kernels.ops.common import reference_dtype, reference_math_in_input_dtype
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


def _running_sum_reference(x):
    """A reference written like the package's (math in ``reference_dtype``): 1000 plus
    the rows of ``x``, added one at a time, so every addition rounds in that dtype."""
    y = x.to(reference_dtype(x.dtype))
    total = torch.full(y.shape[1:], 1000.0, dtype=y.dtype)
    for row in y:
        total = total + row
    return total.to(x.dtype)


def _small_rows():
    return torch.rand(64, 8) * 0.4  # each below half a float16 ulp of 1000 (0.5)


def test_low_precision_reference_runs_its_math_in_low_precision():
    x = _small_rows()
    exact = 1000 + x.double().sum(0)
    rounded_err = (_running_sum_reference(x.half()).double() - exact).abs().max()
    with reference_math_in_input_dtype():
        lowp = _running_sum_reference(x.half())
    assert lowp.dtype == torch.float16
    assert (lowp.double() - exact).abs().max() > 10 * rounded_err
    assert reference_dtype(torch.float16) == torch.float32  # restored after the block


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ratio_rule_is_twice_the_low_precision_math_error(dtype):
    x = _small_rows()
    exact = 1000 + x.double().sum(0)
    with reference_math_in_input_dtype():
        lowp_err = float((_running_sum_reference(x.to(dtype)).double() - exact).abs().max())

    def off_by(multiple):
        def candidate(x):
            out = 1000 + x.double().sum(0)
            out[-1] += multiple * lowp_err
            return out.to(x.dtype)

        return candidate

    check_against_reference(off_by(1.5), _running_sum_reference, {"x": x}, dtype=dtype)
    with pytest.raises(AssertionError, match="low-precision reference's own error"):
        check_against_reference(off_by(3.0), _running_sum_reference, {"x": x}, dtype=dtype)


def test_overflowing_low_precision_reference_falls_back_to_rounding():
    """Where the float16 math overflows (and float64 does not), the rule uses the rounded
    float32 reference instead of an infinite error that would accept anything."""
    x = torch.full((64,), 1000.0)

    def square_sum(x):
        y = x.to(reference_dtype(x.dtype))
        return ((y * y).sum() / 1e4).to(x.dtype)

    check_against_reference(square_sum, square_sum, {"x": x}, dtype=torch.float16)
    with pytest.raises(AssertionError, match="low-precision"):
        check_against_reference(lambda x: square_sum(x) * 1.1, square_sum, {"x": x}, dtype=torch.float16)


def test_zero_gradient_counts_as_no_gradient_both_ways():
    x, w = torch.randn(0, 3), torch.randn(3)
    check_against_reference(lambda x, w: x.sum(0) + w, lambda x, w: w * 1, {"x": x, "w": w}, grad=("x", "w"))
    y = torch.randn(3)
    with pytest.raises(AssertionError, match="grad of y: reference gave no value"):
        check_against_reference(lambda y, w: w + (y - y.detach()), lambda y, w: w * 1, {"y": y, "w": w},
                                grad=("y", "w"))


def test_float32_ill_conditioned_inputs_use_the_reference_float32_error():
    """1.1 x - 1.1e4 cancels: float32 math alone misses rtol 1e-5 there, so the float32
    rule falls back to twice the float32 reference's own error, and no further."""
    x = 1e4 + torch.rand(16)

    def cancel(x):
        return (x * 1.1 - 1.1e4) * 1e3

    err32 = float((cancel(x).double() - cancel(x.double())).abs().max())
    assert err32 > 1e-5 * float(cancel(x.double()).abs().max())  # beyond rtol: ill-conditioned
    check_against_reference(cancel, cancel, {"x": x})
    with pytest.raises(AssertionError, match="output 0"):
        check_against_reference(lambda x: cancel(x) + 3 * err32, cancel, {"x": x})
