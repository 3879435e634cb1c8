"""Shared argument checks: the messages name the argument and say what came."""
import pytest
import torch

from interest_kernels import value_checks
from interest_kernels._validation import check_shape, check_tensor, check_valid_positions


def test_check_tensor_messages():
    with pytest.raises(TypeError, match="keys must be a torch.Tensor, got list"):
        check_tensor("keys", [1, 2])
    with pytest.raises(ValueError, match=r"keys must have 3 dimensions, got shape \(2, 3\)"):
        check_tensor("keys", torch.zeros(2, 3), ndim=3)
    with pytest.raises(TypeError, match="query must have dtype in"):
        check_tensor("query", torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="keys is on meta but the other inputs are on cpu"):
        check_tensor("keys", torch.zeros(2, device="meta"), device=torch.device("cpu"))


def test_check_shape_message():
    with pytest.raises(ValueError, match=r"mask must have shape \(4, \*\)"):
        check_shape("mask", torch.zeros(3, 5), (4, None))


def test_valid_positions():
    lengths = torch.tensor([0, 3, 5])
    out_len, out_mask = check_valid_positions(lengths, None, 3, 5, torch.device("cpu"))
    assert out_len is lengths and out_mask is None
    _, mask = check_valid_positions(None, torch.ones(3, 5, dtype=torch.int32), 3, 5, torch.device("cpu"))
    assert mask.dtype == torch.bool
    with pytest.raises(ValueError, match="not both"):
        check_valid_positions(lengths, torch.ones(3, 5, dtype=torch.bool), 3, 5, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\].*found 6"):
        check_valid_positions(torch.tensor([6, 1, 1]), None, 3, 5, torch.device("cpu"))
    with pytest.raises(ValueError, match="found -1"):
        check_valid_positions(torch.tensor([-1, 1, 1]), None, 3, 5, torch.device("cpu"))
    with pytest.raises(TypeError, match="lengths must have dtype"):
        check_valid_positions(torch.tensor([1.0, 1.0, 1.0]), None, 3, 5, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"lengths must have shape \(3\)"):
        check_valid_positions(torch.tensor([1, 1]), None, 3, 5, torch.device("cpu"))


def test_value_checks_can_be_turned_off():
    with value_checks(False):
        check_valid_positions(torch.tensor([9, 1, 1]), None, 3, 5, torch.device("cpu"))


def test_value_check_settings_are_exact(monkeypatch):
    import interest_kernels as ik
    from interest_kernels._validation import value_checks_enabled

    for wrong in ("off", "0", 2):
        with pytest.raises(ValueError, match="True, False or 'sync'"):
            with ik.value_checks(wrong):
                pass
    monkeypatch.setenv("INTEREST_KERNELS_VALUE_CHECKS", "false")
    with pytest.raises(ValueError, match="must be 0, 1 or sync"):
        value_checks_enabled()
    monkeypatch.setenv("INTEREST_KERNELS_VALUE_CHECKS", "0")
    assert not value_checks_enabled()


def test_mba_row_recorder_is_kept_out_of_cuda_graphs():
    import interest_kernels  # noqa: F401  (registers the op)

    assert torch.Tag.cudagraph_unsafe in torch.ops.interest_kernels.mba_embedding_record_rows.default.tags
