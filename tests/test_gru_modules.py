"""GRU-family modules: torch.nn.GRU compatibility, state dicts, DeepCTR-Torch converters."""
import io

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from interest_kernels.nn.gru import GRU, AttentionalGRU, AuxiliaryLoss, InterestEvolving

from peers import load_deepctr


def _randomise(module, std=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def _round_trip(module):
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("batch_first", [True, False])
def test_gru_matches_torch_gru_with_lengths(batch_first):
    batch, seq_len, input_size, hidden = 4, 6, 3, 5
    ref = torch.nn.GRU(input_size, hidden, batch_first=batch_first)
    ours = GRU(input_size, hidden, batch_first=batch_first)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(batch, seq_len, input_size, requires_grad=True)
    h0 = torch.randn(1, batch, hidden)
    lengths = torch.tensor([6, 2, 0, 4])
    x_in = x if batch_first else x.transpose(0, 1)

    kept = lengths > 0  # pack_padded_sequence refuses zero lengths
    packed, ref_h = ref(
        pack_padded_sequence(x_in[kept] if batch_first else x_in[:, kept], lengths[kept],
                             batch_first=batch_first, enforce_sorted=False),
        h0[:, kept],
    )
    ref_out, _ = pad_packed_sequence(packed, batch_first=batch_first, total_length=seq_len)
    out, h_last = ours(x_in, lengths, h0)
    torch.testing.assert_close(out[kept] if batch_first else out[:, kept], ref_out)
    torch.testing.assert_close(h_last[kept], ref_h[0])
    torch.testing.assert_close(h_last[~kept], h0[0, ~kept])
    zero = out[~kept] if batch_first else out[:, ~kept]
    assert torch.equal(zero, torch.zeros_like(zero))

    (ref_out.sum() + ref_h.sum()).backward()
    want = [p.grad.clone() for p in ref.parameters()]
    (out.sum() + h_last[kept].sum()).backward()
    for g, p in zip(want, ours.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_gru_from_torch_and_state_dict_round_trip():
    ref = torch.nn.GRU(3, 4, batch_first=True, bias=False)
    ours = GRU.from_torch(ref)
    assert ours.bias_ih_l0 is None and set(ours.state_dict()) == set(ref.state_dict())
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(ours(x)[0], ref(x)[0])
    copy = GRU(3, 4, bias=False)
    copy.load_state_dict(_round_trip(ours))
    torch.testing.assert_close(copy(x)[1], ours(x)[1])
    with pytest.raises(ValueError, match="single-layer"):
        GRU.from_torch(torch.nn.GRU(3, 4, num_layers=2))


@pytest.mark.parametrize("mode,variant", [("aigru", "paper"), ("agru", "tensorflow"), ("augru", "paper")])
def test_attentional_gru_state_dict_round_trip(mode, variant):
    ours = AttentionalGRU(3, 4, mode=mode, variant=variant)
    copy = AttentionalGRU(3, 4, mode=mode, variant=variant)
    copy.load_state_dict(_round_trip(ours))
    x, att = torch.randn(2, 5, 3), torch.rand(2, 5)
    lengths = torch.tensor([5, 2])
    for a, b in zip(ours(x, att, lengths), copy(x, att, lengths)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="mode must be one of"):
        AttentionalGRU(3, 4, mode="gru")


@pytest.mark.peers
@pytest.mark.parametrize("gru_type", ["AGRU", "AUGRU"])
def test_attentional_gru_from_deepctr(gru_type):
    seq = load_deepctr("deepctr_torch.layers.sequence")
    dyn = _randomise(seq.DynamicGRU(3, 4, gru_type=gru_type))
    x, att = torch.randn(5, 6, 3), torch.rand(5, 6)
    lengths = torch.tensor([6, 1, 3, 5, 2])
    packed = dyn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False),
                 pack_padded_sequence(att, lengths, batch_first=True, enforce_sorted=False))
    want, _ = pad_packed_sequence(packed, batch_first=True, total_length=6)
    for source in (dyn, dyn.rnn):
        ours = AttentionalGRU.from_deepctr(source)
        out, h_last = ours(x, att.unsqueeze(1), lengths)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(h_last, want[torch.arange(5), lengths - 1])
    # The cell's state dict loads directly, AUGRU's shared bias included.
    direct = AttentionalGRU(3, 4, mode=gru_type.lower())
    direct.load_state_dict(dyn.rnn.state_dict())
    torch.testing.assert_close(direct(x, att, lengths)[0], want)
    if gru_type == "AUGRU":
        torch.testing.assert_close(ours.bias_ih, dyn.rnn.bias_hh)


@pytest.mark.peers
@pytest.mark.parametrize("gru_type", ["GRU", "AIGRU", "AGRU", "AUGRU"])
def test_interest_evolving_from_deepctr(gru_type):
    dien = load_deepctr("deepctr_torch.models.dien")
    dim = 4
    theirs = _randomise(dien.InterestEvolving(dim, gru_type=gru_type, att_hidden_size=(6, 5),
                                              att_weight_normalization=gru_type in ("GRU", "AGRU")))
    ours = InterestEvolving.from_deepctr(theirs)
    query = torch.randn(5, dim, requires_grad=True)
    keys = torch.randn(5, 6, dim, requires_grad=True)
    lengths = torch.tensor([6, 0, 3, 1, 4])
    # DeepCTR's layer takes the keys without their zero-length rows (as its
    # InterestExtractor returns them) but all rows of query and lengths; ours takes all rows.
    want = theirs(query, keys[lengths > 0], lengths)
    got = ours(query, keys, lengths)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[1], torch.zeros(dim))
    g_want = torch.autograd.grad(want.sum(), [query, keys])
    g_got = torch.autograd.grad(got.sum(), [query, keys])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gru_type", ["GRU", "AIGRU", "AUGRU"])
def test_interest_evolving_state_dict_round_trip(gru_type):
    ours = InterestEvolving(4, gru_type=gru_type, att_hidden_units=(6,))
    copy = InterestEvolving(4, gru_type=gru_type, att_hidden_units=(6,))
    copy.load_state_dict(_round_trip(ours))
    query, keys = torch.randn(3, 4), torch.randn(3, 5, 4)
    lengths = torch.tensor([[5], [0], [2]])
    out = ours(query, keys, lengths)
    assert out.shape == (3, 4) and torch.equal(out[1], torch.zeros(4))
    torch.testing.assert_close(copy(query, keys, lengths), out)
    with pytest.raises(ValueError, match="gru_type"):
        InterestEvolving(4, gru_type="LSTM")


def test_auxiliary_loss_module():
    module = AuxiliaryLoss(4, 3, hidden_units=(5, 2))
    copy = AuxiliaryLoss(4, 3, hidden_units=(5, 2))
    copy.load_state_dict(_round_trip(module))
    states, pos, neg = torch.randn(2, 5, 4), torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    loss = module(states, pos, neg, lengths=torch.tensor([5, 3]))
    assert loss.dim() == 0 and loss.item() > 0
    torch.testing.assert_close(copy(states, pos, neg, lengths=torch.tensor([5, 3])), loss)
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())


# --- torch.compile, torch.export and torch.jit.trace with lengths ------------------------------

_D = 5


def _traceable_cases():
    """(name, module, inputs(B, T), dynamic_shapes(B, T)) for each GRU-family module."""
    torch.manual_seed(3)

    def lengths(batch, seq_len):
        out = torch.randint(0, seq_len + 1, (batch,))
        out[0], out[-1] = seq_len, 0
        return out

    return [
        ("GRU", GRU(_D, 4),
         lambda b, t: (torch.randn(b, t, _D), lengths(b, t)),
         lambda B, T: ({0: B, 1: T}, {0: B})),
        ("AttentionalGRU", AttentionalGRU(_D, 4, mode="augru"),
         lambda b, t: (torch.randn(b, t, _D), torch.rand(b, t), lengths(b, t)),
         lambda B, T: ({0: B, 1: T}, {0: B, 1: T}, {0: B})),
        ("InterestEvolving", InterestEvolving(_D, gru_type="AUGRU", att_hidden_units=(8,)),
         lambda b, t: (torch.randn(b, _D), torch.randn(b, t, _D), lengths(b, t)),
         lambda B, T: ({0: B}, {0: B, 1: T}, {0: B})),
    ]


def _grads(module, out):
    loss = sum(o.square().sum() for o in (out if isinstance(out, tuple) else (out,)))
    return torch.autograd.grad(loss, list(module.parameters()))


def _assert_close_outputs(got, want):
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("case", [0, 1, 2], ids=["GRU", "AttentionalGRU", "InterestEvolving"])
def test_compile_fullgraph_with_lengths_matches_eager(case, one_thread):
    _, module, make, _ = _traceable_cases()[case]
    # One shape, new lengths on the second call: nothing depends on their values (dynamic B
    # and T are covered by the export test).
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        args = make(4, 6)
        want, got = module(*args), compiled(*args)
        _assert_close_outputs(got, want)
        for g, w in zip(_grads(module, got), _grads(module, want)):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("case", [0, 1, 2], ids=["GRU", "AttentionalGRU", "InterestEvolving"])
def test_export_with_dynamic_batch_and_length_matches_eager(case, one_thread):
    _, module, make, dynamic = _traceable_cases()[case]
    dims = dynamic(torch.export.Dim("B", min=2), torch.export.Dim("T", min=2))
    program = torch.export.export(module, make(4, 6), dynamic_shapes=dims)
    for batch, seq_len in ((4, 6), (7, 3)):
        args = make(batch, seq_len)
        _assert_close_outputs(program.module()(*args), module(*args))


@pytest.mark.parametrize("case", [0, 1, 2], ids=["GRU", "AttentionalGRU", "InterestEvolving"])
def test_jit_trace_with_lengths_matches_eager(case, one_thread):
    _, module, make, _ = _traceable_cases()[case]
    traced = torch.jit.trace(module, make(4, 6))  # also re-traces under no_grad and compares
    for batch, seq_len in ((4, 6), (5, 8)):
        args = make(batch, seq_len)  # other lengths, batch and length than at trace time
        _assert_close_outputs(traced(*args), module(*args))
