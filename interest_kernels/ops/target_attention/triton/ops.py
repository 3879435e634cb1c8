"""The kernels as ``torch.library`` custom ops: launch, fake implementations, autograd.

Shapes (R = B*E attention rows, N history rows, G = E for per-head MLPs else 1):
qterm (R, H1) fp32 (first bias included); query (R, D); keys (N*E, T, D); key_index (B,)
int64 or None; lengths (N,) int64 or None; mask (N, T) bool or None; wpack (G, S) packed
weights; apack (G, 3 * sum H_l) fp32 packed activation parameters or None; ``units`` the
hidden widths.

Ops: ``target_attention_fwd`` -> (out (R, D), scores (R, T) or (0, T), lse (R,) fp32);
its backward op; ``target_attention_stats`` -> (E, 2, H_l) fp32 Dice statistics of layer
``layer`` and its backward op. The backward ops return the gradients of
(qterm, query, keys, wpack, apack), apack's empty when absent.

Each op is a ``torch.library.triton_op`` whose body is tensor ops and kernel launches
through ``wrap_triton`` (``ops/traceable_triton.py``): ``torch.compile`` traces into the
launches and AOTInductor compiles them into a package. So the bodies keep symbolic sizes
symbolic (``torch.sym_min``/``sym_max``, no Python ``min`` on a size), and no launcher
reads a tensor value back to the host.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...func_transforms import TransformableOp, register_sliced_vmap
from ...traceable_triton import wrap_triton
from .backward import attention_bwd_kernel
from .config import (ACTIVATIONS, BLOCK_T, DATA_GRAD_WARPS, DOT_FLOPS_PER_L2_BYTE, UNIT_CHUNK,
                     launch_config, num_sms, pad)
from .forward import attention_fwd_kernel
from .pack import act_prefix, weight_prefix
from .segment import sum_rows_by_history
from .statistics import dice_stats_kernel
from .weight_grads import first_layer_grad_kernel


def _act_layers(activation: str, layers: int) -> int:
    """How many layers' activation parameters a kernel running ``layers`` layers with the
    top one activated reads."""
    return layers if activation in ("prelu", "dice") else 0


def _shape_args(query, keys, wpack, apack, units, heads):
    """The kernels' runtime sizes (B, T, N, E, D, H1, H2, H3, W_ROW, A_ROW)."""
    rows, dim = query.shape
    batch = rows // heads
    n_hist = keys.shape[0] // heads
    h = list(units) + [0] * (3 - len(units))
    a_row = apack.shape[1] if apack is not None else 0
    return [batch, keys.shape[1], torch.sym_max(n_hist, 1), heads, dim, *h, wpack.shape[1], a_row]


def _balanced(batch: int, cap: int) -> int:
    """The fewest programs whose busiest one walks as many rows (``ceil(batch / cap)``, rows
    strided by the program count) as with ``cap`` programs: the same makespan with fewer
    weight loads and partial rows (150 rows on 132 SMs: 75 programs of 2 rows)."""
    per = torch.sym_max(1, (batch + cap - 1) // cap)
    return torch.sym_max(1, (batch + per - 1) // per)


def _programs(rows: int, heads: int, device: torch.device, share: int = 1) -> int:
    """Programs per head of the persistent grid (grid = (programs, heads)) for R = B*E
    rows: the SMs shared among the heads (and ``share`` unit chunks), at most one
    program per row, at least one, no more than keep the busiest program's row count;
    symbolic sizes stay symbolic (no guard on a dynamic batch)."""
    batch = rows // heads
    cap = torch.sym_max(1, torch.sym_min(batch, num_sms(device) // (heads * share)))
    return _balanced(batch, cap)


def _unit_chunks(units: Sequence[int]) -> list[int]:
    """The first layer's units per chunk of the weight-gradient kernel: ``UNIT_CHUNK`` and
    the rest (``MAX_UNITS`` = 128 makes two at most), or one chunk of them all."""
    return [n for n in (min(units[0], UNIT_CHUNK), units[0] - UNIT_CHUNK) if n > 0]


def _partial_per_unit(dim: int, units: Sequence[int], layers: int) -> int:
    """float32 values per first-layer unit in a weight-gradient partial: W_kd's and W_p's
    rows (D each) and, with two or more layers, W_2's column (H2)."""
    return 2 * dim + (units[1] if layers >= 2 else 0)


def _chunk_row_cost(width: int, dim: int, dz_cols: int, layers: int, dtype: torch.dtype,
                    flags: dict) -> int:
    """Estimated time of one key tile (``BLOCK_T`` positions; a row costs this times its
    tiles, the same for every chunk) of the weight-gradient kernel for a unit chunk of
    padded width ``width``, in L2 bytes: the bytes it reads, keys (D x dtype size per
    position) and its dz columns (``dz_cols`` x 4), plus its dot FLOPs over the
    tensor-core FLOPs per L2 byte (``config.DOT_FLOPS_PER_L2_BYTE``) at the GPU's dot
    precisions (``launch_config``). The FLOPs per position, with two layers: z1's two
    dots, 2 x 2 BD width (input dtype), and the gradient dots dz2^T a1, dz2 W_2 and
    k^T dz1, 2 (2 BH2 + BD) width (bfloat16, else float32 at PREC); with one layer
    only k^T dz1, 2 BD width. At the float16 benchmark (D 64, H2 40): 61122 for 64 units,
    29103 for 16 (float32: 80122, 39997). Weight loads and the partial's store are per
    program, not per row, and left out."""
    bd, bh2 = flags["BD"], flags["BH2"]
    fwd_rate = DOT_FLOPS_PER_L2_BYTE["16-bit" if dtype.itemsize == 2 else flags["PREC"]]
    bwd_rate = DOT_FLOPS_PER_L2_BYTE["16-bit" if dtype == torch.bfloat16 else flags["PREC"]]
    fwd_flops = 2 * BLOCK_T * width * 2 * bd if layers >= 2 else 0
    bwd_flops = 2 * BLOCK_T * width * ((2 * bh2 if layers >= 2 else 0) + bd)
    read = BLOCK_T * (dim * dtype.itemsize + dz_cols * 4)
    return read + fwd_flops // fwd_rate + bwd_flops // bwd_rate


def _chunk_programs(rows: int, heads: int, device: torch.device, units: list[int],
                    layers: int, dim: int, dtype: torch.dtype, flags: dict):
    """Programs per head of the weight-gradient kernel's first and second unit chunk
    (0 for one chunk; the grid is (their sum, heads)). The first chunk (``UNIT_CHUNK``
    units, the widest) takes half the SMs as :func:`_programs` gives it; the second the
    fewest programs whose busiest one (``ceil(B / P1)`` rows) costs no more than the
    first's (:func:`_chunk_row_cost` per row): at the float32 and float16 benchmark (80 =
    64 + 16 units, B 256) 64 programs of 4 rows and 32 of 8, not 64 of 4, i.e. fewer
    weight reads and partial rows for the same estimated makespan. (Giving the SMs this
    frees to the first chunk would shorten it, 86 programs of 3 rows, and the tail's to
    43 of 6, but the extra weight reads and partial rows cost 1.6 MB: float16 backward
    1.56x its floor instead of 1.48x.) Sizes stay symbolic (integer arithmetic on the
    batch, which may be a SymInt)."""
    chunks = _unit_chunks(units)
    p0 = _programs(rows, heads, device, share=len(chunks))
    if len(chunks) == 1:
        return p0, 0
    cost0, cost1 = (_chunk_row_cost(pad(n), dim, units[1] if layers >= 2 else n, layers,
                                    dtype, flags)
                    for n in chunks)
    batch = rows // heads
    per0 = (batch + p0 - 1) // p0  # rows of chunk 0's busiest program
    per1 = torch.sym_max(1, per0 * cost0 // cost1)
    return p0, torch.sym_max(1, (batch + per1 - 1) // per1)


def _flags(keys, key_index, wpack, units, activation):
    """Constexprs every kernel takes: the form and the launch configuration."""
    return dict(ACT=ACTIVATIONS[activation], PER_HEAD=wpack.shape[0] > 1,
                HAS_KIDX=key_index is not None, **launch_config(keys, units, keys.shape[-1]))


def _or(t: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    return t if t is not None else dummy


# --- forward ---------------------------------------------------------------------------


@torch.library.triton_op("interest_kernels::target_attention_fwd", mutates_args=())
def fwd_op(
    qterm: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
    key_index: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
    mask: Optional[torch.Tensor], wpack: torch.Tensor, apack: Optional[torch.Tensor],
    units: list[int], heads: int, activation: str, softmax: bool, return_scores: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (R, D) in query's dtype, scores (R, T) or (0, T) in query's dtype, lse (R,))."""
    rows, dim = query.shape
    seq_len = keys.shape[1]
    dev = query.device
    out = torch.empty(rows, dim, device=dev, dtype=query.dtype)
    lse = torch.empty(rows, device=dev, dtype=torch.float32)
    scores = torch.empty(rows if return_scores else 0, seq_len, device=dev,
                         dtype=torch.float32)
    if rows == 0 or seq_len == 0:
        return out.zero_(), scores.zero_().to(query.dtype), lse.zero_()
    dummy = qterm.new_empty(1)  # stands in for absent inputs; never read
    grid = (_programs(rows, heads, dev), heads)
    wrap_triton(attention_fwd_kernel)[grid](
        qterm, query, keys, _or(key_index, dummy), _or(lengths, dummy),
        mask.view(torch.uint8) if mask is not None else dummy, wpack, _or(apack, dummy),
        out, scores if return_scores else dummy, lse,
        *_shape_args(query, keys, wpack, apack, units, heads),
        LAYERS=len(units), ACT_LAYERS=_act_layers(activation, len(units)), SOFTMAX=softmax,
        WRITE_SCORES=return_scores, HAS_LEN=lengths is not None, HAS_MASK=mask is not None,
        **_flags(keys, key_index, wpack, units, activation),
    )
    return out, scores.to(query.dtype), lse


@fwd_op.register_fake
def _(qterm, query, keys, key_index, lengths, mask, wpack, apack, units, heads, activation,
      softmax, return_scores):
    rows, dim = query.shape
    return (query.new_empty(rows, dim),
            query.new_empty(rows if return_scores else 0, keys.shape[1]),
            query.new_empty(rows, dtype=torch.float32))


@torch.library.triton_op("interest_kernels::target_attention_stats", mutates_args=())
def stats_op(
    qterm: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
    key_index: Optional[torch.Tensor], wpack: torch.Tensor, apack: Optional[torch.Tensor],
    units: list[int], layer: int, heads: int, activation: str,
) -> torch.Tensor:
    """(sum z, sum z^2) over all R*T positions (masked ones too) of layer ``layer``'s
    (1-based) pre-activation, per head: (E, 2, H_layer) fp32. ``apack`` holds the
    activation parameters of the layers below."""
    rows, _ = query.shape
    seq_len = keys.shape[1]
    dev = query.device
    n_prog = _programs(rows, heads, dev)
    st = torch.empty(heads, n_prog, 2, units[layer - 1], device=dev, dtype=torch.float32)
    if rows == 0 or seq_len == 0:
        return st.zero_().sum(dim=1)
    dummy = qterm.new_empty(1)  # stands in for absent inputs; never read
    wrap_triton(dice_stats_kernel)[(n_prog, heads)](
        qterm, query, keys, _or(key_index, dummy), wpack, _or(apack, dummy), st,
        *_shape_args(query, keys, wpack, apack, units, heads),
        LAYERS=layer, PACK_LAYERS=len(units), ACT_LAYERS=_act_layers(activation, layer - 1),
        **_flags(keys, key_index, wpack, units, activation),
    )
    return st.sum(dim=1)


@stats_op.register_fake
def _(qterm, query, keys, key_index, wpack, apack, units, layer, heads, activation):
    return qterm.new_empty(heads, 2, units[layer - 1], dtype=torch.float32)


# --- backward --------------------------------------------------------------------------


def _launch_bwd(qterm, query, keys, key_index, lengths, mask, wpack, apack, units, heads,
                activation, *, out=None, scores=None, dout=None, dscores=None, lse=None,
                softmax=False, gstats=None, layer=None):
    """Gradients of (qterm, query, keys, wpack, apack) (apack's None when absent); the
    attention's (``dout``...) or, with ``gstats`` (G, 2, H_layer), the statistics'."""
    stats = gstats is not None
    layers = layer if stats else len(units)
    act_layers = _act_layers(activation, layers - 1 if stats else layers)
    rows, dim = query.shape
    seq_len = keys.shape[1]
    dev = query.device
    f32 = dict(device=dev, dtype=torch.float32)
    n_prog = _programs(rows, heads, dev)
    slots = heads * n_prog
    groups = wpack.shape[0]
    dqt = torch.empty(rows, units[0], **f32)
    per_row = key_index is not None
    dk = torch.empty(rows, seq_len, dim, **f32) if per_row else torch.empty_like(keys)
    w_used = wpack.shape[1] if not stats else weight_prefix(dim, units, layers)
    a_used = act_prefix(units, act_layers)
    gw = torch.empty(slots, wpack.shape[1], **f32)
    # the first kernel's dz2 (dz1 with one layer), from which the second one takes the
    # gradients of W_kd, W_p and W_2 (the first m_cols of a weight row; those of gw stay
    # unwritten) in chunks of first-layer units, one partial per program
    dz = torch.empty(rows, seq_len, units[1] if layers >= 2 else units[0], **f32)
    m_cols = 2 * units[0] * dim + (units[1] * units[0] if layers >= 2 else 0)
    flags = _flags(keys, key_index, wpack, units, activation)
    chunks = _unit_chunks(units)
    progs = _chunk_programs(rows, heads, dev, units, layers, dim, keys.dtype, flags)
    per_unit = _partial_per_unit(dim, units, layers)
    gm = torch.empty(sum(heads * p * n * per_unit for p, n in zip(progs, chunks)), **f32)
    ga = torch.empty(slots, apack.shape[1], **f32) if apack is not None else None
    if rows == 0 or seq_len == 0:
        dq = torch.zeros(rows, dim, **f32)
        for t in (dqt, dk, gw, gm, ga):
            if t is not None:
                t.zero_()
    else:
        dummy = qterm.new_empty(1)  # stands in for absent inputs; never read
        # The q-term's gradient sum_t dz1 is summed by the weight-gradient kernel, but for
        # float16 inputs (16-bit inputs, float32 gradient dots) by the data-gradient
        # kernel: there its weight-gradient kernel computed the tile's chain a second time
        # in another layout for that sum alone and spilled (sm90_target_attention_spills.md,
        # round 6b); for float32 and bfloat16 the move measured more spills.
        dqt_in_data_grad = flags["LOWP"] and not flags["LOWP_BWD"]
        flags["CH1"] = min(flags["BH1"], UNIT_CHUNK)
        flags["CH1B"] = pad(units[0] - flags["CH1"]) if units[0] > flags["CH1"] else 0
        wrap_triton(attention_bwd_kernel)[(n_prog, heads)](
            qterm, query, keys, _or(key_index, dummy), _or(lengths, dummy),
            mask.view(torch.uint8) if mask is not None else dummy, wpack, _or(apack, dummy),
            _or(out, dummy), _or(scores, dummy), _or(dout, dummy), _or(dscores, dummy),
            _or(lse, dummy), _or(gstats, dummy), dk, dz, dqt, gw, _or(ga, dummy),
            *_shape_args(query, keys, wpack, apack, units, heads),
            LAYERS=layers, PACK_LAYERS=len(units), ACT_LAYERS=act_layers, SOFTMAX=softmax,
            HAS_DSC=dscores is not None, STATS=stats, DK_PER_ROW=per_row,
            HAS_LEN=lengths is not None, HAS_MASK=mask is not None, SUM_DQT=dqt_in_data_grad,
            **dict(flags, num_warps=DATA_GRAD_WARPS),
        )
        flags.pop("BH1")
        flags.pop("BH3")
        dq = torch.empty(len(chunks), rows, dim, **f32)  # each unit chunk's part
        wrap_triton(first_layer_grad_kernel)[(progs[0] + progs[1], heads)](
            qterm, query, keys, _or(key_index, dummy), _or(lengths, dummy),
            mask.view(torch.uint8) if mask is not None else dummy, wpack, _or(apack, dummy),
            dz, dq, dqt, gm, *_shape_args(query, keys, wpack, apack, units, heads), progs[0],
            LAYERS=layers, PACK_LAYERS=len(units), ACT_LAYERS=act_layers,
            HAS_LEN=lengths is not None, HAS_MASK=mask is not None, STATS=stats,
            SUM_DQT=not dqt_in_data_grad, **flags,
        )
        dq = dq.sum(dim=0)
    if per_row:
        dk = sum_rows_by_history(dk, key_index, heads, keys.shape[0], keys.dtype)

    def total(part, programs, used):
        # one deterministic sum over the programs (and the heads of a shared MLP)
        part = part[:, :used].reshape(heads, programs, used)
        return part.sum(dim=1) if groups > 1 else part.sum(dim=(0, 1)).unsqueeze(0)

    def padded(sums, like):
        if sums.shape[1] < like.shape[1]:
            sums = torch.cat([sums, sums.new_zeros(groups, like.shape[1] - sums.shape[1])], 1)
        return sums.to(like.dtype)

    gw = torch.cat([_first_layer_totals(gm, progs, chunks, heads, groups, dim, units, layers),
                    total(gw[:, m_cols:], n_prog, w_used - m_cols)], dim=1)
    ga = padded(total(ga, n_prog, a_used), apack) if ga is not None else None
    return [dqt, dq.to(query.dtype), dk, padded(gw, wpack), ga]


def _first_layer_totals(parts, progs, chunks, heads, groups, dim, units, layers):
    """The weight-gradient kernel's partials (each chunk c: (heads, programs_c, [W_kd
    (units_c, D) | W_p (units_c, D) | W_2^T (units_c, H2)]), the chunks one after the
    other in one flat buffer) summed over the programs
    (and the heads of a shared MLP, in one deterministic order) into the start of a
    packed weight row, (G, m_cols): W_kd, W_p (H1, D), W_2 (H2, H1)."""
    blocks = {"wkd": [], "wp": [], "w2t": []}
    start = 0
    per_unit = _partial_per_unit(dim, units, layers)
    for p, n in zip(progs, chunks):
        size = heads * p * n * per_unit
        part = parts[start:start + size].view(heads, p, -1)
        start = start + size
        part = part.sum(dim=1) if groups > 1 else part.sum(dim=(0, 1)).unsqueeze(0)
        blocks["wkd"].append(part[:, :n * dim].view(groups, n, dim))
        blocks["wp"].append(part[:, n * dim:2 * n * dim].view(groups, n, dim))
        if layers >= 2:
            blocks["w2t"].append(part[:, 2 * n * dim:].view(groups, n, units[1]))
    out = [torch.cat(blocks["wkd"], 1).flatten(1), torch.cat(blocks["wp"], 1).flatten(1)]
    if layers >= 2:
        out.append(torch.cat(blocks["w2t"], 1).transpose(1, 2).flatten(1))
    return torch.cat(out, 1)


def _fill(grads, ref: torch.Tensor) -> list[torch.Tensor]:
    """Custom ops cannot return None: an absent gradient travels as an empty tensor."""
    return [g if g is not None else ref.new_empty(0) for g in grads]


def _fake_grads(qterm, query, keys, wpack, apack):
    return [torch.empty_like(qterm, dtype=torch.float32), torch.empty_like(query),
            torch.empty_like(keys), torch.empty_like(wpack),
            torch.empty_like(apack) if apack is not None else qterm.new_empty(0)]


@torch.library.triton_op("interest_kernels::target_attention_bwd", mutates_args=())
def bwd_op(
    dout: torch.Tensor, dscores: Optional[torch.Tensor], out: torch.Tensor,
    scores: torch.Tensor, lse: torch.Tensor, qterm: torch.Tensor, query: torch.Tensor,
    keys: torch.Tensor, key_index: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
    mask: Optional[torch.Tensor], wpack: torch.Tensor, apack: Optional[torch.Tensor],
    units: list[int], heads: int, activation: str, softmax: bool,
) -> list[torch.Tensor]:
    """Gradients of (qterm, query, keys, wpack, apack) of the attention op."""
    grads = _launch_bwd(qterm, query, keys, key_index, lengths, mask, wpack, apack, units,
                        heads, activation, out=out, scores=scores, dout=dout,
                        dscores=dscores, lse=lse, softmax=softmax)
    return _fill(grads, qterm)


@bwd_op.register_fake
def _(dout, dscores, out, scores, lse, qterm, query, keys, key_index, lengths, mask, wpack,
      apack, units, heads, activation, softmax):
    return _fake_grads(qterm, query, keys, wpack, apack)


@torch.library.triton_op("interest_kernels::target_attention_stats_bwd", mutates_args=())
def stats_bwd_op(
    gstats: torch.Tensor, qterm: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
    key_index: Optional[torch.Tensor], wpack: torch.Tensor, apack: Optional[torch.Tensor],
    units: list[int], layer: int, heads: int, activation: str,
) -> list[torch.Tensor]:
    """Gradients of (qterm, query, keys, wpack, apack) of the statistics op for the
    upstream gradient ``gstats`` (E, 2, H_layer)."""
    groups = wpack.shape[0]
    g = gstats if groups > 1 else gstats.sum(dim=0, keepdim=True)
    grads = _launch_bwd(qterm, query, keys, key_index, None, None, wpack, apack, units,
                        heads, activation, gstats=g.float().contiguous(), layer=layer)
    return _fill(grads, qterm)


@stats_bwd_op.register_fake
def _(gstats, qterm, query, keys, key_index, wpack, apack, units, layer, heads, activation):
    return _fake_grads(qterm, query, keys, wpack, apack)


# --- autograd ----------------------------------------------------------------------------

_FWD_TENSORS = ("qterm", "query", "keys", "key_index", "lengths", "mask", "wpack", "apack")
_STATS_TENSORS = ("qterm", "query", "keys", "key_index", "wpack", "apack")
_GRADS = ("qterm", "query", "keys", "wpack", "apack")


def _save(ctx, tensors, extra=()):
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None], *extra)


def _unpack(ctx):
    """The op's tensor inputs (None where absent) and the saved outputs."""
    saved = list(ctx.saved_tensors)
    tensors = [saved.pop(0) if present else None for present in ctx.present]
    return tensors, saved


def _route(names, tensors, grads):
    by_name = dict(zip(_GRADS, grads))
    return [by_name[n] if n in by_name and t is not None else None
            for n, t in zip(names, tensors)]


def _fwd_setup_context(ctx, inputs, output):
    *tensors, units, heads, activation, softmax, return_scores = inputs
    ctx.args = (units, heads, activation, softmax)
    ctx.return_scores = return_scores
    ctx.set_materialize_grads(False)  # no zero-filled gradients for unused outputs
    _save(ctx, tensors, output)


def _fwd_backward(ctx, dout, dscores, dlse):
    tensors, (out, scores, lse) = _unpack(ctx)
    units, heads, activation, softmax = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    if not ctx.return_scores:
        dscores = None
    grads = bwd_op(dout.contiguous(), dscores.contiguous() if dscores is not None else None,
                   out, scores, lse, *tensors, units, heads, activation, softmax)
    return (*_route(_FWD_TENSORS, tensors, grads), None, None, None, None, None)


fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _stats_setup_context(ctx, inputs, output):
    *tensors, units, layer, heads, activation = inputs
    ctx.args = (units, layer, heads, activation)
    _save(ctx, tensors)


def _stats_backward(ctx, gstats):
    tensors, _ = _unpack(ctx)
    grads = stats_bwd_op(gstats.contiguous(), *tensors, *ctx.args)
    return (*_route(_STATS_TENSORS, tensors, grads), None, None, None, None)


stats_op.register_autograd(_stats_backward, setup_context=_stats_setup_context)

# The ops with their autograd for torch.func transforms (ops/func_transforms.py).
FORWARD = TransformableOp(fwd_op, _fwd_setup_context, _fwd_backward)
STATS = TransformableOp(stats_op, _stats_setup_context, _stats_backward)
register_sliced_vmap("interest_kernels::target_attention_bwd")
register_sliced_vmap("interest_kernels::target_attention_stats_bwd")
