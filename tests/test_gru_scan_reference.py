"""GRU-family scans: the reference against its equations and the peers, the CPU backend
against the reference, and the public op's argument checks."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from interest_kernels import use_backend
from interest_kernels.ops.gru_scan.op import gru_scan
from interest_kernels.ops.gru_scan.reference import MODES, VARIANTS, gru_scan_reference
from interest_kernels.testing import check_against_reference

from gru_scan_cases import gru_inputs as _inputs
from peers import load_deepctr

MODE_VARIANTS = list(itertools.product(MODES, VARIANTS))


def _float_names(inputs):
    return [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]


# --- the reference ---------------------------------------------------------------------


@pytest.mark.parametrize("mode,variant", MODE_VARIANTS)
@pytest.mark.parametrize("valid", ["lengths", "mask"])
def test_reference_gradcheck(mode, variant, valid):
    inp = _inputs(mode, batch=3, seq_len=4, input_size=2, hidden=3, dtype=torch.float64)
    extra = (
        {"lengths": torch.tensor([0, 4, 2])}
        if valid == "lengths"
        else {"mask": torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)}
    )
    names = _float_names(inp)
    for v in inp.values():
        if v is not None:
            v.requires_grad_(True)

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        states, h_last = gru_scan_reference(**{**inp, **kw}, mode=mode, variant=variant, **extra)
        return states, h_last

    assert torch.autograd.gradcheck(fn, [inp[n] for n in names])


def test_reference_invalid_steps_keep_state_and_write_zero():
    inp = _inputs("augru", hidden=4)
    lengths = torch.tensor([0, 5, 2, 3])
    states, h_last = gru_scan_reference(**inp, mode="augru", lengths=lengths)
    full, _ = gru_scan_reference(**inp, mode="augru")
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(states[b, n:], torch.zeros_like(states[b, n:]))
        torch.testing.assert_close(states[b, :n], full[b, :n])
        torch.testing.assert_close(h_last[b], inp["h0"][b] if n == 0 else full[b, n - 1])
    mask = torch.tensor([[True, False, True, True, False]]).expand(4, 5)
    states_m, h_m = gru_scan_reference(**inp, mode="augru", mask=mask)
    assert torch.equal(states_m[:, 1], torch.zeros_like(states_m[:, 1]))
    torch.testing.assert_close(h_m, states_m[:, 3])
    # Dropping the masked steps from the sequence gives the same states.
    kept = [0, 2, 3]
    sub = dict(inp, x=inp["x"][:, kept], att=inp["att"][:, kept])
    states_s, h_s = gru_scan_reference(**sub, mode="augru")
    torch.testing.assert_close(states_m[:, kept], states_s)
    torch.testing.assert_close(h_m, h_s)


@pytest.mark.parametrize("bias", [True, False])
def test_reference_gru_equals_torch_gru(bias):
    batch, seq_len, input_size, hidden = 5, 6, 4, 7
    gru = torch.nn.GRU(input_size, hidden, bias=bias, batch_first=True)
    x = torch.randn(batch, seq_len, input_size)
    h0 = torch.randn(1, batch, hidden)
    weights = dict(weight_ih=gru.weight_ih_l0, weight_hh=gru.weight_hh_l0,
                   bias_ih=gru.bias_ih_l0 if bias else None, bias_hh=gru.bias_hh_l0 if bias else None)
    want, want_h = gru(x, h0)
    got, got_h = gru_scan_reference(x, **weights, h0=h0[0])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_h, want_h[0])

    lengths = torch.tensor([6, 1, 3, 6, 2])
    packed, packed_h = gru(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), h0)
    want, _ = pad_packed_sequence(packed, batch_first=True, total_length=seq_len)
    got, got_h = gru_scan_reference(x, **weights, h0=h0[0], lengths=lengths)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_h, packed_h[0])


def _tf_cell_step(x, h, a, w_ih, w_hh, b_ih, b_hh, mode):
    """One step of the original DIEN TensorFlow cells (GRUCell, QAAttGRUCell,
    VecAttGRUCell) in their own formulation: gate and candidate kernels over [x, h]."""
    hidden = h.shape[1]
    gate_kernel = torch.cat([w_ih[: 2 * hidden].t(), w_hh[: 2 * hidden].t()], dim=0)  # (I+H, 2H)
    gate_bias = b_ih[: 2 * hidden] + b_hh[: 2 * hidden]
    cand_kernel = torch.cat([w_ih[2 * hidden :].t(), w_hh[2 * hidden :].t()], dim=0)  # (I+H, H)
    cand_bias = b_ih[2 * hidden :] + b_hh[2 * hidden :]
    if mode == "aigru":
        x = a * x
    value = torch.sigmoid(torch.cat([x, h], dim=1) @ gate_kernel + gate_bias)
    r, u = value[:, :hidden], value[:, hidden:]
    c = torch.tanh(torch.cat([x, r * h], dim=1) @ cand_kernel + cand_bias)
    if mode == "agru":
        return (1.0 - a) * h + a * c
    if mode == "augru":
        u = (1.0 - a) * u
    return u * h + (1 - u) * c


@pytest.mark.parametrize("mode", MODES)
def test_reference_tensorflow_variant_matches_dien_cells(mode):
    inp = _inputs(mode, dtype=torch.float64)
    a = inp["att"] if inp["att"] is not None else torch.zeros(4, 5, dtype=torch.float64)
    h = inp["h0"]
    want = []
    for t in range(5):
        h = _tf_cell_step(inp["x"][:, t], h, a[:, t : t + 1], inp["weight_ih"], inp["weight_hh"],
                          inp["bias_ih"], inp["bias_hh"], mode)
        want.append(h)
    got, got_h = gru_scan_reference(**inp, mode=mode, variant="tensorflow")
    torch.testing.assert_close(got, torch.stack(want, 1))
    torch.testing.assert_close(got_h, h)
    if mode in ("agru", "augru"):
        paper, _ = gru_scan_reference(**inp, mode=mode, variant="paper")
        assert not torch.allclose(paper, got)


@pytest.mark.peers
@pytest.mark.parametrize("cell_name", ["AGRUCell", "AUGRUCell"])
def test_reference_paper_matches_deepctr(cell_name):
    seq = load_deepctr("deepctr_torch.layers.sequence")
    batch, seq_len, input_size, hidden = 5, 6, 4, 3
    dyn = seq.DynamicGRU(input_size, hidden, gru_type=cell_name[:-4])
    cell = dyn.rnn
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(batch, seq_len, input_size)
    att = torch.rand(batch, seq_len)
    mode = cell_name[:-4].lower()
    # The cell's attribute bias_ih is whatever tensor it registered under that name.
    weights = dict(weight_ih=cell.weight_ih, weight_hh=cell.weight_hh, bias_ih=cell.bias_ih, bias_hh=cell.bias_hh)

    h = torch.zeros(batch, hidden)
    steps = []
    for t in range(seq_len):
        h = cell(x[:, t], h, att[:, t])
        steps.append(h)
    got, got_h = gru_scan_reference(x, **weights, att=att, mode=mode)
    torch.testing.assert_close(got, torch.stack(steps, 1))
    torch.testing.assert_close(got_h, h)

    lengths = torch.tensor([6, 1, 3, 5, 2])
    packed = dyn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False),
                 pack_padded_sequence(att, lengths, batch_first=True, enforce_sorted=False))
    want, _ = pad_packed_sequence(packed, batch_first=True, total_length=seq_len)
    got, got_h = gru_scan_reference(x, **weights, att=att, mode=mode, lengths=lengths)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_h, want[torch.arange(batch), lengths - 1])


# --- the CPU backend against the reference -------------------------------------------------


def _cpu_op(**kw):
    with use_backend("cpu"):
        return gru_scan(**kw)


CASES = {
    "lengths": dict(lengths=torch.tensor([0, 5, 2, 3])),
    "mask": dict(mask=torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]]).bool()),
    "all_valid": dict(),
    "full_lengths": dict(lengths=torch.tensor([5, 5, 5, 5])),
}


@pytest.mark.parametrize("mode,variant", MODE_VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_matches_reference(mode, variant, case):
    inp = dict(_inputs(mode, hidden=6, h0=case != "all_valid"), mode=mode, variant=variant, **CASES[case])
    check_against_reference(_cpu_op, gru_scan_reference, inp, grad=_float_names(inp), dtype=torch.float32)


@pytest.mark.parametrize("mode,variant", [("gru", "paper"), ("augru", "paper"), ("augru", "tensorflow"),
                                          ("aigru", "tensorflow")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_matches_reference_low_precision(mode, variant, dtype):
    inp = dict(_inputs(mode, hidden=18, seq_len=7), mode=mode, variant=variant,
               lengths=torch.tensor([7, 0, 3, 6]))
    check_against_reference(_cpu_op, gru_scan_reference, inp, grad=_float_names(inp), dtype=dtype)


@pytest.mark.parametrize("mode", ["gru", "agru"])
@pytest.mark.parametrize(
    "shape",
    [dict(seq_len=1), dict(hidden=36, input_size=5, seq_len=3), dict(hidden=18, bias=False)],
    ids=["T1", "H36", "H18_nobias"],
)
def test_cpu_matches_reference_shapes(mode, shape):
    inp = dict(_inputs(mode, **shape), mode=mode)
    inp["lengths"] = torch.randint(0, inp["x"].shape[1] + 1, (4,))
    check_against_reference(_cpu_op, gru_scan_reference, inp, grad=_float_names(inp), dtype=torch.float32)


@pytest.mark.parametrize("mode,variant", [("gru", "paper"), ("augru", "tensorflow")])
def test_cpu_without_states(mode, variant):
    inp = dict(_inputs(mode), mode=mode, variant=variant, lengths=torch.tensor([2, 5, 0, 4]))
    check_against_reference(
        lambda **kw: _cpu_op(**kw, return_states=False)[1],
        lambda **kw: gru_scan_reference(**kw)[1],
        inp,
        grad=_float_names(inp),
    )
    with use_backend("cpu"):
        states, h_last = gru_scan(**inp, return_states=False)
    assert states is None and h_last.shape == (4, 6)


def test_cpu_weights_float32_with_half_inputs():
    inp = _inputs("augru")
    half = {k: (v.half() if k in ("x", "att", "h0") else v) for k, v in inp.items()}
    for k in ("weight_ih", "weight_hh"):
        half[k] = half[k].clone().requires_grad_(True)
    with use_backend("cpu"):
        states, h_last = gru_scan(**half, mode="augru")
    assert states.dtype == h_last.dtype == torch.float16
    (states.float().sum() + h_last.float().sum()).backward()
    assert half["weight_ih"].grad.dtype == torch.float32
    want, _ = gru_scan_reference(**inp, mode="augru")
    torch.testing.assert_close(states.float(), want, atol=5e-3, rtol=5e-3)


def test_default_backend_on_cpu_is_cpu():
    from interest_kernels.ops.gru_scan.op import OP

    assert OP.select(torch.device("cpu")).name == "cpu"


# --- argument checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(att=torch.rand(4, 4)), ValueError, "att must have shape"),
        (dict(att=None), ValueError, "att .* required"),
        (dict(mode="gru"), ValueError, "att must be None"),
        (dict(lengths=torch.tensor([0, 6, 1, 1])), ValueError, "lengths must lie in"),
        (dict(lengths=torch.tensor([-1, 2, 1, 1])), ValueError, "lengths must lie in"),
        (dict(lengths=torch.tensor([1, 2])), ValueError, "lengths must have shape"),
        (dict(lengths=torch.tensor([1, 2, 3, 4]), mask=torch.ones(4, 5)), ValueError, "not both"),
        (dict(mask=torch.ones(4, 4)), ValueError, "mask must have shape"),
        (dict(weight_hh=torch.randn(18, 5)), ValueError, "weight_hh must have shape"),
        (dict(weight_ih=torch.randn(15, 3)), ValueError, "weight_ih must have shape"),
        (dict(weight_ih=torch.randn(18, 4)), ValueError, "weight_ih must have shape"),
        (dict(bias_hh=torch.randn(12)), ValueError, "bias_hh must have shape"),
        (dict(h0=torch.randn(4, 5)), ValueError, "h0 must have shape"),
        (dict(x=torch.randn(4, 5)), ValueError, "x must have 3 dimensions"),
        (dict(mode="lstm"), ValueError, "mode must be one of"),
        (dict(variant="keras"), ValueError, "variant must be one of"),
        (dict(h0=torch.randn(4, 6, dtype=torch.float64)), TypeError, "h0 has dtype"),
        (dict(weight_hh=torch.randn(18, 6, dtype=torch.float64)), TypeError, "has dtype"),
        (dict(x=torch.randn(4, 5, 3).half()), TypeError, "dtype"),
    ],
)
def test_bad_arguments(change, error, match):
    kw = dict(_inputs("augru"), mode="augru")
    kw.update(change)
    with pytest.raises(error, match=match):
        gru_scan(**kw)


def test_mixed_devices_rejected():
    kw = dict(_inputs("augru"), mode="augru")
    kw["h0"] = kw["h0"].to("meta")
    with pytest.raises(ValueError, match="h0 is on meta"):
        gru_scan(**kw)


def test_no_nan_from_finite_inputs_at_zero_length():
    inp = _inputs("augru")
    inp["x"][0] = 1e4  # padded garbage in a zero-length row
    with use_backend("cpu"):
        states, h_last = gru_scan(**inp, mode="augru", lengths=torch.tensor([0, 5, 5, 5]))
    assert torch.isfinite(states).all() and torch.isfinite(h_last).all()
    torch.testing.assert_close(h_last[0], inp["h0"][0])
