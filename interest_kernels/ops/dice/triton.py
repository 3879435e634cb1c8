"""Fused Triton Dice (SPEC section 4), forward and backward, channels last.

``x`` is viewed as (M, C) with M = N*T rows. Every kernel works on (BLOCK_M, BLOCK_C)
tiles and accumulates in float32 whatever the input dtype.

Training forward, three launches and no host synchronisation:

1. ``_stats_partial_kernel``: each of P programs (per channel block) reduces a chunk
   of rows to a partial mean and sum of squared deviations. Deviations are taken from
   the chunk's first row, so large means do not cancel the variance away.
2. ``_stats_finalize_kernel``: combines the P partials in a fixed order (deterministic,
   no atomics) into the batch mean and biased variance, and updates the running
   statistics in place (momentum blend, unbiased variance) as BatchNorm does.
3. ``_dice_fwd_kernel``: the elementwise pass. Eval mode runs only this one, with the
   running statistics.

Backward: ``_dice_bwd_reduce_kernel`` reduces, per program, the three per-channel sums
the gradients need (alpha, and the normalisation's bias and weight, which also carry
the path through the batch mean and variance); in eval mode it writes the gradient of
``x`` in the same pass. In training ``_dice_bwd_dx_kernel`` then writes the gradient of
``x`` with the summed terms.

Each pass is a ``torch.library.triton_op`` with a fake implementation whose launches go
through ``wrap_triton``, and the elementwise op has a registered autograd formula:
``torch.compile(fullgraph=True)`` traces into the launches and AOTInductor compiles them
into a package (``ops/traceable_triton.py``). The statistics op mutates the running
statistics (declared in ``mutates_args``) and so cannot carry autograd itself: it runs on
a detached ``x`` and the apply op's backward includes the gradient through the batch
statistics.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ..func_transforms import TransformableOp, call, register_sliced_vmap
from ..traceable_triton import wrap_triton

__all__ = ["dice_triton"]


@triton.jit(do_not_specialize=["M", "rows_per_prog"])
def _stats_partial_kernel(
    x_ptr, mean_part_ptr, m2_part_ptr, M, C, rows_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    row0 = pid_p.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, M)
    shift = tl.load(x_ptr + row0 * C + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        m = (rows < row_end)[:, None] & cmask[None, :]
        v = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, v - shift[None, :], 0.0)
        acc += d
        acc2 += d * d
    n = (row_end - row0).to(tl.float32)
    sd = tl.sum(acc, axis=0)
    sdd = tl.sum(acc2, axis=0)
    out = pid_p * C + cols
    tl.store(mean_part_ptr + out, shift + sd / n, mask=cmask)
    tl.store(m2_part_ptr + out, tl.maximum(sdd - sd * sd / n, 0.0), mask=cmask)


@triton.jit(do_not_specialize=["M", "P", "rows_per_prog"])
def _stats_finalize_kernel(
    mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr,
    M, C, P, rows_per_prog, momentum,
    HAS_RUNNING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    m_f = M.to(tl.float32)
    # Two fixed-order passes over the partials: the mean, then the deviations from it
    # (Chan et al.'s pairwise combination, vectorised over BLOCK_P partials).
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        pm = ps < P
        n_p = tl.minimum(tl.maximum(M - ps * rows_per_prog, 0), rows_per_prog).to(tl.float32)
        m = pm[:, None] & cmask[None, :]
        mp = tl.load(mean_part_ptr + ps[:, None] * C + cols[None, :], mask=m, other=0.0)
        total += tl.sum(n_p[:, None] * mp, axis=0)
    mean = total / m_f
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        pm = ps < P
        n_p = tl.minimum(tl.maximum(M - ps * rows_per_prog, 0), rows_per_prog).to(tl.float32)
        m = pm[:, None] & cmask[None, :]
        mp = tl.load(mean_part_ptr + ps[:, None] * C + cols[None, :], mask=m, other=0.0)
        m2p = tl.load(m2_part_ptr + ps[:, None] * C + cols[None, :], mask=m, other=0.0)
        d = tl.where(m, mp - mean[None, :], 0.0)
        m2 += tl.sum(m2p + n_p[:, None] * d * d, axis=0)
    var = m2 / m_f
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(var_ptr + cols, var, mask=cmask)
    if HAS_RUNNING:
        rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        rv = tl.load(rv_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        unbiased = var * (m_f / (m_f - 1.0))
        rm = (1.0 - momentum) * rm + momentum * mean
        rv = (1.0 - momentum) * rv + momentum * unbiased
        tl.store(rm_ptr + cols, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
        tl.store(rv_ptr + cols, rv.to(rv_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _load_channel_params(
    cols, cmask, alpha_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    a = tl.load(alpha_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(var + eps)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.zeros_like(a) + 1.0
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros_like(a)
    return a, mean, rstd, w, b


@triton.jit(do_not_specialize=["M"])
def _dice_fwd_kernel(
    x_ptr, out_ptr, alpha_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, M, C, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    a, mean, rstd, w, b = _load_channel_params(
        cols, cmask, alpha_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, eps, HAS_WEIGHT, HAS_BIAS
    )
    m = (rows < M)[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    z = (x - mean[None, :]) * rstd[None, :] * w[None, :] + b[None, :]
    p = tl.sigmoid(z)
    out = x * (a[None, :] + (1.0 - a[None, :]) * p)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["M", "rows_per_prog"])
def _dice_bwd_reduce_kernel(
    g_ptr, x_ptr, alpha_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, part_ptr, gx_ptr,
    M, C, P, rows_per_prog, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_GRAD_X: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    a, mean, rstd, w, b = _load_channel_params(
        cols, cmask, alpha_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, eps, HAS_WEIGHT, HAS_BIAS
    )
    row0 = pid_p.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, M)
    acc_a = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc_w = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        m = (rows < row_end)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        p = tl.sigmoid(xhat * w[None, :] + b[None, :])
        gx_direct = g * (a[None, :] + (1.0 - a[None, :]) * p)
        gz = g * x * (1.0 - a[None, :]) * p * (1.0 - p)
        acc_a += g * x * (1.0 - p)
        acc_b += gz
        acc_w += gz * xhat
        if WRITE_GRAD_X:
            gx = gx_direct + gz * (w * rstd)[None, :]
            tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)
    out = pid_p * C + cols
    tl.store(part_ptr + out, tl.sum(acc_a, axis=0), mask=cmask)
    tl.store(part_ptr + P * C + out, tl.sum(acc_b, axis=0), mask=cmask)
    tl.store(part_ptr + 2 * P * C + out, tl.sum(acc_w, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["M"])
def _dice_bwd_dx_kernel(
    g_ptr, x_ptr, alpha_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, sum_b_ptr, sum_w_ptr, gx_ptr,
    M, C, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    a, mean, rstd, w, b = _load_channel_params(
        cols, cmask, alpha_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, eps, HAS_WEIGHT, HAS_BIAS
    )
    m_f = M.to(tl.float32)
    mean_gz = tl.load(sum_b_ptr + cols, mask=cmask, other=0.0) / m_f
    mean_gz_xhat = tl.load(sum_w_ptr + cols, mask=cmask, other=0.0) / m_f
    m = (rows < M)[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    xhat = (x - mean[None, :]) * rstd[None, :]
    p = tl.sigmoid(xhat * w[None, :] + b[None, :])
    gz = g * x * (1.0 - a[None, :]) * p * (1.0 - p)
    # Batch normalisation backward: the gradient through the batch mean and variance
    # removes the mean of dL/dxhat and its projection on xhat.
    gx_norm = gz - mean_gz[None, :] - xhat * mean_gz_xhat[None, :]
    gx = g * (a[None, :] + (1.0 - a[None, :]) * p) + gx_norm * (w * rstd)[None, :]
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)


# --- launch configuration ---------------------------------------------------------------


# Reductions keep two or three (BLOCK_M, BLOCK_C) float32 accumulators live: more warps
# keep them in registers.
_REDUCE_WARPS = 8


def _blocks(channels: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C): whole rows of up to 128 channels, about 4096 elements a tile."""
    block_c = min(triton.next_power_of_2(channels), 128)
    return max(16, 4096 // block_c), block_c


@functools.lru_cache(maxsize=None)
def _parallel_programs(device: torch.device) -> int:
    """How many programs a reduction wants in flight on ``device``."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter runs programs one by one; a few still exercise the combine step.
    return 4


def _row_split(rows: int, col_blocks: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(programs along the rows, rows per program, a multiple of block_m)."""
    target = max(1, _parallel_programs(device) // col_blocks)
    programs = max(1, min(triton.cdiv(rows, block_m), target))
    rows_per_prog = triton.cdiv(triton.cdiv(rows, programs), block_m) * block_m
    return triton.cdiv(rows, rows_per_prog), rows_per_prog


def _partials_block(programs: int) -> int:
    """BLOCK_P of the finalize kernel, which loops over the partials in blocks: up to 64,
    and 64 for a symbolic (dynamic) number of partials."""
    if not isinstance(programs, int):
        return 64
    return max(16, min(64, triton.next_power_of_2(programs)))


# --- custom ops ---------------------------------------------------------------------------


@torch.library.triton_op(
    "interest_kernels::dice_batch_stats", mutates_args=("running_mean", "running_var")
)
def dice_batch_stats(
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance (float32, (C,)) of ``x`` (M, C) contiguous, M >= 2;
    updates the running statistics in place when given."""
    rows, channels = x.shape
    block_m, block_c = _blocks(channels)
    col_blocks = triton.cdiv(channels, block_c)
    programs, rows_per_prog = _row_split(rows, col_blocks, block_m, x.device)
    mean_part = torch.empty((programs, channels), device=x.device, dtype=torch.float32)
    m2_part = torch.empty((programs, channels), device=x.device, dtype=torch.float32)
    wrap_triton(_stats_partial_kernel)[(programs, col_blocks)](
        x, mean_part, m2_part, rows, channels, rows_per_prog,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=_REDUCE_WARPS,
    )
    mean = torch.empty(channels, device=x.device, dtype=torch.float32)
    var = torch.empty(channels, device=x.device, dtype=torch.float32)
    has_running = running_mean is not None
    wrap_triton(_stats_finalize_kernel)[(col_blocks,)](
        mean_part, m2_part, mean, var,
        running_mean if has_running else mean, running_var if has_running else var,
        rows, channels, programs, rows_per_prog, momentum,
        HAS_RUNNING=has_running, BLOCK_P=_partials_block(programs),
        BLOCK_C=block_c,
    )
    return mean, var


@dice_batch_stats.register_fake
def _(x, running_mean, running_var, momentum):
    channels = x.shape[1]
    return x.new_empty(channels, dtype=torch.float32), x.new_empty(channels, dtype=torch.float32)


@torch.library.triton_op("interest_kernels::dice_apply", mutates_args=())
def dice_apply(
    x: torch.Tensor,
    alpha: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    batch_stats: bool,
) -> torch.Tensor:
    """Dice of ``x`` (M, C) contiguous given per-channel ``mean`` and ``var`` (C,).

    ``batch_stats`` says that ``mean``/``var`` are the statistics of this ``x`` (training),
    so the backward includes the gradient through them.
    """
    rows, channels = x.shape
    out = torch.empty_like(x)
    if rows == 0:
        return out
    block_m, block_c = _blocks(channels)
    wrap_triton(_dice_fwd_kernel)[(triton.cdiv(rows, block_m), triton.cdiv(channels, block_c))](
        x, out, alpha, weight if weight is not None else alpha, bias if bias is not None else alpha,
        mean, var, rows, channels, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return out


@dice_apply.register_fake
def _(x, alpha, weight, bias, mean, var, eps, batch_stats):
    return torch.empty_like(x)


@torch.library.triton_op("interest_kernels::dice_apply_backward", mutates_args=())
def dice_apply_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    alpha: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    batch_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`dice_apply`: ``grad_x`` (M, C) in ``x``'s dtype and a float32
    (3, C) stack of the gradients of alpha, weight and bias (the latter two as if
    weight = 1 and bias = 0 were parameters when they are absent)."""
    rows, channels = x.shape
    grad_x = torch.empty_like(x)
    if rows == 0:
        return grad_x, torch.zeros((3, channels), device=x.device, dtype=torch.float32)
    block_m, block_c = _blocks(channels)
    col_blocks = triton.cdiv(channels, block_c)
    programs, rows_per_prog = _row_split(rows, col_blocks, block_m, x.device)
    partials = torch.empty((3, programs, channels), device=x.device, dtype=torch.float32)
    w_ptr = weight if weight is not None else alpha
    b_ptr = bias if bias is not None else alpha
    wrap_triton(_dice_bwd_reduce_kernel)[(programs, col_blocks)](
        grad_out, x, alpha, w_ptr, b_ptr, mean, var, partials, grad_x,
        rows, channels, programs, rows_per_prog, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, WRITE_GRAD_X=not batch_stats,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=_REDUCE_WARPS,
    )
    sums = partials.sum(dim=1)
    if batch_stats:
        wrap_triton(_dice_bwd_dx_kernel)[(triton.cdiv(rows, block_m), col_blocks)](
            grad_out, x, alpha, w_ptr, b_ptr, mean, var, sums[1], sums[2], grad_x,
            rows, channels, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_C=block_c,
        )
    return grad_x, sums


@dice_apply_backward.register_fake
def _(grad_out, x, alpha, weight, bias, mean, var, eps, batch_stats):
    channels = x.shape[1]
    return torch.empty_like(x), x.new_empty((3, channels), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, alpha, weight, bias, mean, var, eps, batch_stats = inputs
    ctx.save_for_backward(x, alpha, weight, bias, mean, var)
    ctx.eps = eps
    ctx.batch_stats = batch_stats


def _backward(ctx, grad_out):
    x, alpha, weight, bias, mean, var = ctx.saved_tensors
    grad_x, grad_params = dice_apply_backward(
        grad_out.contiguous(), x, alpha, weight, bias, mean, var, ctx.eps, ctx.batch_stats
    )
    return (
        grad_x,
        grad_params[0].to(alpha.dtype),
        grad_params[2].to(weight.dtype) if weight is not None else None,
        grad_params[1].to(bias.dtype) if bias is not None else None,
        None,
        None,
        None,
        None,
    )


dice_apply.register_autograd(_backward, setup_context=_setup_context)
# The op with its autograd for torch.func transforms (ops/func_transforms.py).
_APPLY = TransformableOp(dice_apply, _setup_context, _backward)
register_sliced_vmap("interest_kernels::dice_apply_backward")


def dice_triton(
    x: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Fused Dice; arguments as :func:`interest_kernels.ops.dice.op.dice` (validated there).

    x (N, C) or (N, T, C) float32/float16/bfloat16; parameters (C,) of any floating dtype.
    """
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if training:
        # The kernels address (C,) vectors with stride 1: a strided running statistic is
        # updated through a contiguous copy.
        rm = running_mean.contiguous() if running_mean is not None else None
        rv = running_var.contiguous() if running_var is not None else None
        mean, var = dice_batch_stats(flat.detach(), rm, rv, momentum)
        if rm is not None and rm is not running_mean:
            running_mean.copy_(rm)
        if rv is not None and rv is not running_var:
            running_var.copy_(rv)
    else:
        mean, var = running_mean.contiguous(), running_var.contiguous()
    out = call(
        _APPLY, flat, alpha.contiguous(),
        weight.contiguous() if weight is not None else None,
        bias.contiguous() if bias is not None else None,
        mean, var, eps, training,
    )
    return out.reshape(x.shape)
