"""The fused C++ CPU target attention (csrc/target_attention_cpu.cpp): its operator
registrations (opcheck), float64 gradcheck through the operator, the awkward cases
against the eager reference, padding that holds NaN/Inf, tiling past one tile of keys,
and threads. The common forms are compared in test_target_attention_reference.py."""
from __future__ import annotations

import pytest
import torch

from interest_kernels import use_backend
from interest_kernels.ops.target_attention import target_attention, target_attention_reference
from interest_kernels.ops.target_attention import cpu as ta_cpu
from interest_kernels.ops.target_attention.cpu import unavailable_reason
from interest_kernels.testing import check_against_reference

import target_attention_cases as cases
from target_attention_cases import call, grad_names

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

F64 = torch.float64
OPS = torch.ops.interest_kernels


def cpu_call(**kw):
    with use_backend("cpu"):
        return call(target_attention)(**kw)


def check(inp: dict, **kw) -> None:
    check_against_reference(cpu_call, call(target_attention_reference), inp, grad=grad_names(inp), **kw)


# --- operator registration ----------------------------------------------------------------

def _op_args(heads=2, per_head=False, activation="sigmoid", layers=2, rows=None, dtype=F64):
    """Canonical arguments of target_attention_cpu: B 3, T 5, D 3, units (4, 3[, 2])."""
    B, T, D, units = 3, 5, 3, (4, 3, 2)[:layers]
    G = heads if per_head else 1
    widths = (4 * D,) + units
    R = rows or B
    args = dict(
        query=torch.randn(B, 1, D, dtype=dtype, requires_grad=True),
        keys=torch.randn(R, heads, T, D, dtype=dtype, requires_grad=True),
        key_index=torch.tensor([0, R - 1, R - 1]) if rows else None,
        lengths=torch.tensor([0, T, 2])[:R] if not rows else torch.tensor([T, 1][:R]),
        mask=None,
        weights=[torch.randn(G, widths[i + 1], widths[i], dtype=dtype, requires_grad=True)
                 for i in range(layers)],
        biases=[torch.randn(G, h, dtype=dtype, requires_grad=True) for h in units],
        out_weight=torch.randn(G, units[-1], dtype=dtype, requires_grad=True),
        out_bias=torch.randn(G, dtype=dtype, requires_grad=True),
        act_params=[],
    )
    if activation == "prelu":
        args["act_params"] = [torch.rand(G, h, dtype=dtype, requires_grad=True) for h in units]
    if activation == "dice":
        args["act_params"] = [torch.rand(G, h, dtype=dtype, requires_grad=True)
                              for h in units for _ in range(3)]
    return args, units


@pytest.mark.parametrize("cfg", [
    dict(), dict(activation="prelu", per_head=True, layers=3), dict(activation="dice", rows=2),
])
def test_opcheck_forward(cfg):
    args, _ = _op_args(**cfg)
    activation = cfg.get("activation", "sigmoid")
    torch.library.opcheck(OPS.target_attention_cpu, tuple(args.values()) + (activation, "softmax"))


@pytest.mark.parametrize("cfg", [dict(), dict(activation="dice", rows=2, dice_eps=True),
                                 dict(activation="dice", per_head=True, dice_eps=True)])
def test_opcheck_train(cfg):
    cfg = dict(cfg)
    dice_eps = [1e-5, 1e-3] if cfg.pop("dice_eps", False) else None
    args, _ = _op_args(**cfg)
    activation = cfg.get("activation", "sigmoid")
    torch.library.opcheck(OPS.target_attention_cpu_train,
                          tuple(args.values()) + (activation, "softmax", dice_eps))


@pytest.mark.parametrize("cfg", [
    dict(), dict(activation="relu", rows=2), dict(activation="prelu", per_head=True, layers=3),
    dict(activation="dice", layers=1),
])
@pytest.mark.parametrize("normalization", ["softmax", "none"])
def test_gradcheck_through_the_op(cfg, normalization):
    args, _ = _op_args(**cfg)
    activation = cfg.get("activation", "sigmoid")
    names = list(args)
    flat, spec = [], []
    for name in names:
        v = args[name]
        if isinstance(v, list):
            spec.append((name, len(v)))
            flat += v
        else:
            spec.append((name, None))
            flat.append(v)

    def fn(*tensors):
        it = iter(tensors)
        kw = {name: ([next(it) for _ in range(n)] if n is not None else next(it)) for name, n in spec}
        return OPS.target_attention_cpu(*kw.values(), activation, normalization)

    assert torch.autograd.gradcheck(fn, tuple(flat), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cfg", [dict(activation="prelu", rows=2),
                                 dict(activation="dice", rows=2, dice_eps=True),
                                 dict(activation="dice", heads=2, per_head=True, layers=3, dice_eps=True)])
def test_gradcheck_train(cfg):
    """The training operator (pre-activations saved; Dice with batch statistics)."""
    cfg = dict(cfg)
    dice_eps = [1e-3] * cfg.get("layers", 2) if cfg.pop("dice_eps", False) else None
    args, _ = _op_args(**cfg)
    activation = cfg.get("activation", "sigmoid")
    lists = {name: len(v) for name, v in args.items() if isinstance(v, list)}
    fixed = {name: v for name, v in args.items() if not isinstance(v, list) and name in ("key_index", "lengths", "mask")}
    names = [n for n in args if n not in fixed]
    flat = [t for n in names for t in (args[n] if n in lists else [args[n]])]

    def fn(*tensors):
        it = iter(tensors)
        kw = {n: ([next(it) for _ in range(lists[n])] if n in lists else next(it)) for n in names}
        kw.update(fixed)
        ordered = [kw[n] for n in args]
        out, scores, _, _ = OPS.target_attention_cpu_train(*ordered, activation, "softmax", dice_eps)
        return out, scores

    assert torch.autograd.gradcheck(fn, tuple(flat), atol=1e-7, rtol=1e-5)


# --- awkward cases against the reference ----------------------------------------------------

AWKWARD = {
    "T0": dict(seq_len=0, valid="none"),
    "T0-lengths": dict(seq_len=0, valid="lengths"),
    "T1-mask": dict(seq_len=1, valid="mask"),
    "all-masked-rows": dict(valid="mask", batch=4),
    "lengths-0-and-T-none": dict(valid="lengths", normalization="none", batch=5),
    "long-T-two-tiles": dict(seq_len=300, batch=2, dim=4, units=(6, 3)),
    "long-T-dice-train": dict(seq_len=200, batch=2, dim=4, units=(6, 3), activation="dice",
                              dice_training=True),
    "heads-shared-dice-train-mask": dict(heads=3, activation="dice", dice_training=True, valid="mask"),
    "per-head-shared-history-3-layers": dict(heads=2, per_head=True, rows=2, batch=4,
                                             units=(5, 4, 3), activation="relu"),
}


@pytest.mark.parametrize("case", list(AWKWARD))
def test_awkward_cases(case):
    check(cases.make_case(**AWKWARD[case]))


@pytest.mark.parametrize("cfg", [dict(), dict(rows=2), dict(heads=2, per_head=True),
                                 dict(activation="dice", dice_training=True)])
def test_empty_batch(cfg):
    """B = 0 (the reference cannot reshape an empty query, so this compares shapes)."""
    rows = cfg.pop("rows", None)
    inp = cases.make_case(batch=0, valid="none", **cfg)
    if rows:
        inp["keys"] = torch.randn(rows, 4, 3)
        inp["key_index"] = torch.zeros(0, dtype=torch.long)
    q = inp["query"].requires_grad_(True)
    w = inp["weights"][0].requires_grad_(True)
    out, a = cpu_call(**inp)
    heads = (2,) if "heads" in cfg else ()
    assert out.shape == (0,) + heads + (3,) and a.shape == (0,) + heads + (4,)
    gq, gw = torch.autograd.grad(out.sum() + a.sum(), [q, w])
    assert gq.shape == q.shape and torch.equal(gw, torch.zeros_like(gw))


def test_all_masked_rows_give_zeros():
    inp = cases.make_case(valid="mask", batch=4)
    inp["mask"][1] = False
    out, a = cpu_call(**inp)
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and torch.equal(a[:2], torch.zeros_like(a[:2]))


@pytest.mark.parametrize("valid", ["lengths", "mask"])
@pytest.mark.parametrize("rows", [None, 2])
def test_non_contiguous_inputs(valid, rows):
    inp = cases.make_case(valid=valid, rows=rows, batch=4)
    q, k = inp["query"], inp["keys"]
    inp["query"] = torch.cat([q, q], dim=1)[:, ::2]
    inp["keys"] = torch.cat([k, k], dim=-1)[..., ::2].transpose(0, 1).contiguous().transpose(0, 1)
    inp["weights"] = [w.t().contiguous().t() for w in inp["weights"]]
    assert not inp["query"].is_contiguous() and not inp["weights"][0].is_contiguous()
    check(inp)


@pytest.mark.parametrize("activation", ["sigmoid", "prelu", "dice"])
@pytest.mark.parametrize("valid", ["lengths", "mask"])
@pytest.mark.parametrize("rows", [None, 3])
@pytest.mark.parametrize("saved", [True, False], ids=["saved", "recomputed"])
def test_padding_never_read(activation, valid, rows, saved, monkeypatch):
    """NaN and Inf in padded keys and padded upstream score gradients reach no output and
    no gradient; padded key positions get a zero gradient (backward reading the saved
    pre-activations, or recomputing them)."""
    monkeypatch.setattr(ta_cpu, "SAVE_PRE_ACTIVATIONS", saved)
    inp = cases.make_case(activation=activation, valid=valid, rows=rows, batch=5, seq_len=6)
    n_rows = rows or 5
    if valid == "lengths":
        pad = torch.arange(6) >= inp["lengths"].reshape(-1, 1)
    else:
        pad = ~inp["mask"]
    clean = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
             for k, v in inp.items()}
    dirty = dict(clean, keys=clean["keys"].detach().clone().requires_grad_(True))
    with torch.no_grad():
        poison = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(n_rows * 6)[: n_rows * 6]
        dirty["keys"][pad] = poison.reshape(n_rows, 6)[pad].unsqueeze(-1).expand(-1, 3)
    results = []
    for kw in (clean, dirty):
        out, a = cpu_call(**kw)
        key_index = kw.get("key_index")
        a_pad = pad if key_index is None else pad[key_index]
        ga = torch.ones_like(a).masked_fill(a_pad, float("nan"))
        (gq, gk) = torch.autograd.grad((out.sum() + (a * ga).nan_to_num(0.0).sum()), [kw["query"], kw["keys"]])
        results.append((out, a, gq, gk))
    for x, y in zip(*results):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(x, y)
    assert torch.equal(results[1][3][pad], torch.zeros_like(results[1][3][pad]))


def test_padded_score_gradient_is_ignored():
    inp = cases.make_case(valid="lengths", batch=4)
    pad = torch.arange(4) >= inp["lengths"].reshape(-1, 1)
    q = inp["query"].clone().requires_grad_(True)
    _, a = cpu_call(**dict(inp, query=q))
    ga = torch.randn_like(a)
    g1, = torch.autograd.grad(a, q, ga, retain_graph=True)
    g2, = torch.autograd.grad(a, q, ga.masked_fill(pad, float("nan")))
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("batch", [9, 45])  # fewer and more queries than accumulator blocks
def test_two_threads_give_the_same_bits_as_one(batch):
    """Dice with batch statistics: statistics, outputs and every gradient."""
    inp = cases.make_case(batch=batch, seq_len=7, activation="dice", dice_training=True, valid="mask")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            kw = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in inp.items()}
            params = [kw["query"], kw["keys"]]
            for name, value in kw.items():
                if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                    kw[name] = [t.clone().requires_grad_(True) for t in value]
                    params += kw[name]
            out, a = cpu_call(**kw)
            grads = torch.autograd.grad(out.sum() + (a * torch.linspace(0, 1, a.shape[-1])).sum(), params,
                                        allow_unused=True)
            results.append((out, a, *[g for g in grads if g is not None]))
    finally:
        torch.set_num_threads(threads)
    assert len(results[0]) == len(results[1]) > 4
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_no_grad_forward_allocates_nothing_of_size_b_t_units():
    """The fused forward keeps hidden activations in a per-thread workspace."""
    B, T, D, H = 64, 50, 8, 200
    inp = cases.make_case(batch=B, seq_len=T, dim=D, units=(H,), valid="lengths")
    big = []
    with torch.no_grad(), torch.profiler.profile(profile_memory=True) as prof:
        cpu_call(**inp)
    for ev in prof.key_averages():
        if ev.cpu_memory_usage > 4 * B * T * H // 2:
            big.append((ev.key, ev.cpu_memory_usage))
    assert not big, big


# --- shapes checked at the operator boundary ---------------------------------------------

def _train_backward_args(**change):
    """Arguments of target_attention_cpu_train_backward (Dice with batch statistics) from a
    real training forward, with `change` applied: name -> function of the correct value."""
    args, _ = _op_args(activation="dice", dtype=torch.float32)
    args = {k: (v.detach() if isinstance(v, torch.Tensor) else [t.detach() for t in v] if isinstance(v, list) else v)
            for k, v in args.items()}
    dice_eps = [1e-5, 1e-5]
    out, scores, zs, stats = OPS.target_attention_cpu_train(*args.values(), "dice", "softmax", dice_eps)
    bw = dict(grad_out=torch.ones_like(out), grad_scores=torch.ones_like(scores), scores=scores,
              pre_activations=zs, stats=stats)
    bw.update(args)
    for name, fn in change.items():
        bw[name] = fn(bw[name])
    return tuple(bw.values()) + ("dice", "softmax", dice_eps)


@pytest.mark.parametrize("name, change", [
    ("pre_activations", lambda zs: [zs[0][:, :, :2], zs[1]]),
    ("pre_activations", lambda zs: [zs[0], zs[1][..., :1]]),
    ("stats", lambda st: [st[0], st[1][:, :1]]),
    ("stats", lambda st: [st[0][..., :2], st[1]]),
    ("grad_out", lambda g: g[:1]),
    ("grad_scores", lambda g: g[..., :2]),
    ("scores", lambda s: s[:, :, :1]),
    ("out_bias", lambda b: b[:0]),
    ("biases", lambda bs: [bs[0][:, :1], bs[1]]),
    ("act_params", lambda ps: ps[:3] + [ps[3][:, :1]] + ps[4:]),
    ("lengths", lambda n: n[:1]),
])
def test_train_backward_refuses_misshaped_tensors(name, change):
    with pytest.raises(ValueError, match=name):
        OPS.target_attention_cpu_train_backward(*_train_backward_args(**{name: change}))


@pytest.mark.parametrize("name, change", [
    ("grad_out", lambda g: g[..., :1]),
    ("grad_scores", lambda g: g[:1]),
    ("scores", lambda s: s[..., :2]),
    ("weights", lambda ws: [ws[0][..., :5], ws[1]]),
    ("out_weight", lambda w: w[:, :1]),
])
def test_backward_refuses_misshaped_tensors(name, change):
    args, _ = _op_args(dtype=torch.float32)
    args = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out, scores = OPS.target_attention_cpu(*args.values(), "sigmoid", "softmax")
    bw = dict(grad_out=torch.ones_like(out), grad_scores=torch.ones_like(scores), scores=scores)
    bw.update(args)
    bw[name] = change(bw[name])
    with pytest.raises(ValueError, match=name):
        OPS.target_attention_cpu_backward(*bw.values(), "sigmoid", "softmax")


@pytest.mark.parametrize("name, value", [("key_index", [0, 2, 1]), ("key_index", [0, -1, 1]),
                                         ("lengths", [6, 1]), ("lengths", [-1, 1])])
def test_op_refuses_index_values_out_of_range(name, value):
    """Called directly (not through the public op's checks), the operator still refuses an
    index that would address memory outside keys."""
    args, _ = _op_args(dtype=torch.float32, rows=2)
    args = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    args[name] = torch.tensor(value)
    with pytest.raises(ValueError, match=name):
        OPS.target_attention_cpu(*args.values(), "sigmoid", "softmax")


def test_softmax_weight_far_below_the_maximum_is_zero():
    """e^-(max - s) underflows to 0, as std::exp does, on every instruction set."""
    keys = torch.tensor([[[0.0, 0.0], [-200.0, 1.0]]])
    weight = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    with use_backend("cpu"):
        _, scores = target_attention(torch.zeros(1, 2), keys, [weight], [torch.zeros(1)], torch.ones(1, 1),
                                     torch.zeros(1), activation="identity", normalization="softmax",
                                     return_scores=True)
    assert scores.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("default", [True, False])
def test_save_pre_activations_argument_picks_the_operator(default, monkeypatch):
    """``save_pre_activations`` overrides ``SAVE_PRE_ACTIVATIONS`` either way (the saving
    operator, or the recomputing one), with identical results; InterestEvolving's
    attention recomputes."""
    from interest_kernels.nn.gru import InterestEvolving

    monkeypatch.setattr(ta_cpu, "SAVE_PRE_ACTIVATIONS", default)
    ran = []
    real_call = ta_cpu.call
    monkeypatch.setattr(ta_cpu, "call", lambda op, *a: ran.append(op) or real_call(op, *a))
    inp = cases.make_case(valid="lengths", batch=4)
    results = []
    for save in (None, True, False):
        kw = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in inp.items()}
        out, a = cpu_call(**kw, save_pre_activations=save)
        results.append((out, a, *torch.autograd.grad(out.sum() + a.sum(), [kw["query"], kw["keys"]])))
    assert ran == [ta_cpu._TRAIN if default else ta_cpu._FORWARD, ta_cpu._TRAIN, ta_cpu._FORWARD]
    for x, y, z in zip(*results):
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(x, z)

    ran.clear()
    layer = InterestEvolving(4, "AUGRU").double()
    query, keys = torch.randn(3, 4, dtype=F64, requires_grad=True), torch.randn(3, 5, 4, dtype=F64)
    layer(query, keys, torch.tensor([5, 2, 1])).sum().backward()
    assert ran == [ta_cpu._FORWARD] and query.grad is not None


# --- the hand-written SIMD kernels ---------------------------------------------------------

# Layer widths that reach every register block of the float32 tile GEMMs (1 to 5 vectors
# of 16 columns, 64-column panels past 80, masked last vectors), keys of several widths
# (the keys' gradient is a GEMM D columns wide) and row counts with every tail height.
WIDE = {
    "d36-units-80-40": dict(dim=36, units=(80, 40)),
    "d20-units-100-16-3": dict(dim=20, units=(100, 16, 3)),
    "d17-units-64-33": dict(dim=17, units=(64, 33)),
}


@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
@pytest.mark.parametrize("case", list(WIDE))
@pytest.mark.parametrize("saved", [True, False], ids=["saved", "recomputed"])
def test_wide_layers(case, activation, saved, monkeypatch):
    monkeypatch.setattr(ta_cpu, "SAVE_PRE_ACTIVATIONS", saved)
    check(cases.make_case(batch=4, seq_len=37, activation=activation, normalization="none",
                          dice_training=activation == "dice" and saved, **WIDE[case]))


_NARROWER_ISA_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from test_target_attention_cpu import WIDE, cases, check
assert torch.backends.cpu.get_cpu_capability() == {capability!r}.upper()
for activation in ("sigmoid", "dice"):
    for valid in ("lengths", "mask"):
        check(cases.make_case(batch=4, seq_len=29, activation=activation, valid=valid,
                              dice_training=activation == "dice", **WIDE["d20-units-100-16-3"]))
"""


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_narrower_instruction_sets(capability):
    """ATEN_CPU_CAPABILITY caps the hand-written kernels as it caps torch's: the AVX2 tile
    GEMM and the BLAS path match the reference. (The compiler's target_clones variants of the
    elementwise passes are picked by the CPU itself and are not capped by this.)"""
    import os
    import subprocess
    import sys

    if capability == "avx2" and not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("no AVX2 on this CPU")
    script = _NARROWER_ISA_SCRIPT.format(tests=os.path.dirname(__file__), capability=capability)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
