"""Forward kernel: persistent programs, the MLP on 64-key tiles, an online softmax.

Grid (P, E): program p of head e walks rows ``r = b*E + e`` for b = p, p+P, ... Its
group's MLP weights are loaded once, before the row loop. Per row the first-layer
matrix ``M_r = W_kd + W_p diag(q_r)`` (H1, D) is built once; per tile of BLOCK_T keys the
MLP runs as BLOCK_T-row dots, the score, and a flash-attention style online softmax
whose running (max, sum) and weighted key sum stay in registers. Only the
log-sum-exp per row is kept for the backward.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .layers import (history_row, load_vec, load_weights, mlp_tile, tile_vec, tile_vectors,
                     valid_positions, weight_offsets)


@triton.jit(do_not_specialize=["B", "T", "N"])
def attention_fwd_kernel(
    qt_ptr, q_ptr, k_ptr, kidx_ptr, len_ptr, mask_ptr, w_ptr, act_ptr,
    out_ptr, sc_ptr, lse_ptr,
    B, T, N, E, D, H1, H2, H3, W_ROW, A_ROW,
    LAYERS: tl.constexpr, ACT: tl.constexpr, ACT_LAYERS: tl.constexpr,
    SOFTMAX: tl.constexpr, PER_HEAD: tl.constexpr, HAS_KIDX: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_SCORES: tl.constexpr,
    BLOCK_T: tl.constexpr, BD: tl.constexpr, BH1: tl.constexpr, BH2: tl.constexpr,
    BH3: tl.constexpr, LOWP: tl.constexpr, LOWP_BWD: tl.constexpr, PREC: tl.constexpr,
):
    """qt (R, H1) fp32 q-term with the first bias; q (R, D); keys (N*E, T, D); key_index
    (B,); lengths (N,); mask (N, T) uint8; packed weights (G, W_ROW) and activation
    parameters (G, A_ROW) (see layers.py). Writes out (R, D), lse (R,) fp32 and, if
    WRITE_SCORES, the attention weights (R, T) fp32."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n_prog = tl.num_programs(0)
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

    # The weight matrices stay on chip; the per-unit vectors are loaded per tile
    # (layers.tile_vec).
    wkd, wp, w2t, w3t = load_weights(w_g, D, H1, H2, H3, offs_d, offs_h1, offs_h2, offs_h3, LAYERS, LAYERS)
    o_wp, o_w2, o_b2, o_w3, o_b3, o_wo, o_bo, w_row = weight_offsets(D, H1, H2, H3, LAYERS)
    bo = tl.load(w_g + o_bo).to(tl.float32)
    if LAYERS == 1:
        HT = H1
        offs_top = offs_h1
    elif LAYERS == 2:
        HT = H2
        offs_top = offs_h2
    else:
        HT = H3
        offs_top = offs_h3
    if LOWP:
        w2t = w2t.to(DT)
        w3t = w3t.to(DT)

    for b in range(pid, B, n_prog):
        r = b * E + e
        kb = history_row(kidx_ptr, b, N, HAS_KIDX)
        k_base = k_ptr + (kb * E + e) * T * D
        q = load_vec(q_ptr + r * D, offs_d, D)
        mt = tl.trans(wkd + wp * q[None, :])  # M_r^T (BD, BH1), once per row
        if LOWP:
            mt = mt.to(DT)
        m_i = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
        acc = tl.zeros([BD], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + offs_bt
            tm = offs_t < T
            valid = valid_positions(offs_t, T, kb, len_ptr, mask_ptr, HAS_LEN, HAS_MASK)
            # Padding is never read: a masked key loads as zeros.
            k = tl.load(k_base + offs_t[:, None] * D + offs_d[None, :],
                        mask=valid[:, None] & dm[None, :], other=0.0)
            qt, b2, b3, pa1, ps1, pb1, pa2, ps2, pb2, pa3, ps3, pb3 = tile_vectors(
                qt_ptr + r * H1, w_g + o_b2, w_g + o_b3, a_g, H1, H2, H3, offs_h1, offs_h2,
                offs_h3, t0, T, LAYERS, ACT_LAYERS)
            wo = tile_vec(w_g + o_wo, offs_top, HT, t0, T)
            z1, a1, z2, a2, z3, a3 = mlp_tile(k, mt, qt, w2t, b2, w3t, b3, pa1, ps1, pb1,
                                           pa2, ps2, pb2, pa3, ps3, pb3, LAYERS, ACT, True,
                                           LOWP, DT, PREC)
            if LAYERS == 1:
                s = tl.sum(a1 * wo[None, :], axis=1) + bo
            elif LAYERS == 2:
                s = tl.sum(a2 * wo[None, :], axis=1) + bo
            else:
                s = tl.sum(a3 * wo[None, :], axis=1) + bo
            if WRITE_SCORES:
                tl.store(sc_ptr + r * T + offs_t, s, mask=tm)
            kf = k.to(tl.float32)
            if SOFTMAX:
                s_v = tl.where(valid, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s_v, axis=0))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                corr = tl.exp(m_i - m_use)
                p = tl.exp(s_v - m_use)
                l_i = l_i * corr + tl.sum(p, axis=0)
                acc = acc * corr + tl.sum(p[:, None] * kf, axis=0)
                m_i = m_new
            else:
                acc += tl.sum(tl.where(valid, s, 0.0)[:, None] * kf, axis=0)
        lse = 0.0
        if SOFTMAX:
            has = l_i > 0
            l_safe = tl.where(has, l_i, 1.0)
            lse = tl.where(has, m_i + tl.log(l_safe), 0.0)
            acc = acc * tl.where(has, 1.0 / l_safe, 0.0)
        tl.store(lse_ptr + r, lse)
        tl.store(out_ptr + r * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=dm)
        if WRITE_SCORES:
            # The raw scores written above are normalised in place.
            tl.debug_barrier()
            for t0 in range(0, T, BLOCK_T):
                offs_t = t0 + offs_bt
                tm = offs_t < T
                valid = valid_positions(offs_t, T, kb, len_ptr, mask_ptr, HAS_LEN, HAS_MASK)
                s = tl.load(sc_ptr + r * T + offs_t, mask=tm, other=0.0)
                if SOFTMAX:
                    a = tl.where(valid, tl.exp(tl.where(valid, s - lse, 0.0)), 0.0)
                else:
                    a = tl.where(valid, s, 0.0)
                tl.store(sc_ptr + r * T + offs_t, a, mask=tm)
