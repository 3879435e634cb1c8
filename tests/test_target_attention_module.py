"""``TargetAttention`` module: against the functional reference, checkpoints,
converters from DeepCTR-Torch / FuxiCTR, torch.compile, torch.export and torch.jit.trace."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from interest_kernels import use_backend
from interest_kernels.nn.target_attention import TargetAttention
from interest_kernels.ops.dice.reference import DiceParams
from interest_kernels.ops.target_attention import target_attention_reference

from peers import load_deepctr, load_fuxictr


def _randomize(module: nn.Module, std: float = 0.5) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


MODULE_CASES = {
    "sigmoid": dict(hidden_units=(8, 6)),
    "prelu-none": dict(hidden_units=(8,), activation="prelu", normalization="none"),
    "prelu-shared-3": dict(hidden_units=(8, 6, 4), activation="prelu", prelu_shared=True),
    "dice": dict(hidden_units=(8, 6), activation="dice"),
    "heads-per-head-prelu": dict(hidden_units=(8, 6), activation="prelu", num_heads=2, per_head_mlp=True),
    "heads-per-head-dice": dict(hidden_units=(8,), activation="dice", num_heads=2, per_head_mlp=True),
}


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_matches_functional_reference(case):
    cfg = MODULE_CASES[case]
    D, B, T = 4, 5, 6
    mod = TargetAttention(D, return_scores=True, **cfg)
    _randomize(mod)
    heads = cfg.get("num_heads")
    q = torch.randn(B, heads, D) if heads else torch.randn(B, D)
    k = torch.randn(B, heads, T, D) if heads else torch.randn(B, T, D)
    lengths = torch.tensor([0, 6, 3, 1, 5])

    lead = (heads,) if cfg.get("per_head_mlp") else ()
    kw = {}
    if mod.prelu is not None:
        kw["prelu_weights"] = [
            p.weight.reshape(lead + (-1,)) if p.weight.numel() > 1 else p.weight for p in mod.prelu
        ]
    if mod.dice is not None:
        kw["dice_params"] = [
            DiceParams(d.alpha, d.running_mean.clone(), d.running_var.clone(), d.weight, d.bias,
                       training=True, momentum=d.momentum, eps=d.eps)
            for d in mod.dice
        ]
    out, a = mod(q, k, lengths)
    ref_out, ref_a = target_attention_reference(
        q, k, [m.weight for m in mod.layers], [m.bias for m in mod.layers], mod.score.weight,
        mod.score.bias, activation=mod.activation, normalization=mod.normalization,
        lengths=lengths, return_scores=True, **kw,
    )
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(a, ref_a)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    if mod.dice is not None:  # training mode updated the buffers as the reference did
        for d, p in zip(mod.dice, kw["dice_params"]):
            torch.testing.assert_close(d.running_mean, p.running_mean)


def test_module_query_shapes_and_lengths_column():
    mod = TargetAttention(4, (8,))
    q, k = torch.randn(3, 4), torch.randn(3, 5, 4)
    lengths = torch.tensor([1, 5, 2])
    out = mod(q, k, lengths)
    assert out.shape == (3, 4)
    torch.testing.assert_close(mod(q.unsqueeze(1), k, lengths.unsqueeze(1)), out)
    # shared history: two users, three candidates
    out_shared = mod(q, k[:2], torch.tensor([1, 5]), key_index=torch.tensor([0, 1, 1]))
    torch.testing.assert_close(out_shared, mod(q, k[[0, 1, 1]], torch.tensor([1, 5, 5])))


def test_state_dict_round_trip():
    src = TargetAttention(4, (8, 6), activation="dice", dice_affine=True)
    _randomize(src)
    src(torch.randn(3, 4), torch.randn(3, 5, 4))  # moves the running statistics
    dst = TargetAttention(4, (8, 6), activation="dice", dice_affine=True)
    dst.load_state_dict(src.state_dict())
    assert {"layers.0.weight", "score.weight", "dice.0.running_mean", "dice.1.alpha"} <= set(src.state_dict())
    src.eval(), dst.eval()
    q, k = torch.randn(3, 4), torch.randn(3, 5, 4)
    torch.testing.assert_close(src(q, k), dst(q, k))


def test_constructor_rejects_bad_config():
    with pytest.raises(ValueError, match="hidden_units must hold 1 to 3"):
        TargetAttention(4, (8, 8, 8, 8))
    with pytest.raises(ValueError, match="activation must be one of"):
        TargetAttention(4, activation="tanh")
    with pytest.raises(ValueError, match="per_head_mlp=True needs num_heads"):
        TargetAttention(4, per_head_mlp=True)


# --- converters ----------------------------------------------------------------------------

def _compare_with_grads(peer_fn, ours_fn, q, k):
    qp, kp = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = q.clone().requires_grad_(), k.clone().requires_grad_()
    expected, got = peer_fn(qp, kp), ours_fn(qo, ko)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(expected)
    expected.backward(g)
    got.backward(g)
    torch.testing.assert_close(qo.grad, qp.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko.grad, kp.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.peers
@pytest.mark.parametrize("activation", ["sigmoid", "prelu", "dice"])
@pytest.mark.parametrize("weight_normalization,return_score", [(True, False), (False, True)])
def test_from_deepctr(activation, weight_normalization, return_score):
    seq = load_deepctr("deepctr_torch.layers.sequence")
    D = 4
    peer = seq.AttentionSequencePoolingLayer(att_hidden_units=(8, 6), att_activation=activation,
                                             weight_normalization=weight_normalization,
                                             return_score=return_score, embedding_dim=D)
    _randomize(peer)
    ours = TargetAttention.from_deepctr(peer)
    keys_length = torch.tensor([[1], [5], [3], [2]])

    def ours_fn(q, k):
        res = ours(q, k, keys_length)
        return (res[1] if return_score else res).unsqueeze(1)

    _compare_with_grads(lambda q, k: peer(q, k, keys_length), ours_fn, torch.randn(4, 1, D), torch.randn(4, 5, D))


@pytest.mark.peers
@pytest.mark.parametrize("activation", ["ReLU", "PReLU", "Dice"])
@pytest.mark.parametrize("use_softmax", [True, False])
def test_from_fuxictr(activation, use_softmax):
    fx = load_fuxictr("fuxictr.pytorch.layers.attentions.target_attention")
    D = 4
    peer = fx.DIN_Attention(embedding_dim=D, attention_units=[8, 6], hidden_activations=activation,
                            use_softmax=use_softmax)
    _randomize(peer)
    ours = TargetAttention.from_fuxictr(peer)
    mask = torch.rand(4, 5) > 0.4
    mask[:, 1] = True
    _compare_with_grads(lambda q, k: peer(q, k, mask.float()), lambda q, k: ours(q, k, mask=mask),
                        torch.randn(4, D), torch.randn(4, 5, D))
    if activation == "Dice":  # eval mode uses the copied running statistics
        peer.eval(), ours.eval()
        q, k = torch.randn(4, D), torch.randn(4, 5, D)
        torch.testing.assert_close(ours(q, k, mask=mask), peer(q, k, mask.float()), atol=1e-5, rtol=1e-5)


@pytest.mark.peers
@pytest.mark.parametrize("kwargs,match", [
    (dict(dropout_rate=0.1), "dropout"),
    (dict(batch_norm=True), "batch_norm"),
    (dict(output_activation="Sigmoid"), "output_activation"),
    (dict(hidden_activations=["ReLU", "Sigmoid"]), "different activations"),
    (dict(hidden_activations="Tanh"), "Tanh is not supported"),
])
def test_from_fuxictr_rejects_what_it_cannot_reproduce(kwargs, match):
    fx = load_fuxictr("fuxictr.pytorch.layers.attentions.target_attention")
    peer = fx.DIN_Attention(embedding_dim=4, attention_units=[8, 6], **kwargs)
    with pytest.raises(ValueError, match=match):
        TargetAttention.from_fuxictr(peer)


# --- torch.compile -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    mod = TargetAttention(4, (8, 6), activation="dice", return_scores=True)
    _randomize(mod, 0.3)
    q, k = torch.randn(3, 4), torch.randn(3, 5, 4)
    lengths = torch.tensor([0, 5, 2])
    with use_backend(backend):
        eager_out, eager_a = mod(q, k, lengths=lengths)
        compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
        out, a = compiled(q, k, lengths=lengths)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(a, eager_a)
    (out.sum() + a.sum()).backward()
    assert mod.layers[0].weight.grad is not None and torch.isfinite(mod.layers[0].weight.grad).all()


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_compile_dynamic_shapes(backend):
    """``dynamic=True`` makes D symbolic too: the backend choice specialises on it (once),
    while a new batch size and history length reuse the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    mod = TargetAttention(4, (80, 40), return_scores=True)  # two first-layer unit chunks
    _randomize(mod, 0.3)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mod, fullgraph=True, dynamic=True, backend=counter)
    with use_backend(backend):
        for batch, seq in ((3, 5), (6, 9)):
            q, k = torch.randn(batch, 4), torch.randn(batch, seq, 4, requires_grad=True)
            lengths = torch.randint(0, seq + 1, (batch,))
            results = []
            for fn in (compiled, mod):
                mod.zero_grad(set_to_none=True)
                k.grad = None
                out, scores = fn(q, k, lengths=lengths)
                (out.square().sum() + scores.sum()).backward()
                results.append([out, scores, k.grad] + [p.grad for p in mod.parameters()])
            for x, y in zip(*results):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


# --- graph capture on CPU: nothing data-dependent in Python ------------------------------

CAPTURE_CASES = {
    "sigmoid-lengths": (dict(hidden_units=(8, 6)), "lengths"),
    "dice-train-mask": (dict(hidden_units=(8, 6), activation="dice"), "mask"),
    "prelu-heads-mask": (dict(hidden_units=(8,), activation="prelu", num_heads=2, per_head_mlp=True), "mask"),
}


def _capture_inputs(heads, valid, B=4, T=6, D=4):
    q = torch.randn(B, D)
    k = torch.randn(B, heads, T, D) if heads else torch.randn(B, T, D)
    if valid == "lengths":
        return q, k, dict(lengths=torch.tensor([0, T, 2, 1])[:B] if B == 4 else torch.randint(0, T + 1, (B,)))
    mask = torch.rand(B, T) > 0.3
    mask[0] = False
    return q, k, dict(mask=mask)


@pytest.mark.parametrize("case", list(CAPTURE_CASES))
def test_compile_fullgraph_cpu_backend(case):
    cfg, valid = CAPTURE_CASES[case]
    torch._dynamo.reset()
    mod = TargetAttention(4, return_scores=True, **cfg).eval()
    _randomize(mod, 0.3)
    mod.train(cfg.get("activation") == "dice")
    q, k, kw = _capture_inputs(cfg.get("num_heads"), valid)
    with use_backend("cpu"):
        eager = mod(q, k, **kw)
        compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")(q, k, **kw)
    for x, y in zip(compiled, eager):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("case", list(CAPTURE_CASES))
def test_export_dynamic_batch_and_length(case):
    cfg, valid = CAPTURE_CASES[case]
    mod = TargetAttention(4, return_scores=True, **cfg).eval()
    _randomize(mod, 0.3)
    heads = cfg.get("num_heads")
    q, k, kw = _capture_inputs(heads, valid, B=4, T=6)
    batch, seq = torch.export.Dim("batch", min=2), torch.export.Dim("seq", min=2)
    kdims = {0: batch, 2: seq} if heads else {0: batch, 1: seq}
    vdims = {0: batch} if valid == "lengths" else {0: batch, 1: seq}
    name = next(iter(kw))
    with use_backend("cpu"):
        ep = torch.export.export(mod, (q, k), kw,
                                 dynamic_shapes={"query": {0: batch}, "keys": kdims, name: vdims})
        q2, k2, kw2 = _capture_inputs(heads, valid, B=7, T=9)
        got = ep.module()(q2, k2, **kw2)
        want = mod(q2, k2, **kw2)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("case", list(CAPTURE_CASES))
def test_jit_trace(case):
    cfg, valid = CAPTURE_CASES[case]
    mod = TargetAttention(4, return_scores=True, **cfg).eval()
    _randomize(mod, 0.3)
    q, k, kw = _capture_inputs(cfg.get("num_heads"), valid)
    name = next(iter(kw))

    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = mod

        def forward(self, q, k, v):
            return self.inner(q, k, **{name: v})

    wrapper = Positional()
    with use_backend("cpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on the value checks
        traced = torch.jit.trace(wrapper, (q, k, kw[name]), check_trace=False)
        q2, k2, kw2 = _capture_inputs(cfg.get("num_heads"), valid, B=6, T=8)
        got = traced(q2, k2, kw2[name])
        want = wrapper(q2, k2, kw2[name])
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)

