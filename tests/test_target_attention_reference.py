"""Target attention (SPEC 1): the reference against gradcheck and the peer libraries,
the forms against each other, the cpu backend against the reference, bad inputs."""
from __future__ import annotations


import pytest
import torch

from interest_kernels import use_backend
from interest_kernels.ops.dice.reference import DiceParams
from interest_kernels.ops.target_attention import target_attention, target_attention_reference
from interest_kernels.testing import check_against_reference

import target_attention_cases as cases
from peers import load_deepctr, load_fuxictr
from target_attention_cases import call, grad_names

F64 = torch.float64


def make_case(**kw) -> dict:
    """Small float64 cases (T=4, D=3, units (5, 4)) unless told otherwise."""
    kw.setdefault("dtype", F64)
    return cases.make_case(**kw)


# --- gradcheck of the reference ----------------------------------------------------------

GRADCHECK_CASES = {
    **{f"{a}-{n}": dict(activation=a, normalization=n)
       for a in ("sigmoid", "relu", "prelu", "identity") for n in ("softmax", "none")},
    "dice-eval": dict(activation="dice"),
    "dice-train": dict(activation="dice", dice_training=True, normalization="none"),
    "prelu-shared": dict(activation="prelu", prelu_shared=True),
    "mask": dict(valid="mask"),
    "no-mask-1-layer": dict(valid="none", units=(4,)),
    "3-layers": dict(units=(5, 4, 3), activation="relu"),
    "shared-history": dict(rows=2, batch=4, valid="mask"),
    "multi-head-shared": dict(heads=2),
    "multi-head-query-per-head": dict(heads=2, query_per_head=True, normalization="none"),
    "multi-head-per-head-prelu": dict(heads=2, per_head=True, query_per_head=True, activation="prelu"),
    "multi-head-per-head-dice": dict(heads=2, per_head=True, activation="dice", dice_training=True),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_reference_gradcheck(case):
    inp = make_case(**GRADCHECK_CASES[case])
    names = grad_names(inp)
    flat = []
    for n in names:
        v = inp[n]
        flat.extend(v if isinstance(v, list) else [v])
    fn = call(target_attention_reference)

    def f(*tensors):
        it = iter(tensors)
        kw = dict(inp)
        for n in names:
            kw[n] = [next(it) for _ in inp[n]] if isinstance(inp[n], list) else next(it)
        return fn(**kw)

    flat = [t.detach().requires_grad_() for t in flat]
    assert torch.autograd.gradcheck(f, flat, eps=1e-6, atol=1e-6, fast_mode=True)


def test_reference_matches_literal_formula():
    """Scores from the SPEC equations written out by hand for one position."""
    inp = make_case(valid="none", units=(5,), activation="sigmoid", normalization="none")
    out, a = call(target_attention_reference)(**inp)
    q, k = inp["query"][1], inp["keys"][1, 2]
    x = torch.cat([q, k, q - k, q * k])
    h = torch.sigmoid(inp["weights"][0] @ x + inp["biases"][0])
    s = inp["out_weight"][0] @ h + inp["out_bias"][0]
    torch.testing.assert_close(a[1, 2], s)
    torch.testing.assert_close(out, torch.einsum("bt,btd->bd", a, inp["keys"]))


def test_all_masked_rows_give_zeros():
    for normalization in ("softmax", "none"):
        inp = make_case(valid="lengths", normalization=normalization)
        inp["lengths"] = torch.zeros_like(inp["lengths"])
        out, a = call(target_attention_reference)(**inp)
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(a, torch.zeros_like(a))


def test_softmax_sums_to_one_over_valid_positions():
    inp = make_case(valid="mask", batch=6, seq_len=7)
    _, a = call(target_attention_reference)(**inp)
    has_valid = inp["mask"].any(1)
    torch.testing.assert_close(a.sum(1), has_valid.to(F64))
    assert (a[~inp["mask"]] == 0).all()


# --- forms against each other ------------------------------------------------------------

@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
def test_shared_history_equals_expanded(activation):
    inp = make_case(rows=3, batch=7, valid="mask", activation=activation, dice_training=True)
    shared = call(target_attention_reference)(**inp)
    idx = inp.pop("key_index")
    inp["keys"] = inp["keys"][idx]
    inp["mask"] = inp["mask"][idx]
    expanded = call(target_attention_reference)(**inp)
    for s, e in zip(shared, expanded):
        torch.testing.assert_close(s, e)


@pytest.mark.parametrize("per_head,query_per_head", [(False, False), (False, True), (True, True)])
def test_multi_head_equals_per_head_calls(per_head, query_per_head):
    inp = make_case(heads=3, per_head=per_head, query_per_head=query_per_head, activation="prelu",
                    valid="lengths")
    out, a = call(target_attention_reference)(**inp)
    for e in range(3):
        one = dict(inp, keys=inp["keys"][:, e],
                   query=inp["query"][:, e] if query_per_head else inp["query"])
        if per_head:
            for name in ("weights", "biases", "prelu_weights"):
                one[name] = [t[e] for t in inp[name]]
            one["out_weight"], one["out_bias"] = inp["out_weight"][e], inp["out_bias"][e]
        o, s = call(target_attention_reference)(**one)
        torch.testing.assert_close(out[:, e], o)
        torch.testing.assert_close(a[:, e], s)


def test_dice_training_updates_running_stats():
    inp = make_case(activation="dice", dice_training=True)
    before = [m.clone() for m, _ in inp["dice_stats"]]
    kw = dict(inp)
    training, stats = kw.pop("dice_training"), kw.pop("dice_stats")
    params = [DiceParams(kw.pop(f"dice_alpha{i}"), m, v, kw.pop(f"dice_weight{i}"), kw.pop(f"dice_bias{i}"),
                         training=training) for i, (m, v) in enumerate(stats)]
    target_attention_reference(**kw, dice_params=params)
    assert all(not torch.equal(b, p.running_mean) for b, p in zip(before, params))


# --- the cpu backend against the reference -----------------------------------------------

CPU_CASES = {
    "sigmoid-softmax": dict(),
    "relu-none-mask": dict(activation="relu", normalization="none", valid="mask"),
    "prelu": dict(activation="prelu", batch=5, seq_len=6),
    "prelu-shared-3-layers": dict(activation="prelu", prelu_shared=True, units=(6, 5, 4)),
    "identity-1-layer": dict(activation="identity", units=(7,)),
    "dice-eval": dict(activation="dice"),
    "dice-train": dict(activation="dice", dice_training=True),
    "dice-train-one-position": dict(activation="dice", dice_training=True, batch=1, seq_len=1, valid="none"),
    "multi-head-per-head-prelu-none": dict(heads=2, per_head=True, activation="prelu", normalization="none"),
    "T1": dict(seq_len=1, valid="lengths"),
    "D18": dict(dim=18, units=(16, 8), seq_len=9, batch=5),
    "D36-mask": dict(dim=36, units=(20, 10), valid="mask", seq_len=11),
    "no-mask": dict(valid="none"),
    "shared-history": dict(rows=3, batch=6, valid="mask", activation="relu"),
    "shared-history-lengths": dict(rows=2, batch=5),
    "multi-head": dict(heads=2),
    "multi-head-query-per-head": dict(heads=3, query_per_head=True, valid="mask"),
    "multi-head-per-head-prelu": dict(heads=2, per_head=True, query_per_head=True, activation="prelu"),
    "multi-head-per-head-dice": dict(heads=2, per_head=True, activation="dice", dice_training=True),
}


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_backend_matches_reference(case):
    inp = make_case(**CPU_CASES[case], dtype=torch.float32)

    def candidate(**kw):
        with use_backend("cpu"):
            return call(target_attention)(**kw)

    check_against_reference(candidate, call(target_attention_reference), inp, grad=grad_names(inp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_head", [False, True])
def test_cpu_backend_dice_running_stats_match_reference(dtype, per_head):
    inp = make_case(activation="dice", dice_training=True, dtype=dtype, valid="mask",
                    heads=2 if per_head else None, per_head=per_head)
    kw = dict(inp)
    training, stats = kw.pop("dice_training"), kw.pop("dice_stats")
    results = []
    for backend in ("cpu", "reference"):
        params = [DiceParams(kw[f"dice_alpha{i}"], m.clone(), v.clone(), kw[f"dice_weight{i}"],
                             kw[f"dice_bias{i}"], training=training) for i, (m, v) in enumerate(stats)]
        rest = {k: v for k, v in kw.items() if not k.startswith("dice_")}
        with use_backend(backend):
            target_attention(**rest, dice_params=params)
        results.append(params)
    for ours, ref, (m0, _) in zip(*results, stats):
        assert not torch.equal(ours.running_mean, m0)
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["sigmoid-softmax", "dice-train", "multi-head-per-head-prelu"])
def test_cpu_backend_low_precision(case, dtype):
    inp = make_case(**CPU_CASES[case], dtype=torch.float32)

    def candidate(**kw):
        with use_backend("cpu"):
            return call(target_attention)(**kw)

    check_against_reference(candidate, call(target_attention_reference), inp, grad=grad_names(inp), dtype=dtype)


def test_float32_parameters_with_half_inputs():
    inp = make_case(dtype=torch.float32)
    q, k = inp["query"].half(), inp["keys"].half()
    with use_backend("cpu"):
        out, a = call(target_attention)(**dict(inp, query=q, keys=k))
    ref, ref_a = call(target_attention_reference)(**dict(inp, query=q.float(), keys=k.float()))
    assert out.dtype == torch.float16 and a.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_public_op_return_forms():
    inp = make_case(dtype=torch.float32)
    inp["query"] = inp["query"].unsqueeze(1)  # (B, 1, D) is accepted
    out = call(target_attention)(**inp, return_scores=False)
    assert out.shape == (3, 3)
    out2, a = call(target_attention)(**inp)
    assert a.shape == (3, 4)
    torch.testing.assert_close(out, out2)
    with use_backend("reference"):
        ref = call(target_attention)(**inp, return_scores=False)
    torch.testing.assert_close(out, ref)


# --- the peers ---------------------------------------------------------------------------

def _peer_params(linears, dense):
    return dict(weights=[m.weight for m in linears], biases=[m.bias for m in linears],
                out_weight=dense.weight, out_bias=dense.bias)


def _init(layer):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)


@pytest.mark.peers
@pytest.mark.parametrize("activation", ["sigmoid", "relu", "prelu", "dice"])
@pytest.mark.parametrize("weight_normalization", [True, False])
@pytest.mark.parametrize("return_score", [True, False])
def test_matches_deepctr(activation, weight_normalization, return_score):
    seq = load_deepctr("deepctr_torch.layers.sequence")
    B, T, D = 6, 5, 4
    peer = seq.AttentionSequencePoolingLayer(att_hidden_units=(8, 6), att_activation=activation,
                                             weight_normalization=weight_normalization,
                                             return_score=return_score, embedding_dim=D)
    _init(peer)
    q, k = torch.randn(B, 1, D), torch.randn(B, T, D)
    keys_length = torch.tensor([[1], [5], [3], [2], [4], [5]])
    acts = list(peer.local_att.dnn.activation_layers)
    kw = _peer_params(peer.local_att.dnn.linears, peer.local_att.dense)
    if activation == "prelu":
        kw["prelu_weights"] = [a.weight for a in acts]
    if activation == "dice":
        kw["dice_params"] = [DiceParams(a.alpha.reshape(-1), a.bn.running_mean.clone(), a.bn.running_var.clone(),
                                        a.bn.weight, a.bn.bias, training=True, momentum=a.bn.momentum,
                                        eps=a.bn.eps) for a in acts]
    expected = peer(q, k, keys_length)
    out, a = target_attention_reference(q, k, activation=activation,
                                        normalization="softmax" if weight_normalization else "none",
                                        lengths=keys_length.reshape(-1), return_scores=True, **kw)
    got = a if return_score else out
    torch.testing.assert_close(got.unsqueeze(1), expected, atol=1e-5, rtol=1e-5)
    if activation == "dice":  # same running statistics after one training step
        for p, layer in zip(kw["dice_params"], acts):
            torch.testing.assert_close(p.running_mean, layer.bn.running_mean)
            torch.testing.assert_close(p.running_var, layer.bn.running_var)


@pytest.mark.peers
@pytest.mark.parametrize("activation", ["ReLU", "Sigmoid", "PReLU", "Dice"])
@pytest.mark.parametrize("use_softmax", [True, False])
def test_matches_fuxictr(activation, use_softmax):
    fx = load_fuxictr("fuxictr.pytorch.layers.attentions.target_attention")
    B, T, D = 6, 5, 4
    peer = fx.DIN_Attention(embedding_dim=D, attention_units=[8, 6], hidden_activations=activation,
                            use_softmax=use_softmax)
    _init(peer)
    mods = list(peer.attention_layer.mlp)
    linears = [m for m in mods if isinstance(m, torch.nn.Linear)]
    acts = [m for m in mods if not isinstance(m, torch.nn.Linear)]
    q, k = torch.randn(B, D), torch.randn(B, T, D)
    mask = torch.rand(B, T) > 0.4
    mask[:, 2] = True
    kw = _peer_params(linears[:-1], linears[-1])
    name = activation.lower()
    if name == "prelu":
        kw["prelu_weights"] = [a.weight for a in acts]
    if name == "dice":
        kw["dice_params"] = [DiceParams(a.alpha, a.bn.running_mean.clone(), a.bn.running_var.clone(),
                                        training=True, momentum=a.bn.momentum, eps=a.bn.eps) for a in acts]
    expected = peer(q, k, mask.float())
    got = target_attention_reference(q, k, activation=name, normalization="softmax" if use_softmax else "none",
                                     mask=mask, **kw)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.peers
def test_all_masked_row_zero_where_peers_average_padding():
    seq = load_deepctr("deepctr_torch.layers.sequence")
    B, T, D = 3, 4, 4
    peer = seq.AttentionSequencePoolingLayer(att_hidden_units=(8,), weight_normalization=True, embedding_dim=D)
    _init(peer)
    q, k = torch.randn(B, 1, D), torch.randn(B, T, D)
    keys_length = torch.tensor([[0], [2], [4]])
    expected = peer(q, k, keys_length)[:, 0]
    torch.testing.assert_close(expected[0], k[0].mean(0))  # the peer averages the padding
    out = target_attention_reference(q, k, **_peer_params(peer.local_att.dnn.linears, peer.local_att.dense),
                                     lengths=keys_length.reshape(-1))
    assert torch.equal(out[0], torch.zeros(D)) and torch.isfinite(out).all()
    torch.testing.assert_close(out[1:], expected[1:])


# --- bad inputs --------------------------------------------------------------------------

def _base():
    return make_case(dtype=torch.float32)


BAD_INPUTS = {
    "query rank": (dict(query=torch.randn(3)), ValueError, "query must have 2 or 3 dimensions"),
    "keys rank": (dict(keys=torch.randn(3, 4)), ValueError, "keys must have 3 or 4 dimensions"),
    "D mismatch": (dict(keys=torch.randn(3, 4, 5)), ValueError, "keys must have the embedding width D = 3"),
    "batch mismatch": (dict(keys=torch.randn(2, 4, 3)), ValueError, "keys must have the batch size B = 3"),
    "query heads": (dict(query=torch.randn(3, 2, 3)), ValueError, r"query must have shape \(B, D\)"),
    "int query": (dict(query=torch.ones(3, 3, dtype=torch.int64)), TypeError, "query must have dtype"),
    "mixed dtype": (dict(keys=torch.randn(3, 4, 3, dtype=F64)), TypeError, "keys has dtype"),
    "length too long": (dict(lengths=torch.tensor([1, 5, 2])), ValueError, r"lengths must lie in \[0, 4\]"),
    "negative length": (dict(lengths=torch.tensor([1, -1, 2])), ValueError, "found -1"),
    "lengths shape": (dict(lengths=torch.tensor([1, 2])), ValueError, r"lengths must have shape \(3\)"),
    "both": (dict(mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, "pass lengths or mask, not both"),
    "mask shape": (dict(lengths=None, mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "mask must have shape"),
    "W1 width": (dict(weights=[torch.randn(5, 11), torch.randn(4, 5)]), ValueError, r"weights\[0\] must have shape"),
    "W2 width": (dict(weights=[torch.randn(5, 12), torch.randn(4, 6)]), ValueError, r"weights\[1\] must have shape"),
    "no layers": (dict(weights=[], biases=[]), ValueError, "weights must hold 1 to 3"),
    "4 layers": (dict(weights=[torch.randn(5, 12)] + [torch.randn(5, 5)] * 3, biases=None), ValueError,
                 "weights must hold 1 to 3"),
    "biases count": (dict(biases=[None]), ValueError, "biases must be a sequence of 2"),
    "bias shape": (dict(biases=[torch.randn(4), None]), ValueError, r"biases\[0\] must have shape \(5\)"),
    "out_weight": (dict(out_weight=torch.randn(1, 5)), ValueError, r"out_weight must have shape \(1, 4\)"),
    "out_bias": (dict(out_bias=torch.randn(2)), ValueError, "out_bias must have shape"),
    "activation": (dict(activation="tanh"), ValueError, "activation must be one of"),
    "normalization": (dict(normalization="sum"), ValueError, "normalization must be one of"),
    "prelu missing": (dict(activation="prelu"), ValueError, "needs prelu_weights"),
    "prelu shape": (dict(activation="prelu", prelu_weights=[torch.rand(5), torch.rand(3)]), ValueError,
                    r"prelu_weights\[1\] must have shape"),
    "prelu unused": (dict(prelu_weights=[torch.rand(5), torch.rand(4)]), ValueError, "only used with"),
    "dice missing": (dict(activation="dice"), ValueError, "needs dice_params"),
    "dice eval stats": (dict(activation="dice", dice_params=[DiceParams(torch.zeros(5), None, None, training=False),
                                                             DiceParams(torch.zeros(4), None, None, training=False)]),
                        ValueError, "running_mean is required"),
    "dice shape": (dict(activation="dice", dice_params=[DiceParams(torch.zeros(5), None, None),
                                                        DiceParams(torch.zeros(3), None, None)]),
                   ValueError, r"dice_params\[1\].alpha must have shape"),
    "key_index range": (dict(keys=torch.randn(2, 4, 3), lengths=None, key_index=torch.tensor([0, 2, 1])),
                        ValueError, r"key_index must lie in \[0, 2\)"),
    "key_index lengths rows": (dict(keys=torch.randn(2, 4, 3), key_index=torch.tensor([0, 1, 1])), ValueError,
                               r"lengths must have shape \(2\)"),
    "per-head without heads": (dict(weights=[torch.randn(2, 5, 12), torch.randn(2, 4, 5)]), ValueError,
                               "not in the multi-head form"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise(name):
    change, error, match = BAD_INPUTS[name]
    kw = {k: v for k, v in _base().items() if k in ("query", "keys", "weights", "biases", "out_weight", "out_bias",
                                                     "lengths", "activation", "normalization")}
    kw.update(change)
    kw = {k: v for k, v in kw.items() if v is not None or k in ("biases",)}
    with pytest.raises(error, match=match):
        target_attention(**kw)


def test_mixed_devices_raise():
    kw = {k: v for k, v in _base().items() if k in ("query", "keys", "weights", "biases", "out_weight", "lengths")}
    kw["keys"] = kw["keys"].to("meta")
    with pytest.raises(ValueError, match="keys is on meta"):
        target_attention(**kw)
