"""Dice (SPEC section 4): the reference, the fused Triton op, the module and its converters."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interest_kernels import use_backend
from interest_kernels.nn.dice import Dice
from interest_kernels.ops.dice.op import OP, dice
from interest_kernels.ops.dice.reference import dice_reference
from interest_kernels.testing import check_against_reference

from peers import load_deepctr, load_fuxictr


def _params(channels: int, affine: bool, dtype=torch.float32, device="cpu") -> dict:
    """Random alpha/weight/bias and plausible running statistics, all (C,)."""
    kw = {"dtype": dtype, "device": device}
    return {
        "alpha": torch.randn(channels, **kw),
        "running_mean": torch.randn(channels, **kw),
        "running_var": torch.rand(channels, **kw) + 0.5,
        "weight": torch.randn(channels, **kw) if affine else None,
        "bias": torch.randn(channels, **kw) if affine else None,
    }


def _triton_dice(**kw):
    with use_backend("triton"):
        return dice(**kw)


# --- the reference ------------------------------------------------------------------------


def test_reference_matches_batchnorm_formula():
    x = torch.randn(9, 4, 6, dtype=torch.float64) * 2 + 1
    p = _params(6, affine=True, dtype=torch.float64)
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    flat = x.reshape(-1, 6)
    norm = F.batch_norm(flat, rm, rv, p["weight"], p["bias"], training=True, momentum=0.1, eps=1e-8)
    gate = torch.sigmoid(norm)
    want = (gate * flat + (1 - gate) * p["alpha"] * flat).reshape(x.shape)
    got = dice_reference(x, **p, training=True, momentum=0.1, eps=1e-8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p["running_mean"], rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p["running_var"], rv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5)])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_reference_gradcheck(shape, affine, training):
    channels = shape[-1]
    p = _params(channels, affine, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    alpha = p["alpha"].requires_grad_()
    weight = p["weight"].requires_grad_() if affine else None
    bias = p["bias"].requires_grad_() if affine else None

    def fn(x, alpha, *affine_params):
        w, b = affine_params if affine else (None, None)
        # Fresh statistics per call: gradcheck evaluates many times.
        rm, rv = p["running_mean"].clone(), p["running_var"].clone()
        return dice_reference(x, alpha, rm, rv, w, b, training=training, eps=1e-5)

    inputs = (x, alpha) + ((weight, bias) if affine else ())
    assert torch.autograd.gradcheck(fn, inputs)


# --- the Triton op against the reference -------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(300, 18), (5, 61, 80), (3, 7, 200)],
    ids=["NC-C18", "NTC-C80", "NTC-C200"],
)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_triton_matches_reference(device, shape, affine, training):
    x = torch.randn(shape, device=device) * 2 + 3
    inputs = {"x": x, **_params(shape[-1], affine, device=device)}
    inputs.update(training=training, momentum=0.1, eps=1e-5)
    grad = ("x", "alpha") + (("weight", "bias") if affine else ())
    check_against_reference(_triton_dice, dice_reference, inputs, grad=grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_triton_low_precision(device, dtype, training):
    inputs = {"x": torch.randn(4, 37, 18, device=device), **_params(18, True, device=device)}
    inputs.update(training=training, momentum=0.1, eps=1e-5)
    check_against_reference(
        _triton_dice, dice_reference, inputs, grad=("x", "alpha", "weight", "bias"), dtype=dtype
    )


@pytest.mark.parametrize("affine", [False, True])
def test_triton_running_stats_over_steps(device, affine):
    p_ref = _params(80, affine, device=device)
    p_tri = {k: v.clone() if v is not None else None for k, v in p_ref.items()}
    for step in range(4):
        x = torch.randn(3, 50, 80, device=device) * (step + 1) + step
        want = dice_reference(x, **p_ref, training=True, momentum=0.2, eps=1e-6)
        got = _triton_dice(x=x, **p_tri, training=True, momentum=0.2, eps=1e-6)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_tri["running_mean"], p_ref["running_mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_tri["running_var"], p_ref["running_var"], rtol=1e-5, atol=1e-6)
    x = torch.randn(20, 80, device=device)
    torch.testing.assert_close(
        _triton_dice(x=x, **p_tri, training=False, eps=1e-6),
        dice_reference(x, **p_ref, training=False, eps=1e-6),
        rtol=1e-5,
        atol=1e-5,
    )


# Masked lanes of the partial tiles hold x = 0, far below a mean of 1e4: their sigmoid
# saturates (exp overflows to inf, p = 0) and numpy in the interpreter says so.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_triton_variance_with_large_mean(device):
    """Deviations are taken from a shift: a mean 1e4 times the spread keeps its variance."""
    x = torch.randn(500, 18, device=device, dtype=torch.float64) + 1e4
    p = _params(18, False, dtype=torch.float64, device=device)
    rm32, rv32 = p["running_mean"].float(), p["running_var"].float()
    _triton_dice(x=x.float(), alpha=p["alpha"].float(), running_mean=rm32, running_var=rv32, momentum=1.0)
    dice_reference(x, **p, momentum=1.0)
    torch.testing.assert_close(rv32.double(), p["running_var"], rtol=1e-3, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_triton_many_row_programs(monkeypatch, training):
    """More row programs than one block of partials (as on a GPU): the combine loops."""
    from interest_kernels.ops.dice import triton as dice_triton_module

    monkeypatch.setattr(dice_triton_module, "_parallel_programs", lambda device: 64)
    # C = 80: 32-row tiles, so 600 rows give 19 programs > 16 partials per block.
    assert dice_triton_module._row_split(600, 1, 32, torch.device("cpu"))[0] == 19
    inputs = {"x": torch.randn(600, 80) * 3 - 2, **_params(80, True)}
    inputs.update(training=training, momentum=0.1, eps=1e-5)
    check_against_reference(
        _triton_dice, dice_reference, inputs, grad=("x", "alpha", "weight", "bias")
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_input_float32_parameters(device, dtype):
    """Under autocast the parameters stay float32: gradients keep each input's dtype."""
    p = _params(18, True, device=device)
    x = torch.randn(6, 11, 18, device=device).to(dtype)
    results = []
    for fn in (_triton_dice, dice_reference):
        leaves = {k: p[k].clone().requires_grad_() for k in ("alpha", "weight", "bias")}
        xi = x.clone().requires_grad_()
        stats = {"running_mean": p["running_mean"].clone(), "running_var": p["running_var"].clone()}
        out = fn(x=xi, **leaves, **stats, eps=1e-5)
        out.backward(torch.ones_like(out))
        assert out.dtype == dtype and xi.grad.dtype == dtype
        assert all(t.grad.dtype == torch.float32 for t in leaves.values())
        results.append((out.detach(), xi.grad, *(t.grad for t in leaves.values()), *stats.values()))
    atol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for got, want in zip(*results):
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=atol * scale)


def test_triton_without_running_stats_and_strided_input(device):
    base = torch.randn(18, 40, device=device)
    x = base.t()  # (40, 18), not contiguous
    alpha = torch.randn(18, device=device)
    got = _triton_dice(x=x, alpha=alpha, running_mean=None, running_var=None)
    want = dice_reference(x, alpha, None, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_eval_with_no_rows_gives_empty(device, backend):
    p = _params(18, True, device=device)
    x = torch.randn(0, 5, 18, device=device, requires_grad=True)
    with use_backend(backend):
        out = dice(x, **p, training=False)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_triton_custom_ops_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of the custom ops."""
    from interest_kernels.ops.dice import triton as dice_triton_module

    x = torch.randn(40, 18)
    alpha, weight = torch.randn(18), torch.randn(18)
    mean, var = torch.randn(18), torch.rand(18) + 0.5
    torch.library.opcheck(dice_triton_module.dice_batch_stats, (x, mean.clone(), var.clone(), 0.1))
    torch.library.opcheck(
        dice_triton_module.dice_apply,
        (x.clone().requires_grad_(), alpha.requires_grad_(), weight.requires_grad_(), None,
         mean, var, 1e-5, True),
    )
    torch.library.opcheck(
        dice_triton_module.dice_apply_backward,
        (torch.randn(40, 18), x, alpha.detach(), None, None, mean, var, 1e-5, False),
        test_utils=("test_schema", "test_faketensor"),
    )


# --- dispatch and argument checks ------------------------------------------------------------


def test_dispatch_reasons():
    from interest_kernels.ops.dice import cpu as dice_cpu_module

    expected = "cpu" if dice_cpu_module.AVAILABLE else "reference"
    assert OP.select(torch.device("cpu"), dtype=torch.float32).name == expected
    reasons = OP.reasons(device=torch.device("cuda"), dtype=torch.float64)
    assert "float64" in reasons["triton"]


def _good_args():
    return {"x": torch.randn(6, 4, 5), **_params(5, True)}


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"x": torch.randn(5)}, ValueError, "x must have 2 or 3 dimensions"),
        ({"x": torch.randint(0, 3, (6, 5))}, TypeError, "x must have dtype"),
        ({"x": torch.randn(6, 0)}, ValueError, "at least one channel"),
        ({"alpha": torch.randn(4)}, ValueError, "alpha must have shape"),
        ({"alpha": torch.randn(5, 1)}, ValueError, "alpha must have 1 dimensions"),
        ({"weight": torch.randn(6)}, ValueError, "weight must have shape"),
        ({"bias": [0.0] * 5}, TypeError, "bias must be a torch.Tensor"),
        ({"running_var": None}, ValueError, "both running_mean and running_var"),
        ({"running_mean": torch.randn(5, device="meta")}, ValueError, "running_mean is on meta"),
        ({"x": torch.randn(1, 5)}, ValueError, "at least 2 positions"),
        ({"x": torch.randn(1, 1, 5)}, ValueError, "at least 2 positions"),
        ({"momentum": 1.5}, ValueError, r"momentum must lie in \[0, 1\]"),
        ({"momentum": "0.1"}, TypeError, "momentum must be a float"),
        ({"eps": 0.0}, ValueError, "eps must be > 0"),
        ({"eps": float("nan")}, ValueError, "eps must be finite"),
        ({"training": 1}, TypeError, "training must be a bool"),
    ],
)
def test_bad_arguments(change, error, match):
    args = _good_args()
    args.update(change)
    with pytest.raises(error, match=match):
        dice(**args)


def test_eval_needs_running_stats():
    args = _good_args()
    args.update(running_mean=None, running_var=None, training=False)
    with pytest.raises(ValueError, match="eval mode"):
        dice(**args)


# --- the module ----------------------------------------------------------------------------------


def test_module_state_dict_round_trip():
    m = Dice(18, affine=True, eps=1e-6, momentum=0.3)
    m(torch.randn(10, 18) * 3 + 1)
    with torch.no_grad():
        m.alpha.normal_()
        m.weight.normal_()
    state = m.state_dict()
    assert set(state) == {
        "alpha", "weight", "bias", "running_mean", "running_var", "num_batches_tracked"
    }
    assert int(state["num_batches_tracked"]) == 1
    other = Dice(18, affine=True, eps=1e-6, momentum=0.3)
    other.load_state_dict(state)
    m.eval()
    other.eval()
    x = torch.randn(4, 3, 18)
    torch.testing.assert_close(other(x), m(x), rtol=0, atol=0)
    assert set(Dice(18).state_dict()) == {
        "alpha", "running_mean", "running_var", "num_batches_tracked"
    }


def test_module_dice_params_share_tensors():
    m = Dice(6, affine=True, eps=1e-6, momentum=0.2).eval()
    p = m.dice_params()
    assert p.alpha is m.alpha and p.weight is m.weight and p.running_var is m.running_var
    assert (p.training, p.momentum, p.eps) == (False, 0.2, 1e-6)
    x = torch.randn(5, 6)
    torch.testing.assert_close(dice_reference(x, *p[:5], training=p.training, eps=p.eps), m(x))


def test_module_rejects_bad_config():
    with pytest.raises(ValueError, match="num_features"):
        Dice(0)
    with pytest.raises(ValueError, match="momentum"):
        Dice(4, momentum=2.0)
    with pytest.raises(ValueError, match="eps"):
        Dice(4, eps=0.0)


def _randomise(layer: torch.nn.Module) -> None:
    with torch.no_grad():
        for prm in layer.parameters():
            prm.normal_()
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 2.0)


def _compare_with_peer(peer: torch.nn.Module, ours: Dice, shape: tuple[int, ...], backend: str) -> None:
    """Two training steps (outputs, every gradient, statistics), then eval."""
    for step in range(2):
        x = torch.randn(shape) * 2 + step
        x_peer, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_peer = peer(x_peer)
        with use_backend(backend):
            y_ours = ours(x_ours)
        torch.testing.assert_close(y_ours, y_peer, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y_peer)
        y_peer.backward(g)
        y_ours.backward(g)
        torch.testing.assert_close(x_ours.grad, x_peer.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.alpha.grad, peer.alpha.grad.reshape(-1), rtol=1e-4, atol=1e-4)
        if ours.affine:
            torch.testing.assert_close(ours.weight.grad, peer.bn.weight.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours.bias.grad, peer.bn.bias.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.running_mean, peer.bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, peer.bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(peer.bn.num_batches_tracked)
    peer.eval()
    ours.eval()
    x = torch.randn(shape)
    with use_backend(backend):
        torch.testing.assert_close(ours(x), peer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.peers
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dim", [2, 3])
def test_module_matches_deepctr(dim, backend):
    activation = load_deepctr("deepctr_torch.layers.activation")
    peer = activation.Dice(18, dim=dim)
    _randomise(peer)
    ours = Dice.from_deepctr(peer)
    assert ours.affine and ours.eps == 1e-8 and ours.momentum == 0.1
    assert ours.alpha.shape == (18,)
    _compare_with_peer(peer, ours, (64, 18) if dim == 2 else (8, 9, 18), backend)


@pytest.mark.peers
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_module_matches_fuxictr(backend):
    activations = load_fuxictr("fuxictr.pytorch.layers.activations")
    peer = activations.Dice(18)
    _randomise(peer)
    ours = Dice.from_fuxictr(peer)
    assert not ours.affine and ours.eps == 1e-9 and ours.momentum == 0.01
    _compare_with_peer(peer, ours, (64, 18), backend)


@pytest.mark.peers
def test_converter_copies_instead_of_sharing():
    activation = load_deepctr("deepctr_torch.layers.activation")
    peer = activation.Dice(6, dim=2).eval()
    ours = Dice.from_deepctr(peer)
    assert not ours.training
    with torch.no_grad():
        ours.alpha.add_(1.0)
    assert not torch.equal(ours.alpha, peer.alpha)
    with pytest.raises(TypeError, match="DeepCTR-Torch Dice"):
        Dice.from_deepctr(torch.nn.ReLU())


def test_module_compiles_fullgraph():
    torch._dynamo.reset()
    eager = Dice(18, affine=True)
    with torch.no_grad():
        eager.alpha.normal_()
    compiled_module = Dice(18, affine=True)
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = torch.randn(4, 9, 18) * 2 + 1
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    with use_backend("triton"):
        y_comp = compiled(x_comp)
    y_eager = eager(x_eager)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    y_comp.sum().backward()
    y_eager.sum().backward()
    torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_module.alpha.grad, eager.alpha.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled_module.running_var, eager.running_var)
    torch._dynamo.reset()
