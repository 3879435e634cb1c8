"""DIN, DIEN and DMIN compose with PyTorch's program transforms, on CPU:

* ``torch.compile(fullgraph=True)`` of the forward, and of the loss whose backward then
  runs the compiled backward graph: the dense gradients and the rows MBAEmbedding hands
  to the MBA optimisers equal eager's (backend ``aot_eager``: it traces exactly what
  Inductor would receive; Inductor itself takes minutes per model on this machine);
* ``torch.func.grad`` (dense gradients everywhere, tables included) and ``vmap``, on the
  fused C++ operators (``ops/func_transforms.py``) against the reference backend;
* ``torch.jit.trace`` of the plain-tensor scoring module, checked on other shapes;
* ``torch.onnx.export`` with onnxruntime (the ``onnx`` extra), when installed.

Models with ``embedding="torch"`` (``nn.Embedding(sparse=True)`` tables) compile for
training too: under compilation their lookups accumulate the sparse gradient outside the
graph (``nn/sparse_embedding.py``), equal to eager's. They do not take
``torch.func.grad``: PyTorch's transforms do not support sparse gradients.
"""
import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from interest_kernels.data import Batch
from interest_kernels.export import SCORE_INPUTS, ScoringModule
from interest_kernels.models import DIEN, DIN, DMIN
from interest_kernels.optim._rows import take_rows
from test_models import TINY, _batch, _spec

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [pytest.param(DIN, id="din"), pytest.param(DIEN, id="dien"), pytest.param(DMIN, id="dmin")]


def _model(cls, backend="fused", **kwargs):
    torch.manual_seed(0)
    extra = {"dropout": 0.0} if cls is DMIN else {}  # compiled and eager dropout draw differently
    return cls(_spec(), backend=backend, **TINY[cls], **extra, **kwargs)


def _score_args(batch: Batch) -> tuple:
    return tuple(getattr(batch, name) for name in SCORE_INPUTS)


def _restart_sampler(model) -> None:
    if hasattr(model, "sampler"):
        model.sampler.generator.manual_seed(11)


def _dense_grads_and_rows(model, loss_fn, batch):
    """Dense parameter gradients and, per table, the (ids, rows) MBAEmbedding recorded."""
    model.zero_grad(set_to_none=True)
    _restart_sampler(model)
    loss_fn(batch).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    rows = {}
    for name, p in model.named_parameters():
        taken = take_rows(p)
        if taken:
            rows[name] = (torch.cat([r.ids.reshape(-1) for r in taken]),
                          torch.cat([r.grad_rows for r in taken]))
    return grads, rows


@pytest.mark.parametrize("cls", MODELS)
def test_compiled_forward_matches_eager(cls):
    torch._dynamo.reset()
    model = _model(cls).eval()
    batch = _batch(_spec())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch).logits, model(batch).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", MODELS)
def test_compiled_loss_backward_matches_eager(cls):
    torch._dynamo.reset()
    model = _model(cls).train()
    batch = _batch(_spec())
    loss = lambda b: model.loss(b)[0]  # noqa: E731
    eager_grads, eager_rows = _dense_grads_and_rows(model, loss, batch)
    compiled_grads, compiled_rows = _dense_grads_and_rows(
        model, torch.compile(loss, fullgraph=True, backend="aot_eager"), batch)
    assert set(compiled_grads) == set(eager_grads) and len(eager_grads) > 0
    for name, g in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert set(compiled_rows) == set(eager_rows) == {name for name, _ in model.named_parameters()
                                                     if name.endswith("embedding.weight") or "embeddings." in name}
    for name, (ids, rows) in eager_rows.items():
        torch.testing.assert_close(compiled_rows[name][0], ids, rtol=0, atol=0)
        torch.testing.assert_close(compiled_rows[name][1], rows, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("cls", MODELS)
def test_compiled_loss_with_dynamic_shapes(cls):
    """``dynamic=True`` (sizes and float attributes traced symbolically): the loss equals
    eager's at two batch sizes and history lengths, with no recompilation."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    spec = _spec()
    model = _model(cls).train()
    loss = lambda b: model.loss(b)[0]  # noqa: E731
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for b, t in ((6, 5), (9, 7)):
        batch = _batch(spec, b, t)
        _restart_sampler(model)
        got = compiled(batch)
        _restart_sampler(model)
        torch.testing.assert_close(got, loss(batch), rtol=1e-5, atol=1e-6)
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[1] == frames[0]


@pytest.mark.parametrize("cls", [DIEN])
def test_compiled_training_with_torch_embeddings_matches_eager(cls):
    """embedding="torch": the compiled loss's backward leaves the sparse table gradients
    eager leaves (same rows, uncoalesced), and equal dense gradients. DIEN: its tables
    also feed the negative sampler and the auxiliary loss (DIN and DMIN pass too, ~4 s
    each)."""
    grads = []
    for compile_ in (False, True):
        torch._dynamo.reset()
        model = _model(cls, embedding="torch").train()
        loss = lambda b: model.loss(b)[0]  # noqa: E731
        _restart_sampler(model)
        (torch.compile(loss, fullgraph=True, backend="aot_eager") if compile_ else loss)(_batch(_spec())).backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    eager, compiled = grads
    assert set(compiled) == set(eager)
    assert any(g.is_sparse for g in eager.values())
    for name, g in eager.items():
        assert compiled[name].is_sparse == g.is_sparse, name
        if g.is_sparse:
            assert compiled[name]._nnz() == g._nnz(), name
            g, compiled[name] = g.to_dense(), compiled[name].to_dense()
        torch.testing.assert_close(compiled[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture
def fused_calls(monkeypatch):
    """The operators run under torch.func through ops/func_transforms.py, by name."""
    from interest_kernels.ops import func_transforms

    names = []
    apply = func_transforms._TransformableCall.apply

    def counting(target, *args):
        names.append(target.op.name())
        return apply(target, *args)

    monkeypatch.setattr(func_transforms._TransformableCall, "apply", counting)
    return names


def _fused_families(cls) -> set:
    """The fused C++ operator families a model's forward must go through."""
    families = {"interest_kernels::target_attention_cpu"}
    return families | {"interest_kernels::gru_scan_forward"} if cls is DIEN else families


def _families_called(names) -> set:
    """Operator names with the training/inference variant suffix dropped
    (``target_attention_cpu_train`` counts as ``target_attention_cpu``)."""
    return {name.removesuffix("_train") for name in names}


@pytest.mark.parametrize("cls", MODELS)
def test_func_grad_equals_autograd_of_the_reference(cls, fused_calls):
    """torch.func.grad through the fused C++ operators (the default CPU backend) equals
    autograd of the same model on the reference backend."""
    model = _model(cls).train()
    reference = _model(cls, backend="reference").train()
    batch = _batch(_spec())
    target_loss = lambda out: F.binary_cross_entropy_with_logits(out.logits, batch.label)  # noqa: E731
    dense, rows = _dense_grads_and_rows(reference, lambda b: target_loss(reference(b)), batch)

    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # Dice updates its statistics

    def loss(p, b):
        return target_loss(functional_call(model, (p, b), (batch,), strict=True))

    _restart_sampler(model)
    grads = torch.func.grad(loss)(params, buffers)
    assert _families_called(fused_calls) >= _fused_families(cls)
    for name, p in model.named_parameters():
        if name in rows:  # an MBA table: dense gradient = recorded rows summed by id
            ids, grad_rows = rows[name]
            want = torch.zeros_like(p).index_add_(0, ids, grad_rows)
            want[0] = 0  # padding_idx
        else:
            want = dense.get(name, torch.zeros_like(p))
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("cls", MODELS)
def test_vmap_over_requests_equals_the_batch(cls, fused_calls):
    """vmap of one request through the fused C++ operators equals the reference batch."""
    model = _model(cls).eval()
    batch = _batch(_spec())
    one = lambda *row: model(Batch(*(t[None] for t in row))).logits[0]  # noqa: E731
    with torch.no_grad():
        want = _model(cls, backend="reference").eval()(batch).logits
        torch.testing.assert_close(torch.func.vmap(one)(*batch), want, rtol=1e-5, atol=1e-6)
    assert _families_called(fused_calls) >= _fused_families(cls)


@pytest.mark.parametrize("cls", MODELS)
def test_jit_trace_of_the_scoring_module_runs_other_shapes(cls):
    scoring = ScoringModule(_model(cls))
    with torch.no_grad():
        traced = torch.jit.trace(scoring, _score_args(_batch(_spec(), b=4, t=5)), check_trace=False)
        for b, t in ((6, 7), (2, 3)):
            args = _score_args(_batch(_spec(), b=b, t=t))
            torch.testing.assert_close(traced(*args), scoring(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", MODELS)
def test_onnx_export_runs_in_onnxruntime(cls, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra: pip install interest_kernels[onnx]")
    from interest_kernels.export import export_onnx

    scoring = ScoringModule(_model(cls))
    path = str(tmp_path / "model.onnx")
    if cls is DIEN:
        with pytest.raises(NotImplementedError, match="without an ONNX form"):
            export_onnx(scoring.model, path)
        return
    export_onnx(scoring.model, path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b, t in ((6, 7), (3, 2)):
        args = _score_args(_batch(_spec(), b=b, t=t))
        got = session.run(None, {name: a.numpy() for name, a in zip(SCORE_INPUTS, args)})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), scoring(*args), rtol=1e-5, atol=1e-6)


def test_registered_ops_pass_opcheck():
    weight = torch.randn(7, 3, requires_grad=True)
    ids = torch.tensor([[1, 0, 4], [6, 6, 2]])
    torch.library.opcheck(torch.ops.interest_kernels.mba_embedding_lookup.default, (weight, ids, 0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    take_rows(weight)  # forget the rows opcheck's backward passes recorded
    sampler = DIEN(_spec(), **TINY[DIEN]).sampler
    torch.library.opcheck(torch.ops.interest_kernels.sample_negative_items.default,
                          (sampler.key, 30, [2, 3], torch.device("cpu")), test_utils=("test_schema", "test_faketensor"))
