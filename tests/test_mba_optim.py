"""MBA optimisers (SPEC 5) against autograd + torch's optimisers, with every embedding kind."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from interest_kernels import _extension, use_backend
from interest_kernels.nn.mba_embedding import MBAEmbedding
from interest_kernels.optim import MBAAdagrad, MBAAdam, MBASGD

HAS_EXT = _extension.load()
BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_EXT, reason="extension not built")),
]
N, D, B, L = 30, 5, 6, 4
LAM = 0.3


def _oracle_step(kind, table, oracle_opt, ids, target, counts):
    """One step of torch's optimiser on autograd's gradient of
    mean batch loss + sum_{j in S} lambda / (2 n_j) ||w_j||^2 (dense, or sparse on S for Adam)."""
    table.grad = None
    loss = _loss(nn.functional.embedding(ids, table), target)
    touched = torch.unique(ids)
    reg = (LAM / (2 * counts[touched].double()) * table[touched].double().pow(2).sum(1)).sum()
    (loss + reg.to(loss.dtype)).backward()
    if kind == "adam":
        grad = table.grad
        table.grad = torch.sparse_coo_tensor(touched.unsqueeze(0), grad[touched], grad.shape, check_invariants=True)
    oracle_opt.step()


def _loss(emb, target):
    """A mean-over-samples loss of the looked-up rows (B, L, D)."""
    return ((emb.sum(1) - target) ** 2).sum(1).mean()


def _make(kind, params, counts=None, lr=None):
    if kind == "sgd":
        return MBASGD(params, lr=lr or 0.1, weight_decay=LAM, counts=counts)
    if kind == "adagrad":
        return MBAAdagrad(params, lr=lr or 0.1, weight_decay=LAM, lr_decay=0.01, counts=counts)
    return MBAAdam(params, lr=lr or 0.05, weight_decay=LAM, counts=counts)


def _make_oracle(kind, table):
    if kind == "sgd":
        return torch.optim.SGD([table], lr=0.1)
    if kind == "adagrad":
        return torch.optim.Adagrad([table], lr=0.1, lr_decay=0.01)
    return torch.optim.SparseAdam([table], lr=0.05)


def _batches(steps=3, high=12):
    return [(torch.randint(0, high, (B, L)), torch.randn(B, D)) for _ in range(steps)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("module", ["embedding", "mba_embedding"])
def test_matches_autograd_of_regularised_loss(backend, kind, module):
    torch.manual_seed(3)
    if module == "embedding":
        emb = nn.Embedding(N, D, sparse=True)
    else:
        emb = MBAEmbedding(N, D)
    oracle_table = emb.weight.detach().clone().requires_grad_()
    opt, oracle = _make(kind, emb.parameters()), _make_oracle(kind, oracle_table)
    counts = torch.zeros(N, dtype=torch.int64)
    start = emb.weight.detach().clone()
    touched_ever = torch.zeros(N, dtype=torch.bool)
    for ids, target in _batches():
        opt.zero_grad()
        _loss(emb(ids), target).backward()
        with use_backend(backend):
            opt.step()
        if module == "embedding":  # each lookup counts once (sparse grads carry no samples)
            counts += torch.bincount(ids.flatten(), minlength=N)
        else:  # once per sample
            counts += torch.stack([torch.bincount(torch.unique(r), minlength=N) for r in ids]).sum(0)
        _oracle_step(kind, oracle_table, oracle, ids, target, counts)
        touched_ever[ids.flatten()] = True
        torch.testing.assert_close(emb.weight.detach(), oracle_table.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(opt.state[emb.weight]["counts"], counts)
    assert torch.equal(emb.weight[~touched_ever], start[~touched_ever])
    assert emb.weight.grad is None or module == "embedding"
    for name in ("sum", "exp_avg", "exp_avg_sq"):
        if name in opt.state[emb.weight]:
            assert not opt.state[emb.weight][name][~touched_ever].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_sparse(backend, mode):
    bag = nn.EmbeddingBag(N, D, mode=mode, sparse=True)
    plain = nn.Embedding(N, D, sparse=True)
    plain.weight.data.copy_(bag.weight.data)
    opt_bag, opt_plain = MBASGD(bag.parameters(), lr=0.2, weight_decay=LAM), MBASGD(plain.parameters(), lr=0.2, weight_decay=LAM)
    for ids, target in _batches():
        bag_out = bag(ids)
        plain_out = plain(ids).sum(1) if mode == "sum" else plain(ids).mean(1)
        ((bag_out - target) ** 2).sum(1).mean().backward()
        ((plain_out - target) ** 2).sum(1).mean().backward()
        with use_backend(backend):
            opt_bag.step()
            opt_plain.step()
        opt_bag.zero_grad()
        opt_plain.zero_grad()
    torch.testing.assert_close(bag.weight, plain.weight, rtol=1e-6, atol=1e-6)
    assert torch.equal(opt_bag.state[bag.weight]["counts"], opt_plain.state[plain.weight]["counts"])


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_state_dict_round_trip_mid_training(kind, dtype):
    emb = MBAEmbedding(N, D, padding_idx=0, dtype=dtype)
    opt = _make(kind, emb.parameters())
    batches = _batches(5)
    for ids, target in batches[:3]:
        opt.zero_grad()
        _loss(emb(ids).float(), target).backward()
        opt.step()
    saved_state = copy.deepcopy(opt.state_dict())
    saved_table = emb.weight.detach().clone()

    def finish(module, optimizer):
        for ids, target in batches[3:]:
            optimizer.zero_grad()
            _loss(module(ids).float(), target).backward()
            optimizer.step()

    finish(emb, opt)
    again = MBAEmbedding(N, D, padding_idx=0, dtype=dtype)
    again.weight.data.copy_(saved_table)
    opt2 = _make(kind, again.parameters(), lr=123.0)  # lr comes back from the state dict
    opt2.load_state_dict(saved_state)
    for key, value in opt2.state[again.weight].items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == saved_state["state"][0][key].dtype, key
    finish(again, opt2)
    assert torch.equal(again.weight, emb.weight)
    for key, value in opt.state[emb.weight].items():
        other = opt2.state[again.weight][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_given_counts_are_read_not_changed():
    counts = torch.randint(1, 9, (N,))
    emb = nn.Embedding(N, D, sparse=True)
    ref = emb.weight.detach().clone()
    opt = MBASGD(emb.parameters(), lr=0.1, weight_decay=LAM, counts=counts)
    ids, target = _batches(1)[0]
    _loss(emb(ids), target).backward()
    grad = emb.weight.grad.coalesce()
    opt.step()
    j = grad.indices()[0]
    ref[j] -= 0.1 * (grad.values() + LAM * ref[j] / counts[j].unsqueeze(1))
    torch.testing.assert_close(emb.weight.detach(), ref)
    assert opt.state[emb.weight]["counts"] is counts and not opt.state[emb.weight]["online_counts"]


def test_param_groups_and_mixed_counts():
    a, b = MBAEmbedding(N, D), nn.Embedding(N, D, sparse=True)
    fixed = torch.full((N,), 4)
    opt = MBAAdagrad(
        [{"params": [a.weight], "lr": 0.5}, {"params": [b.weight], "weight_decay": 0.0}],
        lr=0.1, weight_decay=LAM, counts=[None, fixed],
    )
    ids, target = _batches(1)[0]
    a0, b0 = a.weight.detach().clone(), b.weight.detach().clone()
    _loss(a(ids) + b(ids), target).backward()
    opt.step()
    assert opt.state[a.weight]["online_counts"] and opt.state[a.weight]["counts"].sum() > 0
    assert opt.state[b.weight]["counts"] is fixed
    # first Adagrad step on a fresh row moves each touched element by about lr
    moved_a = (a.weight.detach() - a0)[ids.flatten()].abs().max()
    moved_b = (b.weight.detach() - b0)[ids.flatten()].abs().max()
    assert 0.45 < float(moved_a) <= 0.5 + 1e-6 and 0.09 < float(moved_b) <= 0.1 + 1e-6


def test_empty_batch_and_no_gradient():
    emb = nn.Embedding(N, D, sparse=True)
    opt = MBAAdam(emb.parameters(), lr=0.1, weight_decay=LAM)
    before = emb.weight.detach().clone()
    opt.step()  # no gradient at all: nothing happens, no step counted
    assert emb.weight not in opt.state or "step" not in opt.state[emb.weight]
    emb(torch.zeros(0, dtype=torch.int64)).sum().backward()
    opt.step()  # an empty batch counts a step (as SparseAdam) and writes nothing
    assert opt.state[emb.weight]["step"] == 1
    assert torch.equal(emb.weight, before)


def test_zero_grad_drops_recorded_rows():
    emb = MBAEmbedding(N, D)
    opt = MBASGD(emb.parameters(), lr=0.1)
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    opt.zero_grad()
    opt.step()
    assert torch.equal(emb.weight, before)


def test_bad_use_is_explained():
    dense = nn.Embedding(N, D)
    opt = MBASGD(dense.parameters(), lr=0.1)
    dense(torch.tensor([1])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    with pytest.raises(ValueError, match="weight_decay"):
        MBASGD(dense.parameters(), lr=0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="counts"):
        MBASGD(dense.parameters(), lr=0.1, counts=torch.ones(N + 1))
    with pytest.raises(ValueError, match=r"tables \(N, D\)"):
        MBASGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    emb = nn.Embedding(N, D, sparse=True)
    opt = MBASGD(emb.parameters(), lr=0.1, counts=torch.ones(N, dtype=torch.int64).index_fill_(0, torch.tensor([7]), 0))
    before = emb.weight.detach().clone()
    emb(torch.tensor([[3, 7]])).sum().backward()
    with pytest.raises(ValueError, match="id 7"):
        opt.step()
    assert torch.equal(emb.weight, before) and opt.state[emb.weight]["step"] == 0
