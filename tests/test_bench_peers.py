"""The benchmark's peer layers hold the case's weights: on the same inputs they give the
eager reference's outputs (so a table's speedups compare equal work), and the harness
times them in every mode."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import interest_kernels as ik
from interest_kernels.bench import cases, peers
from interest_kernels.bench.harness import measure_machine, run_case

pytestmark = pytest.mark.peers


def _ta_inputs(normalization: str):
    make = cases._ta_make(5, 7, 6, (8, 4))
    inp = make(torch.device("cpu"), torch.float32)
    lengths = inp["lengths"]
    weights = (inp["weights"], inp["biases"], inp["out_weight"], inp["out_bias"])
    expected = ik.target_attention_reference(inp["query"], inp["keys"], *weights, activation="sigmoid",
                                             normalization=normalization, lengths=lengths)
    return inp, weights, lengths, expected


@pytest.mark.parametrize("normalization", ["softmax", "none"])
def test_attention_peers_hold_the_weights(normalization):
    try:
        inp, weights, lengths, expected = _ta_inputs(normalization)
        deepctr = peers.deepctr_attention_like(*weights, normalization=normalization)
        fuxictr = peers.fuxictr_attention_like(*weights, normalization=normalization)
    except ImportError as exc:
        pytest.skip(str(exc))
    got = deepctr(inp["query"].unsqueeze(1), inp["keys"], lengths.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    mask = (torch.arange(inp["keys"].shape[1]) < lengths.unsqueeze(1)).float()
    torch.testing.assert_close(fuxictr(inp["query"], inp["keys"], mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["gru", "agru", "augru"])
def test_gru_peers_hold_the_weights(mode):
    inp = cases._gru_make(4, 6, 5, mode)(torch.device("cpu"), torch.float32)
    if mode == "augru":  # DeepCTR-Torch's AUGRU cell adds its bias_hh to both projections
        inp["bias_ih"] = inp["bias_hh"].clone()
    weights = [inp[k] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    states, _ = ik.gru_scan_reference(inp["x"], *weights, inp.get("att"), mode=mode, lengths=inp["lengths"])
    pack = lambda t: pack_padded_sequence(t, inp["lengths"], batch_first=True, enforce_sorted=False)  # noqa: E731
    try:
        if mode == "gru":
            out = peers.torch_gru_like(*weights)(pack(inp["x"]))[0]
        else:
            out = peers.deepctr_attentional_gru_like(*weights, mode=mode)(pack(inp["x"]), pack(inp["att"].unsqueeze(-1)))
    except ImportError as exc:
        pytest.skip(str(exc))
    padded, _ = pad_packed_sequence(out, batch_first=True, total_length=inp["x"].shape[1])
    torch.testing.assert_close(padded, states, atol=1e-5, rtol=1e-5)


def test_harness_times_peers_in_every_mode():
    machine = measure_machine(torch.device("cpu"))
    case = next(cases.target_attention_cases("smoke"))
    rows = run_case(case, torch.device("cpu"), machine, compile_baseline=False, budget_s=0.01, log=lambda _: None)
    timed = {(r.backend, r.mode) for r in rows if r.p50_ms is not None}
    for peer in ("deepctr", "fuxictr"):
        assert {(peer, m) for m in ("fwd", "bwd", "full")} <= timed
    assert {("eager", m) for m in ("fwd", "bwd", "full")} <= timed
