"""Dice batch-statistics kernel: (sum z, sum z^2) of one layer's pre-activation.

Dice in training mode normalises each layer's pre-activation with its batch statistics
over all B*T positions (masked ones included, SPEC 1), so those must be known before the
attention kernel runs that layer. This kernel runs the MLP's first LAYERS layers (the
last one not activated) on the same persistent grid and 64-key tiles as the attention
kernels and keeps the two per-unit sums on chip, writing one partial per program; the
caller sums the partials. Its gradient is the backward kernel in statistics mode.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .layers import history_row, load_vec, load_weights, mlp_tile, tile_vectors, weight_offsets


@triton.jit(do_not_specialize=["B", "T", "N"])
def dice_stats_kernel(
    qt_ptr, q_ptr, k_ptr, kidx_ptr, w_ptr, act_ptr, st_ptr,
    B, T, N, E, D, H1, H2, H3, W_ROW, A_ROW,
    LAYERS: tl.constexpr, PACK_LAYERS: tl.constexpr, ACT: tl.constexpr,
    ACT_LAYERS: tl.constexpr, PER_HEAD: tl.constexpr, HAS_KIDX: tl.constexpr,
    BLOCK_T: tl.constexpr, BD: tl.constexpr, BH1: tl.constexpr, BH2: tl.constexpr,
    BH3: tl.constexpr, LOWP: tl.constexpr, LOWP_BWD: tl.constexpr, PREC: tl.constexpr,
):
    """Inputs as the forward kernel's; writes st (E, P, 2, H_LAYERS) fp32: this
    program's sums of layer LAYERS's pre-activation and of its square."""
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

    # the weight matrices on chip, the per-unit vectors per tile (layers.tile_vec)
    wkd, wp, w2t, w3t = load_weights(w_g, D, H1, H2, H3, offs_d, offs_h1, offs_h2, offs_h3, LAYERS,
                                     PACK_LAYERS)
    o_wp, o_w2, o_b2, o_w3, o_b3, o_wo, o_bo, w_row = weight_offsets(D, H1, H2, H3, PACK_LAYERS)
    if LOWP:
        w2t = w2t.to(DT)
        w3t = w3t.to(DT)
    if LAYERS == 1:
        s1 = tl.zeros([BH1], tl.float32)
        s2 = tl.zeros([BH1], tl.float32)
    elif LAYERS == 2:
        s1 = tl.zeros([BH2], tl.float32)
        s2 = tl.zeros([BH2], tl.float32)
    else:
        s1 = tl.zeros([BH3], tl.float32)
        s2 = tl.zeros([BH3], tl.float32)

    for b in range(pid, B, n_prog):
        r = b * E + e
        kb = history_row(kidx_ptr, b, N, HAS_KIDX)
        k_base = k_ptr + (kb * E + e) * T * D
        q = load_vec(q_ptr + r * D, offs_d, D)
        mt = tl.trans(wkd + wp * q[None, :])
        if LOWP:
            mt = mt.to(DT)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + offs_bt
            tm = offs_t < T
            k = tl.load(k_base + offs_t[:, None] * D + offs_d[None, :],
                        mask=tm[:, None] & dm[None, :], other=0.0)
            qt, b2, b3, pa1, ps1, pb1, pa2, ps2, pb2, pa3, ps3, pb3 = tile_vectors(
                qt_ptr + r * H1, w_g + o_b2, w_g + o_b3, a_g, H1, H2, H3, offs_h1, offs_h2,
                offs_h3, t0, T, LAYERS, ACT_LAYERS)
            z1, a1, z2, a2, z3, a3 = mlp_tile(k, mt, qt, w2t, b2, w3t, b3, pa1, ps1, pb1,
                                           pa2, ps2, pb2, pa3, ps3, pb3, LAYERS, ACT, False,
                                           LOWP, DT, PREC)
            if LAYERS == 1:
                z = z1
            elif LAYERS == 2:
                z = z2
            else:
                z = z3
            z = tl.where(tm[:, None], z, 0.0)
            s1 += tl.sum(z, axis=0)
            s2 += tl.sum(z * z, axis=0)

    if LAYERS == 1:
        HT = H1
        offs_top = offs_h1
    elif LAYERS == 2:
        HT = H2
        offs_top = offs_h2
    else:
        HT = H3
        offs_top = offs_h3
    st_base = st_ptr + (e * n_prog + pid) * 2 * HT
    tl.store(st_base + offs_top, s1, mask=offs_top < HT)
    tl.store(st_base + HT + offs_top, s2, mask=offs_top < HT)
