"""Serve DIN, DIEN and DMIN without Python: export to an AOTInductor package.

    python -m interest_kernels.export --model din|dien|dmin --checkpoint CK --out model.pt2 [--device cpu|cuda]

``CK`` is a checkpoint written by ``python -m interest_kernels.train --checkpoint CK``.
The package holds two entry points (AOTInductor model names), each a function of plain
tensors, all int64, dynamic in the batch B, the candidates N and the history length T:

``"score"`` (:class:`ScoringModule`), one score per request row:
    user (B,), item (B,), cat (B,), hist_items (B, T), hist_cats (B, T), lengths (B,),
    context (B, K)  ->  scores (B,) float32, the click probability sigmoid(logit).

``"candidates"`` (:class:`CandidateScoringModule`), N candidates of U users, each user's
history read once (:meth:`CTRModel.score_candidates`):
    user (U,), hist_items (U, T), hist_cats (U, T), lengths (U,), context (U, K),
    item (N,), cat (N,), user_index (N,) in [0, U)  ->  scores (N,) float32.

Ids are the dense indices of the training vocabularies (0 = padding / unknown); history
positions ``t >= lengths[b]`` are padding and never read; ``1 <= T`` (a user without
history has length 0), and T <= the model's ``max_len`` for DMIN. K, the number of context
fields, is fixed by the model.

On the CPU the graph runs the fused backends of eager inference (``backend="fused"``):
the compiled extension's operators (fused target attention, GRU scans) appear in the
package as calls into ``interest_kernels._C``, so a C++ process must load that library
(or the CMake target ``interest_kernels_ops``) before it loads the package: see
``csrc/serving/``. With ``--device cuda`` the graph runs the project's Triton kernels
(target attention, GRU scans, Dice), which are ``torch.library.triton_op`` s: AOTInductor
traces into their launches and compiles the kernels into the package with the rest of the
graph, so serving needs neither Python nor Triton (nor the project's operator library).
"""
from __future__ import annotations

import argparse
import os
import struct
import tempfile
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from torch import nn

from ._backend import use_backend
from .data.common import Batch, FeatureSpec
from .models import MODELS, CTRModel

__all__ = [
    "SCORE_INPUTS",
    "CANDIDATE_INPUTS",
    "ScoringModule",
    "CandidateScoringModule",
    "load_checkpoint_model",
    "export_programs",
    "export_package",
    "export_onnx",
    "write_tensors",
    "read_tensors",
    "main",
]

SCORE_INPUTS = ("user", "item", "cat", "hist_items", "hist_cats", "lengths", "context")
CANDIDATE_INPUTS = ("user", "hist_items", "hist_cats", "lengths", "context", "item", "cat", "user_index")


class ScoringModule(nn.Module):
    """``model`` (in eval mode) as a function of plain tensors (see the module docstring)
    returning the click probability (B,) float32."""

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(
        self, user: torch.Tensor, item: torch.Tensor, cat: torch.Tensor, hist_items: torch.Tensor,
        hist_cats: torch.Tensor, lengths: torch.Tensor, context: torch.Tensor,
    ) -> torch.Tensor:
        # No model reads the label: inference has none.
        batch = Batch(user, item, cat, hist_items, hist_cats, lengths, context, None)
        return torch.sigmoid(self.model(batch).logits.float())


class CandidateScoringModule(nn.Module):
    """``model.score_candidates`` (eval mode) as a function of plain tensors: U users'
    features, N candidates and the user row of each -> click probability (N,) float32."""

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(
        self, user: torch.Tensor, hist_items: torch.Tensor, hist_cats: torch.Tensor, lengths: torch.Tensor,
        context: torch.Tensor, item: torch.Tensor, cat: torch.Tensor, user_index: torch.Tensor,
    ) -> torch.Tensor:
        users = Batch(user, None, None, hist_items, hist_cats, lengths, context, None)
        return torch.sigmoid(self.model.score_candidates(users, item, cat, user_index).float())


def _spec_from_state(state: dict[str, torch.Tensor], max_len: int) -> FeatureSpec:
    """The vocabulary sizes a model's state_dict was built with."""
    num_items = state["item_embedding.weight"].shape[0]
    contexts = sorted(
        (int(k.split(".")[1]), v.shape[0]) for k, v in state.items()
        if k.startswith("context_embeddings.") and k.endswith(".weight")
    )
    item_category = state.get("sampler.item_category")
    if item_category is None:  # DIN samples no negatives: the mapping is not saved
        item_category = torch.zeros(num_items, dtype=torch.int64)
    return FeatureSpec(
        num_users=state["user_embedding.weight"].shape[0], num_items=num_items,
        num_cats=state["cat_embedding.weight"].shape[0], context_sizes=tuple(n for _, n in contexts),
        max_len=max_len, item_category=item_category,
    )


def load_checkpoint_model(path: str, model: Optional[str] = None) -> CTRModel:
    """The model saved in a ``python -m interest_kernels.train --checkpoint`` file, in
    eval mode on the CPU. ``model``, when given, must be the checkpoint's model name."""
    from .train import TrainConfig, build_model

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"--checkpoint {path!r} is not a checkpoint of python -m interest_kernels.train")
    config = TrainConfig(**state["config"])
    if model is not None and model != config.model:
        raise ValueError(f"--model {model!r} does not match the checkpoint's model {config.model!r}")
    spec = _spec_from_state(state["model"], config.max_len)
    net = build_model(config, SimpleNamespace(spec=spec))
    net.load_state_dict(state["model"])
    return net.eval()


def _example_inputs(model: CTRModel, users: int, candidates: int, steps: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    contexts = len(model.context_embeddings)

    def ids(table: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(1, table.weight.shape[0], shape, generator=gen).to(device)

    lengths = torch.tensor([steps] + [1] * (users - 1), device=device)
    context = torch.stack([ids(t, (users,)) for t in model.context_embeddings], 1) if contexts else \
        torch.zeros(users, 0, dtype=torch.int64, device=device)
    user = ids(model.user_embedding, (users,))
    hist_items, hist_cats = ids(model.item_embedding, (users, steps)), ids(model.cat_embedding, (users, steps))
    score = (user, ids(model.item_embedding, (users,)), ids(model.cat_embedding, (users,)),
             hist_items, hist_cats, lengths, context)
    user_index = torch.arange(candidates, device=device) % users
    cand = (user, hist_items, hist_cats, lengths, context, ids(model.item_embedding, (candidates,)),
            ids(model.cat_embedding, (candidates,)), user_index)
    return score, cand


def _load_packaged_attention() -> bool:
    """Whether the extension provides ``target_attention_cpu_packaged`` (``csrc/serving_ops.cpp``);
    registers its fake implementation once."""
    from .ops.target_attention.cpu import unavailable_reason

    if unavailable_reason() is not None or not hasattr(torch.ops.interest_kernels, "target_attention_cpu_packaged"):
        return False
    if not torch._library.utils.has_fake_kernel(torch.ops.interest_kernels.target_attention_cpu_packaged.default):
        @torch.library.register_fake("interest_kernels::target_attention_cpu_packaged")
        def _fake(query, keys, key_index, lengths, mask, weights, biases, out_weight, out_bias, act_params,
                  activation, normalization):
            return torch.ops.interest_kernels.target_attention_cpu(
                query, keys, key_index, lengths, mask, weights, biases, out_weight, out_bias, act_params or [],
                activation, normalization)
    return True


def _packageable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Calls of the fused target attention whose ``act_params`` list is empty (sigmoid,
    relu, identity) become calls of ``target_attention_cpu_packaged`` with None:
    AOTInductor's proxy executor (torch 2.13) passes an empty ``Tensor[]`` as None, which
    aborts the call."""
    if not _load_packaged_attention():
        return gm
    fused = torch.ops.interest_kernels.target_attention_cpu.default
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is fused and len(node.args) > 9 and not node.args[9]:
            node.target = torch.ops.interest_kernels.target_attention_cpu_packaged.default
            node.args = node.args[:9] + (None,) + node.args[10:]
    gm.recompile()
    return gm


def export_programs(
    model: CTRModel, device: str = "cpu", backend: Optional[str] = None
) -> dict[str, torch.export.ExportedProgram]:
    """``torch.export`` of both entry points, dynamic in B (or U), N and T.

    ``backend``: the op backend traced (``use_backend``); by default each op's preferred
    one: the fused C++ ops on the CPU, the Triton kernels on CUDA (see the module
    docstring). ``backend="triton"`` on the CPU (under the Triton interpreter) traces the
    graph a CUDA export compiles."""
    device_ = torch.device(device)
    model = model.to(device_).eval()
    max_steps = model.positions.num_embeddings if hasattr(model, "positions") else None
    batch = torch.export.Dim("batch", min=1)
    users = torch.export.Dim("users", min=1)
    candidates = torch.export.Dim("candidates", min=1)
    steps = torch.export.Dim("history", min=1, max=max_steps) if max_steps else torch.export.Dim("history", min=1)
    score_args, cand_args = _example_inputs(model, 3, 5, min(4, max_steps or 4), device_)
    score_shapes = {
        "user": {0: batch}, "item": {0: batch}, "cat": {0: batch}, "hist_items": {0: batch, 1: steps},
        "hist_cats": {0: batch, 1: steps}, "lengths": {0: batch}, "context": {0: batch},
    }
    cand_shapes = {
        "user": {0: users}, "hist_items": {0: users, 1: steps}, "hist_cats": {0: users, 1: steps},
        "lengths": {0: users}, "context": {0: users}, "item": {0: candidates}, "cat": {0: candidates},
        "user_index": {0: candidates},
    }
    with torch.no_grad(), use_backend(backend):
        return {
            "score": torch.export.export(ScoringModule(model), score_args, dynamic_shapes=score_shapes),
            "candidates": torch.export.export(CandidateScoringModule(model), cand_args, dynamic_shapes=cand_shapes),
        }


def export_package(
    model: CTRModel, path: str, device: str = "cpu", inductor_configs: Optional[dict[str, object]] = None
) -> str:
    """Compile both entry points with AOTInductor into one package at ``path``.
    ``inductor_configs``: extra Inductor options (``torch._inductor.config`` names)."""
    from torch._inductor import aot_compile
    from torch._inductor.package import package_aoti

    programs = export_programs(model, device)
    options = {**(inductor_configs or {}), "aot_inductor.package": True}
    files = {
        name: aot_compile(_packageable(program.module()), tuple(program.example_inputs[0]), options=options)
        for name, program in programs.items()
    }
    return package_aoti(path, files)


def export_onnx(model: CTRModel, path: str) -> None:
    """The ``"score"`` entry point as ONNX (dynamic B and T), for onnxruntime and the like.

    Traced from the reference backend: the fused operators are opaque to ONNX. DIN and
    DMIN export; DIEN does not, since its GRU scans (the attentional AUGRU/AGRU/AIGRU)
    are one operator with no ONNX form, and their reference is a Python loop over T, which
    would fix T. Needs the ``onnx`` extra (onnx, onnxscript; onnxruntime to run it)."""
    if isinstance(model, MODELS["dien"]):
        raise NotImplementedError(
            "DIEN cannot be exported to ONNX: its GRU scans are one operator without an ONNX "
            "form; serve it with the AOTInductor package (python -m interest_kernels.export)"
        )
    program = export_programs(model, "cpu", backend="reference")["score"]
    torch.onnx.export(program, (), path, dynamo=True, input_names=list(SCORE_INPUTS), output_names=["scores"])


# --- a tensor file format simple enough for any C++ reader ---------------------------

_MAGIC = b"IKTENSOR"
_DTYPES = {torch.int64: 0, torch.float32: 1}


def write_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write named int64/float32 tensors to ``path`` (format in ``csrc/serving/README.md``):
    ``IKTENSOR``, uint32 count, then per tensor uint32 name length, name (UTF-8), uint32
    dtype (0 int64, 1 float32), uint32 ndim, int64 sizes, the data (C order, little endian)."""
    with open(path, "wb") as f:
        f.write(_MAGIC + struct.pack("<I", len(tensors)))
        for name, t in tensors.items():
            if t.dtype not in _DTYPES:
                raise TypeError(f"{name}: only int64 and float32 tensors can be written, got {t.dtype}")
            raw = name.encode()
            f.write(struct.pack("<I", len(raw)) + raw)
            f.write(struct.pack("<II", _DTYPES[t.dtype], t.dim()) + struct.pack(f"<{t.dim()}q", *t.shape))
            f.write(t.detach().cpu().contiguous().numpy().tobytes())


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`write_tensors` (or by the C++ runner)."""
    codes = {v: k for k, v in _DTYPES.items()}
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != _MAGIC:
        raise ValueError(f"{path}: not a tensor file (no {_MAGIC!r} header)")
    (count,), pos = struct.unpack_from("<I", data, 8), 12
    out = {}
    for _ in range(count):
        (length,) = struct.unpack_from("<I", data, pos)
        name = data[pos + 4 : pos + 4 + length].decode()
        pos += 4 + length
        code, ndim = struct.unpack_from("<II", data, pos)
        shape = struct.unpack_from(f"<{ndim}q", data, pos + 8)
        pos += 8 + 8 * ndim
        dtype = codes[code]
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if len(data) < pos + nbytes:
            raise ValueError(f"{path}: truncated data of {name!r}")
        flat = torch.frombuffer(bytearray(data[pos : pos + nbytes]), dtype=dtype) if nbytes else \
            torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(shape)
        pos += nbytes
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m interest_kernels.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of python -m interest_kernels.train")
    p.add_argument("--out", required=True, help="the AOTInductor package to write (.pt2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="an Inductor option, e.g. aot_inductor.compile_wrapper_opt_level=O0 (compiles "
                        "about 3x faster; repeatable)")
    return p


def _config_value(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    configs = {}
    for item in args.config:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--config takes KEY=VALUE, got {item!r}")
        configs[key] = _config_value(value)
    model = load_checkpoint_model(args.checkpoint, args.model)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".pt2", delete=False) as tmp:
        pass
    try:
        export_package(model, tmp.name, args.device, configs)
        os.replace(tmp.name, args.out)
    finally:
        if os.path.exists(tmp.name):
            os.remove(tmp.name)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
