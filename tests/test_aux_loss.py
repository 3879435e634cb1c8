"""DIEN auxiliary loss: the reference against its equation, gradients, the public op's
checks, and DeepCTR-Torch's InterestExtractor."""
import math

import pytest
import torch

from interest_kernels.ops.aux_loss.op import dien_aux_loss
from interest_kernels.ops.aux_loss.reference import dien_aux_loss_reference
from interest_kernels.testing import check_against_reference

from peers import load_deepctr


def _inputs(batch=3, seq_len=5, hidden=4, emb=3, units=(6, 5), dtype=torch.float32):
    widths = (hidden + emb,) + tuple(units)
    return dict(
        states=torch.randn(batch, seq_len, hidden, dtype=dtype),
        pos=torch.randn(batch, seq_len, emb, dtype=dtype),
        neg=torch.randn(batch, seq_len, emb, dtype=dtype),
        weights=[torch.randn(widths[i + 1], widths[i], dtype=dtype) * 0.5 for i in range(len(units))],
        biases=[torch.randn(u, dtype=dtype) for u in units],
        out_weight=torch.randn(1, units[-1], dtype=dtype),
        out_bias=torch.randn(1, dtype=dtype),
    )


def _loop_loss(inp, valid, activation="sigmoid"):
    """The SPEC formula pair by pair, in plain Python over (b, t)."""
    act = {"sigmoid": torch.sigmoid, "relu": torch.relu, "identity": lambda v: v}[activation]

    def f(h, e):
        y = torch.cat([h, e])
        for w, b in zip(inp["weights"], inp["biases"]):
            y = act(w @ y + b)
        return (inp["out_weight"] @ y + inp["out_bias"]).squeeze()

    terms = []
    batch, seq_len = valid.shape
    for b in range(batch):
        for t in range(seq_len - 1):
            if valid[b, t] and valid[b, t + 1]:
                h = inp["states"][b, t]
                p = torch.sigmoid(f(h, inp["pos"][b, t + 1]))
                q = torch.sigmoid(f(h, inp["neg"][b, t + 1]))
                terms.append(torch.log(p) + torch.log(1 - q))
    return -torch.stack(terms).mean() if terms else torch.zeros(())


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "identity"])
def test_reference_matches_pairwise_formula(activation):
    inp = _inputs(dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3])
    valid = torch.arange(5)[None] < lengths[:, None]
    got = dien_aux_loss_reference(**inp, activation=activation, lengths=lengths)
    torch.testing.assert_close(got, _loop_loss(inp, valid, activation))
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 0, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    got = dien_aux_loss_reference(**inp, activation=activation, mask=mask)
    torch.testing.assert_close(got, _loop_loss(inp, mask, activation))


def test_reference_gradcheck():
    inp = _inputs(batch=2, seq_len=4, hidden=2, emb=2, units=(3, 2), dtype=torch.float64)
    flat = [inp["states"], inp["pos"], inp["neg"], *inp["weights"], *inp["biases"], inp["out_weight"], inp["out_bias"]]
    for t in flat:
        t.requires_grad_(True)

    def fn(states, pos, neg, w0, w1, b0, b1, ow, ob):
        return dien_aux_loss_reference(states, pos, neg, [w0, w1], [b0, b1], ow, ob,
                                       lengths=torch.tensor([4, 2]))

    assert torch.autograd.gradcheck(fn, flat)


def test_no_valid_pair_gives_zero_and_zero_gradients():
    inp = _inputs()
    inp["states"].requires_grad_(True)
    loss = dien_aux_loss(**inp, lengths=torch.tensor([1, 0, 1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(inp["states"].grad, torch.zeros_like(inp["states"]))
    one_step = _inputs(seq_len=1)
    assert dien_aux_loss(**one_step).item() == 0.0


def test_large_scores_stay_finite():
    inp = _inputs()
    inp["out_bias"] = torch.tensor([1e4])
    loss = dien_aux_loss(**inp)
    assert math.isfinite(loss.item()) and loss.item() > 1e3


AUX_GRADS = ["states", "pos", "neg", "weights", "biases", "out_weight", "out_bias"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_matches_reference(dtype):
    inp = _inputs()
    inp["lengths"] = torch.tensor([5, 2, 0])
    check_against_reference(dien_aux_loss, dien_aux_loss_reference, inp, grad=AUX_GRADS, dtype=dtype)


def _mean_over_every_pair(**kw):
    """A plausible bug: the mean over all B (T - 1) pairs (the DIEN code's padding rule)."""
    lengths = kw.pop("lengths")
    pairs = (torch.arange(1, 5)[None] < lengths[:, None]).sum()
    return dien_aux_loss(**kw, lengths=lengths) * pairs / (3 * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_comparison_can_fail(dtype):
    """The comparison above is not vacuous at any dtype: a wrong pair count fails it."""
    inp = _inputs()
    inp["lengths"] = torch.tensor([5, 2, 0])
    with pytest.raises(AssertionError):
        check_against_reference(_mean_over_every_pair, dien_aux_loss_reference, inp, grad=AUX_GRADS,
                                dtype=dtype)


def test_op_accepts_flat_out_weight_and_no_biases():
    inp = _inputs()
    want = dien_aux_loss_reference(**inp)
    flat = dict(inp, out_weight=inp["out_weight"].reshape(-1), out_bias=inp["out_bias"].reshape(()))
    torch.testing.assert_close(dien_aux_loss(**flat), want)
    no_bias = dict(inp, biases=[None, None], out_bias=None)
    torch.testing.assert_close(dien_aux_loss(**no_bias), dien_aux_loss_reference(**no_bias))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(pos=torch.randn(3, 4, 3)), ValueError, "pos must have shape"),
        (dict(neg=torch.randn(3, 5, 2)), ValueError, "neg must have shape"),
        (dict(weights=[torch.randn(6, 8), torch.randn(5, 6)]), ValueError, r"weights\[0\] must have shape"),
        (dict(weights=[torch.randn(6, 7), torch.randn(5, 4)]), ValueError, r"weights\[1\] must have shape"),
        (dict(biases=[torch.randn(6)]), ValueError, "one entry per weight"),
        (dict(biases=[torch.randn(5), torch.randn(5)]), ValueError, r"biases\[0\] must have shape"),
        (dict(out_weight=torch.randn(2, 5)), ValueError, "out_weight must have shape"),
        (dict(out_bias=torch.randn(2)), ValueError, "out_bias must hold one value"),
        (dict(weights=[]), ValueError, "at least one"),
        (dict(activation="dice"), ValueError, "activation must be one of"),
        (dict(lengths=torch.tensor([6, 1, 1])), ValueError, "lengths must lie in"),
        (dict(neg=torch.randn(3, 5, 3, dtype=torch.float64)), TypeError, "neg has dtype"),
        (dict(pos=torch.randn(3, 5, 3, device="meta")), ValueError, "pos is on meta"),
    ],
)
def test_bad_arguments(change, error, match):
    kw = _inputs()
    kw.update(change)
    with pytest.raises(error, match=match):
        dien_aux_loss(**kw)


@pytest.mark.peers
def test_matches_deepctr_interest_extractor():
    dien = load_deepctr("deepctr_torch.models.dien")
    from interest_kernels.nn.gru import AuxiliaryLoss

    dim = 4
    extractor = dien.InterestExtractor(dim, use_neg=True, init_std=0.5)
    keys = torch.randn(5, 6, dim)
    neg = torch.randn(5, 6, dim)
    lengths = torch.tensor([6, 0, 1, 3, 4])
    states, their_loss = extractor(keys, lengths, neg)
    # DeepCTR drops zero-length rows before the GRU; align our states with its rows.
    kept = lengths > 0
    module = AuxiliaryLoss.from_deepctr(extractor)
    ours = module(states, keys[kept], neg[kept], lengths=lengths[kept])
    # Its binary cross-entropy averages over positives and negatives together: half ours.
    torch.testing.assert_close(ours, 2 * their_loss)
