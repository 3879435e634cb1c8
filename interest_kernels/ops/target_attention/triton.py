"""Fused Triton kernels for target attention (SPEC section 1), forward and backward.

Every form is run as R = B * E attention rows (E = 1 without heads). Row ``r = b*E + e``
reads query ``q_r`` (D), key row ``kb*E + e`` of ``keys`` viewed as (N, T, D) with
``kb = key_index[b]`` (or ``b``), and the valid positions of history row ``kb``.

The first layer uses SPEC's identity, folded per row into one matrix::

    W_1 x_t = (W_q + W_d) q + c_1  +  M_r k_t,     M_r = (W_k - W_d) + W_p diag(q)   (H_1, D)

The q-term (``qterm``, (R, H_1)) is one torch GEMM before the kernel. Per tile of
BLOCK_T keys the kernel computes the MLP and the score in registers, an online
(flash-attention style) masked softmax, and the weighted key sum; only the log-sum-exp
per row (R,) is kept for the backward, which recomputes the MLP per tile and writes dq,
dkeys and per-program partial parameter gradients that torch sums afterwards
(deterministic, no atomics).

Widths: the first layer is walked a chunk of BC1 units at a time (``M_r``'s rows for
that chunk built from L2-resident weights, its activations folded straight into the
second layer's pre-activation or the score), and so is the third (BC3); only the key
tile (BLOCK_T, D) and the second layer (BLOCK_T, H_2) are held whole. Per-unit results
of a chunk (the backward's weight gradients, dqt, the statistics) are added into this
program's own zero-initialised slot in global memory, so no on-chip buffer grows with
H_1 x D and the widths the layer sizes allow are bounded only by D and H_2.

Dice in training mode needs the batch statistics of each layer's pre-activation over
all positions: a statistics op (same kernels, stopping at layer l) computes them before
the attention op, and autograd carries their gradient back through it.

The weight preparation (splitting W_1, the per-unit Dice affine, the q-term) is torch
code around two ``torch.library`` custom ops, so autograd differentiates it and
``torch.compile(fullgraph=True)`` sees the kernels as opaque nodes.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..dice.reference import DiceParams, update_running_stats

_ACTIVATIONS = {"identity": 0, "sigmoid": 1, "relu": 2, "prelu": 3, "dice": 4}
_MAX_LAYERS = 3
# The first and third layers are walked _CHUNK units (at most) at a time, so their width
# is free; the key tile and the second layer are held whole, which bounds D and units_2
# on the GPU. Up to these (padded) sizes the kernels were compiled for sm_90 and fit one
# program's shared memory (at most ~100 KB) with registers spilling at most ~2.3 KB.
_CHUNK = 32
_MAX_DIM = 256
_MAX_SECOND = 512


def unsupported_reason(
    dtype: Optional[torch.dtype] = None,
    num_layers: Optional[int] = None,
    hidden_units: Optional[Sequence[int]] = None,
    dim: Optional[int] = None,
    device: Optional[torch.device] = None,
    **_: object,
) -> Optional[str]:
    """Why the Triton kernels cannot take a call with these facts (None when they can)."""
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the Triton kernels take float32/float16/bfloat16 inputs, not {dtype}"
    if num_layers is not None and not 1 <= num_layers <= _MAX_LAYERS:
        return f"the Triton kernels take 1 to {_MAX_LAYERS} hidden layers, not {num_layers}"
    if device is not None and device.type == "cuda":
        # Whole tiles wider than these were not checked to fit one program on sm_90.
        if dim and _pow2(dim) > _MAX_DIM:
            return (f"the Triton kernels take D up to {_MAX_DIM} on the GPU (a tile of keys "
                    f"is held whole in one program), got D = {dim}")
        if hidden_units and len(hidden_units) > 1 and _pow2(hidden_units[1]) > _MAX_SECOND:
            return (f"the Triton kernels take up to {_MAX_SECOND} units in the second layer "
                    f"on the GPU (a tile of it is held whole in one program), got units "
                    f"{tuple(hidden_units)}")
    return None


# --------------------------------------------------------------------------------------
# kernel helpers


@triton.jit
def _vec(ptr, offs, n):
    return tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32)


@triton.jit
def _mat(ptr, offs_r, offs_c, n_r, n_c, TRANSPOSE: tl.constexpr):
    """Row-major (n_r, n_c) matrix at ``ptr``, padded with zeros; its transpose if asked."""
    if TRANSPOSE:
        ptrs = ptr + offs_c[None, :] * n_c + offs_r[:, None]
        msk = (offs_c[None, :] < n_r) & (offs_r[:, None] < n_c)
    else:
        ptrs = ptr + offs_r[:, None] * n_c + offs_c[None, :]
        msk = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    return tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)


@triton.jit
def _dot(a, b, LOWP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    if LOWP:
        return tl.dot(a.to(DT), b.to(DT), out_dtype=tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _act(z, pa, ps, pb, ACT: tl.constexpr):
    """Activation of pre-activations z (BT, H); pa/ps/pb: per-unit PReLU slope or Dice
    (alpha, scale, shift) with the Dice gate sigmoid(z * scale + shift)."""
    if ACT == 1:
        a = tl.sigmoid(z)
    elif ACT == 2:
        a = tl.maximum(z, 0.0)
    elif ACT == 3:
        a = tl.where(z >= 0, z, pa[None, :] * z)
    elif ACT == 4:
        p = tl.sigmoid(z * ps[None, :] + pb[None, :])
        a = z * (pa[None, :] + p * (1.0 - pa[None, :]))
    else:
        a = z
    return a


@triton.jit
def _act_bwd(z, g, pa, ps, pb, ACT: tl.constexpr):
    """(dz, per-unit grads of pa, ps, pb summed over the tile) for upstream grad g."""
    zero = tl.sum(z * 0.0, axis=0)
    gpa = zero
    gps = zero
    gpb = zero
    if ACT == 1:
        s = tl.sigmoid(z)
        dz = g * s * (1.0 - s)
    elif ACT == 2:
        dz = tl.where(z > 0, g, 0.0)
    elif ACT == 3:
        neg = z < 0
        dz = tl.where(neg, g * pa[None, :], g)
        gpa = tl.sum(tl.where(neg, g * z, 0.0), axis=0)
    elif ACT == 4:
        p = tl.sigmoid(z * ps[None, :] + pb[None, :])
        one_m_a = 1.0 - pa[None, :]
        common = g * z * one_m_a * p * (1.0 - p)
        dz = g * (pa[None, :] + p * one_m_a) + common * ps[None, :]
        gpa = tl.sum(g * z * (1.0 - p), axis=0)
        gps = tl.sum(common * z, axis=0)
        gpb = tl.sum(common, axis=0)
    else:
        dz = g
    return dz, gpa, gps, gpb


@triton.jit
def _act_vecs(ptr, offs, n, LOAD: tl.constexpr):
    """Per-unit activation parameters (G-slice of a (G, 3, H) tensor), zeros if unused."""
    if LOAD:
        pa = _vec(ptr, offs, n)
        ps = _vec(ptr + n, offs, n)
        pb = _vec(ptr + 2 * n, offs, n)
    else:
        pa = tl.zeros(offs.shape, tl.float32)
        ps = pa
        pb = pa
    return pa, ps, pb


@triton.jit
def _valid(offs_t, T, mrow, len_ptr, mask_ptr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr):
    tm = offs_t < T
    valid = tm
    if HAS_LEN:
        valid = valid & (offs_t < tl.load(len_ptr + mrow))
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + mrow * T + offs_t, mask=tm, other=0) != 0)
    return valid


@triton.jit
def _rmw(ptr, offs, n, x):
    """``ptr[offs] += x`` on an accumulator that only this program touches."""
    m = offs < n
    tl.store(ptr + offs, tl.load(ptr + offs, mask=m, other=0.0) + x, mask=m)


@triton.jit
def _rmw_mat(ptr, x, offs_r, offs_c, n_r, n_c):
    """``+= x`` on block (offs_r, offs_c) of a row-major (n_r, n_c) accumulator of this program."""
    ptrs = ptr + offs_r[:, None] * n_c + offs_c[None, :]
    m = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) + x, mask=m)


@triton.jit
def _rmw_act(ptr, gpa, gps, gpb, offs, n):
    _rmw(ptr, offs, n, gpa)
    _rmw(ptr + n, offs, n, gps)
    _rmw(ptr + 2 * n, offs, n, gpb)


@triton.jit
def _layer1(k, q, qt_row, wk_ptr, wp_ptr, p1_ptr, offs_c, offs_d, H1, D,
            ACT: tl.constexpr, LOAD_ACT: tl.constexpr, APPLY: tl.constexpr,
            LOWP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Units ``offs_c`` (a chunk) of the first layer for keys k (BT, BD) of the row with
    query q and q-term row ``qt_row``: (weff, wp, z, a, pa, ps, pb), weff/wp (BC, BD)."""
    wp = _mat(wp_ptr, offs_c, offs_d, H1, D, False)
    weff = _mat(wk_ptr, offs_c, offs_d, H1, D, False) + wp * q[None, :]
    z = _dot(k, tl.trans(weff), LOWP, DT, PREC) + _vec(qt_row, offs_c, H1)[None, :]
    pa, ps, pb = _act_vecs(p1_ptr, offs_c, H1, LOAD_ACT)
    a = z
    if APPLY:
        a = _act(z, pa, ps, pb, ACT)
    return weff, wp, z, a, pa, ps, pb


@triton.jit
def _layer2_pre(k, q, qt_row, wk_ptr, wp_ptr, p1_ptr, w2_ptr, b2, offs_d, offs_h2, H1, H2, D,
                ACT: tl.constexpr, LOAD_ACT: tl.constexpr, BLOCK_T: tl.constexpr,
                BH2: tl.constexpr, BC1: tl.constexpr,
                LOWP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """Second layer's pre-activation (BT, BH2), the first layer's units BC1 at a time."""
    z2 = tl.zeros([BLOCK_T, BH2], tl.float32) + b2[None, :]
    for c0 in range(0, H1, BC1):
        offs_c = c0 + tl.arange(0, BC1)
        _, _, _, a1, _, _, _ = _layer1(k, q, qt_row, wk_ptr, wp_ptr, p1_ptr, offs_c, offs_d,
                                       H1, D, ACT, LOAD_ACT, True, LOWP, DT, PREC)
        z2 += _dot(a1, _mat(w2_ptr, offs_c, offs_h2, H2, H1, True), LOWP, DT, PREC)
    return z2


# --------------------------------------------------------------------------------------
# forward kernel: attention (STATS false) or layer statistics (STATS true)
#
# Layer widths: the first and third layers are walked BC1 / BC3 units at a time (their
# weights are read per chunk from L2, their per-unit results accumulated into this
# program's slot of a global buffer), so their widths only cost loop iterations; the
# second layer (BT, BH2) and the key tile (BT, BD) are held whole.


@triton.jit(do_not_specialize=["B", "T"])
def _fwd_kernel(
    qt_ptr, q_ptr, k_ptr, kidx_ptr, len_ptr, mask_ptr,
    wk_ptr, wp_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, wo_ptr, bo_ptr,
    p1_ptr, p2_ptr, p3_ptr,
    out_ptr, sc_ptr, lse_ptr, st_ptr,
    B, T, E, D, H1, H2, H3,
    LAYERS: tl.constexpr, ACT: tl.constexpr, SOFTMAX: tl.constexpr, PER_HEAD: tl.constexpr,
    HAS_KIDX: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
    WRITE_SCORES: tl.constexpr, STATS: tl.constexpr,
    BLOCK_T: tl.constexpr, BD: tl.constexpr, BH2: tl.constexpr,
    BC1: tl.constexpr, BC3: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
    ACT_PARAMS: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n_prog = tl.num_programs(0)
    if PER_HEAD:
        g = e
    else:
        g = 0
    DT = k_ptr.dtype.element_ty
    offs_d = tl.arange(0, BD)
    offs_h2 = tl.arange(0, BH2)
    offs_bt = tl.arange(0, BLOCK_T)
    wk_g = wk_ptr + g * H1 * D
    wp_g = wp_ptr + g * H1 * D
    p1_g = p1_ptr + g * 3 * H1
    w2_g = w2_ptr + g * H2 * H1
    w3_g = w3_ptr + g * H3 * H2
    p3_g = p3_ptr + g * 3 * H3
    if LAYERS == 1:
        HL = H1
        wo_g = wo_ptr + g * H1
    elif LAYERS == 2:
        HL = H2
        wo_g = wo_ptr + g * H2
    else:
        HL = H3
        wo_g = wo_ptr + g * H3
    st_base = st_ptr + (e * n_prog + pid) * 2 * HL

    b2 = tl.zeros([BH2], tl.float32)
    pa2 = b2
    ps2 = b2
    pb2 = b2
    wo2 = b2
    if LAYERS >= 2:
        b2 = _vec(b2_ptr + g * H2, offs_h2, H2)
        pa2, ps2, pb2 = _act_vecs(p2_ptr + g * 3 * H2, offs_h2, H2, ACT_PARAMS >= 2)
    if LAYERS == 2:
        wo2 = _vec(wo_g, offs_h2, H2)
    bo = tl.load(bo_ptr + g).to(tl.float32)
    st1 = tl.zeros([BH2], tl.float32)
    st2 = tl.zeros([BH2], tl.float32)

    for b in range(pid, B, n_prog):
        r = b * E + e
        if HAS_KIDX:
            kb = tl.load(kidx_ptr + b)
        else:
            kb = b
        krow = (kb * E + e).to(tl.int64)
        k_base = k_ptr + krow * T * D
        q = _vec(q_ptr + r * D, offs_d, D)
        qt_row = qt_ptr + r * H1
        m_i = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
        acc = tl.zeros([BD], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            if STATS:
                # Orders the previous tile's statistics updates before this tile's.
                tl.debug_barrier()
            offs_t = t0 + offs_bt
            tm = offs_t < T
            k = tl.load(k_base + offs_t[:, None] * D + offs_d[None, :],
                        mask=tm[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
            s = tl.zeros([BLOCK_T], tl.float32) + bo
            if LAYERS == 1:
                for c0 in range(0, H1, BC1):
                    offs_c = c0 + tl.arange(0, BC1)
                    _, _, z1, a1, _, _, _ = _layer1(k, q, qt_row, wk_g, wp_g, p1_g, offs_c,
                                                    offs_d, H1, D, ACT, ACT_PARAMS >= 1,
                                                    not STATS, LOWP, DT, PREC)
                    if STATS:
                        zs = tl.where(tm[:, None], z1, 0.0)
                        _rmw(st_base, offs_c, H1, tl.sum(zs, axis=0))
                        _rmw(st_base + H1, offs_c, H1, tl.sum(zs * zs, axis=0))
                    else:
                        s += tl.sum(a1 * _vec(wo_g, offs_c, H1)[None, :], axis=1)
            else:
                z2 = _layer2_pre(k, q, qt_row, wk_g, wp_g, p1_g, w2_g, b2, offs_d, offs_h2,
                                 H1, H2, D, ACT, ACT_PARAMS >= 1, BLOCK_T, BH2, BC1,
                                 LOWP, DT, PREC)
                if LAYERS == 2:
                    if STATS:
                        zs = tl.where(tm[:, None], z2, 0.0)
                        st1 += tl.sum(zs, axis=0)
                        st2 += tl.sum(zs * zs, axis=0)
                    else:
                        s += tl.sum(_act(z2, pa2, ps2, pb2, ACT) * wo2[None, :], axis=1)
                else:
                    a2 = _act(z2, pa2, ps2, pb2, ACT)
                    for c0 in range(0, H3, BC3):
                        offs_c = c0 + tl.arange(0, BC3)
                        z3 = (_dot(a2, _mat(w3_g, offs_h2, offs_c, H3, H2, True), LOWP, DT, PREC)
                              + _vec(b3_ptr + g * H3, offs_c, H3)[None, :])
                        if STATS:
                            zs = tl.where(tm[:, None], z3, 0.0)
                            _rmw(st_base, offs_c, H3, tl.sum(zs, axis=0))
                            _rmw(st_base + H3, offs_c, H3, tl.sum(zs * zs, axis=0))
                        else:
                            pa3, ps3, pb3 = _act_vecs(p3_g, offs_c, H3, ACT_PARAMS >= 3)
                            s += tl.sum(_act(z3, pa3, ps3, pb3, ACT)
                                        * _vec(wo_g, offs_c, H3)[None, :], axis=1)
            if not STATS:
                valid = _valid(offs_t, T, kb, len_ptr, mask_ptr, HAS_LEN, HAS_MASK)
                if WRITE_SCORES:
                    tl.store(sc_ptr + r * T + offs_t, s, mask=tm)
                if SOFTMAX:
                    s_v = tl.where(valid, s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s_v, axis=0))
                    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                    corr = tl.exp(m_i - m_use)
                    p = tl.exp(s_v - m_use)
                    l_i = l_i * corr + tl.sum(p, axis=0)
                    acc = acc * corr + tl.sum(p[:, None] * k, axis=0)
                    m_i = m_new
                else:
                    w = tl.where(valid, s, 0.0)
                    acc += tl.sum(w[:, None] * k, axis=0)
        if not STATS:
            if SOFTMAX:
                has = l_i > 0
                l_safe = tl.where(has, l_i, 1.0)
                lse = tl.where(has, m_i + tl.log(l_safe), 0.0)
                acc = acc * tl.where(has, 1.0 / l_safe, 0.0)
                tl.store(lse_ptr + r, lse)
            tl.store(out_ptr + r * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=offs_d < D)
            if WRITE_SCORES:
                # The raw scores written above are normalised in place.
                tl.debug_barrier()
                for t0 in range(0, T, BLOCK_T):
                    offs_t = t0 + offs_bt
                    tm = offs_t < T
                    valid = _valid(offs_t, T, kb, len_ptr, mask_ptr, HAS_LEN, HAS_MASK)
                    s = tl.load(sc_ptr + r * T + offs_t, mask=tm, other=0.0)
                    if SOFTMAX:
                        a = tl.where(valid, tl.exp(tl.where(valid, s - lse, 0.0)), 0.0)
                    else:
                        a = tl.where(valid, s, 0.0)
                    tl.store(sc_ptr + r * T + offs_t, a, mask=tm)
    if STATS and LAYERS == 2:
        tl.store(st_base + offs_h2, st1, mask=offs_h2 < H2)
        tl.store(st_base + H2 + offs_h2, st2, mask=offs_h2 < H2)


# --------------------------------------------------------------------------------------
# backward kernel


@triton.jit(do_not_specialize=["B", "T"])
def _bwd_kernel(
    qt_ptr, q_ptr, k_ptr, kidx_ptr, len_ptr, mask_ptr,
    wk_ptr, wp_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, wo_ptr, bo_ptr,
    p1_ptr, p2_ptr, p3_ptr,
    dout_ptr, dsc_ptr, lse_ptr, delta_ptr, gst_ptr,
    dqt_ptr, dq_ptr, dk_ptr,
    gwk_ptr, gwp_ptr, gw2_ptr, gb2_ptr, gw3_ptr, gb3_ptr, gwo_ptr, gbo_ptr,
    gp1_ptr, gp2_ptr, gp3_ptr,
    B, T, E, D, H1, H2, H3,
    LAYERS: tl.constexpr, ACT: tl.constexpr, SOFTMAX: tl.constexpr, PER_HEAD: tl.constexpr,
    HAS_KIDX: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DSC: tl.constexpr, STATS: tl.constexpr, DK_PER_ROW: tl.constexpr,
    BLOCK_T: tl.constexpr, BD: tl.constexpr, BH2: tl.constexpr,
    BC1: tl.constexpr, BC3: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
    ACT_PARAMS: tl.constexpr, LOWP_BWD: tl.constexpr,
):
    """Gradients. The per-program parameter gradients (zero-initialised slots) and dqt
    (zero-initialised) are accumulated in place, chunk by chunk; the rest is stored."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n_prog = tl.num_programs(0)
    slot = e * n_prog + pid
    if PER_HEAD:
        g = e
    else:
        g = 0
    DT = k_ptr.dtype.element_ty
    offs_d = tl.arange(0, BD)
    offs_h2 = tl.arange(0, BH2)
    offs_bt = tl.arange(0, BLOCK_T)
    dm = offs_d < D
    wk_g = wk_ptr + g * H1 * D
    wp_g = wp_ptr + g * H1 * D
    p1_g = p1_ptr + g * 3 * H1
    w2_g = w2_ptr + g * H2 * H1
    w3_g = w3_ptr + g * H3 * H2
    p3_g = p3_ptr + g * 3 * H3
    if LAYERS == 1:
        HL = H1
    elif LAYERS == 2:
        HL = H2
    else:
        HL = H3
    wo_g = wo_ptr + g * HL
    gst_g = gst_ptr + g * 2 * HL
    gwk_s = gwk_ptr + slot * H1 * D
    gwp_s = gwp_ptr + slot * H1 * D
    gw2_s = gw2_ptr + slot * H2 * H1
    gb2_s = gb2_ptr + slot * H2
    gp2_s = gp2_ptr + slot * 3 * H2
    gw3_s = gw3_ptr + slot * H3 * H2
    gb3_s = gb3_ptr + slot * H3
    gwo_s = gwo_ptr + slot * HL
    gp1_s = gp1_ptr + slot * 3 * H1
    gp3_s = gp3_ptr + slot * 3 * H3

    b2 = tl.zeros([BH2], tl.float32)
    pa2 = b2
    ps2 = b2
    pb2 = b2
    wo2 = b2
    gs1 = b2
    gs2 = b2
    if LAYERS >= 2:
        b2 = _vec(b2_ptr + g * H2, offs_h2, H2)
        pa2, ps2, pb2 = _act_vecs(p2_ptr + g * 3 * H2, offs_h2, H2, ACT_PARAMS >= 2)
    if LAYERS == 2:
        wo2 = _vec(wo_g, offs_h2, H2)
        if STATS:
            # Upstream grads of (sum z_2, sum z_2^2) for this program's head.
            gs1 = _vec(gst_g, offs_h2, H2)
            gs2 = _vec(gst_g + H2, offs_h2, H2)
    bo = tl.load(bo_ptr + g).to(tl.float32)

    gbo = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)

    for b in range(pid, B, n_prog):
        r = b * E + e
        if HAS_KIDX:
            kb = tl.load(kidx_ptr + b)
        else:
            kb = b
        krow = (kb * E + e).to(tl.int64)
        k_base = k_ptr + krow * T * D
        if DK_PER_ROW:
            dk_base = dk_ptr + r.to(tl.int64) * T * D
        else:
            dk_base = dk_ptr + krow * T * D
        q = _vec(q_ptr + r * D, offs_d, D)
        qt_row = qt_ptr + r * H1
        dqt_row = dqt_ptr + r * H1
        if not STATS:
            dout = _vec(dout_ptr + r * D, offs_d, D)
            if SOFTMAX:
                lse = tl.load(lse_ptr + r)
                delta = tl.load(delta_ptr + r)
        dq = tl.zeros([BD], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            # Orders the previous tile's in-place accumulations before this tile's.
            tl.debug_barrier()
            offs_t = t0 + offs_bt
            tm = offs_t < T
            kmask = tm[:, None] & dm[None, :]
            k = tl.load(k_base + offs_t[:, None] * D + offs_d[None, :],
                        mask=kmask, other=0.0).to(tl.float32)
            if LAYERS >= 2:
                z2 = _layer2_pre(k, q, qt_row, wk_g, wp_g, p1_g, w2_g, b2, offs_d, offs_h2,
                                 H1, H2, D, ACT, ACT_PARAMS >= 1, BLOCK_T, BH2, BC1,
                                 LOWP, DT, PREC)
                a2 = z2
                if LAYERS == 3 or not STATS:
                    a2 = _act(z2, pa2, ps2, pb2, ACT)
            ds = tl.zeros([BLOCK_T], tl.float32)
            dk = tl.zeros([BLOCK_T, BD], tl.float32)
            if not STATS:
                s = tl.zeros([BLOCK_T], tl.float32) + bo
                if LAYERS == 1:
                    for c0 in range(0, H1, BC1):
                        offs_c = c0 + tl.arange(0, BC1)
                        _, _, _, a1, _, _, _ = _layer1(k, q, qt_row, wk_g, wp_g, p1_g, offs_c,
                                                       offs_d, H1, D, ACT, ACT_PARAMS >= 1,
                                                       True, LOWP, DT, PREC)
                        s += tl.sum(a1 * _vec(wo_g, offs_c, H1)[None, :], axis=1)
                elif LAYERS == 2:
                    s += tl.sum(a2 * wo2[None, :], axis=1)
                else:
                    for c0 in range(0, H3, BC3):
                        offs_c = c0 + tl.arange(0, BC3)
                        z3 = (_dot(a2, _mat(w3_g, offs_h2, offs_c, H3, H2, True), LOWP, DT, PREC)
                              + _vec(b3_ptr + g * H3, offs_c, H3)[None, :])
                        pa3, ps3, pb3 = _act_vecs(p3_g, offs_c, H3, ACT_PARAMS >= 3)
                        s += tl.sum(_act(z3, pa3, ps3, pb3, ACT)
                                    * _vec(wo_g, offs_c, H3)[None, :], axis=1)
                valid = _valid(offs_t, T, kb, len_ptr, mask_ptr, HAS_LEN, HAS_MASK)
                da = tl.sum(k * dout[None, :], axis=1)
                if HAS_DSC:
                    da += tl.load(dsc_ptr + r * T + offs_t, mask=tm, other=0.0).to(tl.float32)
                if SOFTMAX:
                    p = tl.where(valid, tl.exp(tl.where(valid, s - lse, 0.0)), 0.0)
                    ds = p * (da - delta)
                else:
                    p = tl.where(valid, s, 0.0)
                    ds = tl.where(valid, da, 0.0)
                dk = p[:, None] * dout[None, :]
                gbo += tl.sum(ds, axis=0)

            if LAYERS == 2:
                if STATS:
                    dz2 = tl.where(tm[:, None], gs1[None, :] + 2.0 * gs2[None, :] * z2, 0.0)
                else:
                    _rmw(gwo_s, offs_h2, H2, tl.sum(ds[:, None] * a2, axis=0))
                    dz2, x0, x1, x2 = _act_bwd(z2, ds[:, None] * wo2[None, :], pa2, ps2, pb2,
                                               ACT)
                    if ACT_PARAMS >= 2:
                        _rmw_act(gp2_s, x0, x1, x2, offs_h2, H2)
            if LAYERS == 3:
                g2 = tl.zeros([BLOCK_T, BH2], tl.float32)
                for c0 in range(0, H3, BC3):
                    offs_c = c0 + tl.arange(0, BC3)
                    w3c = _mat(w3_g, offs_c, offs_h2, H3, H2, False)  # (BC3, BH2)
                    z3 = (_dot(a2, tl.trans(w3c), LOWP, DT, PREC)
                          + _vec(b3_ptr + g * H3, offs_c, H3)[None, :])
                    if STATS:
                        dz3 = tl.where(tm[:, None],
                                       _vec(gst_g, offs_c, H3)[None, :]
                                       + 2.0 * _vec(gst_g + H3, offs_c, H3)[None, :] * z3, 0.0)
                    else:
                        pa3, ps3, pb3 = _act_vecs(p3_g, offs_c, H3, ACT_PARAMS >= 3)
                        _rmw(gwo_s, offs_c, H3,
                             tl.sum(ds[:, None] * _act(z3, pa3, ps3, pb3, ACT), axis=0))
                        dz3, ga3c, gs3c, gb3c = _act_bwd(
                            z3, ds[:, None] * _vec(wo_g, offs_c, H3)[None, :], pa3, ps3, pb3,
                            ACT)
                        if ACT_PARAMS >= 3:
                            _rmw_act(gp3_s, ga3c, gs3c, gb3c, offs_c, H3)
                    _rmw_mat(gw3_s, _dot(tl.trans(dz3), a2, LOWP_BWD, DT, PREC), offs_c,
                             offs_h2, H3, H2)
                    _rmw(gb3_s, offs_c, H3, tl.sum(dz3, axis=0))
                    g2 += _dot(dz3, w3c, LOWP_BWD, DT, PREC)
                dz2, x0, x1, x2 = _act_bwd(z2, g2, pa2, ps2, pb2, ACT)
                if ACT_PARAMS >= 2:
                    _rmw_act(gp2_s, x0, x1, x2, offs_h2, H2)
            if LAYERS >= 2:
                _rmw(gb2_s, offs_h2, H2, tl.sum(dz2, axis=0))

            for c0 in range(0, H1, BC1):
                offs_c = c0 + tl.arange(0, BC1)
                weff, wp, z1, a1, pa1, ps1, pb1 = _layer1(
                    k, q, qt_row, wk_g, wp_g, p1_g, offs_c, offs_d, H1, D, ACT,
                    ACT_PARAMS >= 1, LAYERS > 1 or not STATS, LOWP, DT, PREC)
                if LAYERS == 1:
                    if STATS:
                        dz1 = tl.where(tm[:, None],
                                       _vec(gst_g, offs_c, H1)[None, :]
                                       + 2.0 * _vec(gst_g + H1, offs_c, H1)[None, :] * z1, 0.0)
                    else:
                        _rmw(gwo_s, offs_c, H1, tl.sum(ds[:, None] * a1, axis=0))
                        dz1, ga1c, gs1c, gb1c = _act_bwd(
                            z1, ds[:, None] * _vec(wo_g, offs_c, H1)[None, :], pa1, ps1, pb1,
                            ACT)
                        if ACT_PARAMS >= 1:
                            _rmw_act(gp1_s, ga1c, gs1c, gb1c, offs_c, H1)
                else:
                    _rmw_mat(gw2_s, _dot(tl.trans(dz2), a1, LOWP_BWD, DT, PREC), offs_h2,
                             offs_c, H2, H1)
                    g1 = _dot(dz2, _mat(w2_g, offs_h2, offs_c, H2, H1, False), LOWP_BWD, DT,
                              PREC)
                    dz1, ga1c, gs1c, gb1c = _act_bwd(z1, g1, pa1, ps1, pb1, ACT)
                    if ACT_PARAMS >= 1:
                        _rmw_act(gp1_s, ga1c, gs1c, gb1c, offs_c, H1)
                _rmw(dqt_row, offs_c, H1, tl.sum(dz1, axis=0))
                gweff = _dot(tl.trans(dz1), k, LOWP_BWD, DT, PREC)  # (BC1, BD)
                _rmw_mat(gwk_s, gweff, offs_c, offs_d, H1, D)
                _rmw_mat(gwp_s, gweff * q[None, :], offs_c, offs_d, H1, D)
                dq += tl.sum(gweff * wp, axis=0)
                dk += _dot(dz1, weff, LOWP_BWD, DT, PREC)
            tl.store(dk_base + offs_t[:, None] * D + offs_d[None, :],
                     dk.to(dk_ptr.dtype.element_ty), mask=kmask)
        tl.store(dq_ptr + r * D + offs_d, dq, mask=dm)

    tl.store(gbo_ptr + slot, gbo)


@triton.jit(do_not_specialize=["T"])
def _segment_sum_kernel(src_ptr, order_ptr, start_ptr, dst_ptr, TD, BLOCK: tl.constexpr):
    """dst[n] = sum of src[order[i]] for i in [start[n], start[n+1]), in that order."""
    n = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < TD
    lo = tl.load(start_ptr + n)
    hi = tl.load(start_ptr + n + 1)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(lo, hi):
        row = tl.load(order_ptr + i)
        acc += tl.load(src_ptr + row * TD + offs, mask=msk, other=0.0)
    tl.store(dst_ptr + n.to(tl.int64) * TD + offs, acc.to(dst_ptr.dtype.element_ty), mask=msk)


# --------------------------------------------------------------------------------------
# launch configuration


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _config(keys: torch.Tensor, hidden: Sequence[int], dim: int, backward: bool = False) -> dict:
    """Tile sizes and dot precision, fixed by the shapes (deterministic, no autotune).

    GPU (sizes chosen by compiling for sm_90 and reading shared memory, registers and
    spills): 8 warps; the forward takes 32-key tiles (16 when D > 64 or the second layer,
    held whole, is wider than 128) and 32-unit chunks (16 when D > 64); the backward,
    which keeps about twice as many tiles live, 16-key tiles and 16-unit chunks. The loops
    are not software-pipelined (num_stages 1): the pipelining buffers of the nested loops
    cost more registers than they save latency."""
    bd = _pow2(dim)
    blocks = [_pow2(h) for h in hidden]
    bh2 = blocks[1] if len(hidden) > 1 else 16
    if _interpreting() or not keys.is_cuda:
        block_t, warps, chunk = 16, 1, _CHUNK
    else:
        wide = bd > 64 or bh2 > 128
        block_t = 16 if backward or wide else 32
        chunk = min(_CHUNK, 16 if backward or bd > 64 else 32)
        warps = 8
    # Half inputs run the MLP's dots in their dtype on the GPU (fp32 accumulation); the
    # gradient dots too for bfloat16 only, since float16 underflows small gradients.
    # The interpreter computes bfloat16 dots wrongly, so it always runs them in fp32.
    lowp = keys.dtype in (torch.float16, torch.bfloat16) and keys.is_cuda and not _interpreting()
    prec = "tf32" if keys.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return dict(BLOCK_T=block_t, BD=bd, BH2=bh2, BC1=min(blocks[0], chunk),
                BC3=min(blocks[2], chunk) if len(hidden) > 2 else 16,
                LOWP=lowp, PREC=prec, num_warps=warps, num_stages=1)


def _act_param_layers(activation: str, n_layers: int, stats: bool) -> int:
    """How many layers' per-unit activation parameters the kernel reads (the statistics
    pass stops before the last layer's activation)."""
    if activation not in ("prelu", "dice"):
        return 0
    return n_layers - 1 if stats else n_layers


def _programs(batch: int, heads: int, device: torch.device, per_sm: int = 4) -> int:
    """Programs per head: each walks a strided set of rows, so the weights are loaded
    once per program, and owns one slot of the backward's partial-gradient buffers
    (few slots keep those small)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(batch, (per_sm * sms + heads - 1) // heads))
    return max(1, min(batch, 4))


# --------------------------------------------------------------------------------------
# custom ops


def _dummy(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_zeros(1)


def _hidden(w_k: torch.Tensor, w2: Optional[torch.Tensor], w3: Optional[torch.Tensor]) -> list[int]:
    return [w_k.shape[1]] + [w.shape[1] for w in (w2, w3) if w is not None]


def _launch_fwd(qterm, query, keys, key_index, lengths, mask, w_k, w_p, w2, b2, w3, b3,
                w_o, b_o, act1, act2, act3, heads, activation, softmax, return_scores,
                stats):
    """Run the forward kernel. Inputs (R = B*E rows, N key rows, G = E for per-head MLPs
    else 1): qterm (R, H1) fp32, first bias included; query (R, D); keys (N, T, D);
    key_index (B,) int64 or None; lengths (N // E,) int64 or None; mask (N // E, T) bool
    or None; w_k, w_p (G, H1, D); w2 (G, H2, H1), b2 (G, H2), w3 (G, H3, H2), b3 (G, H3)
    or None; w_o (G, H_L); b_o (G,); act1..3 (G, 3, H_l) per-unit (PReLU slope or Dice
    alpha, Dice scale, Dice shift) or None.

    Returns (out (R, D) in query's dtype, scores (R, T) fp32 (or (0, T)), lse (R,) fp32,
    statistics (E, P, 2, H_L) fp32 per program in STATS mode)."""
    rows, dim = query.shape
    seq_len = keys.shape[1]
    batch = rows // heads
    hidden = _hidden(w_k, w2, w3)
    cfg = _config(keys, hidden, dim)
    dummy = _dummy(qterm)
    out = torch.empty(rows, dim, device=query.device, dtype=query.dtype)
    lse = torch.empty(rows, device=query.device, dtype=torch.float32)
    scores = torch.empty(rows if return_scores else 0, seq_len, device=query.device,
                         dtype=torch.float32)
    if stats:
        n_prog = _programs(batch, heads, query.device)
        st = torch.zeros(heads, n_prog, 2, hidden[-1], device=query.device, dtype=torch.float32)
    else:
        n_prog = _programs(batch, heads, query.device, per_sm=16)
        st = dummy
    if rows == 0 or seq_len == 0:
        out.zero_()
        scores.zero_()
        lse.zero_()
        if stats:
            st.zero_()
        return out, scores, lse, st
    _fwd_kernel[(n_prog, heads)](
        qterm, query, keys,
        key_index if key_index is not None else dummy,
        lengths if lengths is not None else dummy,
        mask.view(torch.uint8) if mask is not None else dummy,
        w_k, w_p,
        *(t if t is not None else dummy for t in (w2, b2, w3, b3)),
        w_o, b_o,
        *(t if t is not None else dummy for t in (act1, act2, act3)),
        out, scores if return_scores else dummy, lse, st,
        batch, seq_len, heads, dim, *(hidden + [1] * (_MAX_LAYERS - len(hidden))),
        LAYERS=len(hidden), ACT=_ACTIVATIONS[activation], SOFTMAX=softmax,
        PER_HEAD=w_k.shape[0] > 1, HAS_KIDX=key_index is not None,
        HAS_LEN=lengths is not None, HAS_MASK=mask is not None,
        WRITE_SCORES=return_scores, STATS=stats,
        ACT_PARAMS=_act_param_layers(activation, len(hidden), stats), **cfg,
    )
    if not softmax:
        lse.zero_()
    return out, scores, lse, st





@torch.library.custom_op("interest_kernels::target_attention_fwd", mutates_args=())
def _fwd_op(
    qterm: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
    key_index: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
    mask: Optional[torch.Tensor], w_k: torch.Tensor, w_p: torch.Tensor,
    w2: Optional[torch.Tensor], b2: Optional[torch.Tensor],
    w3: Optional[torch.Tensor], b3: Optional[torch.Tensor],
    w_o: torch.Tensor, b_o: torch.Tensor, act1: Optional[torch.Tensor],
    act2: Optional[torch.Tensor], act3: Optional[torch.Tensor],
    heads: int, activation: str, softmax: bool, return_scores: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention: (out (R, D) in query's dtype, scores (R, T) or (0, T) in query's
    dtype, lse (R,) fp32). """
    out, scores, lse, _ = _launch_fwd(
        qterm, query, keys, key_index, lengths, mask, w_k, w_p, w2, b2, w3, b3, w_o, b_o,
        act1, act2, act3, heads, activation, softmax, return_scores, stats=False)
    return out, scores.to(query.dtype), lse


@_fwd_op.register_fake
def _(qterm, query, keys, key_index, lengths, mask, w_k, w_p, w2, b2, w3, b3, w_o, b_o,
      act1, act2, act3, heads, activation, softmax, return_scores):
    rows, dim = query.shape
    return (
        query.new_empty(rows, dim),
        query.new_empty(rows if return_scores else 0, keys.shape[1]),
        query.new_empty(rows, dtype=torch.float32),
    )


@torch.library.custom_op("interest_kernels::target_attention_stats", mutates_args=())
def _stats_op(
    qterm: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
    key_index: Optional[torch.Tensor], w_k: torch.Tensor, w_p: torch.Tensor,
    w2: Optional[torch.Tensor], b2: Optional[torch.Tensor],
    w3: Optional[torch.Tensor], b3: Optional[torch.Tensor],
    act1: Optional[torch.Tensor], act2: Optional[torch.Tensor], heads: int, activation: str,
) -> torch.Tensor:
    """(sum z_L, sum z_L^2) over all R*T positions (padded ones too) of the last given
    layer's pre-activation, per head: (E, 2, H_L) fp32."""
    out, _, _, st = _launch_fwd(
        qterm, query, keys, key_index, None, None, w_k, w_p, w2, b2, w3, b3,
        qterm.new_zeros(w_k.shape[0], _hidden(w_k, w2, w3)[-1]), qterm.new_zeros(w_k.shape[0]),
        act1, act2, None, heads, activation, False, False, stats=True)
    return st.sum(dim=1)


@_stats_op.register_fake
def _(qterm, query, keys, key_index, w_k, w_p, w2, b2, w3, b3, act1, act2, heads, activation):
    return qterm.new_empty(heads, 2, _hidden(w_k, w2, w3)[-1], dtype=torch.float32)


def _launch_bwd(dout, dscores, lse, delta, gstats, qterm, query, keys, key_index, lengths,
                mask, w_k, w_p, w2, b2, w3, b3, w_o, b_o, act1, act2, act3, heads,
                activation, softmax, stats):
    """Gradients of every differentiable input, in the order of the op's tensors:
    (qterm, query, keys, w_k, w_p, w2, b2, w3, b3, w_o, b_o, act1, act2, act3);
    absent inputs give None."""
    rows, dim = query.shape
    seq_len = keys.shape[1]
    batch = rows // heads
    groups = w_k.shape[0]
    hidden = _hidden(w_k, w2, w3)
    cfg = _config(keys, hidden, dim, backward=True)
    dev = query.device
    dummy = _dummy(qterm)
    n_prog = _programs(batch, heads, dev)
    f32 = dict(device=dev, dtype=torch.float32)
    dqt = torch.zeros(rows, hidden[0], **f32)
    dq = torch.empty(rows, dim, **f32)
    per_row = key_index is not None
    dk_rows = torch.empty(rows, seq_len, dim, **f32) if per_row else torch.empty_like(keys)

    def part(*shape):
        return torch.zeros(heads, n_prog, *shape, **f32)

    h_last = hidden[-1]
    parts = {
        "w_k": part(hidden[0], dim), "w_p": part(hidden[0], dim),
        "w2": part(hidden[1], hidden[0]) if w2 is not None else None,
        "b2": part(hidden[1]) if w2 is not None else None,
        "w3": part(hidden[2], hidden[1]) if w3 is not None else None,
        "b3": part(hidden[2]) if w3 is not None else None,
        "w_o": part(h_last), "b_o": part(),
        "act1": part(3, hidden[0]),
        "act2": part(3, hidden[1]) if w2 is not None else None,
        "act3": part(3, hidden[2]) if w3 is not None else None,
    }
    if rows == 0 or seq_len == 0:
        for t in [dqt, dq, dk_rows] + [p for p in parts.values() if p is not None]:
            t.zero_()
    else:
        _bwd_kernel[(n_prog, heads)](
            qterm, query, keys,
            key_index if key_index is not None else dummy,
            lengths if lengths is not None else dummy,
            mask.view(torch.uint8) if mask is not None else dummy,
            w_k, w_p, *(t if t is not None else dummy for t in (w2, b2, w3, b3)), w_o, b_o,
            *(t if t is not None else dummy for t in (act1, act2, act3)),
            dout if dout is not None else dummy,
            dscores if dscores is not None else dummy,
            lse if lse is not None else dummy,
            delta if delta is not None else dummy,
            gstats if gstats is not None else dummy,
            dqt, dq, dk_rows,
            *(parts[n] if parts[n] is not None else dummy
              for n in ("w_k", "w_p", "w2", "b2", "w3", "b3", "w_o", "b_o",
                        "act1", "act2", "act3")),
            batch, seq_len, heads, dim, *(hidden + [1] * (_MAX_LAYERS - len(hidden))),
            LAYERS=len(hidden), ACT=_ACTIVATIONS[activation], SOFTMAX=softmax,
            PER_HEAD=groups > 1, HAS_KIDX=key_index is not None,
            HAS_LEN=lengths is not None, HAS_MASK=mask is not None,
            HAS_DSC=dscores is not None, STATS=stats, DK_PER_ROW=per_row,
            ACT_PARAMS=_act_param_layers(activation, len(hidden), stats),
            LOWP_BWD=cfg["LOWP"] and keys.dtype == torch.bfloat16, **cfg,
        )
    if per_row:
        dkeys = _segment_rows(dk_rows, key_index, heads, keys.shape[0], keys.dtype)
    else:
        dkeys = dk_rows

    def reduce(name, like):
        p = parts[name]
        if p is None:
            return None
        p = p.sum(dim=1)  # over programs: (E, ...)
        p = p if groups > 1 else p.sum(dim=0, keepdim=True)
        return p.reshape(like.shape).to(like.dtype)

    grads = [dqt, dq.to(query.dtype), dkeys]
    for name, like in (("w_k", w_k), ("w_p", w_p), ("w2", w2), ("b2", b2), ("w3", w3),
                       ("b3", b3), ("w_o", w_o), ("b_o", b_o), ("act1", act1),
                       ("act2", act2), ("act3", act3)):
        grads.append(reduce(name, like) if like is not None else None)
    return grads


def _segment_rows(dk_rows, key_index, heads, n_keys, dtype):
    """Sum per-row key gradients (R, T, D) into their key rows (N, T, D), in a fixed order."""
    rows, seq_len, dim = dk_rows.shape
    dev = dk_rows.device
    head = torch.arange(heads, device=dev)
    key_row = (key_index.reshape(-1, 1) * heads + head).reshape(-1)  # (R,)
    order = torch.sort(key_row, stable=True).indices
    counts = torch.zeros(n_keys, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key_row, torch.ones_like(key_row))
    start = torch.zeros(n_keys + 1, dtype=torch.int64, device=dev)
    start[1:] = torch.cumsum(counts, 0)
    dst = torch.empty(n_keys, seq_len, dim, device=dev, dtype=dtype)
    td = seq_len * dim
    if n_keys == 0 or td == 0:
        return dst.zero_()
    block = min(1024, triton.next_power_of_2(td))
    _segment_sum_kernel[(n_keys, triton.cdiv(td, block))](dk_rows, order, start, dst, td,
                                                          BLOCK=block)
    return dst


_GRAD_NAMES = ("qterm", "query", "keys", "w_k", "w_p", "w2", "b2", "w3", "b3", "w_o", "b_o",
               "act1", "act2", "act3")


def _fill(grads, ref: torch.Tensor) -> list[torch.Tensor]:
    """Custom ops cannot return None: absent gradients travel as empty tensors."""
    return [g if g is not None else ref.new_empty(0) for g in grads]


@torch.library.custom_op("interest_kernels::target_attention_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor, dscores: Optional[torch.Tensor], lse: torch.Tensor,
    delta: torch.Tensor, qterm: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
    key_index: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
    mask: Optional[torch.Tensor], w_k: torch.Tensor, w_p: torch.Tensor,
    w2: Optional[torch.Tensor], b2: Optional[torch.Tensor],
    w3: Optional[torch.Tensor], b3: Optional[torch.Tensor],
    w_o: torch.Tensor, b_o: torch.Tensor, act1: Optional[torch.Tensor],
    act2: Optional[torch.Tensor], act3: Optional[torch.Tensor],
    heads: int, activation: str, softmax: bool,
) -> list[torch.Tensor]:
    """Gradients of (qterm, query, keys, w_k, w_p, w2, b2, w3, b3, w_o, b_o, act1..3);
    an absent input's entry is an empty tensor."""
    grads = _launch_bwd(dout, dscores, lse, delta, None, qterm, query, keys, key_index,
                        lengths, mask, w_k, w_p, w2, b2, w3, b3, w_o, b_o, act1, act2, act3,
                        heads, activation, softmax, stats=False)
    return _fill(grads, qterm)


def _fake_grads(qterm, query, keys, w_k, w_p, w2, b2, w3, b3, w_o, b_o, act1, act2, act3):
    out = [qterm.new_empty(qterm.shape, dtype=torch.float32), torch.empty_like(query),
           torch.empty_like(keys)]
    for t in (w_k, w_p, w2, b2, w3, b3, w_o, b_o, act1, act2, act3):
        out.append(torch.empty_like(t) if t is not None else qterm.new_empty(0))
    return out


@_bwd_op.register_fake
def _(dout, dscores, lse, delta, qterm, query, keys, key_index, lengths, mask, w_k, w_p,
      w2, b2, w3, b3, w_o, b_o, act1, act2, act3, heads, activation, softmax):
    return _fake_grads(qterm, query, keys, w_k, w_p, w2, b2, w3, b3, w_o, b_o,
                       act1, act2, act3)


@torch.library.custom_op("interest_kernels::target_attention_stats_bwd", mutates_args=())
def _stats_bwd_op(
    gstats: torch.Tensor, qterm: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
    key_index: Optional[torch.Tensor], w_k: torch.Tensor, w_p: torch.Tensor,
    w2: Optional[torch.Tensor], b2: Optional[torch.Tensor],
    w3: Optional[torch.Tensor], b3: Optional[torch.Tensor],
    act1: Optional[torch.Tensor], act2: Optional[torch.Tensor], heads: int, activation: str,
) -> list[torch.Tensor]:
    """Gradients of the statistics op's (qterm, query, keys, w_k, w_p, w2, b2, w3, b3,
    act1, act2) for the upstream gradient ``gstats`` (E|1, 2, H_L) (empty when absent)."""
    groups = w_k.shape[0]
    g = gstats if groups > 1 else gstats.sum(dim=0, keepdim=True)
    zeros_o = qterm.new_zeros(groups, _hidden(w_k, w2, w3)[-1])
    grads = _launch_bwd(None, None, None, None, g.contiguous(), qterm, query, keys, key_index,
                        None, None, w_k, w_p, w2, b2, w3, b3, zeros_o,
                        qterm.new_zeros(groups), act1, act2, None, heads, activation,
                        False, stats=True)
    keep = grads[:9] + grads[11:13]
    return _fill(keep, qterm)


@_stats_bwd_op.register_fake
def _(gstats, qterm, query, keys, key_index, w_k, w_p, w2, b2, w3, b3, act1, act2, heads,
      activation):
    full = _fake_grads(qterm, query, keys, w_k, w_p, w2, b2, w3, b3, w_k, w_k, act1, act2,
                       None)
    return full[:9] + full[11:13]


# --- autograd ---------------------------------------------------------------------------

_FWD_TENSORS = ("qterm", "query", "keys", "key_index", "lengths", "mask", "w_k", "w_p", "w2",
                "b2", "w3", "b3", "w_o", "b_o", "act1", "act2", "act3")


def _fwd_setup_context(ctx, inputs, output):
    *tensors, heads, activation, softmax, return_scores = inputs
    out, scores, lse = output
    ctx.heads, ctx.activation, ctx.softmax = heads, activation, softmax
    ctx.return_scores = return_scores
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None], out, scores, lse)


def _unpack(ctx):
    """The op's tensor inputs (None where absent) and the saved outputs."""
    saved = list(ctx.saved_tensors)
    tensors = []
    for present in ctx.present:
        tensors.append(saved.pop(0) if present else None)
    return tensors, saved


def _fwd_backward(ctx, dout, dscores, dlse):
    tensors, (out, scores, lse) = _unpack(ctx)
    if dout is None:
        dout = torch.zeros_like(out)
    if not ctx.return_scores:
        dscores = None
    delta = (dout.float() * out.float()).sum(dim=-1)
    if dscores is not None:
        delta = delta + (dscores.float() * scores.float()).sum(dim=-1)
        dscores = dscores.contiguous()
    grads = _bwd_op(dout.contiguous(), dscores, lse, delta.contiguous(), *tensors,
                    ctx.heads, ctx.activation, ctx.softmax)
    by_name = dict(zip(_GRAD_NAMES, grads))
    result = []
    for name, t in zip(_FWD_TENSORS, tensors):
        result.append(by_name[name] if name in by_name and t is not None else None)
    return (*result, None, None, None, None)


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)

_STATS_TENSORS = ("qterm", "query", "keys", "key_index", "w_k", "w_p", "w2", "b2", "w3", "b3",
                  "act1", "act2")
_STATS_GRADS = ("qterm", "query", "keys", "w_k", "w_p", "w2", "b2", "w3", "b3", "act1", "act2")


def _stats_setup_context(ctx, inputs, output):
    *tensors, heads, activation = inputs
    ctx.heads, ctx.activation = heads, activation
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None])


def _stats_backward(ctx, gstats):
    tensors, _ = _unpack(ctx)
    grads = _stats_bwd_op(gstats.contiguous(), *tensors, ctx.heads, ctx.activation)
    by_name = dict(zip(_STATS_GRADS, grads))
    result = []
    for name, t in zip(_STATS_TENSORS, tensors):
        result.append(by_name[name] if name in by_name and t is not None else None)
    return (*result, None, None)


_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup_context)


# --------------------------------------------------------------------------------------
# entry point


def _with_groups(t: torch.Tensor, per_head: bool) -> torch.Tensor:
    return (t if per_head else t.unsqueeze(0)).contiguous()


def _act_params(
    activation: str,
    layer: int,
    hidden: int,
    groups: int,
    per_head: bool,
    prelu_weights: Optional[Sequence[torch.Tensor]],
    dice_params: Optional[Sequence[DiceParams]],
    mean: Optional[torch.Tensor] = None,
    var: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """(G, 3, H) per-unit activation parameters of one layer, or None.

    PReLU: slope in row 0. Dice: (alpha, scale, shift) with the gate
    sigmoid(z * scale + shift) = sigmoid(weight * (z - mean) / sqrt(var + eps) + bias);
    ``mean``/``var`` (G, H) override the running statistics (training mode)."""
    if activation == "prelu":
        slope = prelu_weights[layer].float().reshape(-1, hidden).expand(groups, hidden)
        zero = slope.new_zeros(groups, hidden)
        return torch.stack([slope, zero, zero], dim=1).contiguous()
    if activation != "dice":
        return None
    p = dice_params[layer]

    def grouped(t, fill):
        if t is None:
            return torch.full((groups, hidden), fill, device=p.alpha.device, dtype=torch.float32)
        return t.float().reshape(-1, hidden).expand(groups, hidden)

    if mean is None:
        mean, var = grouped(p.running_mean, 0.0), grouped(p.running_var, 1.0)
    scale = grouped(p.weight, 1.0) * torch.rsqrt(var + p.eps)
    shift = grouped(p.bias, 0.0) - mean * scale
    return torch.stack([grouped(p.alpha, 0.0), scale, shift], dim=1).contiguous()


def target_attention_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    out_weight: torch.Tensor,
    out_bias: Optional[torch.Tensor],
    *,
    activation: str,
    normalization: str,
    lengths: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    key_index: Optional[torch.Tensor],
    prelu_weights: Optional[Sequence[torch.Tensor]],
    dice_params: Optional[Sequence[DiceParams]],
    return_scores: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Target attention with the fused kernels, on arguments normalised by the public op.

    query (B, D) or (B, E, D); keys (B|U, T, D) or (B|U, E, T, D); weights/biases as
    nn.Linear (leading E for per-head MLPs); out_weight (H_L,) or (E, H_L); out_bias
    0-d, (E,) or None. Returns ``(out, scores)``: out (B, D) / (B, E, D) and scores
    (B, T) / (B, E, T) (None unless ``return_scores``), in the dtype of ``query``.
    Dice in training mode updates the running statistics in place.
    """
    multi_head = keys.dim() == 4
    per_head = weights[0].dim() == 3
    heads = keys.shape[1] if multi_head else 1
    seq_len, dim = keys.shape[-2], keys.shape[-1]
    batch = query.shape[0]
    groups = heads if per_head else 1
    rows = batch * heads
    n_layers = len(weights)
    biases = list(biases) if biases is not None else [None] * n_layers

    # No -1 in these reshapes: B (or U) may be 0.
    q_heads = query.shape[1] if query.dim() == 3 else 1
    q = query.reshape(batch, q_heads, dim).expand(batch, heads, dim).reshape(rows, dim).contiguous()
    k = keys.reshape(keys.shape[0] * heads, seq_len, dim).contiguous()
    ws = [_with_groups(w, per_head) for w in weights]
    hidden = [w.shape[1] for w in ws]
    bs = [_with_groups(c, per_head) if c is not None else ws[i].new_zeros(groups, hidden[i])
          for i, c in enumerate(biases)]
    w1 = ws[0]
    w_q, w_k, w_d, w_p = w1.split(dim, dim=-1)
    w_qd = (w_q + w_d).float()
    w_kd = (w_k - w_d).contiguous()
    w_p = w_p.contiguous()
    # q-term of the first layer and its bias, per row: (R, H1) fp32.
    q3 = q.float().reshape(batch, heads, dim)
    if per_head:
        qterm = torch.einsum("bed,ehd->beh", q3, w_qd)
    else:
        qterm = torch.einsum("bed,hd->beh", q3, w_qd[0])
    qterm = (qterm + bs[0].float().reshape(1, groups, hidden[0])).reshape(rows, hidden[0]).contiguous()
    w_o = out_weight.reshape(groups, hidden[-1]).contiguous()
    b_o = (out_bias.reshape(-1).expand(groups) if out_bias is not None
           else w_o.new_zeros(groups)).contiguous()
    layer_args = [ws[1] if n_layers > 1 else None, bs[1] if n_layers > 1 else None,
                  ws[2] if n_layers > 2 else None, bs[2] if n_layers > 2 else None]

    acts: list[Optional[torch.Tensor]] = []
    for layer in range(n_layers):
        stats_mean = stats_var = None
        if activation == "dice" and dice_params[layer].training:
            stats_mean, stats_var = _dice_batch_stats(
                qterm, q, k, key_index, w_kd, w_p, layer_args, acts, heads, groups,
                layer, rows * seq_len, dice_params[layer])
        acts.append(_act_params(activation, layer, hidden[layer], groups, per_head,
                                prelu_weights, dice_params, stats_mean, stats_var))
    acts += [None] * (_MAX_LAYERS - n_layers)

    out, scores, _ = _fwd_op(
        qterm, q, k, key_index,
        lengths.contiguous() if lengths is not None else None,
        mask.contiguous() if mask is not None else None, w_kd, w_p, *layer_args, w_o, b_o, *acts,
        heads, activation, normalization == "softmax", bool(return_scores))
    out_shape = (batch, heads, dim) if multi_head else (batch, dim)
    out = out.reshape(out_shape)
    if not return_scores:
        return out, None
    score_shape = (batch, heads, seq_len) if multi_head else (batch, seq_len)
    return out, scores.reshape(score_shape)


def _dice_batch_stats(qterm, q, k, key_index, w_kd, w_p, layer_args, acts, heads, groups,
                      layer, positions, params: DiceParams):
    """Batch mean and biased variance (G, H) of layer ``layer``'s pre-activation over all
    positions (per head for per-head MLPs), differentiable; updates the running stats."""
    w2, b2, w3, b3 = layer_args
    args = [w2 if layer >= 1 else None, b2 if layer >= 1 else None,
            w3 if layer >= 2 else None, b3 if layer >= 2 else None]
    prev = acts + [None] * (2 - len(acts))
    sums = _stats_op(qterm, q, k, key_index, w_kd, w_p, *args, prev[0], prev[1],
                     heads, "dice")  # (E, 2, H)
    n = positions
    if groups == 1:
        sums = sums.sum(dim=0, keepdim=True)
    else:
        n = positions // heads
    sums = sums.double()  # E[z^2] - E[z]^2 cancels: take the difference in float64
    if n == 0:  # no positions (B or T is 0): no batch statistics, running ones untouched
        return sums[:, 0].float(), torch.ones_like(sums[:, 1]).float()
    mean = sums[:, 0] / n
    var = (sums[:, 1] / n - mean * mean).clamp_min(0.0)
    if params.running_mean is not None and params.running_var is not None:
        update_running_stats(params.running_mean, params.running_var, mean, var, n, params.momentum)
    return mean.float(), var.float()
