"""Padding is never read (SPEC conventions), on every backend, the reference included.

Each case runs an op twice on the same valid data: once with finite padding and once
with NaN (or Inf) in every padded position of the inputs and of the upstream gradients.
Outputs and gradients must be finite and equal. The one documented exception is Dice in
training mode inside target attention, whose batch statistics cover padded positions.
"""
from __future__ import annotations

import pytest
import torch

from interest_kernels.ops.aux_loss.op import dien_aux_loss
from interest_kernels.ops.gru_scan.op import gru_scan
from interest_kernels.ops.target_attention.op import target_attention

import target_attention_cases as ta_cases
from backend_runs import backends, outputs_and_leaves

POISONS = [float("nan"), float("inf")]


def _run(backend, fn, inputs: dict, grad_outs: list) -> tuple[list, dict]:
    """Outputs and the gradients of every floating leaf (lists flattened by name)."""
    outs, leaves = outputs_and_leaves(backend, fn, inputs)
    pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None and o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], list(leaves.values()), [g for _, g in pairs],
                                allow_unused=True)
    return [o.detach() for o in outs], dict(zip(leaves, grads))


def _assert_same(clean, poisoned) -> None:
    (outs_c, grads_c), (outs_p, grads_p) = clean, poisoned
    for i, (c, p) in enumerate(zip(outs_c, outs_p)):
        assert torch.isfinite(p).all(), f"output {i} reads padding (non-finite values)"
        torch.testing.assert_close(p, c, msg=lambda m: f"output {i}: {m}")
    for name, c in grads_c.items():
        p = grads_p[name]
        if c is None and p is None:
            continue
        assert p is not None and torch.isfinite(p).all(), f"grad of {name} reads padding"
        torch.testing.assert_close(p, c, msg=lambda m: f"grad of {name}: {m}")


TA_CASES = {
    "lengths-softmax": dict(valid="lengths"),
    "mask-none-relu": dict(valid="mask", normalization="none", activation="relu"),
    "dice-eval-mask": dict(valid="mask", activation="dice"),
    "shared-history-mask": dict(valid="mask", rows=2, batch=4),
    "multi-head-lengths": dict(valid="lengths", heads=2, query_per_head=True),
}


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("case", list(TA_CASES))
@pytest.mark.parametrize("backend", backends("target_attention"))
def test_target_attention_never_reads_padded_keys(backend, case, poison, request):
    if backend == "triton" and poison == float("inf"):
        pytest.skip("under the Triton interpreter NaN padding alone keeps the budget")
    inp = ta_cases.make_case(seq_len=5, dim=3, **TA_CASES[case])
    fn = ta_cases.call(target_attention)
    rows = inp["keys"].shape[0]
    valid = (torch.arange(5) < inp["lengths"][:, None]) if "lengths" in inp else inp["mask"].bool()
    batch = inp["query"].shape[0]
    valid_q = valid[inp["key_index"]] if "key_index" in inp else valid
    out_shape = inp["query"].shape[:1] + inp["keys"].shape[1:-2] + inp["keys"].shape[-1:]
    score_shape = inp["query"].shape[:1] + inp["keys"].shape[1:-1]
    g_out, g_scores = torch.randn(out_shape), torch.randn(score_shape)
    clean = _run(backend, fn, inp, [g_out, g_scores])

    keys = inp["keys"].clone()
    key_pad = ~valid.reshape((rows,) + (1,) * (keys.dim() - 3) + (5,))
    keys[key_pad.expand(keys.shape[:-1])] = poison
    score_pad = ~valid_q.reshape((batch,) + (1,) * (len(score_shape) - 2) + (5,)).expand(score_shape)
    g_scores = g_scores.masked_fill(score_pad, float("nan"))
    poisoned = _run(backend, fn, dict(inp, keys=keys), [g_out, g_scores])
    _assert_same(clean, poisoned)


def _gru_case(mode: str, valid: str) -> dict:
    batch, seq_len, hidden = 4, 6, 5
    kw = dict(
        x=torch.randn(batch, seq_len, 3),
        weight_ih=torch.randn(3 * hidden, 3) * 0.5,
        weight_hh=torch.randn(3 * hidden, hidden) * 0.5,
        bias_ih=torch.randn(3 * hidden) * 0.1,
        bias_hh=torch.randn(3 * hidden) * 0.1,
        att=torch.rand(batch, seq_len) if mode != "gru" else None,
        mode=mode,
        h0=torch.randn(batch, hidden),
    )
    if valid == "lengths":
        kw["lengths"] = torch.tensor([0, 6, 3, 1])
    else:
        kw["mask"] = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 1],
                                   [1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 0, 1]], dtype=torch.bool)
    return kw


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("mode,valid", [("gru", "lengths"), ("augru", "mask"), ("aigru", "lengths"),
                                        ("agru", "mask")])
@pytest.mark.parametrize("backend", backends("gru_scan"))
def test_gru_scan_never_reads_padded_steps(backend, mode, valid, poison):
    kw = _gru_case(mode, valid)
    steps = (torch.arange(6) < kw["lengths"][:, None]) if valid == "lengths" else kw["mask"]
    g_states, g_last = torch.randn(4, 6, 5), torch.randn(4, 5)
    clean = _run(backend, gru_scan, kw, [g_states, g_last])
    poisoned_kw = dict(kw, x=kw["x"].masked_fill(~steps[..., None], poison))
    if kw["att"] is not None:
        poisoned_kw["att"] = kw["att"].masked_fill(~steps, poison)
    g_states = g_states.masked_fill(~steps[..., None], float("nan"))
    _assert_same(clean, _run(backend, gru_scan, poisoned_kw, [g_states, g_last]))


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("backend", backends("dien_aux_loss"))
def test_aux_loss_never_reads_padded_steps(backend, poison):
    batch, seq_len = 3, 5
    kw = dict(
        states=torch.randn(batch, seq_len, 4), pos=torch.randn(batch, seq_len, 3),
        neg=torch.randn(batch, seq_len, 3), weights=[torch.randn(6, 7), torch.randn(5, 6)],
        biases=[torch.randn(6), torch.randn(5)], out_weight=torch.randn(1, 5), out_bias=torch.randn(1),
        lengths=torch.tensor([5, 0, 3]),
    )
    steps = torch.arange(seq_len) < kw["lengths"][:, None]
    clean = _run(backend, dien_aux_loss, kw, [torch.tensor(1.0)])
    poisoned_kw = dict(kw, **{n: kw[n].masked_fill(~steps[..., None], poison) for n in ("states", "pos", "neg")})
    _assert_same(clean, _run(backend, dien_aux_loss, poisoned_kw, [torch.tensor(1.0)]))
