"""Backward kernel: recompute per 64-key tile, the data gradients and the small
parameter gradients.

Same grid and row walk as the forward. Per tile the MLP is recomputed from the keys
(flash-attention style: only the forward's log-sum-exp is saved), the attention gradient
gives each position's score gradient, and the chain runs down the MLP. The first layer
runs in two chunks of units (``UNIT_CHUNK`` = 64 and the rest, padded: 80 = 64 + 16), in
the forward part summed into z2 and dropped, then recomputed one chunk at a time in the
chain (a (64, 128) float32 tile kept live across the layers above cost 64 registers per
thread and spilled; the recomputation costs one dot per chunk). The gradients of
the first layer's matrices (W_kd, W_p) and of W_2 are left to a second kernel
(``weight_grads.py``), with the query's and the q-term's (for float16 inputs this
kernel sums the q-term's instead: fewer sm_90 spills, ``ops._launch_bwd``), fed the
layer-2 pre-activation gradient dz2 that this one writes: their three float32
accumulators held across the tile loop took most of the registers
(bench/results/sm90_target_attention_spills.md). W_3's
gradient is a register accumulator of the program, written once, at the end, into this
program's row of a (programs, ...) partial buffer that the caller sums (deterministic,
no atomics); the per-unit ones (biases, score layer, activation parameters) are summed
in place in that row across the program's tiles, and
the per-unit inputs (q-term, biases, score weights, activation parameters) are loaded
per tile: a per-unit vector held in registers across the tile loop costs a quarter of
its length per thread in the MMA layout. Both go through tiles of up to four vectors
(``layers.tile_vecs``, ``add_to_vecs``) where a layer has more than one (a vector loaded
alone holds an address per two units across the loops); a lone q-term is a plain
``tile_vec``. The key gradient of a tile is stored as soon as
it is known. The deeper layers' weights stay on chip for the whole program; W_kd and W_p
are read once per row (from L2).

In statistics mode (STATS) the upstream gradient is that of the Dice statistics
(sum z, sum z^2) of layer LAYERS's pre-activation, instead of the attention output's.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .layers import (act_bwd, act_fwd, add_to_vec, add_to_vecs, history_row, load_mat,
                     load_vec, mm, store_mat, tile_vec, tile_vecs, valid_positions,
                     weight_offsets)


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
def _vec(ptr, offs, n, t0, T):
    """A per-unit vector loaded per tile as a tile of its own (layers.tile_vecs)."""
    v, _1, _2, _3 = tile_vecs(ptr, ptr, ptr, ptr, offs, n, t0, T, 1)
    return v


@triton.jit
def _layer_vecs(pv, pa, offs, n, t0, T, HAS_V: tl.constexpr, ACT: tl.constexpr,
                HAS_ACT: tl.constexpr):
    """A tile's float32 per-unit inputs of a layer as one tile (layers.tile_vecs): (HAS_V)
    the vector at pv (the row's q-term) and (HAS_ACT) the activation parameters at pa
    (PReLU's slope, Dice's three), zeros where absent. The q-term alone is a plain
    ``tile_vec``: as a tile it took more registers (round 5b of the spills notes)."""
    if HAS_ACT and ACT == 4:
        v, a, s, b = tile_vecs(pv, pa, pa + n, pa + 2 * n, offs, n, t0, T, 14 + HAS_V)
    elif HAS_ACT and ACT == 3:
        v, a, s, b = tile_vecs(pv, pa, pa, pa, offs, n, t0, T, 2 + HAS_V)
    else:
        if HAS_V:
            v = tile_vec(pv, offs, n, t0, T)
        else:
            v = tl.zeros(offs.shape, tl.float32)
        a = tl.zeros(offs.shape, tl.float32)  # no activation parameters
        s = a
        b = a
    return v, a, s, b


@triton.jit
def _add_layer_grads(pb, pa, pw, offs, n, gb, ga, gs, gbb, gw, HAS_B: tl.constexpr,
                     HAS_W: tl.constexpr, ACT: tl.constexpr, HAS_ACT: tl.constexpr):
    """Adds a tile's per-unit gradients of a layer to this program's partial rows, in as
    few tiles as fit (layers.add_to_vecs): (HAS_B) its bias's gb at pb, (HAS_W) the score
    weights' gw at pw, (HAS_ACT) its activation parameters' at pa (PReLU's slope, ga;
    Dice's ga, gs, gbb; PReLU's other two rows stay zero)."""
    if HAS_ACT and ACT == 4:
        add_to_vecs(pb, pa, pa + n, pa + 2 * n, offs, n, gb, ga, gs, gbb, 14 + HAS_B)
        if HAS_W:
            add_to_vecs(pw, pw, pw, pw, offs, n, gw, gw, gw, gw, 1)
    elif HAS_ACT and ACT == 3:
        add_to_vecs(pb, pa, pw, pw, offs, n, gb, ga, gw, gw, 2 + HAS_B + 4 * HAS_W)
    elif HAS_B or HAS_W:
        add_to_vecs(pb, pw, pw, pw, offs, n, gb, gw, gw, gw, HAS_B + 2 * HAS_W)


@triton.jit
def _attention_weight_grad(k, dout_row, dsc_row, offs_d, offs_t, valid, D, t0, T,
                           HAS_DSC: tl.constexpr):
    """da (BLOCK_T,): the upstream gradient of each position's attention weight, the
    key's dot with dout (plus the score's own upstream gradient; a padded score's is
    never read)."""
    dout = tile_vec(dout_row, offs_d, D, t0, T)
    da = tl.sum(k.to(tl.float32) * dout[None, :], axis=1)
    if HAS_DSC:
        da += tl.where(valid, load_vec(dsc_row, offs_t, T), 0.0)
    return da


@triton.jit
def _mt_chunk(w_g, o_wp, q, offs_c, offs_d, H1, D, zero, LOWP: tl.constexpr, DT: tl.constexpr):
    """Columns ``offs_c`` of the row's first-layer matrix M_r^T = (W_kd + W_p diag(q))^T:
    (BD, CH). ``zero`` is a row-dependent 0 (see the row loop) added to the offsets, so
    that the compiler does not hoist the (CH, BD) address and mask tensors of these
    per-row reads out of the row loop: held across it they took about 45 registers per
    thread and spilled (sm90_target_attention_spills.md)."""
    offs_c = offs_c + zero
    offs_d = offs_d + zero
    mt = tl.trans(load_mat(w_g, offs_c, offs_d, H1, D, False)
                  + load_mat(w_g + o_wp, offs_c, offs_d, H1, D, False) * q[None, :])
    if LOWP:
        mt = mt.to(DT)
    return mt


@triton.jit
def _weights(ptr, offs_r, offs_c, n_r, n_c, LOWP: tl.constexpr, LOWP_BWD: tl.constexpr,
             DT: tl.constexpr):
    """The (n_c, n_r) matrix at ``ptr`` transposed, (offs_r, offs_c), for a forward dot
    and as it is, (offs_c, offs_r), for a backward one, each in its dot's dtype. Both
    are made here, outside the loops, so that each lives in shared memory only: a
    matrix transposed at its dot inside a loop is held in registers and copied per tile."""
    m = load_mat(ptr, offs_r, offs_c, n_r, n_c, True)
    fwd = m
    if LOWP:
        fwd = m.to(DT)
    bwd = tl.trans(m)
    if LOWP_BWD:
        bwd = bwd.to(DT)
    return fwd, bwd


@triton.jit
def _z1_chunk(k, mt, qt, AGAIN: tl.constexpr, LOWP: tl.constexpr, DT: tl.constexpr,
              PREC: tl.constexpr):
    """A unit chunk's first-layer pre-activation z1 = k M_r^T + qt (BLOCK_T, CH). AGAIN
    (the backward's recomputation) adds the q-term as the dot's accumulator, so that the
    compiler does not merge it with the forward's and keep z1 live in between."""
    if AGAIN:
        acc = tl.zeros([k.shape[0], qt.shape[0]], tl.float32) + qt[None, :]
        if LOWP:
            z1 = tl.dot(k.to(DT), mt.to(DT), acc=acc)
        else:
            z1 = tl.dot(k.to(tl.float32), mt.to(tl.float32), acc=acc, input_precision=PREC)
    else:
        z1 = mm(k, mt, LOWP, DT, PREC) + qt[None, :]
    return z1


@triton.jit
def _chunk_grads(k, mt, da1, ds, qt_ptr, w_g, a_g, o_wo, gw_s, ga_s, dz_ptr, dqt_ptr, r,
                 offs_t, tm, offs_c, H1, t0, T, gst_g,
                 LAYERS: tl.constexpr, ACT: tl.constexpr, ACT_LAYERS: tl.constexpr,
                 STATS: tl.constexpr, LOWP: tl.constexpr, LOWP_BWD: tl.constexpr,
                 DT: tl.constexpr, PREC: tl.constexpr, SUM_DQT: tl.constexpr):
    """The key gradient's share dz1 M_r of a chunk of first-layer units, z1 recomputed:
    with two or more layers from the chunk's upstream gradient da1 = dz2 W_2; with one
    layer (layer 1 is the top) from the score gradient ds or, in STATS mode, the
    statistics' gradient; dz1 is then stored for the weight-gradient kernel. Adds the
    chunk's per-unit gradients (activation parameters, and with one layer the score
    layer's) to this program's partial rows and, if SUM_DQT, its q-term gradient
    ``sum_t dz1_t`` to the row's dqt."""
    qt, pa, ps, pb = _layer_vecs(qt_ptr, a_g, offs_c, H1, t0, T, True, ACT, ACT_LAYERS >= 1)
    z1 = _z1_chunk(k, mt, qt, True, LOWP, DT, PREC)
    if LAYERS >= 2:
        a1 = act_fwd(z1, pa, ps, pb, ACT)
        dz1, x0, x1, x2 = act_bwd(z1, a1, da1, pa, ps, pb, ACT)
        _add_layer_grads(ga_s, ga_s, ga_s, offs_c, H1, x0, x0, x1, x2, x0, False, False, ACT,
                         ACT_LAYERS >= 1)
    else:
        if STATS:
            gs1, gs2, _s2, _s3 = tile_vecs(gst_g, gst_g + H1, gst_g, gst_g, offs_c, H1, t0, T, 3)
            dz1 = tl.where(tm[:, None], gs1[None, :] + 2.0 * gs2[None, :] * z1, 0.0)
        else:
            a1 = act_fwd(z1, pa, ps, pb, ACT)
            wo = _vec(w_g + o_wo, offs_c, H1, t0, T)
            dz1, x0, x1, x2 = act_bwd(z1, a1, ds[:, None] * wo[None, :], pa, ps, pb, ACT)
            _add_layer_grads(ga_s, ga_s, gw_s + o_wo, offs_c, H1, x0, x0, x1, x2,
                             tl.sum(ds[:, None] * a1, axis=0), False, True, ACT,
                             ACT_LAYERS >= 1)
        tl.store(dz_ptr + r.to(tl.int64) * T * H1 + offs_t[:, None] * H1 + offs_c[None, :],
                 dz1, mask=tm[:, None] & (offs_c[None, :] < H1))
    if SUM_DQT:  # the first tile stores its sum, the next ones add theirs
        add_to_vec(dqt_ptr + r * H1, offs_c, H1, tl.sum(dz1, axis=0), t0 > 0)
    return mm(dz1, tl.trans(mt), LOWP_BWD, DT, PREC)


@triton.jit(do_not_specialize=["B", "T", "N"])
def attention_bwd_kernel(
    qt_ptr, q_ptr, k_ptr, kidx_ptr, len_ptr, mask_ptr, w_ptr, act_ptr,
    out_ptr, sc_ptr, dout_ptr, dsc_ptr, lse_ptr, gst_ptr,
    dk_ptr, dz_ptr, dqt_ptr, gw_ptr, ga_ptr,
    B, T, N, E, D, H1, H2, H3, W_ROW, A_ROW,
    LAYERS: tl.constexpr, PACK_LAYERS: tl.constexpr, ACT: tl.constexpr,
    ACT_LAYERS: tl.constexpr, SOFTMAX: tl.constexpr, PER_HEAD: tl.constexpr,
    HAS_KIDX: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DSC: tl.constexpr, STATS: tl.constexpr, DK_PER_ROW: tl.constexpr,
    BLOCK_T: tl.constexpr, BD: tl.constexpr, BH1: tl.constexpr, CH1: tl.constexpr,
    CH1B: tl.constexpr, BH2: tl.constexpr, BH3: tl.constexpr, LOWP: tl.constexpr,
    LOWP_BWD: tl.constexpr, PREC: tl.constexpr, SUM_DQT: tl.constexpr,
):
    """Inputs as the forward kernel's, plus its out (R, D) and scores (R, T), the upstream
    dout (R, D) and dscores (R, T), lse (R,), or in STATS mode gst (G, 2, H_LAYERS).
    Writes dkeys (per row (R, T, D) fp32 if DK_PER_ROW,
    else like keys), dz (R, T, H2) fp32 = dz2 (dz1 (R, T, H1) if LAYERS == 1) for
    ``weight_grads.py``, and this program's rows of gw (E*P, W_ROW) and ga (E*P, A_ROW)
    fp32: the layers it ran (and in attention mode the score layer) except W_kd, W_p
    and W_2, which the second kernel writes, as dq and, unless SUM_DQT (then this kernel
    writes dqt (R, H1) fp32), dqt. The first layer runs in two chunks of units: CH1 and
    the rest, padded to CH1B (0: none)."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n_prog = tl.num_programs(0)
    slot = e * n_prog + pid
    g = e if PER_HEAD else 0
    DT = k_ptr.dtype.element_ty
    offs_d = tl.arange(0, BD)
    offs_c0 = tl.arange(0, CH1)
    if CH1B > 0:
        offs_c1 = CH1 + tl.arange(0, CH1B)
    offs_h1 = tl.arange(0, BH1)
    offs_h2 = tl.arange(0, BH2)
    offs_h3 = tl.arange(0, BH3)
    offs_bt = tl.arange(0, BLOCK_T)
    dm = offs_d < D
    w_g = w_ptr + g * W_ROW
    a_g = act_ptr + g * A_ROW
    o_wp, o_w2, o_b2, o_w3, o_b3, o_wo, o_bo, _ = weight_offsets(D, H1, H2, H3, PACK_LAYERS)

    # The deeper layers' weight matrices stay on chip (W_2^T in chunks of first-layer
    # units); W_kd and W_p are read per row from L2 (below); the per-unit vectors per tile.
    # Each in both orientations, one per dot (W_2^T's chunks for the forward, W_2's for
    # the backward), see _weights.
    if LAYERS >= 2:
        w2t0, w2_0 = _weights(w_g + o_w2, offs_c0, offs_h2, H2, H1, LOWP, LOWP_BWD, DT)
        if CH1B > 0:
            w2t1, w2_1 = _weights(w_g + o_w2, offs_c1, offs_h2, H2, H1, LOWP, LOWP_BWD, DT)
    if LAYERS >= 3:
        w3t, w3 = _weights(w_g + o_w3, offs_h2, offs_h3, H3, H2, LOWP, LOWP_BWD, DT)
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
        # M_r^T in unit chunks, once per row (W_kd and W_p are not held through the
        # program: they would not fit the registers)
        zero = b // (B + 1)  # 0 (b < B), which the compiler cannot tell: see _mt_chunk
        mt0 = _mt_chunk(w_g, o_wp, q, offs_c0, offs_d, H1, D, zero, LOWP, DT)
        if CH1B > 0:
            mt1 = _mt_chunk(w_g, o_wp, q, offs_c1, offs_d, H1, D, zero, LOWP, DT)
        qt_r = qt_ptr + r * H1
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
            if not STATS and ACT == 3:
                # PReLU keeps the top layer's z live next to its a (its gradient reads z):
                # the key tile's registers are freed first (for the other activations
                # later is better: sm90_target_attention_spills.md, round 5b)
                da = _attention_weight_grad(k, dout_ptr + r * D, dsc_ptr + r * T, offs_d,
                                            offs_t, valid, D, t0, T, HAS_DSC)
            # Forward, the first layer in unit chunks, none of them kept: the chain
            # below recomputes each (a (BLOCK_T, 128) float32 tile kept live through
            # the layers above took 64 registers per thread and spilled).
            ds = tl.zeros([BLOCK_T], tl.float32)
            # (per-unit vectors come in tiles of up to four: layers.tile_vecs)
            if LAYERS >= 2:
                qt, pa1, ps1, pb1 = _layer_vecs(qt_r, a_g, offs_c0, H1, t0, T, True, ACT,
                                                ACT_LAYERS >= 1)
                a1 = act_fwd(_z1_chunk(k, mt0, qt, False, LOWP, DT, PREC), pa1, ps1, pb1, ACT)
                z2 = mm(a1, w2t0, LOWP, DT, PREC) + _vec(w_g + o_b2, offs_h2, H2, t0, T)[None, :]
                if CH1B > 0:
                    qt, pa1, ps1, pb1 = _layer_vecs(qt_r, a_g, offs_c1, H1, t0, T, True, ACT,
                                                    ACT_LAYERS >= 1)
                    a1 = act_fwd(_z1_chunk(k, mt1, qt, False, LOWP, DT, PREC), pa1, ps1, pb1,
                                 ACT)
                    z2 += mm(a1, w2t1, LOWP, DT, PREC)
                _v, pa2, ps2, pb2 = _layer_vecs(a_g, a_g + 3 * H1, offs_h2, H2, t0, T, False,
                                                ACT, ACT_LAYERS >= 2)
                if LAYERS >= 3:
                    a2 = act_fwd(z2, pa2, ps2, pb2, ACT)
                    z3 = mm(a2, w3t, LOWP, DT, PREC) + _vec(w_g + o_b3, offs_h3, H3, t0, T)[None, :]
                    _v, pat, pst, pbt = _layer_vecs(a_g, a_g + 3 * (H1 + H2), offs_h3, H3, t0, T,
                                                    False, ACT, ACT_LAYERS >= 3)
                    zt = z3
                    ga_top = ga_s + 3 * (H1 + H2)
                else:
                    zt = z2
                    pat, pst, pbt = pa2, ps2, pb2
                if STATS:
                    gs1, gs2, _s2, _s3 = tile_vecs(gst_g, gst_g + HT, gst_g, gst_g, offs_top, HT,
                                                   t0, T, 3)
                    dtop = tl.where(tm[:, None], gs1[None, :] + 2.0 * gs2[None, :] * zt, 0.0)
                    gwo = tl.zeros(offs_top.shape, tl.float32)  # no score layer, no
                    x0 = gwo  # activation at the top: no gradients of theirs
                    x1 = gwo
                    x2 = gwo
                else:
                    at = act_fwd(zt, pat, pst, pbt, ACT)
                    wo = _vec(w_g + o_wo, offs_top, HT, t0, T)
                    s = tl.sum(at * wo[None, :], axis=1) + bo
            elif not STATS:  # one layer: the score from the first layer's chunks
                qt, pa1, ps1, pb1 = _layer_vecs(qt_r, a_g, offs_c0, H1, t0, T, True, ACT,
                                                ACT_LAYERS >= 1)
                a1 = act_fwd(_z1_chunk(k, mt0, qt, False, LOWP, DT, PREC), pa1, ps1, pb1, ACT)
                s = tl.sum(a1 * _vec(w_g + o_wo, offs_c0, H1, t0, T)[None, :], axis=1) + bo
                if CH1B > 0:
                    qt, pa1, ps1, pb1 = _layer_vecs(qt_r, a_g, offs_c1, H1, t0, T, True, ACT,
                                                    ACT_LAYERS >= 1)
                    a1 = act_fwd(_z1_chunk(k, mt1, qt, False, LOWP, DT, PREC), pa1, ps1, pb1,
                                 ACT)
                    s += tl.sum(a1 * _vec(w_g + o_wo, offs_c1, H1, t0, T)[None, :], axis=1)
            if not STATS:
                if ACT != 3:
                    da = _attention_weight_grad(k, dout_ptr + r * D, dsc_ptr + r * T, offs_d,
                                                offs_t, valid, D, t0, T, HAS_DSC)
                if SOFTMAX:
                    p = tl.where(valid, tl.exp(tl.where(valid, s - lse, 0.0)), 0.0)
                    ds = p * (da - delta)
                else:
                    p = tl.where(valid, s, 0.0)
                    ds = tl.where(valid, da, 0.0)
                gbo += tl.sum(ds, axis=0)
                if LAYERS >= 2:
                    gwo = tl.sum(ds[:, None] * at, axis=0)
                    dtop, x0, x1, x2 = act_bwd(zt, at, ds[:, None] * wo[None, :], pat, pst,
                                               pbt, ACT)
            # Backward below the top; a layer's activation parameters are loaded again and
            # a = act(z) recomputed where the activation reads z (PReLU, Dice).
            if LAYERS == 3:
                dz3 = dtop
                _add_layer_grads(gw_s + o_b3, ga_top, gw_s + o_wo, offs_h3, H3,
                                 tl.sum(dz3, axis=0), x0, x1, x2, gwo, True, not STATS, ACT,
                                 ACT_LAYERS >= 3)
                _v, pa2, ps2, pb2 = _layer_vecs(a_g, a_g + 3 * H1, offs_h2, H2, t0, T, False,
                                                ACT, ACT_LAYERS >= 2)
                a2 = _act_again(z2, a2, pa2, ps2, pb2, ACT)
                gw3t += mm(tl.trans(a2), dz3, LOWP_BWD, DT, PREC)
                dz2, x0, x1, x2 = act_bwd(z2, a2, mm(dz3, w3, LOWP_BWD, DT, PREC),
                                          pa2, ps2, pb2, ACT)
                gwo = x0  # (a stand-in of layer 2's width: the score layer is layer 3)
            elif LAYERS == 2:
                dz2 = dtop
            if LAYERS >= 2:
                tl.store(dz_ptr + r.to(tl.int64) * T * H2 + offs_t[:, None] * H2
                         + offs_h2[None, :], dz2, mask=tm[:, None] & (offs_h2[None, :] < H2))
                # layer 2's per-unit gradients (with two layers, the score layer's too)
                _add_layer_grads(gw_s + o_b2, ga_s + 3 * H1, gw_s + o_wo, offs_h2, H2,
                                 tl.sum(dz2, axis=0), x0, x1, x2, gwo, True,
                                 LAYERS == 2 and not STATS, ACT, ACT_LAYERS >= 2)
            # the first layer, chunk by chunk, recomputed: its part of the key gradient
            # (both chunks' upstream gradients first, so that dz2 need not stay live)
            da1_0 = ds  # (unused with one layer)
            da1_1 = ds
            if LAYERS >= 2:
                da1_0 = mm(dz2, w2_0, LOWP_BWD, DT, PREC)
                if CH1B > 0:
                    da1_1 = mm(dz2, w2_1, LOWP_BWD, DT, PREC)
            dk = _chunk_grads(k, mt0, da1_0, ds, qt_r, w_g, a_g, o_wo, gw_s, ga_s, dz_ptr,
                              dqt_ptr, r, offs_t, tm, offs_c0, H1, t0, T, gst_g, LAYERS, ACT,
                              ACT_LAYERS, STATS, LOWP, LOWP_BWD, DT, PREC, SUM_DQT)
            if CH1B > 0:
                dk += _chunk_grads(k, mt1, da1_1, ds, qt_r, w_g, a_g, o_wo, gw_s, ga_s, dz_ptr,
                                   dqt_ptr, r, offs_t, tm, offs_c1, H1, t0, T, gst_g, LAYERS,
                                   ACT, ACT_LAYERS, STATS, LOWP, LOWP_BWD, DT, PREC, SUM_DQT)
            if not STATS:  # the attention's own term (dout reloaded: it is not held
                # through the chain); a padded key gets a zero gradient
                dout = tile_vec(dout_ptr + r * D, offs_d, D, t0, T)
                # (valid found again: the one above, kept, costs a register per element)
                valid = valid_positions(offs_t, T, kb, len_ptr, mask_ptr, HAS_LEN, HAS_MASK)
                dk = tl.where(valid[:, None], dk + p[:, None] * dout[None, :], 0.0)
            tl.store(dk_base + offs_t[:, None] * D + offs_d[None, :],
                     dk.to(dk_ptr.dtype.element_ty), mask=tm[:, None] & dm[None, :])

    if LAYERS >= 3:
        store_mat(gw_s + o_w3, gw3t, offs_h2, offs_h3, H3, H2, True)
    if not STATS:
        tl.store(gw_s + o_bo, gbo)
