"""``torch.func`` transforms through the fused operators (``ops/func_transforms.py``).

The modules on the default CPU backend (the C++ target attention and GRU scans) under
``grad``, ``vmap`` and per-sample gradients ``vmap(grad)`` equal the reference backend
under plain autograd; so do ``grad`` and ``vmap(grad)`` on the Triton kernels (the
interpreter on CPU).
"""
import pytest
import torch
from torch.func import functional_call, grad, vmap

from interest_kernels import nn as ik_nn
from interest_kernels import use_backend
from interest_kernels.ops.target_attention.cpu import unavailable_reason

pytestmark = pytest.mark.usefixtures("one_thread")
needs_extension = pytest.mark.skipif(unavailable_reason() is not None, reason="the compiled extension is not built")
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _attention():
    torch.manual_seed(0)
    return ik_nn.TargetAttention(6, (12, 5), activation="dice").train()


def _evolving():
    torch.manual_seed(0)
    return ik_nn.InterestEvolving(6, "AUGRU", att_hidden_units=(8, 4))


def _inputs(batch=4, steps=5, dim=6, device="cpu"):
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, steps + 1, (batch,), generator=gen)
    lengths[0], lengths[1] = 0, steps
    args = torch.randn(batch, dim, generator=gen), torch.randn(batch, steps, dim, generator=gen), lengths
    return tuple(t.to(device) for t in args)


def _loss(module, params, buffers, query, keys, lengths):
    out = functional_call(module, (params, buffers), (query, keys, lengths))
    return (out * torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)).sum()


def _reference_grads(make, query, keys, lengths):
    module = make().to(query.device)
    with use_backend("reference"):
        out = module(query, keys, lengths)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)).sum().backward()
    return {name: p.grad for name, p in module.named_parameters()}, dict(module.named_buffers())


@pytest.mark.parametrize("make", [_attention, _evolving], ids=["target_attention_dice", "interest_evolving"])
@pytest.mark.parametrize("backend", [pytest.param(None, marks=needs_extension, id="cpu"), "triton"])
def test_grad_equals_reference_autograd(make, backend):
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    module = make().to(device)
    params = {name: p.detach() for name, p in module.named_parameters()}
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    args = _inputs(device=device)
    with use_backend(backend):
        got = grad(lambda p, b: _loss(module, p, b, *args))(params, buffers)
    want, want_buffers = _reference_grads(make, *args)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)
    for name, b in want_buffers.items():  # Dice's running statistics, updated once
        torch.testing.assert_close(buffers[name], b, rtol=1e-5, atol=1e-6, msg=name)


@needs_extension
def test_vmap_over_requests_and_per_sample_grads():
    """vmap of single requests equals the batch; vmap(grad) per-sample gradients equal one
    reference backward per request."""
    module = _evolving().eval()
    params = {name: p.detach() for name, p in module.named_parameters()}
    query, keys, lengths = _inputs()

    def one(p, q, k, n):
        return _loss(module, p, {}, q[None], k[None], n[None])

    with torch.no_grad(), use_backend("reference"):
        want = module(query, keys, lengths)
    got = vmap(lambda q, k, n: functional_call(module, params, (q[None], k[None], n[None]))[0])(
        query, keys, lengths)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, query, keys, lengths)
    for b in range(query.shape[0]):
        want, _ = _reference_grads(lambda: _evolving().eval(), query[b:b + 1], keys[b:b + 1], lengths[b:b + 1])
        for name, g in want.items():
            torch.testing.assert_close(per_sample[name][b], g, rtol=1e-5, atol=1e-6, msg=f"{name}[{b}]")


def test_per_sample_grads_on_the_triton_kernels():
    module = _evolving().eval().to(TRITON_DEVICE)
    params = {name: p.detach() for name, p in module.named_parameters()}
    query, keys, lengths = _inputs(batch=2, device=TRITON_DEVICE)

    def one(p, q, k, n):
        return _loss(module, p, {}, q[None], k[None], n[None])

    with use_backend("triton"):
        per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, query, keys, lengths)
    for b in range(query.shape[0]):
        want, _ = _reference_grads(lambda: _evolving().eval(), query[b:b + 1], keys[b:b + 1], lengths[b:b + 1])
        for name, g in want.items():
            torch.testing.assert_close(per_sample[name][b], g, rtol=1e-5, atol=1e-6, msg=f"{name}[{b}]")


@needs_extension
def test_second_derivatives_are_refused_not_zero():
    module = _evolving().eval()
    params = dict(module.named_parameters())
    query, keys, lengths = _inputs()

    def first(q):
        return grad(lambda q2: functional_call(module, params, (q2, keys, lengths)).sum())(q).sum()

    with pytest.raises(NotImplementedError, match="second derivatives"):
        grad(first)(query)


@needs_extension
def test_grad_and_per_sample_grads_through_the_fused_dice():
    """nn.Dice on the C++ Dice op: grad equals reference autograd (running statistics
    updated the same), and vmap(grad) in eval mode equals per-row reference autograd."""
    torch.manual_seed(0)
    dice = ik_nn.Dice(7).train()
    x = torch.randn(9, 7)
    weights = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    params = {name: p.detach() for name, p in dice.named_parameters()}
    buffers = {name: b.clone() for name, b in dice.named_buffers()}
    got = grad(lambda p, b: (functional_call(dice, (p, b), (x,)) * weights).sum())(params, buffers)
    reference = ik_nn.Dice(7).train()
    reference.load_state_dict(dice.state_dict())
    with use_backend("reference"):
        (reference(x) * weights).sum().backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    for name, b in reference.named_buffers():
        torch.testing.assert_close(buffers[name], b, rtol=1e-5, atol=1e-6, msg=name)

    dice.eval()
    reference.eval()
    reference.load_state_dict(dice.state_dict())  # the training step above moved its statistics
    per_row = vmap(grad(lambda p, row: (functional_call(dice, p, (row[None],)) * row).sum()),
                   in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        reference.zero_grad()
        with use_backend("reference"):
            (reference(x[i : i + 1]) * x[i]).sum().backward()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(per_row[name][i], p.grad, rtol=1e-5, atol=1e-6, msg=f"{name}[{i}]")
