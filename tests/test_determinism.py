"""Determinism on CPU: the same inputs twice give bitwise-equal outputs, gradients and
optimiser states, on every backend, with and without ``torch.use_deterministic_algorithms``.
MBA batches hold duplicate ids (the sums must not depend on the order of arrival)."""
from __future__ import annotations

import pytest
import torch

import interest_kernels as ik
from interest_kernels import BackendUnavailableError, use_backend
from interest_kernels import nn as iknn
from interest_kernels import optim as ikoptim

import target_attention_cases as ta_cases
from backend_runs import backends, outputs_and_leaves


@pytest.fixture(params=[False, True], ids=["default", "deterministic_algorithms"])
def deterministic(request):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(before)


def _outputs_and_grads(backend: str, fn, inputs: dict, seed: int = 7) -> list[torch.Tensor]:
    """Every output and the gradient of every floating leaf, as one flat list."""
    outs, leaves = outputs_and_leaves(backend, fn, inputs)
    gen = torch.Generator().manual_seed(seed)
    grads = torch.autograd.grad(outs, list(leaves.values()), [torch.randn(o.shape, generator=gen) for o in outs],
                                allow_unused=True)
    return [o.detach() for o in outs] + [g for g in grads if g is not None]


def _assert_bitwise(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        same = torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        assert same, f"tensor {i} differs between two identical runs"


@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
@pytest.mark.parametrize("backend", backends("target_attention"))
def test_target_attention_twice(backend, activation, deterministic):
    inp = ta_cases.make_case(seq_len=6, dim=5, valid="mask", activation=activation, dice_training=True,
                             rows=2, batch=4)
    fn = ta_cases.call(ik.target_attention)
    _assert_bitwise(_outputs_and_grads(backend, fn, inp), _outputs_and_grads(backend, fn, inp))


@pytest.mark.parametrize("backend", backends("gru_scan"))
def test_gru_scan_twice(backend, deterministic):
    kw = dict(x=torch.randn(3, 5, 4), weight_ih=torch.randn(15, 4), weight_hh=torch.randn(15, 5),
              bias_ih=torch.randn(15), bias_hh=torch.randn(15), att=torch.rand(3, 5), mode="augru",
              lengths=torch.tensor([5, 0, 2]), h0=torch.randn(3, 5))
    _assert_bitwise(_outputs_and_grads(backend, ik.gru_scan, kw), _outputs_and_grads(backend, ik.gru_scan, kw))


@pytest.mark.parametrize("backend", backends("dice"))
def test_dice_twice(backend, deterministic):
    def run():
        stats = dict(running_mean=torch.zeros(5), running_var=torch.ones(5))
        kw = dict(x=torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(1)),
                  alpha=torch.full((5,), 0.25))
        out = _outputs_and_grads(backend, lambda **k: ik.dice(**k, **stats), kw)
        return out + list(stats.values())

    _assert_bitwise(run(), run())


def test_aux_loss_twice(deterministic):
    kw = dict(states=torch.randn(3, 5, 4), pos=torch.randn(3, 5, 2), neg=torch.randn(3, 5, 2),
              weights=[torch.randn(6, 6)], biases=[torch.randn(6)], out_weight=torch.randn(6),
              lengths=torch.tensor([5, 1, 3]))
    for backend in backends("dien_aux_loss"):
        _assert_bitwise(_outputs_and_grads(backend, ik.dien_aux_loss, kw),
                        _outputs_and_grads(backend, ik.dien_aux_loss, kw))


@pytest.mark.parametrize("opt", ["MBASGD", "MBAAdagrad", "MBAAdam"])
@pytest.mark.parametrize("backend", backends("mba_update"))
def test_mba_training_twice(backend, opt, deterministic):
    """Three steps of an MBAEmbedding + optimiser, duplicate ids in every batch, and a
    sparse nn.Embedding table beside it: tables, counts and optimiser state bitwise equal."""

    def train() -> list[torch.Tensor]:
        torch.manual_seed(3)
        emb = iknn.MBAEmbedding(50, 7)
        sparse = torch.nn.Embedding(30, 7, sparse=True)
        optimizer = getattr(ikoptim, opt)([emb.weight, sparse.weight], lr=0.05, weight_decay=0.1)
        for step in range(3):
            ids = torch.randint(0, 12, (16, 5))  # 80 lookups of 12 ids: many duplicates
            loss = (emb(ids) * torch.randn(16, 5, 7)).sum() + sparse(ids[:, :3]).pow(2).sum()
            loss.backward()
            try:
                with use_backend(backend):
                    optimizer.step()
            except BackendUnavailableError as exc:
                pytest.skip(str(exc))
            optimizer.zero_grad()
        state = [t for p in (emb.weight, sparse.weight) for t in optimizer.state[p].values()
                 if isinstance(t, torch.Tensor)]
        return [emb.weight.detach().clone(), sparse.weight.detach().clone()] + state

    _assert_bitwise(train(), train())


@pytest.mark.parametrize("backend", backends("mba_update"))
def test_dedup_rows_twice(backend, deterministic):
    ids = torch.randint(0, 9, (300,))
    rows = torch.randn(300, 6)
    with use_backend(backend):
        try:
            first = ik.dedup_rows(ids, rows, 9)
        except BackendUnavailableError as exc:
            pytest.skip(str(exc))
        second = ik.dedup_rows(ids.clone(), rows.clone(), 9)
    _assert_bitwise(list(first), list(second))
