"""What the Triton GRU scan moves, counted by the traffic meter under the interpreter:
W_hh read once per program where it stays on chip, and blocks of rows sorted by length
that stop at their longest row (issue 10, item 6)."""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the traffic meter runs kernels under the Triton interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

from interest_kernels import use_backend  # noqa: E402
from interest_kernels.bench.meter import TrafficMeter  # noqa: E402
from interest_kernels.ops.gru_scan import triton as gru_triton  # noqa: E402
from interest_kernels.ops.gru_scan.op import gru_scan  # noqa: E402
from interest_kernels.ops.gru_scan.reference import gru_scan_reference  # noqa: E402
from interest_kernels.testing import check_against_reference  # noqa: E402


def _inputs(B, T, H, dtype, lengths, mode="augru"):
    g = torch.Generator().manual_seed(0)
    k = H**-0.5
    leaves = dict(
        x=torch.randn(B, T, H, generator=g),
        weight_ih=torch.randn(3 * H, H, generator=g) * k,
        weight_hh=torch.randn(3 * H, H, generator=g) * k,
        bias_ih=torch.randn(3 * H, generator=g) * 0.1,
        bias_hh=torch.randn(3 * H, generator=g) * 0.1,
        att=torch.rand(B, T, generator=g),
        h0=torch.randn(B, H, generator=g) * 0.5,
    )
    kw = {n: v.to(dtype).requires_grad_(True) for n, v in leaves.items()}
    return dict(kw, lengths=lengths, mode=mode)


def _metered(kw):
    """Records per (phase, kernel) of one forward and backward on the Triton backend."""
    with use_backend("triton"), TrafficMeter() as meter:
        with meter.phase("fwd"):
            states, h_last = gru_scan(**kw)
        with meter.phase("bwd"):
            (states.float().sum() + h_last.float().sum()).backward()
    return {(r.phase, r.kernel.split("_")[-2]): r for r in meter.records if "gru_scan" in r.kernel}


@pytest.mark.parametrize("H, dtype", [(36, torch.float32), (128, torch.float16)])
def test_resident_weights_are_read_once_per_program(H, dtype):
    """H 36 float32 and H 128 16-bit keep W_hh on chip in both kernels (they used to read
    it at every step): W_hh bytes = programs x its size, no scratch round trips."""
    B, T = 20, 3
    cfg = gru_triton._launch_config("bwd", B, H, dtype, torch.device("cpu"))
    assert cfg["W_RESIDENT"] and cfg["BLOCK_B"] == 16
    records = _metered(_inputs(B, T, H, dtype, torch.full((B,), T)))
    programs = 2
    for phase in ("fwd", "bwd"):
        rec = records[phase, phase]
        assert rec.grids == [(programs,)]
        assert rec.by_argument["w_ptr"] == [programs * 3 * H * H * dtype.itemsize, 0]
        assert "scr_ptr" not in rec.by_argument or rec.by_argument["scr_ptr"] == [0, 0]


@pytest.mark.parametrize("valid", ["lengths", "mask"])
def test_blocks_of_sorted_rows_stop_at_their_longest_row(valid):
    """Rows go to programs by decreasing end (last valid step + 1); a program walks only
    the steps up to its rows' last valid one and then writes the zeros of the remaining
    steps (states, gate gradients)."""
    B, T, H = 20, 6, 8
    ends = torch.tensor([1, 6, 0, 2, 3, 1, 1, 2, 5, 6, 4, 1, 0, 2, 2, 3, 1, 2, 1, 2])
    kw = _inputs(B, T, H, torch.float32, ends)
    if valid == "mask":
        mask = torch.arange(T) < ends[:, None]
        mask[1, 2] = mask[9, 0] = mask[8, 3] = False  # holes before a row's end
        kw = dict(kw, lengths=None, mask=mask)
    records = _metered(kw)
    by_end = ends.sort(descending=True).values
    blocks = [by_end[:16], by_end[16:]]  # BLOCK_B = 16
    walked = sum(len(b) * int(b.max()) for b in blocks)
    assert walked < B * T
    gi_row_step = 3 * H * 4
    fwd, bwd = records["fwd", "fwd"], records["bwd", "bwd"]
    assert fwd.by_argument["gi_ptr"] == [walked * gi_row_step, 0]
    assert fwd.by_argument["states_ptr"] == [0, B * T * H * 4]
    assert bwd.by_argument["gi_ptr"] == [walked * gi_row_step, 0]
    assert bwd.by_argument["dgi_ptr"] == [0, B * T * gi_row_step]


@pytest.mark.parametrize("mode, valid", [("gru", "lengths"), ("agru", "mask")])
def test_rows_sorted_across_blocks_match_the_reference(mode, valid):
    """Three blocks of permuted rows, lengths 0 to T (or a mask with all-masked rows and
    holes), every output and gradient."""
    B, T = 40, 4
    g = torch.Generator().manual_seed(1)
    kw = _inputs(B, T, 8, torch.float32, torch.randint(0, T + 1, (B,), generator=g), mode)
    kw = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    if valid == "mask":
        mask = torch.rand(B, T, generator=g) > 0.4
        mask[:3] = False
        kw = dict(kw, lengths=None, mask=mask)
    if mode == "gru":
        kw.pop("att")
    grads = tuple(n for n in ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "att", "h0")
                  if n in kw)

    def triton_scan(**args):
        with use_backend("triton"):
            return gru_scan(**args)

    check_against_reference(triton_scan, gru_scan_reference, kw, grad=grads)


def test_slab_kernels_save_the_hidden_projections_for_the_backward():
    """Where W_hh is read in slabs at every use (here float32 "tensorflow" at H 40), the
    forward saves gh = W_hh h_{t-1} and the backward reads it instead of a second pass
    over W_hh per step: both kernels read W_hh the same number of times."""
    B, T, H = 20, 3, 40
    kw = dict(_inputs(B, T, H, torch.float32, torch.full((B,), T)), variant="tensorflow")
    assert not gru_triton._launch_config("bwd", B, H, torch.float32, torch.device("cpu"),
                                         "tensorflow")["W_RESIDENT"]
    records = _metered(kw)
    fwd, bwd = records["fwd", "fwd"], records["bwd", "bwd"]
    programs = 2
    assert fwd.by_argument["w_ptr"] == [programs * T * 3 * H * H * 4, 0]
    assert bwd.by_argument["w_ptr"] == fwd.by_argument["w_ptr"]
    assert fwd.by_argument["gh_ptr"] == [0, B * T * 3 * H * 4]
    assert bwd.by_argument["gh_ptr"] == [B * T * 3 * H * 4, 0]
