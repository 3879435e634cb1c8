"""The fused C++ CPU scan (csrc/gru_scan_cpu.cpp) against the eager reference: the op's
registration (opcheck), float64 gradcheck, awkward shapes, padding never read, dtypes,
threads. (tests/test_gru_scan_reference.py compares the cpu backend with the reference
over every mode, variant and validity pattern in float32 and half precision.)"""
import itertools

import pytest
import torch

from interest_kernels import use_backend
from interest_kernels.ops.gru_scan import cpu
from interest_kernels.ops.gru_scan.op import gru_scan
from interest_kernels.ops.gru_scan.reference import MODES, VARIANTS, gru_scan_reference
from interest_kernels.testing import check_against_reference

from gru_scan_cases import gru_inputs as _inputs

pytestmark = pytest.mark.skipif(not cpu.AVAILABLE, reason="interest_kernels._C is not built")

MODE_VARIANTS = list(itertools.product(MODES, VARIANTS))
GRAD_NAMES = ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "att", "h0")


def _grad_names(inp):
    return [k for k in GRAD_NAMES if inp.get(k) is not None]


def _cpu_op(**kw):
    with use_backend("cpu"):
        return gru_scan(**kw)


@pytest.mark.parametrize("mode,variant", MODE_VARIANTS)
def test_gradcheck_float64_through_the_op(mode, variant):
    inp = _inputs(mode, batch=3, seq_len=4, input_size=2, hidden=3, dtype=torch.float64)
    names = _grad_names(inp)
    for valid in ({"lengths": torch.tensor([0, 4, 2])},
                  {"mask": torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)}):

        def fn(*tensors):
            return _cpu_op(**{**inp, **dict(zip(names, tensors))}, mode=mode, variant=variant, **valid)

        leaves = [inp[n].clone().requires_grad_(True) for n in names]
        assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize(
    "mode,variant,extra",
    [("augru", "paper", {"lengths": torch.tensor([0, 5, 2, 5])}),
     ("aigru", "tensorflow", {"mask": torch.tensor([[1, 0, 1, 1, 0], [0] * 5, [1] * 5, [0, 1, 1, 0, 1]]).bool()}),
     ("gru", "paper", {}),
     ("augru", "tensorflow", {})],
)
def test_opcheck(mode, variant, extra):
    inp = _inputs(mode)
    for name in _grad_names(inp):
        inp[name].requires_grad_(True)
    args = (inp["x"], inp["weight_ih"], inp["weight_hh"], inp["bias_ih"], inp["bias_hh"], inp["att"],
            inp["h0"], extra.get("lengths"), extra.get("mask"), mode, variant, True, True)
    # The workspace rows past the valid steps are left unwritten, so outputs compare equal
    # between eager and AOT tracing only when every step is valid.
    padded = bool(extra)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if padded else None
    kwargs = {"test_utils": utils} if utils else {}
    torch.library.opcheck(torch.ops.interest_kernels.gru_scan_forward, args, **kwargs)


AWKWARD = {
    "B0": dict(batch=0, lengths=[]),
    "T0": dict(seq_len=0, lengths=[0, 0, 0, 0]),
    "T1": dict(seq_len=1, lengths=[1, 0, 1, 1]),
    "all_zero_lengths": dict(lengths=[0, 0, 0, 0]),
    "all_full": dict(lengths=[5, 5, 5, 5]),
    "all_masked": dict(mask=torch.zeros(4, 5, dtype=torch.bool)),
    "no_h0_no_bias": dict(lengths=[3, 0, 5, 1], h0=False, bias=False),
}


@pytest.mark.parametrize("case", list(AWKWARD))
@pytest.mark.parametrize("mode,variant", [("augru", "paper"), ("agru", "tensorflow")])
def test_awkward_cases_match_reference(case, mode, variant):
    spec = dict(AWKWARD[case])
    valid = {}
    if "lengths" in spec:
        valid["lengths"] = torch.tensor(spec.pop("lengths"), dtype=torch.int64)
    if "mask" in spec:
        valid["mask"] = spec.pop("mask")
    inp = dict(_inputs(mode, **spec), mode=mode, variant=variant, **valid)
    # With T = 0 the reference's graph never touches x, att or the weights.
    grad = ["h0"] if case == "T0" else _grad_names(inp)
    check_against_reference(_cpu_op, gru_scan_reference, inp, grad=grad, dtype=torch.float64)


# The gate passes work on blocks of 16 float32 / 8 float64 units, the last partial block
# through padded copies: widths with full blocks, with and without a partial one.
@pytest.mark.parametrize("mode,variant", MODE_VARIANTS)
@pytest.mark.parametrize("dtype,hidden", [(torch.float32, 16), (torch.float32, 37), (torch.float64, 19)])
def test_unit_blocks_and_partial_block_match_reference(mode, variant, dtype, hidden):
    lengths = torch.tensor([5, 0, 3, 1], dtype=torch.int64)
    inp = dict(_inputs(mode, hidden=hidden, input_size=5, dtype=dtype), mode=mode, variant=variant,
               lengths=lengths)
    for name in ("weight_ih", "weight_hh"):
        inp[name] = inp[name] * hidden**-0.5
    check_against_reference(_cpu_op, gru_scan_reference, inp, grad=_grad_names(inp), dtype=dtype)


# Sorted rows run in blocks of 16, weight gradients are summed per wave of 8 blocks, and the
# products have AVX-512, AVX2 and portable paths (INTEREST_KERNELS_GRU_MATMUL caps the
# choice; the CPU's best otherwise): a batch of several blocks and waves, the last block
# partial, ties and zero lengths; widths around every vector width.
@pytest.mark.parametrize("matmul", ["best", "avx2", "portable"])
@pytest.mark.parametrize(
    "mode,variant,hidden,input_size,dtype",
    [("augru", "paper", 1, 3, torch.float32), ("agru", "tensorflow", 5, 17, torch.float32),
     ("aigru", "paper", 17, 5, torch.float64), ("gru", "tensorflow", 36, 36, torch.float32),
     ("augru", "tensorflow", 128, 20, torch.float32)],
)
def test_blocks_waves_and_product_paths_match_reference(monkeypatch, matmul, mode, variant, hidden,
                                                        input_size, dtype):
    if matmul != "best":
        monkeypatch.setenv("INTEREST_KERNELS_GRU_MATMUL", matmul)
    gen = torch.Generator().manual_seed(hidden)
    batch, seq_len = 150, 6
    inp = dict(_inputs(mode, batch=batch, seq_len=seq_len, input_size=input_size, hidden=hidden, dtype=dtype),
               mode=mode, variant=variant)
    for name in ("weight_ih", "weight_hh"):
        inp[name] = inp[name] * max(hidden, input_size) ** -0.5
    if variant == "paper":
        inp["lengths"] = torch.randint(0, seq_len + 1, (batch,), generator=gen)
    else:
        inp["mask"] = torch.rand(batch, seq_len, generator=gen) < 0.7
    check_against_reference(_cpu_op, gru_scan_reference, inp, grad=_grad_names(inp), dtype=dtype)


@pytest.mark.parametrize("mode,variant", [("augru", "paper"), ("aigru", "tensorflow"), ("gru", "tensorflow")])
@pytest.mark.parametrize("valid", ["lengths", "mask"])
def test_padding_is_never_read(mode, variant, valid):
    """NaN in every padded x, att and upstream-gradient position changes nothing."""
    batch, seq_len = 4, 6
    inp = dict(_inputs(mode, batch=batch, seq_len=seq_len), mode=mode, variant=variant)
    if valid == "lengths":
        inp["lengths"] = torch.tensor([6, 0, 2, 4])
        ok = torch.arange(seq_len) < inp["lengths"][:, None]
    else:
        ok = torch.rand(batch, seq_len) < 0.6
        ok[1] = False
        inp["mask"] = ok
    grad_states = torch.randn(batch, seq_len, 6)
    grad_h = torch.randn(batch, 6)

    def run(poisoned):
        kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
        g = grad_states.clone()
        if poisoned:
            kw["x"][~ok] = float("nan")
            if kw["att"] is not None:
                kw["att"][~ok] = float("nan")
            g[~ok] = float("nan")
        leaves = {k: kw[k].requires_grad_(True) for k in _grad_names(kw)}
        states, h_last = _cpu_op(**kw)
        grads = torch.autograd.grad((states, h_last), list(leaves.values()), (g, grad_h))
        return [states, h_last, *grads]  # padded positions: zero outputs and gradients

    for got, want in zip(run(True), run(False)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_non_contiguous_inputs():
    mode = "augru"
    base = _inputs(mode, batch=4, seq_len=5, input_size=3, hidden=6)
    inp = dict(base)
    inp["x"] = torch.randn(5, 4, 3).transpose(0, 1)  # (B, T, I) with strides of (T, B, I)
    inp["att"] = torch.rand(5, 4).t()
    inp["weight_ih"] = torch.randn(3, 18).t() * 0.6
    inp["h0"] = torch.randn(6, 4).t()
    inp["lengths"] = torch.tensor([5, 1, 0, 3], dtype=torch.int32)[torch.arange(4)]
    assert not inp["x"].is_contiguous() and not inp["weight_ih"].is_contiguous()
    check_against_reference(_cpu_op, gru_scan_reference, dict(inp, mode=mode),
                            grad=_grad_names(inp), dtype=None)


@pytest.mark.parametrize("mode,variant", [("augru", "paper"), ("gru", "tensorflow")])
def test_bfloat16_accepted_with_float32_accumulation(mode, variant):
    inp = dict(_inputs(mode, hidden=18, seq_len=7), mode=mode, variant=variant,
               lengths=torch.tensor([7, 0, 3, 6]))
    check_against_reference(_cpu_op, gru_scan_reference, inp, grad=_grad_names(inp), dtype=torch.bfloat16)


def test_float64_inputs_with_float32_weights():
    inp = _inputs("agru", dtype=torch.float64)
    for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        inp[k] = inp[k].float().requires_grad_(True)
    lengths = torch.tensor([5, 2, 0, 4])
    states, h_last = _cpu_op(**inp, mode="agru", lengths=lengths)
    want, want_h = gru_scan_reference(**inp, mode="agru", lengths=lengths)
    assert states.dtype == torch.float64
    torch.testing.assert_close(states, want)
    torch.testing.assert_close(h_last, want_h)
    h_last.sum().backward()
    assert inp["weight_hh"].grad.dtype == torch.float32


def test_no_grad_forward_keeps_no_workspace_and_matches():
    inp = _inputs("augru")
    lengths = torch.tensor([5, 2, 0, 4])
    with torch.no_grad():
        states, h_last = _cpu_op(**inp, mode="augru", lengths=lengths)
        _, _, *workspace = torch.ops.interest_kernels.gru_scan_forward(
            inp["x"], inp["weight_ih"], inp["weight_hh"], inp["bias_ih"], inp["bias_hh"], inp["att"],
            inp["h0"], lengths, None, "augru", "paper", False, False)
    assert len(workspace) == 5 and all(w.numel() == 0 for w in workspace)
    want, want_h = gru_scan_reference(**inp, mode="augru", lengths=lengths)
    torch.testing.assert_close(states, want)
    torch.testing.assert_close(h_last, want_h)


def test_two_threads_match_one():
    # B 300 = 19 row blocks of 16, three waves of the blocks' gradient partials: bitwise equal.
    inp = dict(_inputs("augru", batch=300, seq_len=9, input_size=8, hidden=16), mode="augru",
               lengths=torch.randint(0, 10, (300,)))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = {k: inp[k].clone().requires_grad_(True) for k in _grad_names(inp)}
            states, h_last = _cpu_op(**{**inp, **leaves})
            grads = torch.autograd.grad((states.sum() + h_last.sum()), list(leaves.values()))
            results.append((states, h_last) + grads)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


class _MaskedScan(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight_ih = torch.nn.Parameter(torch.randn(18, 3) * 0.6)
        self.weight_hh = torch.nn.Parameter(torch.randn(18, 6) * 0.6)

    def forward(self, x, att, mask):
        return gru_scan(x, self.weight_ih, self.weight_hh, None, None, att, mode="agru",
                        variant="tensorflow", mask=mask)


def _masked_inputs(batch, seq_len):
    mask = torch.rand(batch, seq_len) < 0.6
    mask[0] = False
    return torch.randn(batch, seq_len, 3), torch.rand(batch, seq_len), mask


def test_compile_and_export_with_mask_match_eager():
    module = _MaskedScan()
    args = _masked_inputs(4, 5)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), module(*args)):
        torch.testing.assert_close(got, want)
    B, T = torch.export.Dim("B", min=2), torch.export.Dim("T", min=2)
    program = torch.export.export(module, args, dynamic_shapes=({0: B, 1: T},) * 3)
    for batch, seq_len in ((4, 5), (6, 3)):
        args = _masked_inputs(batch, seq_len)
        for got, want in zip(program.module()(*args), module(*args)):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name,shape", [("grad_h_last", (3, 1)), ("grad_h_last", (1, 8)),
                                        ("grad_states", (4, 3, 8))])
def test_backward_refuses_gradients_of_the_wrong_shape(name, shape):
    """A direct call of the backward op with a misshapen gradient is an error naming it."""
    batch, seq_len, hidden = 3, 4, 8
    x = torch.randn(batch, seq_len, 2)
    w_ih, w_hh = torch.randn(3 * hidden, 2), torch.randn(3 * hidden, hidden)
    out = torch.ops.interest_kernels.gru_scan_forward(x, w_ih, w_hh, None, None, None, None, None,
                                                      None, "gru", "paper", True, True)
    grads = {"grad_states": None, "grad_h_last": None, name: torch.randn(shape)}
    with pytest.raises(ValueError, match=name):
        torch.ops.interest_kernels.gru_scan_backward(
            grads["grad_states"], grads["grad_h_last"], x, w_ih, w_hh, None, None, None, None,
            None, None, list(out[2:]), "gru", "paper", [True, False, True] + [False] * 4)
