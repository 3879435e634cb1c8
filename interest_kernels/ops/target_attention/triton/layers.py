"""Triton building blocks shared by the target-attention kernels: loads of the packed
parameters, the dots, the activations and their gradients, the valid-position mask.

Packed parameters (built by ``pack.py``), per MLP group g (a head for per-head MLPs):

* weights, one row of S entries in the parameters' dtype:
  ``[W_kd (H1, D), W_p (H1, D), W_2 (H2, H1), c_2 (H2), W_3 (H3, H2), c_3 (H3), w_o (H_L), c_o]``
  with ``W_kd = W_k - W_d`` and ``W_p`` the first layer's key and product blocks, an
  absent layer of width 0;
* activation parameters, one float32 row ``[(3, H1), (3, H2), (3, H3)]``: per unit the
  PReLU slope (then two zeros) or Dice's (alpha, scale, shift) with the gate
  ``sigmoid(z * scale + shift)``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def weight_offsets(D, H1, H2, H3, PACK_LAYERS: tl.constexpr):
    """Offsets of (W_p, W_2, c_2, W_3, c_3, w_o, c_o) in a packed weight row, and its size."""
    o_wp = H1 * D
    o_w2 = 2 * H1 * D
    o_b2 = o_w2 + H2 * H1
    o_w3 = o_b2 + H2
    o_b3 = o_w3 + H3 * H2
    o_wo = o_b3 + H3
    if PACK_LAYERS == 1:
        o_bo = o_wo + H1
    elif PACK_LAYERS == 2:
        o_bo = o_wo + H2
    else:
        o_bo = o_wo + H3
    return o_wp, o_w2, o_b2, o_w3, o_b3, o_wo, o_bo, o_bo + 1


@triton.jit
def load_vec(ptr, offs, n):
    return tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32)


@triton.jit
def load_mat(ptr, offs_r, offs_c, n_r, n_c, TRANSPOSE: tl.constexpr):
    """Row-major (n_r, n_c) matrix at ``ptr`` (its transpose if asked), zero-padded, fp32."""
    if TRANSPOSE:
        ptrs = ptr + offs_c[None, :] * n_c + offs_r[:, None]
        msk = (offs_c[None, :] < n_r) & (offs_r[:, None] < n_c)
    else:
        ptrs = ptr + offs_r[:, None] * n_c + offs_c[None, :]
        msk = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    return tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)


@triton.jit
def store_mat(ptr, x, offs_r, offs_c, n_r, n_c, TRANSPOSE: tl.constexpr):
    """Store x (or its transpose) into the row-major (n_r, n_c) matrix at ``ptr``."""
    if TRANSPOSE:
        ptrs = ptr + offs_c[None, :] * n_c + offs_r[:, None]
        msk = (offs_c[None, :] < n_r) & (offs_r[:, None] < n_c)
    else:
        ptrs = ptr + offs_r[:, None] * n_c + offs_c[None, :]
        msk = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    tl.store(ptrs, x, mask=msk)


@triton.jit
def mm(a, b, LOWP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """a (M, K) @ b (K, N) -> (M, N) with float32 accumulation: 16-bit operands (dtype
    DT) when LOWP, else float32 operands at precision PREC ("tf32" or "ieee")."""
    if LOWP:
        return tl.dot(a.to(DT), b.to(DT), out_dtype=tl.float32)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def mm_unchained(a, b, LOWP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, opaque_true):
    """``mm`` of a (M, K) and b (K, N) into (M, N) float32, computed in a branch on
    ``opaque_true``: a condition that must hold in every program (a false one gives
    zeros) and that the compiler cannot fold. Triton 3.9 lays a dot whose result reaches
    another dot (a chained dot) with all warps along M; with 8 warps and 64 rows both
    warpgroups then hold the same rows, and a (64, 64) float32 tile costs 32 registers per
    thread instead of 16. The branch's yield ends the chain that Triton follows, so the
    dot gets 4 x 2 warps (sm90_target_attention_spills.md, round 6)."""
    if opaque_true:
        c = mm(a, b, LOWP, DT, PREC)
    else:
        c = tl.zeros([a.shape[0], b.shape[1]], tl.float32)
    return c


@triton.jit
def tile_vec(ptr, offs, n, t0, T):
    """A loop-invariant (H,) vector loaded inside the tile loop of ``t0`` < T (the mask
    names t0 so that the load stays in the loop): held across the loop, a vector
    broadcast over an MMA tile costs H/4 registers per thread; reloaded it costs an L1
    hit per tile."""
    return tl.load(ptr + offs, mask=(offs < n) & (offs * 0 + t0 < T), other=0.0).to(tl.float32)


@triton.jit
def add_to_vec(ptr, offs, n, x, ADD=True):
    """ptr[offs] += x (fp32, offs < n), or ptr[offs] = x where ADD is false: a program's
    own partial of a per-unit gradient, summed in place across its tiles instead of in
    registers (see ``tile_vec``). The caller puts a barrier between one tile's update
    and the next."""
    m = offs < n
    tl.store(ptr + offs, tl.load(ptr + offs, mask=m & ADD, other=0.0) + x, mask=m)


@triton.jit
def _vecs_tile(p0, p1, p2, p3, offs, n, USE: tl.constexpr):
    """Addresses and mask of the (H,) vectors at p0..p3 as one (H, 2, 2) tile: vector
    2 i + j at [:, i, j], present where bit 2 i + j of USE is set. An absent vector's
    slot gets an address of its own (never read): with equal slot addresses the compiler
    takes the tile for one vector and lays it out as such (two units per thread),
    which spills more (sm90_target_attention_spills.md, round 5b)."""
    if (USE & 1) == 0:
        p0 = p1 + 3 * n
    if (USE & 2) == 0:
        p1 = p0 + n
    if (USE & 4) == 0:
        p2 = p0 + 2 * n
    if (USE & 8) == 0:
        p3 = p0 + 3 * n
    i = tl.arange(0, 2)[None, :, None]
    j = tl.arange(0, 2)[None, None, :]
    ptrs = tl.where(i == 0, tl.where(j == 0, p0, p1), tl.where(j == 0, p2, p3))
    return ptrs + offs[:, None, None], ((USE >> (2 * i + j)) & 1) != 0


@triton.jit
def tile_vecs(p0, p1, p2, p3, offs, n, t0, T, USE: tl.constexpr):
    """Up to four (H,) vectors at p0..p3 (those named by the bits of USE; the others
    come back as zeros), loaded per tile (as ``tile_vec``) as one (H, 2, 2) tile.

    Loaded alone, a vector takes the layout of its use, the column slice of an MMA tile,
    with a 64-bit address per two columns (eight for 64 units) that the compiler computes
    once and holds across the loops; a load of at least as many elements as the program
    has threads keeps a layout of its own, two addresses per thread here."""
    ptrs, use = _vecs_tile(p0, p1, p2, p3, offs, n, USE)
    o = offs[:, None, None]
    x = tl.load(ptrs, mask=use & (o < n) & (o * 0 + t0 < T), other=0.0)
    x02, x13 = tl.split(x.to(tl.float32))
    v0, v2 = tl.split(x02)
    v1, v3 = tl.split(x13)
    return v0, v1, v2, v3


@triton.jit
def add_to_vecs(p0, p1, p2, p3, offs, n, x0, x1, x2, x3, USE: tl.constexpr):
    """``add_to_vec`` of those of x0..x3 named by the bits of USE to p0..p3, as one
    (H, 2, 2) tile (see ``tile_vecs``)."""
    ptrs, use = _vecs_tile(p0, p1, p2, p3, offs, n, USE)
    m = use & (offs[:, None, None] < n)
    x = tl.join(tl.join(x0, x2), tl.join(x1, x3))
    tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) + x, mask=m)


@triton.jit
def tile_act_params(ptr, offs, n, t0, T, LOAD: tl.constexpr):
    """``act_params`` loaded per tile (see ``tile_vec``)."""
    if LOAD:
        pa = tile_vec(ptr, offs, n, t0, T)
        ps = tile_vec(ptr + n, offs, n, t0, T)
        pb = tile_vec(ptr + 2 * n, offs, n, t0, T)
    else:
        pa = tl.zeros(offs.shape, tl.float32)
        ps = pa
        pb = pa
    return pa, ps, pb


@triton.jit
def tile_vectors(qt_ptr, b2_ptr, b3_ptr, a_g, H1, H2, H3, offs_h1, offs_h2, offs_h3, t0, T,
                 LAYERS: tl.constexpr, ACT_LAYERS: tl.constexpr):
    """A tile's per-unit inputs of the MLP (see ``tile_vec``): the row's q-term, the
    biases c_2, c_3 and the activation parameters, zeros where absent."""
    qt = tile_vec(qt_ptr, offs_h1, H1, t0, T)
    b2 = tl.zeros(offs_h2.shape, tl.float32)
    b3 = tl.zeros(offs_h3.shape, tl.float32)
    if LAYERS >= 2:
        b2 = tile_vec(b2_ptr, offs_h2, H2, t0, T)
    if LAYERS >= 3:
        b3 = tile_vec(b3_ptr, offs_h3, H3, t0, T)
    pa1, ps1, pb1 = tile_act_params(a_g, offs_h1, H1, t0, T, ACT_LAYERS >= 1)
    pa2, ps2, pb2 = tile_act_params(a_g + 3 * H1, offs_h2, H2, t0, T, ACT_LAYERS >= 2)
    pa3, ps3, pb3 = tile_act_params(a_g + 3 * (H1 + H2), offs_h3, H3, t0, T, ACT_LAYERS >= 3)
    return qt, b2, b3, pa1, ps1, pb1, pa2, ps2, pb2, pa3, ps3, pb3


@triton.jit
def act_fwd(z, pa, ps, pb, ACT: tl.constexpr):
    """Activation of pre-activations z (BT, H): identity, sigmoid, relu, prelu, dice."""
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
def act_bwd(z, a, g, pa, ps, pb, ACT: tl.constexpr):
    """(dz, and the per-unit gradients of pa, ps, pb summed over the tile's rows) for the
    upstream gradient g of the activation a = act(z). Sigmoid and relu read only a, so
    z need not stay live."""
    gpa = tl.sum(g * 0.0, axis=0)
    gps = gpa
    gpb = gpa
    if ACT == 1:
        dz = g * a * (1.0 - a)
    elif ACT == 2:
        dz = tl.where(a > 0, g, 0.0)
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
def history_row(kidx_ptr, b, N, HAS_KIDX: tl.constexpr):
    """The history row of query b, clamped into [0, N) so a bad key_index reads nothing
    out of bounds (the public op checks the values on the device)."""
    if HAS_KIDX:
        kb = tl.load(kidx_ptr + b)
        kb = tl.minimum(tl.maximum(kb, 0), N - 1)
    else:
        kb = tl.cast(b, tl.int64)
    return kb


@triton.jit
def valid_positions(offs_t, T, kb, len_ptr, mask_ptr,
                    HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr):
    """Bool (BT,): positions in range and valid for history row kb."""
    tm = offs_t < T
    valid = tm
    if HAS_LEN:
        valid = valid & (offs_t < tl.load(len_ptr + kb))
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + kb * T + offs_t, mask=tm, other=0) != 0)
    return valid


@triton.jit
def load_weights(w_g, D, H1, H2, H3, offs_d, offs_h1, offs_h2, offs_h3,
                 LAYERS: tl.constexpr, PACK_LAYERS: tl.constexpr):
    """A program's on-chip copy of one group's weight matrices (loaded once, fp32,
    zero-padded): W_kd, W_p (BH1, BD); W_2^T (BH1, BH2); W_3^T (BH2, BH3) (of the first
    ``LAYERS`` layers of a pack of ``PACK_LAYERS``; absent layers get zero stand-ins).
    The per-unit vectors come per tile (``tile_vectors``)."""
    o_wp, o_w2, _, o_w3, _, _, _, _ = weight_offsets(D, H1, H2, H3, PACK_LAYERS)
    wkd = load_mat(w_g, offs_h1, offs_d, H1, D, False)
    wp = load_mat(w_g + o_wp, offs_h1, offs_d, H1, D, False)
    w2t = tl.zeros([offs_h1.shape[0], offs_h2.shape[0]], tl.float32)
    w3t = tl.zeros([offs_h2.shape[0], offs_h3.shape[0]], tl.float32)
    if LAYERS >= 2:
        w2t = load_mat(w_g + o_w2, offs_h1, offs_h2, H2, H1, True)
    if LAYERS >= 3:
        w3t = load_mat(w_g + o_w3, offs_h2, offs_h3, H3, H2, True)
    return wkd, wp, w2t, w3t


@triton.jit
def mlp_tile(k, mt, qt, w2t, b2, w3t, b3, pa1, ps1, pb1, pa2, ps2, pb2, pa3, ps3, pb3,
             LAYERS: tl.constexpr, ACT: tl.constexpr, TOP_ACT: tl.constexpr,
             LOWP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """The MLP on a tile of keys k (BT, BD) of one row with first-layer matrix
    mt = M_r^T (BD, BH1) and q-term qt (BH1): pre-activations and activations
    (z1, a1, z2, a2, z3, a3) of the first LAYERS layers (the top one activated only if
    TOP_ACT; absent layers repeat the last present one)."""
    z1 = mm(k, mt, LOWP, DT, PREC) + qt[None, :]
    a1 = z1
    if LAYERS > 1 or TOP_ACT:
        a1 = act_fwd(z1, pa1, ps1, pb1, ACT)
    z2 = z1
    a2 = a1
    z3 = z1
    a3 = a1
    if LAYERS >= 2:
        z2 = mm(a1, w2t, LOWP, DT, PREC) + b2[None, :]
        a2 = z2
        if LAYERS > 2 or TOP_ACT:
            a2 = act_fwd(z2, pa2, ps2, pb2, ACT)
        z3 = z2
        a3 = a2
    if LAYERS >= 3:
        z3 = mm(a2, w3t, LOWP, DT, PREC) + b3[None, :]
        a3 = z3
        if TOP_ACT:
            a3 = act_fwd(z3, pa3, ps3, pb3, ACT)
    return z1, a1, z2, a2, z3, a3
