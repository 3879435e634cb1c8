"""The Triton GRU-family scan against the eager reference (SPEC section 2).

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1),
so shapes stay tiny; the CUDA-only tests use realistic ones. Every comparison covers
the states, h_last and the gradients of x, att, h0 and all four weights and biases.
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch

from interest_kernels import use_backend
from interest_kernels.ops.gru_scan.op import gru_scan
from interest_kernels.ops.gru_scan.reference import gru_scan_reference
from interest_kernels.testing import check_against_reference

GRAD_NAMES = ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "att", "h0")


def make_case(
    *,
    batch: int = 3,
    seq_len: int = 5,
    input_size: int = 7,
    hidden: int = 18,
    mode: str = "augru",
    variant: str = "paper",
    valid: Optional[str] = "mask",
    h0: bool = True,
    bias: bool = True,
    return_states: bool = True,
    device: torch.device = torch.device("cpu"),
) -> dict:
    """Keyword arguments of ``gru_scan`` (float32; the checker casts them)."""
    f = dict(device=device)
    scale = hidden**-0.5
    kw: dict = dict(
        x=torch.randn(batch, seq_len, input_size, **f),
        weight_ih=torch.randn(3 * hidden, input_size, **f) * scale,
        weight_hh=torch.randn(3 * hidden, hidden, **f) * scale,
        bias_ih=torch.randn(3 * hidden, **f) * 0.1 if bias else None,
        bias_hh=torch.randn(3 * hidden, **f) * 0.1 if bias else None,
        att=torch.rand(batch, seq_len, **f) if mode != "gru" else None,
        mode=mode,
        variant=variant,
        h0=torch.randn(batch, hidden, **f) * 0.5 if h0 else None,
        return_states=return_states,
    )
    if valid == "lengths":
        # A zero length, a full one and partial ones.
        lengths = torch.tensor([0, seq_len, 2, 1, seq_len - 1][:batch], device=device)
        kw["lengths"] = lengths.clamp(max=seq_len)
    elif valid == "mask":
        mask = torch.rand(batch, seq_len, **f) > 0.35
        mask[0] = False  # an all-masked row: h_last = h0, zero states
        kw["mask"] = mask
    return kw


def triton_gru_scan(**kw):
    with use_backend("triton"):
        return gru_scan(**kw)


def grad_names(kw: dict) -> tuple[str, ...]:
    return tuple(n for n in GRAD_NAMES if kw.get(n) is not None)


def check(kw: dict, dtype: Optional[torch.dtype] = None) -> None:
    check_against_reference(triton_gru_scan, gru_scan_reference, kw, grad=grad_names(kw),
                            dtype=dtype)


@pytest.mark.parametrize("variant", ["paper", "tensorflow"])
@pytest.mark.parametrize("mode", ["gru", "aigru", "agru", "augru"])
def test_modes_and_variants_with_mask(mode, variant, device):
    check(make_case(mode=mode, variant=variant, device=device))


@pytest.mark.parametrize("mode", ["gru", "augru"])
def test_mixed_lengths_including_zero_and_full(mode, device):
    check(make_case(mode=mode, valid="lengths", batch=5, device=device))


def test_single_step_without_h0_or_biases(device):
    check(make_case(mode="agru", seq_len=1, valid=None, h0=False, bias=False, device=device))


@pytest.mark.parametrize("hidden", [8, 16, 20])
def test_hidden_sizes(hidden, device):
    check(make_case(mode="aigru", hidden=hidden, valid="lengths", batch=4, device=device))


@pytest.mark.parametrize("variant", ["paper", "tensorflow"])
def test_wide_hidden_weights_reloaded_each_step(variant, device):
    """H = 130 pads to 256: W_hh no longer stays on chip but is read in slabs at each use."""
    check(make_case(mode="augru", variant=variant, hidden=130, batch=2, seq_len=3, device=device))


@pytest.mark.parametrize(
    "mode, variant, dtype",
    [(m, v, None) for m in ("gru", "agru", "augru") for v in ("paper", "tensorflow")]
    + [("augru", "paper", torch.float16), ("augru", "tensorflow", torch.bfloat16)],
)
def test_weights_read_in_chunks(mode, variant, dtype, device, monkeypatch):
    """W_hh read per use in slabs of 16 rows (the wide-H path on a GPU), forced at
    H = 40 (HP = 64: three slabs, a partial last one, the fourth all padding and
    skipped): every dot of both kernels."""
    from interest_kernels.ops.gru_scan import triton as gru_triton

    launch_config = gru_triton._launch_config
    configs = []

    def chunked(*args, **kw):
        configs.append(dict(launch_config(*args, **kw), W_RESIDENT=False, CHUNK=16, KP=48))
        return configs[-1]

    monkeypatch.setattr(gru_triton, "_launch_config", chunked)
    check(make_case(mode=mode, variant=variant, hidden=40, batch=3, seq_len=3, device=device),
          dtype=dtype)
    assert [c["HP"] for c in configs] == [64, 64]  # forward and backward both chunked


@pytest.mark.parametrize("variant", ["paper", "tensorflow"])
def test_only_h_last(variant, device):
    """return_states=False: the gradients flow from h_last alone."""
    check(make_case(mode="augru", variant=variant, return_states=False, device=device))


def test_states_gradient_alone(device):
    """A loss on the states only (h_last unused) reaches every input."""
    kw = make_case(mode="gru", valid="lengths", batch=4, device=device)
    names = grad_names(kw)
    runs = []
    for fn in (triton_gru_scan, gru_scan_reference):
        inputs = {k: (v.detach().clone().requires_grad_(k in names) if isinstance(v, torch.Tensor)
                      else v) for k, v in kw.items()}
        states, _ = fn(**inputs)
        runs.append(torch.autograd.grad((states * states).sum(), [inputs[n] for n in names]))
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["paper", "tensorflow"])
def test_float16(variant, device):
    check(make_case(mode="augru", variant=variant, device=device), dtype=torch.float16)


def test_bfloat16(device):
    check(make_case(mode="augru", device=device), dtype=torch.bfloat16)


def test_float64(device):
    check(make_case(mode="augru", variant="tensorflow", valid="lengths", device=device),
          dtype=torch.float64)


def test_float32_weights_with_float16_input(device):
    """Autocast-style parameters: fp16 outputs, fp32 parameter gradients."""
    kw = make_case(mode="gru", valid=None, device=device)
    kw["x"], kw["h0"] = kw["x"].half(), kw["h0"].half()
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        kw[name].requires_grad_(True)
    states, h_last = triton_gru_scan(**kw)
    assert states.dtype == h_last.dtype == torch.float16
    h_last.float().sum().backward()
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        assert kw[name].grad.dtype == torch.float32 and torch.isfinite(kw[name].grad).all()
    _, want = gru_scan_reference(**{k: v.detach() if isinstance(v, torch.Tensor) else v
                                    for k, v in kw.items()})
    torch.testing.assert_close(h_last, want, atol=2e-3, rtol=2e-3)


def test_zero_lengths_give_h0_and_zero_states(device):
    kw = make_case(mode="augru", valid=None, batch=2, device=device)
    kw["lengths"] = torch.zeros(2, dtype=torch.int64, device=device)
    states, h_last = triton_gru_scan(**kw)
    assert torch.equal(states, torch.zeros_like(states))
    assert torch.equal(h_last, kw["h0"])


def test_empty_sequence(device):
    """T = 0: no states, h_last = h0, and the gradient of h0 passes straight through."""
    kw = make_case(mode="gru", seq_len=0, valid=None, device=device)
    for name in ("x", "weight_hh", "h0"):
        kw[name].requires_grad_(True)
    states, h_last = triton_gru_scan(**kw)
    assert states.shape == (3, 0, 18) and torch.equal(h_last, kw["h0"])
    h_last.sum().backward()
    assert torch.equal(kw["h0"].grad, torch.ones_like(kw["h0"]))
    assert torch.equal(kw["weight_hh"].grad, torch.zeros_like(kw["weight_hh"]))


def test_no_grad_call_saves_nothing(device):
    kw = make_case(mode="augru", return_states=False, device=device)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            states, h_last = triton_gru_scan(**kw)
        assert states is None and h_last.grad_fn is None
    assert packed == []
    kw["weight_hh"].requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        states, h_last = triton_gru_scan(**kw)
    assert states is None and h_last.grad_fn is not None and packed  # the check above can fail


def test_torch_compile_fullgraph(device):
    """Dynamo traces the public op (validation, backend selection, projection GEMM and
    the two custom ops) without a graph break, forward and backward."""
    kw = make_case(mode="augru", variant="tensorflow", device=device)
    leaves = [kw["x"], kw["weight_hh"], kw["att"], kw["h0"]]
    for t in leaves:
        t.requires_grad_(True)

    def f(scan, x, weight_ih, weight_hh, bias_ih, bias_hh, att, h0, mask):
        states, h_last = scan(x=x, weight_ih=weight_ih, weight_hh=weight_hh, bias_ih=bias_ih,
                              bias_hh=bias_hh, att=att, mode="augru", variant="tensorflow",
                              mask=mask, h0=h0)
        return (states * states).sum() + h_last.sum()

    args = [kw[n] for n in ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "att", "h0",
                            "mask")]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with use_backend("triton"):
        loss = compiled(gru_scan, *args)
    got = torch.autograd.grad(loss, leaves)
    want_loss = f(gru_scan_reference, *args)
    want = torch.autograd.grad(want_loss, leaves)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_custom_ops_opcheck(device):
    """Schema, fake tensors and autograd registration of both custom ops."""
    from interest_kernels.ops.gru_scan import triton as gru_triton

    batch, seq_len, hidden = 2, 3, 16
    f = dict(device=device)
    gi = torch.randn(batch, seq_len, 3 * hidden, **f, requires_grad=True)
    w = (torch.randn(3 * hidden, hidden, **f) * 0.2).requires_grad_(True)
    b = torch.randn(3 * hidden, **f, requires_grad=True)
    att = torch.rand(batch, seq_len, **f, requires_grad=True)
    h0 = torch.randn(batch, hidden, **f, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, True]], device=device)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    for mode, variant, save_gh in (("augru", "paper", False), ("agru", "tensorflow", True)):
        torch.library.opcheck(gru_triton.gru_scan_fwd,
                              (gi, w, b, att, h0, None, mask, mode, variant, True, save_gh),
                              test_utils=tests)
    states = torch.randn(batch, seq_len, hidden, **f)
    for gh in (None, torch.randn(batch, seq_len, 3 * hidden, **f)):
        torch.library.opcheck(
            gru_triton.gru_scan_bwd,
            (gi.detach(), w.detach(), None, att.detach(), None, torch.tensor([3, 1], **f), None,
             states, gh, torch.randn_like(states), None, "agru", "tensorflow"),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "hidden, dtype",
    [(36, torch.float32), (36, torch.float16), (128, torch.float32), (128, torch.float16),
     (128, torch.bfloat16), (256, torch.float32), (256, torch.bfloat16)],
)
def test_cuda_realistic_shapes(hidden, dtype):
    kw = make_case(batch=300, seq_len=20, input_size=hidden, hidden=hidden, mode="augru",
                   valid="lengths", device=torch.device("cuda"))
    kw["lengths"] = torch.randint(0, 21, (300,), device="cuda")
    check(kw, dtype=dtype)


def test_launch_falls_back_when_resident_weights_do_not_fit(monkeypatch):
    """A GPU without room for the resident W_hh tiles gets the kernel reading them in slabs."""
    from triton.runtime.errors import OutOfResources

    from interest_kernels.ops.gru_scan import triton as gru_triton

    calls = []

    class FakeKernel:
        fn = test_launch_falls_back_when_resident_weights_do_not_fit

        def __getitem__(self, grid):
            def run(*args, W_RESIDENT, HP, CHUNK, KP, **kw):
                calls.append((W_RESIDENT, CHUNK, KP, args[-1].numel()))
                if W_RESIDENT or HP > 128:
                    raise OutOfResources(300_000, 232_448, "shared memory")
            return run

    monkeypatch.setattr(gru_triton, "_TOO_BIG", set())
    cfg = dict(W_RESIDENT=True, HP=128, CHUNK=128, KP=128, BLOCK_B=16, F64=False, num_stages=3)
    for _ in range(2):
        gru_triton._launch(FakeKernel(), (3,), (), dict(MODE=0), cfg, torch.device("cpu"), 100)
    # The second call remembers; the slab kernel gets its (3 programs, 16, 128) scratch
    # and skips the padding slab past 112.
    assert calls == [(True, 128, 128, 1), (False, 16, 112, 3 * 16 * 128), (False, 16, 112, 3 * 16 * 128)]
    with pytest.raises(RuntimeError, match="on-chip memory"):
        wide = dict(cfg, W_RESIDENT=False, HP=256, CHUNK=16, KP=256)
        gru_triton._launch(FakeKernel(), (1,), (), dict(MODE=0), wide, torch.device("cpu"), 256)


def test_triton_declines_what_it_cannot_run_on_cuda():
    """Only float64 goes to the reference on CUDA; every other dtype trains up to H = 256."""
    from interest_kernels.ops.gru_scan.op import OP

    cuda = torch.device("cuda")
    if OP.reasons(device=cuda, dtype=torch.bfloat16, hidden=128)["triton"] is not None:
        pytest.skip("triton is not installed")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for hidden in (8, 64, 128, 256):
            reasons = OP.reasons(device=cuda, dtype=dtype, hidden=hidden, needs_grad=True)
            assert reasons["triton"] is None
    assert "float64" in OP.reasons(device=cuda, dtype=torch.float64, hidden=128,
                                   needs_grad=True)["triton"]


def test_unchecked_length_past_T_stays_inside_the_tensors():
    """With the value checks skipped (compile, CUDA graphs) a length above T must not take
    a row block past T: the op clamps it, so forward and backward equal those of T."""
    torch.manual_seed(0)
    batch, steps, hidden = 3, 3, 4
    gi = torch.randn(batch, steps, 3 * hidden, requires_grad=True)
    weight = torch.randn(3 * hidden, hidden, requires_grad=True)
    from interest_kernels.ops.gru_scan import triton as gru_triton

    fwd = gru_triton.gru_scan_fwd

    def run(lengths):
        states, h_last, _ = fwd(gi, weight, None, None, None, lengths, None, "gru", "paper", True, False)
        return [states, h_last, *torch.autograd.grad((states.sum() + h_last.sum()), (gi, weight))]

    for got, want in zip(run(torch.tensor([5, 3, 2])), run(torch.tensor([3, 3, 2]))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
