"""Backward kernel: recompute per 64-key tile, the data gradients and the small
parameter gradients.

Same grid and row walk as the forward. Per tile the MLP is recomputed from the keys
(flash-attention style: only the forward's log-sum-exp is saved), the attention gradient
gives each position's score gradient, and the chain runs down the MLP. The gradients of
the first layer's matrices (W_kd, W_p) and of W_2 are left to a second kernel
(``weight_grads.py``), with the query's and the q-term's, fed the layer-2 pre-activation
gradient dz2 that this one writes: their three float32 accumulators held across the tile
loop took most of the registers (bench/results/sm90_target_attention_spills.md). W_3's
gradient is a register accumulator of the program, written once, at the end, into this
program's row of a (programs, ...) partial buffer that the caller sums (deterministic,
no atomics); the per-unit ones (biases, score layer, activation parameters) are summed
in place in that row across the program's tiles, and
the per-unit inputs (q-term, biases, score weights, activation parameters) are loaded
per tile: a per-unit vector held in registers across the tile loop costs a quarter of
its length per thread in the MMA layout. The key gradient of a tile is stored as soon as
it is known. The deeper layers' weights stay on chip for the whole program; W_kd and W_p
are read once per row (from L2).

In statistics mode (STATS) the upstream gradient is that of the Dice statistics
(sum z, sum z^2) of layer LAYERS's pre-activation, instead of the attention output's.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .layers import (act_bwd, act_fwd, add_to_vec, history_row, load_mat, load_vec,
                     load_weights, mlp_tile, mm, store_mat, tile_act_params, tile_vec,
                     tile_vectors, valid_positions, weight_offsets)


@triton.jit
def _zero_vec(ptr, offs, n):
    tl.store(ptr + offs, tl.zeros(offs.shape, tl.float32), mask=offs < n)


@triton.jit
def _act_again(z, a, pa, ps, pb, ACT: tl.constexpr):
    """The activation a = act(z) for the backward: recomputed from z where act_bwd
    reads z anyway (PReLU, Dice), else a itself (then z need not stay live)."""
    if ACT == 3 or ACT == 4:
        return act_fwd(z, pa, ps, pb, ACT)
    return a


@triton.jit
def _zero_act(ptr, offs, n):
    _zero_vec(ptr, offs, n)
    _zero_vec(ptr + n, offs, n)
    _zero_vec(ptr + 2 * n, offs, n)


@triton.jit
def _add_act_grads(ptr, ga, gs, gb, offs, n):
    add_to_vec(ptr, offs, n, ga)
    add_to_vec(ptr + n, offs, n, gs)
    add_to_vec(ptr + 2 * n, offs, n, gb)


@triton.jit(do_not_specialize=["B", "T", "N"])
def attention_bwd_kernel(
    qt_ptr, q_ptr, k_ptr, kidx_ptr, len_ptr, mask_ptr, w_ptr, act_ptr,
    out_ptr, sc_ptr, dout_ptr, dsc_ptr, lse_ptr, gst_ptr,
    dk_ptr, dz_ptr, gw_ptr, ga_ptr,
    B, T, N, E, D, H1, H2, H3, W_ROW, A_ROW,
    LAYERS: tl.constexpr, PACK_LAYERS: tl.constexpr, ACT: tl.constexpr,
    ACT_LAYERS: tl.constexpr, SOFTMAX: tl.constexpr, PER_HEAD: tl.constexpr,
    HAS_KIDX: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DSC: tl.constexpr, STATS: tl.constexpr, DK_PER_ROW: tl.constexpr,
    BLOCK_T: tl.constexpr, BD: tl.constexpr, BH1: tl.constexpr, BH2: tl.constexpr,
    BH3: tl.constexpr, LOWP: tl.constexpr, LOWP_BWD: tl.constexpr, PREC: tl.constexpr,
):
    """Inputs as the forward kernel's, plus its out (R, D) and scores (R, T), the upstream
    dout (R, D) and dscores (R, T), lse (R,), or in STATS mode gst (G, 2, H_LAYERS).
    Writes dkeys (per row (R, T, D) fp32 if DK_PER_ROW,
    else like keys), dz (R, T, H2) fp32 = dz2 (dz1 (R, T, H1) if LAYERS == 1) for
    ``weight_grads.py``, and this program's rows of gw (E*P, W_ROW) and ga (E*P, A_ROW)
    fp32: the layers it ran (and in attention mode the score layer) except W_kd, W_p
    and W_2, which the second kernel writes, as dq and dqt."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n_prog = tl.num_programs(0)
    slot = e * n_prog + pid
    g = e if PER_HEAD else 0
    DT = k_ptr.dtype.element_ty
    offs_d = tl.arange(0, BD)
    offs_h1 = tl.arange(0, BH1)
    offs_h2 = tl.arange(0, BH2)
    offs_h3 = tl.arange(0, BH3)
    offs_bt = tl.arange(0, BLOCK_T)
    dm = offs_d < D
    w_g = w_ptr + g * W_ROW
    a_g = act_ptr + g * A_ROW

    # W_kd and W_p are read per row from L2 instead (see below); the per-unit vectors
    # per tile; the weight matrices stay on chip.
    (_, _, w2t, _, w3t, _, _, _, _, _, _, _, _, _, _) = load_weights(
        w_g, a_g, D, H1, H2, H3, offs_d, offs_h1, offs_h2, offs_h3, LAYERS, PACK_LAYERS,
        ACT_LAYERS, False)
    o_wp, o_w2, o_b2, o_w3, o_b3, o_wo, o_bo, _ = weight_offsets(D, H1, H2, H3, PACK_LAYERS)
    if LOWP:
        w2t = w2t.to(DT)
        w3t = w3t.to(DT)
    if LAYERS == 1:
        HT = H1
        offs_top = offs_h1
    elif LAYERS == 2:
        HT = H2
        offs_top = offs_h2
    else:
        HT = H3
        offs_top = offs_h3
    gst_g = gst_ptr + g * 2 * HT
    if not STATS:
        bo = tl.load(w_g + o_bo).to(tl.float32)

    # Parameter-gradient accumulators: W_3's on chip for the whole program, the
    # per-unit vectors in place in this program's partial rows (zeroed here).
    gw3t = tl.zeros([BH2, BH3], tl.float32)
    gbo = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
    gw_s = gw_ptr + slot * W_ROW
    ga_s = ga_ptr + slot * A_ROW
    if LAYERS >= 2:
        _zero_vec(gw_s + o_b2, offs_h2, H2)
    if LAYERS >= 3:
        _zero_vec(gw_s + o_b3, offs_h3, H3)
    if not STATS:
        _zero_vec(gw_s + o_wo, offs_top, HT)
    if ACT_LAYERS >= 1:
        _zero_act(ga_s, offs_h1, H1)
    if ACT_LAYERS >= 2:
        _zero_act(ga_s + 3 * H1, offs_h2, H2)
    if ACT_LAYERS >= 3:
        _zero_act(ga_s + 3 * (H1 + H2), offs_h3, H3)

    for b in range(pid, B, n_prog):
        r = b * E + e
        kb = history_row(kidx_ptr, b, N, HAS_KIDX)
        krow = kb * E + e
        k_base = k_ptr + krow * T * D
        if DK_PER_ROW:
            dk_base = dk_ptr + r.to(tl.int64) * T * D
        else:
            dk_base = dk_ptr + krow * T * D
        q = load_vec(q_ptr + r * D, offs_d, D)
        # M_r^T (BD, BH1), once per row. W_kd and W_p are not held through the program:
        # they would not fit the registers.
        mt = tl.trans(load_mat(w_g, offs_h1, offs_d, H1, D, False)
                      + load_mat(w_g + H1 * D, offs_h1, offs_d, H1, D, False) * q[None, :])
        if LOWP:
            mt = mt.to(DT)
        if not STATS:
            dout = load_vec(dout_ptr + r * D, offs_d, D)
            if SOFTMAX:
                lse = tl.load(lse_ptr + r)
                # delta_r = sum_t a_t da_t = dout . out (+ dscores . scores)
                delta = tl.sum(dout * load_vec(out_ptr + r * D, offs_d, D), axis=0)
                if HAS_DSC:
                    for t0 in range(0, T, BLOCK_T):
                        offs_t = t0 + offs_bt
                        valid = valid_positions(offs_t, T, kb, len_ptr, mask_ptr, HAS_LEN, HAS_MASK)
                        delta += tl.sum(tl.where(valid, load_vec(dsc_ptr + r * T, offs_t, T)
                                                 * load_vec(sc_ptr + r * T, offs_t, T), 0.0), axis=0)
        for t0 in range(0, T, BLOCK_T):
            # the previous tile's in-place sums are visible to every thread from here on
            tl.debug_barrier()
            offs_t = t0 + offs_bt
            tm = offs_t < T
            if STATS:  # Dice's batch statistics cover every position, padded ones too (SPEC 1)
                kmask = tm[:, None] & dm[None, :]
            else:  # elsewhere padding is never read: a masked key loads as zeros
                valid = valid_positions(offs_t, T, kb, len_ptr, mask_ptr, HAS_LEN, HAS_MASK)
                kmask = valid[:, None] & dm[None, :]
            k = tl.load(k_base + offs_t[:, None] * D + offs_d[None, :], mask=kmask, other=0.0)
            # the per-unit inputs, loaded per tile (see the module docstring)
            qt, b2, b3, pa1, ps1, pb1, pa2, ps2, pb2, pa3, ps3, pb3 = tile_vectors(
                qt_ptr + r * H1, w_g + o_b2, w_g + o_b3, a_g, H1, H2, H3, offs_h1, offs_h2,
                offs_h3, t0, T, LAYERS, ACT_LAYERS)
            z1, a1, z2, a2, z3, a3 = mlp_tile(k, mt, qt, w2t, b2, w3t, b3, pa1, ps1, pb1,
                                              pa2, ps2, pb2, pa3, ps3, pb3, LAYERS, ACT,
                                              not STATS, LOWP, DT, PREC)
            if LAYERS == 1:
                zt, at = z1, a1
                pat, pst, pbt = pa1, ps1, pb1
                ga_top = ga_s
            elif LAYERS == 2:
                zt, at = z2, a2
                pat, pst, pbt = pa2, ps2, pb2
                ga_top = ga_s + 3 * H1
            else:
                zt, at = z3, a3
                pat, pst, pbt = pa3, ps3, pb3
                ga_top = ga_s + 3 * (H1 + H2)
            if STATS:
                gs1 = tile_vec(gst_g, offs_top, HT, t0, T)
                gs2 = tile_vec(gst_g + HT, offs_top, HT, t0, T)
                dtop = tl.where(tm[:, None], gs1[None, :] + 2.0 * gs2[None, :] * zt, 0.0)
            else:
                wo = tile_vec(w_g + o_wo, offs_top, HT, t0, T)
                dout = tile_vec(dout_ptr + r * D, offs_d, D, t0, T)
                s = tl.sum(at * wo[None, :], axis=1) + bo
                da = tl.sum(k.to(tl.float32) * dout[None, :], axis=1)
                if HAS_DSC:  # a padded score's upstream gradient is never read either
                    da += tl.where(valid, load_vec(dsc_ptr + r * T, offs_t, T), 0.0)
                if SOFTMAX:
                    p = tl.where(valid, tl.exp(tl.where(valid, s - lse, 0.0)), 0.0)
                    ds = p * (da - delta)
                else:
                    p = tl.where(valid, s, 0.0)
                    ds = tl.where(valid, da, 0.0)
                add_to_vec(gw_s + o_wo, offs_top, HT, tl.sum(ds[:, None] * at, axis=0))
                gbo += tl.sum(ds, axis=0)
                dtop, x0, x1, x2 = act_bwd(zt, at, ds[:, None] * wo[None, :], pat, pst, pbt,
                                           ACT)
                if ACT_LAYERS >= LAYERS:
                    _add_act_grads(ga_top, x0, x1, x2, offs_top, HT)
            # Below the top, a layer's activation parameters are loaded again and, where
            # the activation reads z (PReLU, Dice), a = act(z) is recomputed, so that
            # neither stays live through the layers above.
            if LAYERS == 3:
                dz3 = dtop
                pa2, ps2, pb2 = tile_act_params(a_g + 3 * H1, offs_h2, H2, t0, T,
                                                ACT_LAYERS >= 2)
                a2 = _act_again(z2, a2, pa2, ps2, pb2, ACT)
                gw3t += mm(tl.trans(a2), dz3, LOWP_BWD, DT, PREC)
                add_to_vec(gw_s + o_b3, offs_h3, H3, tl.sum(dz3, axis=0))
                dz2, x0, x1, x2 = act_bwd(z2, a2, mm(dz3, tl.trans(w3t), LOWP_BWD, DT, PREC),
                                          pa2, ps2, pb2, ACT)
                if ACT_LAYERS >= 2:
                    _add_act_grads(ga_s + 3 * H1, x0, x1, x2, offs_h2, H2)
            elif LAYERS == 2:
                dz2 = dtop
            if LAYERS >= 2:
                tl.store(dz_ptr + r.to(tl.int64) * T * H2 + offs_t[:, None] * H2
                         + offs_h2[None, :], dz2, mask=tm[:, None] & (offs_h2[None, :] < H2))
                pa1, ps1, pb1 = tile_act_params(a_g, offs_h1, H1, t0, T, ACT_LAYERS >= 1)
                a1 = _act_again(z1, a1, pa1, ps1, pb1, ACT)
                add_to_vec(gw_s + o_b2, offs_h2, H2, tl.sum(dz2, axis=0))
                dz1, x0, x1, x2 = act_bwd(z1, a1, mm(dz2, tl.trans(w2t), LOWP_BWD, DT, PREC),
                                          pa1, ps1, pb1, ACT)
                if ACT_LAYERS >= 1:
                    _add_act_grads(ga_s, x0, x1, x2, offs_h1, H1)
            else:
                dz1 = dtop
                tl.store(dz_ptr + r.to(tl.int64) * T * H1 + offs_t[:, None] * H1
                         + offs_h1[None, :], dz1, mask=tm[:, None] & (offs_h1[None, :] < H1))
            dk = mm(dz1, tl.trans(mt), LOWP_BWD, DT, PREC)
            if not STATS:  # the attention's own term (dout reloaded: it is not held
                # through the chain); a padded key gets a zero gradient
                dout = tile_vec(dout_ptr + r * D, offs_d, D, t0, T)
                dk = tl.where(valid[:, None], dk + p[:, None] * dout[None, :], 0.0)
            tl.store(dk_base + offs_t[:, None] * D + offs_d[None, :],
                     dk.to(dk_ptr.dtype.element_ty), mask=tm[:, None] & dm[None, :])

    if LAYERS >= 3:
        store_mat(gw_s + o_w3, gw3t, offs_h2, offs_h3, H3, H2, True)
    if not STATS:
        tl.store(gw_s + o_bo, gbo)
