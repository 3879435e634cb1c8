"""Second backward kernel: the gradients of the first layer's matrices W_kd, W_p, of
W_2 and of the query, from the layer-2 pre-activation gradient dz2 that the first
kernel wrote.

Kept out of the data-gradient kernel (``backward.py``) because there the three (H1, D)
/ (H1, H2) float32 accumulators held across the tile loop took most of the registers
and spilled on sm_90 (bench/results/sm90_target_attention_spills.md). Here a program
holds them for one chunk of at most ``UNIT_CHUNK`` first-layer units (grid
(programs, heads, chunks)): the first layer's units are independent given dz2, so a
chunk recomputes only its own units, ``z1 = k W_kd^T + (k q) W_p^T + qt`` with its
chunk of W_kd and W_p on chip for the whole program (no per-row M_r, whose weights
would be read again for every row), ``a1 = act(z1)``, ``dz1 = act'(z1) (dz2 W_2)``, and
accumulates ``W_2``'s gradient ``dz2^T a1`` and ``M_r = W_kd + W_p diag(q)``'s
``dz1^T k``, split into W_kd's and W_p's (times q); per row, its chunk's part of q's
gradient ``sum_t k_t (dz1 W_p)_t = sum_h W_p * (dz1^T k)`` (from the same product, so
that the key tile need not stay live to the end) and of the q-term's, ``sum_t dz1_t``. With one
layer, dz (R, T, H1) is dz1 itself and nothing is recomputed. Each program writes its
chunk of its own row of a (programs, ...) partial buffer (about one program per SM over
all chunks, as each writes a row), and the chunks' parts of dq go to (chunks, R, D):
the caller sums both (deterministic, no atomics). A masked position's dz is zero and
its key is not read (Dice's statistics cover every position, padded ones too).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .layers import (act_bwd, act_fwd, add_to_vec, history_row, load_mat, load_vec, mm,
                     store_mat, tile_act_params, tile_vec, valid_positions, weight_offsets)


@triton.jit(do_not_specialize=["B", "T", "N"])
def first_layer_grad_kernel(
    qt_ptr, q_ptr, k_ptr, kidx_ptr, len_ptr, mask_ptr, w_ptr, act_ptr, dz_ptr, dq_ptr,
    dqt_ptr, gw_ptr,
    B, T, N, E, D, H1, H2, H3, W_ROW, A_ROW, GW_ROW,
    LAYERS: tl.constexpr, PACK_LAYERS: tl.constexpr, ACT: tl.constexpr,
    ACT_LAYERS: tl.constexpr, PER_HEAD: tl.constexpr, HAS_KIDX: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr, STATS: tl.constexpr,
    BLOCK_T: tl.constexpr, BD: tl.constexpr, CH1: tl.constexpr, BH2: tl.constexpr,
    LOWP: tl.constexpr, LOWP_BWD: tl.constexpr, PREC: tl.constexpr,
):
    """Inputs as the backward kernel's, plus dz (R, T, H2) fp32 (dz1 (R, T, H1) when
    LAYERS == 1). Writes, for c = program_id(2), the rows [c CH1, (c + 1) CH1) of
    W_kd's, W_p's and the columns of W_2's gradient in this program's row of gw
    (E*P, GW_ROW) fp32 (laid out as the start of a weight row: W_kd, W_p, W_2), dq[c]
    (chunks, R, D) fp32 and the chunk's columns of dqt (R, H1) fp32 for its rows."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n_prog = tl.num_programs(0)
    slot = e * n_prog + pid
    g = e if PER_HEAD else 0
    DT = k_ptr.dtype.element_ty
    offs_d = tl.arange(0, BD)
    offs_h1 = tl.program_id(2) * CH1 + tl.arange(0, CH1)
    offs_h2 = tl.arange(0, BH2)
    offs_bt = tl.arange(0, BLOCK_T)
    dm = offs_d < D
    w_g = w_ptr + g * W_ROW
    a_g = act_ptr + g * A_ROW
    o_wp, o_w2, _, _, _, _, _, _ = weight_offsets(D, H1, H2, H3, PACK_LAYERS)
    wp = load_mat(w_g + o_wp, offs_h1, offs_d, H1, D, False)  # (CH1, BD)
    if LAYERS >= 2:
        wkd = load_mat(w_g, offs_h1, offs_d, H1, D, False)
        if LOWP:
            wkd = wkd.to(DT)
    wp_fwd = wp
    if LOWP:
        wp_fwd = wp.to(DT)
    if LAYERS >= 2:
        HZ = H2
        offs_z = offs_h2
        w2t = load_mat(w_g + o_w2, offs_h1, offs_h2, H2, H1, True)  # (CH1, BH2)
        if LOWP:
            w2t = w2t.to(DT)
    else:
        HZ = H1
        offs_z = offs_h1
    gwkd = tl.zeros([CH1, BD], tl.float32)
    gwp = tl.zeros([CH1, BD], tl.float32)
    gw2t = tl.zeros([CH1, BH2], tl.float32)
    for b in range(pid, B, n_prog):
        r = b * E + e
        kb = history_row(kidx_ptr, b, N, HAS_KIDX)
        k_base = k_ptr + (kb * E + e) * T * D
        dz_base = dz_ptr + r.to(tl.int64) * T * HZ
        q = load_vec(q_ptr + r * D, offs_d, D)
        dq = tl.zeros([BD], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            # the previous tile's in-place dqt sums are visible to every thread from here on
            tl.debug_barrier()
            offs_t = t0 + offs_bt
            tm = offs_t < T
            if STATS:
                valid = tm
            else:
                valid = valid_positions(offs_t, T, kb, len_ptr, mask_ptr, HAS_LEN, HAS_MASK)
            k = tl.load(k_base + offs_t[:, None] * D + offs_d[None, :],
                        mask=valid[:, None] & dm[None, :], other=0.0)
            dz = tl.load(dz_base + offs_t[:, None] * HZ + offs_z[None, :],
                         mask=tm[:, None] & (offs_z[None, :] < HZ), other=0.0)
            if LAYERS >= 2:
                qt = tile_vec(qt_ptr + r * H1, offs_h1, H1, t0, T)
                pa1, ps1, pb1 = tile_act_params(a_g, offs_h1, H1, t0, T, ACT_LAYERS >= 1)
                z1 = (mm(k, tl.trans(wkd), LOWP, DT, PREC)
                      + mm(k.to(tl.float32) * q[None, :], tl.trans(wp_fwd), LOWP, DT, PREC)
                      + qt[None, :])
                a1 = act_fwd(z1, pa1, ps1, pb1, ACT)
                gw2t += mm(tl.trans(a1), dz, LOWP_BWD, DT, PREC)
                dz1 = act_bwd(z1, a1, mm(dz, tl.trans(w2t), LOWP_BWD, DT, PREC),
                              pa1, ps1, pb1, ACT)[0]
            else:
                dz1 = dz
            gm = mm(tl.trans(dz1), k, LOWP_BWD, DT, PREC)  # (CH1, BD)
            gwkd += gm
            gwp += gm * q[None, :]
            dq += tl.sum(wp * gm, axis=0)
            # the first tile stores its sum, the next ones add theirs (nothing to zero)
            add_to_vec(dqt_ptr + r * H1, offs_h1, H1, tl.sum(dz1, axis=0), t0 > 0)
        tl.store(dq_ptr + (tl.program_id(2).to(tl.int64) * B * E + r) * D + offs_d, dq,
                 mask=dm)
    gw_s = gw_ptr + slot * GW_ROW
    # A zero the compiler cannot tell (pid < n_prog) in the offsets: otherwise they are the
    # weight loads' offsets above, kept (spilled) across the loops to be reused here.
    zero = pid // (n_prog + 1)
    offs_h1 = offs_h1 + zero
    store_mat(gw_s, gwkd, offs_h1, offs_d, H1, D, False)
    store_mat(gw_s + o_wp, gwp, offs_h1, offs_d, H1, D, False)
    if LAYERS >= 2:
        store_mat(gw_s + o_w2, gw2t, offs_h1, offs_h2, H2, H1, True)
