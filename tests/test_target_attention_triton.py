"""Target attention (SPEC 1): the fused Triton kernels against the eager reference.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so
the shapes are small; every case compares the forward (output and scores) and every
gradient with ``check_against_reference``.
"""
from __future__ import annotations


import pytest
import torch
import torch._dynamo.testing

from interest_kernels import use_backend
from interest_kernels.ops.dice.reference import DiceParams
from interest_kernels.ops.target_attention.op import target_attention
from interest_kernels.ops.target_attention.reference import target_attention_reference
from interest_kernels.testing import check_against_reference

import target_attention_cases as cases
from target_attention_cases import call, grad_names

triton = pytest.importorskip("triton")


def make_case(**kw) -> dict:
    """float32 cases with T = 21 (one partial tile of BLOCK_T = 64 keys), D = 18 and units
    (20, 12) unless told otherwise."""
    for name, value in (("seq_len", 21), ("dim", 18), ("units", (20, 12))):
        kw.setdefault(name, value)
    return cases.make_case(**kw)


CASES = {
    "sigmoid-softmax-lengths": dict(),
    "sigmoid-none-mask": dict(normalization="none", valid="mask"),
    "relu-softmax-mask-3-layers": dict(activation="relu", valid="mask", units=(20, 10, 6)),
    "prelu-none-3-layers": dict(activation="prelu", normalization="none", units=(24, 12, 5)),
    "identity-1-layer-no-mask": dict(activation="identity", units=(17,), valid="none"),
    "dice-eval": dict(activation="dice"),
    "dice-train": dict(activation="dice", dice_training=True, valid="mask"),
    "dice-train-3-layers-none": dict(activation="dice", dice_training=True, units=(20, 12, 6),
                                     normalization="none"),
    "T1": dict(seq_len=1, batch=4),
    "T16-D36": dict(seq_len=16, dim=36, units=(40, 20)),
    "T40-mask": dict(seq_len=40, dim=8, units=(16,), valid="mask", batch=2),
    "shared-history-mask": dict(rows=3, batch=6, valid="mask", activation="relu"),
    "shared-history-lengths-none": dict(rows=2, batch=5, normalization="none"),
    "multi-head": dict(heads=2, dim=8),
    "multi-head-query-per-head-mask": dict(heads=3, query_per_head=True, valid="mask", dim=8),
    "multi-head-per-head-prelu": dict(heads=2, per_head=True, query_per_head=True,
                                      activation="prelu", dim=8),
    "multi-head-per-head-dice-train": dict(heads=2, per_head=True, activation="dice",
                                           dice_training=True, dim=8, units=(16, 6)),
    "multi-head-shared-history": dict(heads=2, rows=2, batch=4, dim=8, valid="mask"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case, device):
    inp = make_case(**CASES[case], device=device)
    check_against_reference(call(target_attention, "triton"), call(target_attention_reference),
                            inp, grad=grad_names(inp))


FLOAT16_CASES = {
    **{name: CASES[name] for name in ("sigmoid-softmax-lengths", "dice-train",
                                      "multi-head-per-head-prelu",
                                      # the data-gradient kernel sums float16's q-term gradient
                                      # (ops._launch_bwd): one layer, three layers
                                      "T40-mask", "dice-train-3-layers-none")},
    # ... and across several key tiles per row (its in-place sums)
    "T130-mask": dict(seq_len=130, dim=8, units=(20, 10), valid="mask", batch=2),
}


@pytest.mark.parametrize("case", list(FLOAT16_CASES))
def test_triton_float16(case, device):
    inp = make_case(**FLOAT16_CASES[case], device=device)
    check_against_reference(call(target_attention, "triton"), call(target_attention_reference),
                            inp, grad=grad_names(inp), dtype=torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 tl.dot needs a GPU")
@pytest.mark.parametrize("case", ["sigmoid-softmax-lengths", "shared-history-mask"])
def test_triton_bfloat16(case):
    inp = make_case(**CASES[case], device=torch.device("cuda"))
    check_against_reference(call(target_attention, "triton"), call(target_attention_reference),
                            inp, grad=grad_names(inp), dtype=torch.bfloat16)


def test_long_sequence(device):
    """Several tiles per row: T = 300 with a mask (the loop over T, not a specialisation)."""
    inp = make_case(seq_len=300, dim=8, units=(16,), batch=2, valid="mask", device=device)
    check_against_reference(call(target_attention, "triton"), call(target_attention_reference),
                            inp, grad=grad_names(inp))


def test_float32_parameters_with_half_inputs(device):
    inp = make_case(valid="mask", device=device)
    q, k = inp["query"].half(), inp["keys"].half()
    params = [inp["weights"][0].requires_grad_(True)]
    with use_backend("triton"):
        out, a = call(target_attention)(**dict(inp, query=q, keys=k))
    ref, ref_a = call(target_attention_reference)(**dict(inp, query=q.float(), keys=k.float()))
    assert out.dtype == torch.float16 and a.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(a.float(), ref_a, atol=2e-3, rtol=2e-3)
    (g,) = torch.autograd.grad(out.float().sum(), params)
    (want,) = torch.autograd.grad(ref.sum(), params)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, want, atol=2e-3, rtol=2e-3)


def test_scores_gradient_alone(device):
    """A loss on the scores only (no gradient reaches ``out``)."""
    inp = make_case(valid="mask", device=device)
    kw = {k: v for k, v in inp.items()}
    leaves = [kw["query"], kw["keys"], *kw["weights"]]
    for t in leaves:
        t.requires_grad_(True)
    with use_backend("triton"):
        _, a = target_attention(**kw, return_scores=True)
    got = torch.autograd.grad((a * a).sum(), leaves)
    _, ref_a = target_attention_reference(**kw, return_scores=True)
    want = torch.autograd.grad((ref_a * ref_a).sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_all_masked_rows_give_zeros(device):
    inp = make_case(valid="none", device=device)
    mask = torch.zeros(3, 21, dtype=torch.bool, device=device)
    with use_backend("triton"):
        out, a = target_attention(**inp, mask=mask, return_scores=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(a, torch.zeros_like(a))


def test_dice_training_updates_running_stats_like_reference(device):
    inp = make_case(activation="dice", dice_training=True, valid="mask", device=device)
    runs = {}
    for name, fn, backend in (("triton", target_attention, "triton"),
                              ("reference", target_attention_reference, None)):
        kw = dict(inp)
        training, stats = kw.pop("dice_training"), kw.pop("dice_stats")
        params = [DiceParams(kw.pop(f"dice_alpha{i}"), m.clone(), v.clone(),
                             kw.pop(f"dice_weight{i}"), kw.pop(f"dice_bias{i}"), training=training)
                  for i, (m, v) in enumerate(stats)]
        with use_backend(backend):
            fn(**kw, dice_params=params)
        runs[name] = params
    for got, want in zip(runs["triton"], runs["reference"]):
        torch.testing.assert_close(got.running_mean, want.running_mean)
        torch.testing.assert_close(got.running_var, want.running_var)
        assert not torch.equal(got.running_mean, inp["dice_stats"][0][0])


def test_no_grad_call_saves_nothing(device):
    inp = make_case(device=device)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), use_backend("triton"):
            out, a = target_attention(**inp, return_scores=True)
        # Leaves do not require grad: nothing to save even with grad mode on.
        assert out.grad_fn is None and a.grad_fn is None
    assert packed == []
    inp["keys"].requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), use_backend("triton"):
        out = target_attention(**inp)
    assert out.grad_fn is not None and packed  # the check above can fail


def test_torch_compile_fullgraph(device):
    inp = make_case(activation="prelu", valid="mask", device=device)
    kw = {k: v for k, v in inp.items()}
    kw["query"].requires_grad_(True)
    kw["weights"][0].requires_grad_(True)

    def f(query, keys, weights, biases, out_weight, out_bias, mask, prelu_weights):
        out, a = target_attention(query, keys, weights, biases, out_weight, out_bias,
                                  activation="prelu", mask=mask, prelu_weights=prelu_weights,
                                  return_scores=True)
        return out.sum() + (a * a).sum()

    args = (kw["query"], kw["keys"], kw["weights"], kw["biases"], kw["out_weight"],
            kw["out_bias"], kw["mask"], kw["prelu_weights"])
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    with use_backend("triton"):
        loss = compiled(*args)
        gq, gw = torch.autograd.grad(loss, [kw["query"], kw["weights"][0]])
        want = f(*args)
    wq, ww = torch.autograd.grad(want, [kw["query"], kw["weights"][0]])
    assert counter.frame_count == 1
    assert "interest_kernels.target_attention_fwd" in counter.graphs[0].code
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(gq, wq)
    torch.testing.assert_close(gw, ww)


@pytest.mark.parametrize("op", ["fwd", "stats", "bwd", "stats_bwd"])
def test_custom_ops_opcheck(op, device):
    """torch.library.opcheck: schema, fake tensors and the autograd registration."""
    from interest_kernels.ops.target_attention.triton import ops
    from interest_kernels.ops.target_attention.triton.pack import weight_row_size

    rows, seq_len, dim, units = 2, 5, 4, [16, 6]

    def t(*shape, grad=True):
        return torch.randn(*shape, device=device, requires_grad=grad)

    qterm, query, keys = t(rows, units[0]), t(rows, dim), t(rows, seq_len, dim)
    wpack = t(1, weight_row_size(dim, units))
    apack = torch.cat([torch.rand(1, units[0]), torch.rand(1, units[0]), torch.randn(1, units[0]),
                       torch.rand(1, 3 * units[1])], dim=1).to(device).requires_grad_(True)
    lengths = torch.tensor([5, 2], device=device)
    if op == "fwd":
        fn = ops.fwd_op
        args = (qterm, query, keys, None, lengths, None, wpack, apack, units, 1, "dice", True,
                True)
    elif op == "stats":
        fn = ops.stats_op
        args = (qterm, query, keys, None, wpack, apack[:, :3 * units[0]], units, 2, 1, "dice")
    elif op == "bwd":
        fn = ops.bwd_op
        args = (t(rows, dim, grad=False), t(rows, seq_len, grad=False), t(rows, dim, grad=False),
                t(rows, seq_len, grad=False), t(rows, grad=False), qterm.detach(),
                query.detach(), keys.detach(), None, lengths, None, wpack.detach(), None, units,
                1, "sigmoid", True)
    else:
        fn = ops.stats_bwd_op
        args = (t(1, 2, units[1], grad=False), qterm.detach(), query.detach(), keys.detach(),
                None, wpack.detach(), apack[:, :3 * units[0]].detach(), units, 2, 1, "dice")
    torch.library.opcheck(fn, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


WIDE_CASES = {
    # The widest float32 layers the kernels keep on chip (128 x 64 padded matrices), and
    # the benchmark's units (80, 40) with D = 64.
    "wide-2-layers-D40": dict(units=(128, 64), dim=40, batch=2, seq_len=19),
    "wide-3-layers-dice-train": dict(units=(100, 64, 40), dim=24, batch=2, seq_len=17,
                                     activation="dice", dice_training=True, valid="mask"),
    "bench-units-prelu-none": dict(units=(80, 40), dim=64, batch=2, seq_len=70,
                                   activation="prelu", normalization="none"),
    "wide-per-head-shared-history": dict(units=(40, 20, 36), heads=2, per_head=True, rows=2,
                                         batch=3, dim=8, seq_len=17, activation="relu"),
    # one layer wider than the weight-gradient kernel's 64-unit chunks (dz1 read per chunk)
    "one-layer-two-unit-chunks": dict(units=(72,), dim=16, batch=3, seq_len=9, valid="mask",
                                      activation="prelu"),
}


@pytest.mark.parametrize("case", list(WIDE_CASES))
def test_wide_layers(case, device):
    inp = make_case(**WIDE_CASES[case], device=device)
    check_against_reference(call(target_attention, "triton"), call(target_attention_reference),
                            inp, grad=grad_names(inp))


def test_wide_layers_float16(device):
    """float16 through the data-gradient kernel's two first-layer chunks (80 = 64 + 16
    units) and the weight-gradient kernel's two programs per unit chunk."""
    inp = make_case(**dict(WIDE_CASES["bench-units-prelu-none"], seq_len=21), device=device)
    check_against_reference(call(target_attention, "triton"), call(target_attention_reference),
                            inp, grad=grad_names(inp), dtype=torch.float16)


TAIL_CHUNK_CASES = {
    # the weight-gradient kernel's second unit chunk at its own padded width (16) and
    # program count; every gradient (W_kd, W_p, W_2, query, q-term) checked
    "tail-16-of-80-two-layers": dict(units=(80, 40), dim=16, batch=5, seq_len=9),
    "tail-8-of-72-two-layers-mask": dict(units=(72, 8), dim=8, batch=3, seq_len=5,
                                         valid="mask"),
    "tail-16-of-80-one-layer": dict(units=(80,), dim=8, batch=4, seq_len=7),
    "tail-8-of-72-one-layer-B1": dict(units=(72,), dim=8, batch=1, seq_len=5, valid="none"),
    "tail-per-head-shared-history": dict(units=(72, 8), heads=2, per_head=True, rows=2,
                                         batch=3, dim=8, seq_len=5),
    "tail-shared-mlp-3-heads-mask": dict(units=(72, 8), heads=3, batch=3, dim=8, seq_len=5,
                                         valid="mask"),
    "tail-dice-train": dict(units=(80, 40), activation="dice", dice_training=True, dim=8,
                            batch=4, seq_len=6),
    "tail-three-layers-prelu": dict(units=(80, 24, 8), activation="prelu", dim=8, batch=3,
                                    seq_len=5),
}


@pytest.mark.parametrize("case", list(TAIL_CHUNK_CASES))
def test_tail_unit_chunk(case, device):
    inp = make_case(**TAIL_CHUNK_CASES[case], device=device)
    check_against_reference(call(target_attention, "triton"), call(target_attention_reference),
                            inp, grad=grad_names(inp))


def test_unit_chunk_program_counts(monkeypatch):
    """The weight-gradient kernel's grid: at the benchmark (B 256, 80 = 64 + 16 units) the
    tail chunk takes 32 programs of 8 rows beside chunk 0's 64 of 4 (bfloat16, whose
    gradient dots are 16-bit too and so cheaper next to the reads: 37 of 7); for any batch each
    chunk has 1 to B programs and the tail's busiest program costs no more than chunk
    0's (``_chunk_row_cost`` per row); one chunk gets the whole grid."""
    from interest_kernels.ops.target_attention.triton import config, ops

    monkeypatch.delenv(config.FP32_DOTS_ENV, raising=False)  # the counts below are TF32's
    cpu = torch.device("cpu")
    for dtype, tail in ((torch.float32, 32), (torch.float16, 32), (torch.bfloat16, 37)):
        keys = torch.empty(1, 1, 64, dtype=dtype)
        flags = ops._flags(keys, None, torch.empty(1, 1), (80, 40), "sigmoid")
        assert ops._chunk_programs(256, 1, cpu, [80, 40], 2, 64, dtype, flags) == (64, tail)
        for units, layers in (([80, 40], 2), ([72], 1), ([128, 8], 2)):
            costs = [ops._chunk_row_cost(ops.pad(n), 64, units[1] if layers > 1 else n,
                                         layers, dtype, flags)
                     for n in (64, units[0] - 64)]
            for batch in (1, 2, 3, 63, 64, 65, 130, 131, 257, 1000):
                p0, p1 = ops._chunk_programs(batch, 1, cpu, units, layers, 64, dtype, flags)
                assert 1 <= p1 <= p0 <= min(batch, 66)
                assert -(-batch // p1) * costs[1] <= -(-batch // p0) * costs[0]
        assert ops._chunk_programs(132, 1, cpu, [64, 40], 2, 64, dtype, flags) == (132, 0)
    # a symbolic batch (torch.compile / export with dynamic shapes) stays symbolic: no guard
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    batch = env.create_unspecified_symint_and_symbol(256, ConstantSource("batch"),
                                                     DimDynamic.DYNAMIC)
    bf16 = torch.bfloat16
    flags = ops._flags(torch.empty(1, 1, 64, dtype=bf16), None, torch.empty(1, 1), (80, 40),
                       "sigmoid")
    progs = ops._chunk_programs(batch, 1, cpu, [80, 40], 2, 64, bf16, flags)
    assert env.guards == []
    assert [int(p.node.expr.subs(batch.node.expr, 256)) for p in progs] == [64, 37]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU")
@pytest.mark.parametrize("units,dim,dtype", [
    ((128, 64, 32), 64, torch.float32), ((100, 64), 36, torch.float32),
    ((80, 40), 64, torch.float32), ((128, 64, 32), 128, torch.bfloat16),
    ((80, 40), 128, torch.bfloat16)])
def test_wide_layers_gpu(units, dim, dtype):
    """Benchmark-sized widths, compiled."""
    inp = make_case(units=units, dim=dim, batch=5, seq_len=70, valid="mask",
                    device=torch.device("cuda"))
    check_against_reference(call(target_attention, "triton"), call(target_attention_reference),
                            inp, grad=grad_names(inp), dtype=dtype)


def test_unsupported_calls_are_declined_with_a_reason():
    from interest_kernels.ops.target_attention.triton import unsupported_reason

    for device in (torch.device("cuda"), torch.device("cpu")):  # one rule for both
        for units in [(80, 40), (64, 16), (128, 64), (128, 64, 32), (17,), (32, 128, 128)]:
            for dim in (18, 36, 64, 128):
                assert unsupported_reason(dtype=torch.bfloat16, num_layers=len(units),
                                          hidden_units=units, dim=dim, device=device) is None
        for dim in (18, 32, 64):
            assert unsupported_reason(dtype=torch.float32, num_layers=2, hidden_units=(80, 40),
                                      dim=dim, device=device) is None
        assert "16384 padded weight-matrix elements in torch.float32" in unsupported_reason(
            dtype=torch.float32, num_layers=2, hidden_units=(80, 40), dim=128, device=device)
        assert "need 20480" in unsupported_reason(
            dtype=torch.float16, num_layers=3, hidden_units=(128, 64, 64), dim=64, device=device)
        assert "need 40960" in unsupported_reason(
            dtype=torch.bfloat16, num_layers=3, hidden_units=(128, 80, 40), dim=128,
            device=device)
        assert "float64" in unsupported_reason(dtype=torch.float64, num_layers=1)
        assert "hidden layers" in unsupported_reason(dtype=torch.float32, num_layers=4)
        assert "D up to" in unsupported_reason(dtype=torch.float32, num_layers=2,
                                               hidden_units=(80, 40), dim=130, device=device)
        assert "units" in unsupported_reason(dtype=torch.float16, num_layers=2,
                                             hidden_units=(80, 200), dim=64, device=device)


def test_declined_widths_run_on_the_next_backend(device):
    """A layer too wide to keep on chip is declined with a reason; the op still runs."""
    from interest_kernels._backend import BackendUnavailableError

    inp = make_case(units=(200,), dim=4, batch=2, seq_len=3, device=device)
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="128 units"):
        call(target_attention)(**inp)
    ref = call(target_attention_reference)(**inp)
    out = call(target_attention)(**inp)
    torch.testing.assert_close(out, ref)


def _host_reads_fail(m):
    """Make every Python-level read of a tensor value back to the host raise."""
    def host_read(*_, **__):
        raise AssertionError("a tensor value was read back to the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        m.setattr(torch.Tensor, name, host_read)


def test_device_value_checks_never_synchronise(device, monkeypatch):
    """On CUDA the range checks of lengths and key_index run on the device. With them
    treated so here, a forward and backward (shared history, lengths, Dice training)
    reads no tensor value back to the host, and a bad value still stops the call
    (torch._assert_async, which raises at once on CPU)."""
    from interest_kernels import _validation

    monkeypatch.setattr(_validation, "checks_on_device", lambda t: True)
    inp = make_case(rows=3, batch=5, activation="dice", dice_training=True, device=device)
    leaves = [inp["query"], inp["keys"], *inp["weights"]]
    for t in leaves:
        t.requires_grad_(True)
    with monkeypatch.context() as m, use_backend("triton"):
        _host_reads_fail(m)
        out, a = call(target_attention)(**inp)
        grads = torch.autograd.grad((out.sum(), a.sum()), leaves)
    assert all(g is not None for g in grads)
    for name, bad in (("lengths", inp["lengths"].clone().fill_(22)),
                      ("key_index", inp["key_index"].clone().fill_(-1))):
        with monkeypatch.context() as m, use_backend("triton"), \
                pytest.raises(RuntimeError, match=f"{name} must lie in"):
            _host_reads_fail(m)
            call(target_attention)(**dict(inp, **{name: bad}))


def test_sync_value_checks_raise_a_value_error(device):
    from interest_kernels import value_checks

    inp = make_case(device=device)
    inp["lengths"][1] = 22
    with value_checks("sync"), use_backend("triton"), \
            pytest.raises(ValueError, match="lengths must lie in .* found 22"):
        call(target_attention)(**inp)


def test_launch_matches_the_gpu(device, monkeypatch):
    """Under the interpreter the kernels launch with an H200's persistent grid (at most
    132 programs over the rows, no more than keep the busiest program's row count: 150
    rows take 75 programs of 2) and the GPU's tiles and warps. (The launches are
    recorded, not run: 132 interpreted programs take half a minute.)"""
    from interest_kernels.ops.target_attention.triton import config, ops

    launches = []
    names = ["attention_fwd_kernel", "attention_bwd_kernel", "first_layer_grad_kernel"]
    for name in names:
        kernel = getattr(ops, name)

        class Recorder:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                def launch(*args, **kw):
                    launches.append((self.name, grid, kw))
                return launch

        monkeypatch.setattr(ops, name, Recorder(kernel, name))
    inp = make_case(batch=150, seq_len=3, dim=4, units=(8,), device=device)
    inp["keys"].requires_grad_(True)
    out, _ = call(target_attention, "triton")(**inp)
    out.sum().backward()
    assert [n for n, _, _ in launches] == names
    sms = config.num_sms(inp["keys"].device)
    busiest = -(-150 // min(150, sms))  # rows of the busiest program at one program per SM
    for name, grid, kw in launches:
        warps = 4 if name == "attention_bwd_kernel" else 8  # config.DATA_GRAD_WARPS
        assert grid == (-(-150 // busiest), 1)
        assert sms != 132 or grid[0] == 75
        assert (kw["BLOCK_T"], kw["num_warps"], kw["num_stages"]) == (64, warps, 1)
    assert config.num_sms(torch.device("cpu")) == 132


def test_fp32_dot_precision_switch(device, monkeypatch):
    """TF32 by default for float32 inputs, IEEE on request; the IEEE path runs here.

    Tolerances: the interpreter's dots are exact, so every path meets float32's (rtol
    1e-5). On a GPU, TF32 rounds each operand to 10 mantissa bits (unit roundoff 2^-11,
    about 5e-4) and accumulates in float32, so test_fp32_tf32_gpu holds TF32 results to
    5e-3 relative and 5e-3 times the largest reference magnitude: ten unit roundoffs
    for two or three chained dots, the softmax and the pooling."""
    from interest_kernels.ops.target_attention.triton import config

    monkeypatch.delenv(config.FP32_DOTS_ENV, raising=False)
    assert config.launch_config(torch.empty(0), (8,), 4)["PREC"] == "tf32"
    monkeypatch.setenv(config.FP32_DOTS_ENV, "bogus")
    with pytest.raises(ValueError, match="tf32"):
        config.fp32_dot_precision()
    monkeypatch.setenv(config.FP32_DOTS_ENV, "ieee")
    assert config.launch_config(torch.empty(0), (8,), 4)["PREC"] == "ieee"
    inp = make_case(valid="mask", activation="relu", device=device)
    check_against_reference(call(target_attention, "triton"), call(target_attention_reference),
                            inp, grad=grad_names(inp))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 needs a GPU")
def test_fp32_tf32_gpu(monkeypatch):
    from interest_kernels.ops.target_attention.triton import config
    from interest_kernels.testing import Tolerance

    monkeypatch.delenv(config.FP32_DOTS_ENV, raising=False)
    inp = make_case(units=(80, 40), dim=64, batch=6, seq_len=70, valid="mask",
                    device=torch.device("cuda"))
    check_against_reference(call(target_attention, "triton"), call(target_attention_reference),
                            inp, grad=grad_names(inp),
                            tol=Tolerance(rtol=5e-3, atol=5e-3, ratio=None))


def test_every_dot_has_64_rows_at_the_benchmark_widths(device, monkeypatch):
    """Units (80, 40) with D = 64: every tl.dot of the forward and backward kernels
    (counted under the interpreter) has M >= 64, fp32 and fp16."""
    if device.type != "cpu":
        pytest.skip("counts the interpreter's dots")
    from triton.runtime import interpreter

    shapes = []
    real_dot = interpreter.InterpreterBuilder.create_dot

    def counting_dot(self, a, b, d, *args):
        shapes.append(a.data.shape[-2:] + b.data.shape[-1:])
        return real_dot(self, a, b, d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting_dot)
    for dtype in (torch.float32, torch.float16):
        inp = make_case(units=(80, 40), dim=64, batch=2, seq_len=64, device=device)
        q = inp["query"].to(dtype).requires_grad_(True)
        k = inp["keys"].to(dtype).requires_grad_(True)
        out, _ = call(target_attention, "triton")(**dict(inp, query=q, keys=k))
        out.float().sum().backward()
    assert shapes and min(m for m, _, _ in shapes) >= 64, sorted(set(shapes))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_forward_and_backward_capture_in_a_cuda_graph():
    """No host synchronisation: a forward and backward (shared history, lengths) is
    captured in a CUDA graph and replays to the eager result."""
    dev = torch.device("cuda")
    inp = make_case(rows=3, batch=5, units=(80, 40), dim=64, seq_len=70, device=dev)
    kw = dict(inp, return_scores=False)
    w = kw["weights"][0].requires_grad_(True)
    k = kw["keys"].requires_grad_(True)

    def step():
        out = target_attention(**kw)
        return (out,) + torch.autograd.grad(out.square().sum(), [w, k])

    with use_backend("triton"):
        want = step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up (compiles the kernels) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = step()
    graph.replay()
    torch.cuda.synchronize()
    for g, x in zip(got, want):
        torch.testing.assert_close(g, x)
