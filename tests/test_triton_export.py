"""The Triton kernels as ``torch.library.triton_op``: graphs trace into their launches.

``torch.export`` of the modules on the triton backend keeps each kernel op as one node;
``run_decompositions(decompose_custom_triton_ops=True)`` (what AOTInductor does) turns
them into ``triton_kernel_wrapper`` launches with no opaque ``interest_kernels`` op left,
and that graph runs equal to eager at other batch sizes and lengths. ``torch.compile``
sees the launches in the forward and the backward graph. On CPU the kernels run in the
interpreter (``ops/traceable_triton.py``), on a GPU machine on CUDA; a CUDA AOTInductor
package of the models is checked in ``test_export.py`` when a GPU is present.
"""
from __future__ import annotations

import logging

import pytest
import torch

from interest_kernels import nn as ik_nn
from interest_kernels import use_backend

pytest.importorskip("triton")

HOP = "triton_kernel_wrapper"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def quiet_mutation_analysis():
    """Without a GPU driver Triton cannot lower a kernel to find the tensors it writes, and
    torch then assumes every tensor argument is written (correct, with copies): it warns
    at each launch."""
    log = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    level = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(level)


def _targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _interest_ops(gm: torch.fx.GraphModule) -> set[str]:
    return {t for t in _targets(gm) if t.startswith("interest_kernels.")}


def _launches(gm: torch.fx.GraphModule) -> int:
    return sum(HOP in t for t in _targets(gm))


def _trained_dice(module: torch.nn.Module) -> torch.nn.Module:
    """Running statistics away from (0, 1), so eval-mode Dice is not the identity."""
    for name, buf in module.named_buffers():
        if name.endswith("running_mean"):
            buf.uniform_(-0.5, 0.5)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
    for name, p in module.named_parameters():
        if name.endswith("alpha"):
            p.data.uniform_(0.1, 0.9)
    return module


def _inputs(kind: str, batch: int, steps: int, dim: int = 8):
    gen = torch.Generator().manual_seed(batch * 100 + steps)
    query = torch.randn(batch, dim, generator=gen)
    keys = torch.randn(batch, steps, dim, generator=gen)
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    lengths[0] = steps
    return tuple(t.to(DEVICE) for t in ((keys,) if kind == "dice" else (query, keys, lengths)))


def _module(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "interest_evolving":
        module = ik_nn.InterestEvolving(8, "AUGRU", att_hidden_units=(16, 8))
    else:
        module = ik_nn.Dice(8)
    return _trained_dice(module).eval().to(DEVICE)


def _shapes(kind: str):
    batch, steps = torch.export.Dim("batch", min=1), torch.export.Dim("steps", min=1)
    seq = {0: batch, 1: steps}
    return (seq,) if kind == "dice" else ({0: batch}, seq, {0: batch})


# kind -> the kernel ops its export holds. nn.TargetAttention (Dice activation),
# nn.GRU and InterestEvolving's nn.AttentionalGRU are exported inside the DIEN of
# test_model_export_for_cuda_traces_the_kernels (each trace costs seconds here).
EXPORTS = {
    "dice": {"interest_kernels.dice_apply.default"},
}


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_export_decomposes_into_kernel_launches(kind):
    module = _module(kind)
    with torch.no_grad(), use_backend("triton"):
        program = torch.export.export(module, _inputs(kind, 3, 5), dynamic_shapes=_shapes(kind))
        assert _interest_ops(program.graph_module) == EXPORTS[kind]
        launches = program.run_decompositions(decompose_custom_triton_ops=True)
        assert _interest_ops(launches.graph_module) == set()
        assert _launches(launches.graph_module) == len(EXPORTS[kind])
        for batch, steps in ((4, 7), (1, 2)):
            args = _inputs(kind, batch, steps)
            want = module(*args)
            got = launches.module()(*args)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compile_traces_forward_and_backward_launches():
    """torch.compile (AOT autograd) of InterestEvolving's loss: the forward and the
    backward graph launch the kernels themselves; values and gradients equal eager."""
    from torch._dynamo.backends.debugging import aot_eager, boxed_nop

    graphs = {}

    def keep(name):
        def compiler(gm, inputs):
            graphs[name] = gm
            return boxed_nop(gm, inputs)
        return compiler

    def backend(gm, inputs):
        return aot_eager(gm, inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward"))

    module = _module("interest_evolving")
    args = _inputs("interest_evolving", 3, 6)
    params = list(module.parameters())

    def loss(query, keys, lengths):
        return (module(query, keys, lengths) ** 2).sum()

    torch._dynamo.reset()
    with use_backend("triton"):
        compiled = torch.compile(loss, fullgraph=True, backend=backend)(*args)
        got = torch.autograd.grad(compiled, params)
        want_loss = loss(*args)
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(compiled, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for name in ("forward", "backward"):
        assert _interest_ops(graphs[name]) == set(), name
        assert _launches(graphs[name]) >= 2, name  # target attention and the GRU scan


TRITON_OPS = {"interest_kernels.target_attention_fwd.default", "interest_kernels.gru_scan_fwd.default",
              "interest_kernels.dice_apply.default"}


def test_model_export_for_cuda_traces_the_kernels():
    """``python -m interest_kernels.export --device cuda`` exports the models on the Triton
    kernels; traced here on the CPU (interpreter) for a DIEN with GRU interest extraction,
    AUGRU evolution, Dice in the attention and the MLP: every kernel op decomposes into
    launches, and the graph AOTInductor compiles equals eager on other shapes. (DIN's and
    DMIN's graphs use the same ops; each trace costs seconds here.)"""
    from interest_kernels.export import ScoringModule, export_programs
    from interest_kernels.models import MODELS
    from test_export import _model
    from test_models import _batch, _spec

    model = _trained_dice(_model(MODELS["dien"], {"att_activation": "dice", "mlp_activation": "dice"}))
    program = export_programs(model, DEVICE.type, backend="triton")["score"]
    assert _interest_ops(program.graph_module) == TRITON_OPS
    launches = program.run_decompositions(decompose_custom_triton_ops=True).module()
    assert _interest_ops(launches) == set()
    users = _batch(_spec(), b=5, t=6)  # lengths 0 and T among them
    args = tuple(t.to(DEVICE) for t in (users.user, users.item, users.cat, users.hist_items,
                                        users.hist_cats, users.lengths, users.context))
    with torch.no_grad(), use_backend("triton"):
        torch.testing.assert_close(launches(*args), ScoringModule(model)(*args), rtol=1e-5, atol=1e-6)


KERNELS = {
    "target_attention_fwd": ["attention_fwd_kernel"],
    "target_attention_stats": ["dice_stats_kernel"],
    "target_attention_bwd": ["attention_bwd_kernel", "first_layer_grad_kernel",
                            "_segment_sum_kernel"],
    "target_attention_stats_bwd": ["attention_bwd_kernel", "first_layer_grad_kernel",
                                  "_segment_sum_kernel"],
    "gru_scan_fwd": ["_gru_scan_fwd_kernel"],
    "gru_scan_bwd": ["_gru_scan_bwd_kernel"],
    "dice_batch_stats": ["_stats_partial_kernel", "_stats_finalize_kernel"],
    "dice_apply": ["_dice_fwd_kernel"],
    "dice_apply_backward": ["_dice_bwd_reduce_kernel", "_dice_bwd_dx_kernel"],
}


def test_compile_caches_see_every_kernel_of_each_op(monkeypatch):
    """torch.compile's caches key a graph that calls a triton_op by the kernels its body
    launches, which torch finds by reading the body for ``wrap_triton(kernel)``: a kernel
    launched some other way would let a cached graph outlive an edit of that kernel.
    (torch recognises compiled kernels only: interpreted ones are let through here.)"""
    import triton.runtime.jit as jit
    from torch._library.custom_ops import OPDEFS
    from torch._library.triton import get_inner_triton_kernels

    from interest_kernels.ops.dice import triton as _dice  # noqa: F401  (registers the ops)
    from interest_kernels.ops.gru_scan import triton as _gru  # noqa: F401
    from interest_kernels.ops.target_attention.triton import ops as _attention  # noqa: F401

    try:
        from triton.runtime.interpreter import InterpretedFunction
        monkeypatch.setattr(jit, "JITFunction", (jit.JITFunction, InterpretedFunction))
    except ImportError:
        pass
    found = {name: [k.fn.__name__ for k in get_inner_triton_kernels(OPDEFS[f"interest_kernels::{name}"]._init_fn)]
             for name in KERNELS}
    assert found == KERNELS
