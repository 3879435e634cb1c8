"""Second backward kernel: the gradients of the first layer's matrices W_kd, W_p, of
W_2 and of the query, from the layer-2 pre-activation gradient dz2 that the first
kernel wrote.

Kept out of the data-gradient kernel (``backward.py``) because there the three (H1, D)
/ (H1, H2) float32 accumulators held across the tile loop took most of the registers
and spilled on sm_90 (bench/results/sm90_target_attention_spills.md). Here a program
holds them for one chunk of first-layer units: the first ``UNIT_CHUNK`` (CH1) units,
or the rest (``MAX_UNITS`` = 128: at most 2 chunks), padded to its own width CH1B (80
units: 64 and 16, not 64 and 64 of which 48 masked). The first layer's units are independent
given dz2, so a chunk recomputes only its own units, ``z1 = k W_kd^T + (k q) W_p^T +
qt`` with its chunk of W_kd and W_p on chip for the whole program (no per-row M_r,
whose weights would be read again for every row), ``a1 = act(z1)``, ``dz1 = act'(z1)
(dz2 W_2)``, and accumulates ``W_2``'s gradient ``dz2^T a1`` and ``M_r = W_kd + W_p
diag(q)``'s ``dz1^T k``, split into W_kd's and W_p's (times q); per row, its chunk's
part of q's gradient ``sum_t k_t (dz1 W_p)_t = sum_h W_p * (dz1^T k)`` (from the same
product, so that the key tile need not stay live to the end) and of the q-term's,
``sum_t dz1_t`` (for float16 inputs the data-gradient kernel sums it instead:
``ops._launch_bwd``). With one layer, dz (R, T, H1) is dz1 itself and nothing is
recomputed. The tail chunk, when narrower than a key tile, holds its accumulators
transposed, (D, units) and (H2, units), so that its gradient dots ``k^T dz1`` and
``dz2^T a1`` have M = D and H2 rather than its width (Hopper's warpgroup MMA wants
M >= 64). The tile's chained dots (z1's two, ``dz2 W_2^T``) go through
``layers.mm_unchained`` in the forms where that measured fewer sm_90 spills (``APART`` in
``chunk_grads``), so that Triton lays them over 4 x 2 warps, not 8 x 1.

Grid (programs of chunk 0 + programs of chunk 1, heads): each chunk walks all rows with
its own program count (``ops._chunk_programs``: the narrower chunk's programs take more
rows each). Each program writes one float32 partial of its chunk's gradients, and the
chunks' parts of dq go to (chunks, R, D): the caller sums both (deterministic, no
atomics). A masked position's dz is zero and its key is not read (Dice's statistics
cover every position, padded ones too).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .layers import (act_bwd, act_fwd, add_to_vec, history_row, load_mat, load_vec, mm,
                     mm_unchained, store_mat, tile_act_params, tile_vec, tile_vecs,
                     valid_positions, weight_offsets)


@triton.jit(do_not_specialize=["B", "T", "N", "P0"])
def first_layer_grad_kernel(
    qt_ptr, q_ptr, k_ptr, kidx_ptr, len_ptr, mask_ptr, w_ptr, act_ptr, dz_ptr, dq_ptr,
    dqt_ptr, gw_ptr,
    B, T, N, E, D, H1, H2, H3, W_ROW, A_ROW, P0,
    LAYERS: tl.constexpr, PACK_LAYERS: tl.constexpr, ACT: tl.constexpr,
    ACT_LAYERS: tl.constexpr, PER_HEAD: tl.constexpr, HAS_KIDX: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr, STATS: tl.constexpr,
    BLOCK_T: tl.constexpr, BD: tl.constexpr, CH1: tl.constexpr, CH1B: tl.constexpr,
    BH2: tl.constexpr, LOWP: tl.constexpr, LOWP_BWD: tl.constexpr, PREC: tl.constexpr,
    SUM_DQT: tl.constexpr,
):
    """Inputs as the backward kernel's, plus dz (R, T, H2) fp32 (dz1 (R, T, H1) when
    LAYERS == 1). Grid (P0 + P1, E): programs [0, P0) take the units [0, n_0), n_0 =
    min(H1, CH1), the others (when CH1B > 0) the n_1 = H1 - CH1 units after them, padded
    to CH1B. Program p of chunk c (p counted within the chunk) writes its partial of the
    chunk's gradients, ``[W_kd rows (n_c, D), W_p rows (n_c, D), W_2^T rows (n_c, H2)]``
    (m_c = n_c (2 D + H2) floats, no W_2 part with one layer), to gw fp32 at
    ``(e P_c + p) m_c``, after E P0 m_0 for chunk 1; dq[c] (chunks, R, D) fp32 and, if
    SUM_DQT, the chunk's columns of dqt (R, H1) fp32 for its rows."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    g = e if PER_HEAD else 0
    w_g = w_ptr + g * W_ROW
    a_g = act_ptr + g * A_ROW
    row_w = 2 * D  # partial floats per unit
    if LAYERS >= 2:
        row_w += H2
    n0 = tl.minimum(H1, CH1)
    if pid < P0:
        chunk_grads(qt_ptr, q_ptr, k_ptr, kidx_ptr, len_ptr, mask_ptr, w_g, a_g, dz_ptr,
                    dq_ptr, dqt_ptr, gw_ptr + (e * P0 + pid).to(tl.int64) * n0 * row_w,
                    0, 0, pid, P0, e, n0, B, T, N, E, D, H1, H2, H3, LAYERS, PACK_LAYERS, ACT,
                    ACT_LAYERS, HAS_KIDX, HAS_LEN, HAS_MASK, STATS, BLOCK_T, BD, CH1, BH2,
                    LOWP, LOWP_BWD, PREC, SUM_DQT, False)
    elif CH1B > 0:
        p1 = tl.num_programs(0) - P0
        gw_1 = gw_ptr + (E * P0).to(tl.int64) * n0 * row_w
        chunk_grads(qt_ptr, q_ptr, k_ptr, kidx_ptr, len_ptr, mask_ptr, w_g, a_g, dz_ptr,
                    dq_ptr, dqt_ptr,
                    gw_1 + (e * p1 + pid - P0).to(tl.int64) * (H1 - CH1) * row_w,
                    1, CH1, pid - P0, p1, e, H1 - CH1, B, T, N, E, D, H1, H2, H3, LAYERS,
                    PACK_LAYERS, ACT, ACT_LAYERS, HAS_KIDX, HAS_LEN, HAS_MASK, STATS, BLOCK_T,
                    BD, CH1B, BH2, LOWP, LOWP_BWD, PREC, SUM_DQT, CH1B < BLOCK_T)


@triton.jit
def _layer1_vecs(pq, pa, offs, n, t0, T, ACT: tl.constexpr, HAS_ACT: tl.constexpr,
                 LOWP_BWD: tl.constexpr):
    """A tile's first-layer per-unit inputs (the row's q-term at pq, the activation
    parameters at pa, zeros where absent), loaded per tile (``layers.tile_vec``), as one
    (H, 2, 2) tile (``layers.tile_vecs``) where that measured fewer sm_90 spills: PReLU
    (q-term and slope) with float32 gradient dots (float32, float16 inputs), the q-term
    alone with 16-bit ones (bfloat16); else as plain vectors (sigmoid float32 / float16
    and Dice spilled more as tiles; sm90_target_attention_spills.md, round 5e)."""
    if HAS_ACT and ACT == 3 and not LOWP_BWD:
        v, a, s, b = tile_vecs(pq, pa, pa, pa, offs, n, t0, T, 3)
    elif not HAS_ACT and LOWP_BWD:
        v, a, s, b = tile_vecs(pq, pq, pq, pq, offs, n, t0, T, 1)
    else:
        v = tile_vec(pq, offs, n, t0, T)
        a, s, b = tile_act_params(pa, offs, n, t0, T, HAS_ACT)
    return v, a, s, b


@triton.jit
def _chain_mm(a, b, LOWP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
              APART: tl.constexpr, opaque_true):
    """A dot of the tile's chain (z1's two, ``dz2 W_2^T``), (M, K) @ (K, N) -> (M, N)
    float32: ``layers.mm_unchained`` where that measured fewer sm_90 spills (APART), else
    ``mm``."""
    if APART:
        c = mm_unchained(a, b, LOWP, DT, PREC, opaque_true)
    else:
        c = mm(a, b, LOWP, DT, PREC)
    return c


@triton.jit
def _query(q, ptr, offs, n, t0, T, AGAIN: tl.constexpr):
    """The row's query q (loaded once per row), or (AGAIN) the same vector loaded again
    for this tile at ptr (``layers.tile_vec``: an L1 hit, in the layout of its use). The
    untransposed path takes it again where that measured fewer sm_90 spills: in the forward's
    k q for float32 inputs and Dice, in W_p's gradient in every form but float16 without
    activation parameters (sm90_target_attention_spills.md, round 5e)."""
    if AGAIN:
        q = tile_vec(ptr, offs, n, t0, T)
    return q


@triton.jit
def chunk_grads(
    qt_ptr, q_ptr, k_ptr, kidx_ptr, len_ptr, mask_ptr, w_g, a_g, dz_ptr, dq_ptr, dqt_ptr,
    gw_s, c, u0, pid, n_prog, e, n_c, B, T, N, E, D, H1, H2, H3,
    LAYERS: tl.constexpr, PACK_LAYERS: tl.constexpr, ACT: tl.constexpr,
    ACT_LAYERS: tl.constexpr, HAS_KIDX: tl.constexpr, HAS_LEN: tl.constexpr,
    HAS_MASK: tl.constexpr, STATS: tl.constexpr, BLOCK_T: tl.constexpr, BD: tl.constexpr,
    CW: tl.constexpr, BH2: tl.constexpr, LOWP: tl.constexpr, LOWP_BWD: tl.constexpr,
    PREC: tl.constexpr, SUM_DQT: tl.constexpr, ACC_T: tl.constexpr,
):
    """Program ``pid`` of the ``n_prog`` of unit chunk c (units [u0, u0 + n_c), padded
    to CW) of head e: the rows b = pid, pid + n_prog, ... and its partial at gw_s.
    ACC_T: the matrices (weights and accumulators) held transposed, (BD, CW) and
    (BH2, CW), for a chunk narrower than a key tile (its gradient dots then have M = BD
    and BH2, not CW)."""
    DT = k_ptr.dtype.element_ty
    offs_d = tl.arange(0, BD)
    offs_h1 = u0 + tl.arange(0, CW)
    offs_h2 = tl.arange(0, BH2)
    offs_bt = tl.arange(0, BLOCK_T)
    dm = offs_d < D
    o_wp, o_w2, _, _, _, _, _, _ = weight_offsets(D, H1, H2, H3, PACK_LAYERS)
    if ACC_T:
        wp = load_mat(w_g + o_wp, offs_d, offs_h1, H1, D, True)  # (BD, CW)
    else:
        wp = load_mat(w_g + o_wp, offs_h1, offs_d, H1, D, False)  # (CW, BD)
    if LAYERS >= 2:
        if ACC_T:
            wkd = load_mat(w_g, offs_d, offs_h1, H1, D, True)
        else:
            wkd = load_mat(w_g, offs_h1, offs_d, H1, D, False)
        if LOWP:
            wkd = wkd.to(DT)
    wp_fwd = wp
    if LOWP:
        wp_fwd = wp.to(DT)
    if LAYERS >= 2:
        HZ = H2
        offs_z = offs_h2
        if ACC_T:
            w2 = load_mat(w_g + o_w2, offs_h2, offs_h1, H2, H1, False)  # (BH2, CW)
        else:
            w2 = load_mat(w_g + o_w2, offs_h1, offs_h2, H2, H1, True)  # W_2^T (CW, BH2)
        if LOWP:
            w2 = w2.to(DT)
    else:
        HZ = H1
        offs_z = offs_h1
    if ACC_T:
        gwkd = tl.zeros([BD, CW], tl.float32)
        gwp = tl.zeros([BD, CW], tl.float32)
        gw2 = tl.zeros([BH2, CW], tl.float32)
    else:
        gwkd = tl.zeros([CW, BD], tl.float32)
        gwp = tl.zeros([CW, BD], tl.float32)
        gw2 = tl.zeros([CW, BH2], tl.float32)
    # the untransposed path's uses of q that load it again per tile (``_query``)
    Q_FWD: tl.constexpr = not LOWP or ACT == 4
    Q_GRAD: tl.constexpr = not (LOWP and not LOWP_BWD and ACT_LAYERS == 0)
    # the chain's dots laid 4 x 2 (``layers.mm_unchained``) with float32 gradient dots,
    # except Dice and PReLU with 16-bit inputs (there it measured more spills)
    APART: tl.constexpr = not LOWP_BWD and ACT != 4 and not (LOWP and ACT == 3)
    # true: pid < n_prog. Not written so: in chunk 0 that is the caller's pid < P0, which
    # the compiler folds to true inside that branch, and the dots are chained again
    opaque_true = pid <= n_prog
    for b in range(pid, B, n_prog):
        r = b * E + e
        kb = history_row(kidx_ptr, b, N, HAS_KIDX)
        k_base = k_ptr + (kb * E + e) * T * D
        dz_base = dz_ptr + r.to(tl.int64) * T * HZ
        if ACC_T or (LAYERS >= 2 and not Q_FWD) or not Q_GRAD:
            q = load_vec(q_ptr + r * D, offs_d, D)
        else:  # every use loads it again per tile
            q = tl.zeros([BD], tl.float32)
        dq = tl.zeros([BD], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            if SUM_DQT:  # the previous tile's in-place dqt sums are visible from here on
                tl.debug_barrier()
            offs_t = t0 + offs_bt
            tm = offs_t < T
            if STATS:
                valid = tm
            else:
                valid = valid_positions(offs_t, T, kb, len_ptr, mask_ptr, HAS_LEN, HAS_MASK)
            k = tl.load(k_base + offs_t[:, None] * D + offs_d[None, :],
                        mask=valid[:, None] & dm[None, :], other=0.0)
            # float32: dz's tile is loaded after the forward dots (its registers are free
            # during them; the float32 kernel spilled 384 B, now 124), 16-bit: before them
            # (late it spilled more)
            if LOWP:
                dz = tl.load(dz_base + offs_t[:, None] * HZ + offs_z[None, :],
                             mask=tm[:, None] & (offs_z[None, :] < HZ), other=0.0)
            if LAYERS >= 2:
                qt, pa1, ps1, pb1 = _layer1_vecs(qt_ptr + r * H1, a_g, offs_h1, H1, t0, T, ACT,
                                                 ACT_LAYERS >= 1, LOWP_BWD)
                if ACC_T:
                    z1 = (_chain_mm(k, wkd, LOWP, DT, PREC, APART, opaque_true)
                          + _chain_mm(k.to(tl.float32) * q[None, :], wp_fwd, LOWP, DT, PREC,
                                      APART, opaque_true)
                          + qt[None, :])
                else:
                    z1 = (_chain_mm(k, tl.trans(wkd), LOWP, DT, PREC, APART, opaque_true)
                          + _chain_mm(k.to(tl.float32) * _query(q, q_ptr + r * D, offs_d, D,
                                                                t0, T, Q_FWD)[None, :],
                                      tl.trans(wp_fwd), LOWP, DT, PREC, APART, opaque_true)
                          + qt[None, :])
                a1 = act_fwd(z1, pa1, ps1, pb1, ACT)
            if not LOWP:
                dz = tl.load(dz_base + offs_t[:, None] * HZ + offs_z[None, :],
                             mask=tm[:, None] & (offs_z[None, :] < HZ), other=0.0)
            if LAYERS >= 2:
                if ACC_T:
                    gw2 += mm(tl.trans(dz), a1, LOWP_BWD, DT, PREC)
                    da1 = _chain_mm(dz, w2, LOWP_BWD, DT, PREC, APART, opaque_true)
                else:
                    gw2 += mm(tl.trans(a1), dz, LOWP_BWD, DT, PREC)
                    da1 = _chain_mm(dz, tl.trans(w2), LOWP_BWD, DT, PREC, APART, opaque_true)
                dz1 = act_bwd(z1, a1, da1, pa1, ps1, pb1, ACT)[0]
            else:
                dz1 = dz
            if ACC_T:
                gm = mm(tl.trans(k), dz1, LOWP_BWD, DT, PREC)  # (BD, CW)
                gwkd += gm
                gwp += gm * q[:, None]
                dq += tl.sum(wp * gm, axis=1)
            else:
                gm = mm(tl.trans(dz1), k, LOWP_BWD, DT, PREC)  # (CW, BD)
                gwkd += gm
                gwp += gm * _query(q, q_ptr + r * D, offs_d, D, t0, T, Q_GRAD)[None, :]
                dq += tl.sum(wp * gm, axis=0)
            if SUM_DQT:  # the first tile stores its sum, the next ones add theirs
                add_to_vec(dqt_ptr + r * H1, offs_h1, H1, tl.sum(dz1, axis=0), t0 > 0)
        tl.store(dq_ptr + (c * B * E + r).to(tl.int64) * D + offs_d, dq, mask=dm)
    # A zero the compiler cannot tell (pid < n_prog) in the offsets: otherwise they are the
    # weight loads' offsets above, kept (spilled) across the loops to be reused here.
    offs_u = tl.arange(0, CW) + pid // (n_prog + 1)
    if ACC_T:
        store_mat(gw_s, gwkd, offs_d, offs_u, n_c, D, True)
        store_mat(gw_s + n_c * D, gwp, offs_d, offs_u, n_c, D, True)
        if LAYERS >= 2:
            store_mat(gw_s + 2 * n_c * D, gw2, offs_h2, offs_u, n_c, H2, True)
    else:
        store_mat(gw_s, gwkd, offs_u, offs_d, n_c, D, False)
        store_mat(gw_s + n_c * D, gwp, offs_u, offs_d, n_c, D, False)
        if LAYERS >= 2:
            store_mat(gw_s + 2 * n_c * D, gw2, offs_u, offs_h2, n_c, H2, False)
