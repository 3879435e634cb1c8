"""Fused Triton GRU-family scan (SPEC section 2): forward and backward.

Forward: the input projection of every step is one GEMM in torch
(``gi = W_ih x + b_ih``, after AIGRU's ``x <- a x``); then one kernel launch walks
t = 0..T-1. Each program owns ``BLOCK_B`` rows, keeps their hidden state in
registers in float32 (float64 for float64 inputs) and computes
``gh = h @ W_hh^T + b_hh`` with ``tl.dot`` per step, so h never goes back to memory
except as the (B, T, H) states output. float16/bfloat16 inputs feed the dots 16-bit
operands with float32 accumulation (as cuDNN does); float32 inputs use IEEE float32
dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set.

Backward: one reverse-scan launch recomputes the gates from the saved gi and the
saved states, carries dh backwards and writes the gate gradients d(gi) (B, T, 3H),
the hidden-side operands of the weight gradient and d(att); the weight and bias
gradients of ``W_hh`` are then two GEMMs and sums in torch, and autograd's own
``linear`` backward gives dx, dW_ih, db_ih (and AIGRU's attention gradient).

Both kernels are ``torch.library.triton_op`` custom ops (``interest_kernels::gru_scan_fwd``
/ ``interest_kernels::gru_scan_bwd``) with fake implementations and a registered autograd
formula, launched through ``wrap_triton``: ``torch.compile(fullgraph=True)`` traces into
the launches and AOTInductor compiles them into a package (``ops/traceable_triton.py``).

Cost per call, B rows, T steps, hidden H padded to HP = next power of two >= max(H, 16)
inside registers only, 2-byte dtype: the forward reads gi (6·BTH bytes), writes the
states (2·BTH) and runs 3 dots of (BLOCK_B, HP) x (HP, HP) per step, 6·B·T·HP² FLOPs;
the backward reads gi, the states and d(states) (10·BTH), writes d(gi), h_{t-1} and
the n-block operand (10·BTH) and runs 6 dots per step (recompute and dh), 12·B·T·HP²
FLOPs. W_hh is read once per program and stays on chip for the whole scan up to
HP = 64 for float32 (the "paper" variant; "tensorflow" up to 32: its two distinct dot
operands spill 300-700 B at 64), 128 for 16-bit inputs (the backward's six tiles take
196 KB of an sm_90 block's 227 KB); wider kernels (float32 at HP >= 128: the FMA dots
hold both operands in registers, resident tiles spill 2-15 KB) read it at each use in
(16, HP) slabs from L1/L2, skipping the slabs past H that hold only padding, and their
dots re-read the left operand from a (BLOCK_B, HP) float32 scratch row block per
program, written once per distinct operand (the "paper" forward: once per step for its
three dots; the backward: four times for six; float32 at HP >= 128 writes it for every
dot, which spills less), cached. There (float32/float64), a forward that needs a
backward also writes gh = W_hh h_{t-1} (B, T, 3H, no bias) and the backward reads it
instead of recomputing it: half the backward's passes over W_hh and its dots.
With lengths or a mask, the rows are handed to programs by decreasing end (last valid
step + 1; one argsort on the device), and a program walks only the steps up to its
rows' last valid one, then writes the zero outputs of the remaining steps: short rows
cost no dots and no gi reads past their block's longest row.
Launches: forward 2 (the projection GEMM, the scan; 3 for AIGRU; with lengths or a
mask also the argsort and the row ends), backward the scan (and its argsort) plus about
8 small torch ops (GEMMs, bias sums) and autograd's linear backward.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from torch import Tensor

from ..common import valid_mask
from ..func_transforms import TransformableOp, call, register_sliced_vmap
from ..traceable_triton import kernel_name, wrap_triton

__all__ = ["gru_scan_triton"]

# The scan kernel sees "aigru" as "gru": AIGRU's attention only scales the input.
_KERNEL_MODES = {"gru": 0, "aigru": 0, "agru": 1, "augru": 2}
_GRU: tl.constexpr = tl.constexpr(0)
_AGRU: tl.constexpr = tl.constexpr(1)
_AUGRU: tl.constexpr = tl.constexpr(2)
# How each row's valid steps are given.
_ALL_VALID, _BY_LENGTHS, _BY_MASK = 0, 1, 2


# --- kernels -------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # exp of a non-positive argument only: no overflow for large |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _acc(x, F64: tl.constexpr):
    """``x`` in the state/accumulation dtype: float64 for float64 inputs, else float32."""
    if F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _dot_operand(x, like_ptr, DOT_IN_ACC: tl.constexpr, F64: tl.constexpr):
    # Accumulation-dtype operands for float32/float64 inputs (and bfloat16 in the
    # interpreter); otherwise the weights' own 16-bit type feeds the tensor cores.
    if DOT_IN_ACC:
        return _acc(x, F64)
    else:
        return x.to(like_ptr.dtype.element_ty)


@triton.jit
def _load_w(w_ptr, GATE: tl.constexpr, H, ks, cols, TRANSPOSED: tl.constexpr,
            DOT_IN_ACC: tl.constexpr, F64: tl.constexpr):
    """Rows ``ks`` of gate block GATE of W_hh (3H, H) as a (len(ks), HP) dot operand,
    zero-padded: tile[i, j] = W[GATE*H + j, ks[i]] when TRANSPOSED (for x @ W^T),
    else W[GATE*H + ks[i], j] (for x @ W)."""
    ok = (ks[:, None] < H) & (cols[None, :] < H)
    if TRANSPOSED:
        ptrs = w_ptr + (GATE * H + cols[None, :]) * H + ks[:, None]
    else:
        ptrs = w_ptr + (GATE * H + ks[:, None]) * H + cols[None, :]
    return _dot_operand(tl.load(ptrs, mask=ok, other=0.0), w_ptr, DOT_IN_ACC, F64)


@triton.jit
def _matmul_w(x, w_t, w_ptr, GATE: tl.constexpr, H, cols, TRANSPOSED: tl.constexpr,
              W_RESIDENT: tl.constexpr, CHUNK: tl.constexpr, KP: tl.constexpr, scr_ptr,
              STAGE: tl.constexpr, DOT_IN_ACC: tl.constexpr, F64: tl.constexpr,
              PREC: tl.constexpr):
    """x (BLOCK_B, HP) @ W_gate^T (TRANSPOSED) or @ W_gate, in the accumulation dtype.

    ``w_t`` is the resident transposed tile when W_RESIDENT. Otherwise W is read from
    global memory (L1/L2) at each use in slabs of CHUNK rows of the reduction dim, so
    that only a (CHUNK, HP) tile occupies shared memory and registers; slabs from KP
    (H rounded up to CHUNK) on hold only padding and are skipped. Register tensors
    cannot be sliced, so x then goes through this program's (BLOCK_B, HP) scratch
    rows at ``scr_ptr`` and comes back CHUNK columns at a time: STAGE writes it there;
    without STAGE the rows already hold x (the same operand as the previous call's).
    (Halving x in registers instead, with reshape/split, spills kilobytes on sm_90.)
    """
    if W_RESIDENT:
        w = w_t if TRANSPOSED else tl.trans(w_t)
        return tl.dot(_dot_operand(x, w_ptr, DOT_IN_ACC, F64), w, input_precision=PREC)
    else:
        HP: tl.constexpr = cols.shape[0]
        lr = tl.arange(0, x.shape[0])
        if STAGE:
            tl.store(scr_ptr + lr[:, None] * HP + cols[None, :], x)
            tl.debug_barrier()
        ks = tl.arange(0, CHUNK)
        acc = tl.zeros(x.shape, dtype=x.dtype)
        for k0 in range(0, KP, CHUNK):
            a = tl.load(scr_ptr + lr[:, None] * HP + (k0 + ks)[None, :])
            w = _load_w(w_ptr, GATE, H, k0 + ks, cols, TRANSPOSED, DOT_IN_ACC, F64)
            acc = tl.dot(_dot_operand(a, w_ptr, DOT_IN_ACC, F64), w, acc, input_precision=PREC)
        # Every thread has read the operand before a later call overwrites it.
        tl.debug_barrier()
        return acc


@triton.jit
def _load_bias(b_ptr, GATE: tl.constexpr, H, cols, HAS_B: tl.constexpr, HP: tl.constexpr,
               F64: tl.constexpr):
    if HAS_B:
        return _acc(tl.load(b_ptr + GATE * H + cols, mask=cols < H, other=0.0), F64)
    else:
        return _acc(tl.zeros([HP], dtype=tl.float32), F64)


@triton.jit
def _block_rows(order_ptr, slots, row_ok, VALID: tl.constexpr):
    """The rows a program owns: under lengths or a mask, its slots of the rows sorted by
    decreasing end (``order``), so that a block's rows end close together; else the slots."""
    if VALID == 0:
        return slots
    else:
        return tl.load(order_ptr + slots, mask=row_ok, other=0)


@triton.jit
def _block_steps(ends, T, VALID: tl.constexpr):
    """Steps up to the block's last valid one (T when all are valid); ``ends`` (BLOCK_B,)
    is each row's last valid step + 1. Later steps change no state and only write zeros."""
    if VALID == 0:
        return T
    else:
        return tl.max(ends, axis=0).to(tl.int32)


@triton.jit
def _valid_rows(mask_ptr, row_ok, step, t, seq_len, VALID: tl.constexpr):
    if VALID == 1:
        return row_ok & (t < seq_len)
    elif VALID == 2:
        return tl.load(mask_ptr + step, mask=row_ok, other=0) != 0
    else:
        return row_ok


@triton.jit(do_not_specialize=["T"])
def _gru_scan_fwd_kernel(
    gi_ptr, w_ptr, b_ptr, att_ptr, len_ptr, order_ptr, mask_ptr, h0_ptr, states_ptr, hlast_ptr,
    gh_ptr, B, T, H, scr_ptr,
    MODE: tl.constexpr, TF: tl.constexpr, VALID: tl.constexpr,
    HAS_B: tl.constexpr, HAS_H0: tl.constexpr, WRITE_STATES: tl.constexpr, SAVE_GH: tl.constexpr,
    BLOCK_B: tl.constexpr, HP: tl.constexpr, W_RESIDENT: tl.constexpr, CHUNK: tl.constexpr,
    KP: tl.constexpr, RESTAGE: tl.constexpr,
    DOT_IN_ACC: tl.constexpr, F64: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    slots = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, HP)
    row_ok = slots < B
    rows = _block_rows(order_ptr, slots, row_ok, VALID)
    ok2 = row_ok[:, None] & (cols < H)[None, :]
    rows64 = rows.to(tl.int64)
    h_offs = rows64[:, None] * H + cols[None, :]
    scr = scr_ptr + pid.to(tl.int64) * (BLOCK_B * HP)

    if HAS_H0:
        h = _acc(tl.load(h0_ptr + h_offs, mask=ok2, other=0.0), F64)
    else:
        h = _acc(tl.zeros([BLOCK_B, HP], dtype=tl.float32), F64)
    b_r = _load_bias(b_ptr, 0, H, cols, HAS_B, HP, F64)[None, :]
    b_z = _load_bias(b_ptr, 1, H, cols, HAS_B, HP, F64)[None, :]
    b_n = _load_bias(b_ptr, 2, H, cols, HAS_B, HP, F64)[None, :]
    # Under lengths, a row's end is its length; under a mask, the launcher's row ends.
    seq_len = tl.load(len_ptr + rows, mask=row_ok, other=0) if VALID != 0 else 0
    if W_RESIDENT:
        w_r = _load_w(w_ptr, 0, H, cols, cols, True, DOT_IN_ACC, F64)
        w_z = _load_w(w_ptr, 1, H, cols, cols, True, DOT_IN_ACC, F64)
        w_n = _load_w(w_ptr, 2, H, cols, cols, True, DOT_IN_ACC, F64)
    else:
        w_r = None
        w_z = None
        w_n = None

    n_steps = _block_steps(seq_len, T, VALID)
    for t in range(n_steps):
        step = rows64 * T + t
        g_offs = step[:, None] * (3 * H) + cols[None, :]
        g_r = _acc(tl.load(gi_ptr + g_offs, mask=ok2, other=0.0), F64)
        g_n = _acc(tl.load(gi_ptr + g_offs + 2 * H, mask=ok2, other=0.0), F64)

        gh_r = _matmul_w(h, w_r, w_ptr, 0, H, cols, True, W_RESIDENT, CHUNK, KP, scr, True,
                         DOT_IN_ACC, F64, PREC)
        r = tl.sigmoid(g_r + gh_r + b_r)
        if TF:
            gh_n = _matmul_w(r * h, w_n, w_ptr, 2, H, cols, True, W_RESIDENT, CHUNK, KP, scr,
                             True, DOT_IN_ACC, F64, PREC)
            n = _tanh(g_n + gh_n + b_n)
        else:
            gh_n = _matmul_w(h, w_n, w_ptr, 2, H, cols, True, W_RESIDENT, CHUNK, KP, scr,
                             RESTAGE, DOT_IN_ACC, F64, PREC)
            n = _tanh(g_n + r * (gh_n + b_n))
        if SAVE_GH:
            tl.store(gh_ptr + g_offs, gh_r, mask=ok2)
            tl.store(gh_ptr + g_offs + 2 * H, gh_n, mask=ok2)

        if MODE == _AGRU:
            a = _acc(tl.load(att_ptr + step, mask=row_ok, other=0.0), F64)[:, None]
            keep = 1.0 - a
        else:
            g_z = _acc(tl.load(gi_ptr + g_offs + H, mask=ok2, other=0.0), F64)
            gh_z = _matmul_w(h, w_z, w_ptr, 1, H, cols, True, W_RESIDENT, CHUNK, KP, scr,
                             TF or RESTAGE, DOT_IN_ACC, F64, PREC)
            if SAVE_GH:
                tl.store(gh_ptr + g_offs + H, gh_z, mask=ok2)
            z = tl.sigmoid(g_z + gh_z + b_z)
            if MODE == _AUGRU:
                a = _acc(tl.load(att_ptr + step, mask=row_ok, other=0.0), F64)[:, None]
                keep = (1.0 - a) * z if TF else 1.0 - a * z
            else:
                keep = z
        h_new = n + keep * (h - n)

        valid = _valid_rows(mask_ptr, row_ok, step, t, seq_len, VALID)[:, None]
        if WRITE_STATES:
            tl.store(
                states_ptr + step[:, None] * H + cols[None, :],
                tl.where(valid, h_new, 0.0).to(states_ptr.dtype.element_ty),
                mask=ok2,
            )
        h = tl.where(valid, h_new, h)
    if WRITE_STATES:
        for t in range(n_steps, T):
            step = rows64 * T + t
            tl.store(states_ptr + step[:, None] * H + cols[None, :],
                     tl.zeros([BLOCK_B, HP], dtype=states_ptr.dtype.element_ty), mask=ok2)

    tl.store(hlast_ptr + h_offs, h.to(hlast_ptr.dtype.element_ty), mask=ok2)


@triton.jit(do_not_specialize=["T"])
def _gru_scan_bwd_kernel(
    gi_ptr, w_ptr, b_ptr, att_ptr, len_ptr, order_ptr, mask_ptr, prev_ptr, h0_ptr, states_ptr,
    dstates_ptr, dhlast_ptr,
    gh_ptr, dgi_ptr, aux_ptr, hprev_ptr, datt_ptr, dh0_ptr,
    B, T, H, scr_ptr,
    MODE: tl.constexpr, TF: tl.constexpr, VALID: tl.constexpr,
    HAS_B: tl.constexpr, HAS_H0: tl.constexpr, HAS_DSTATES: tl.constexpr,
    HAS_DHLAST: tl.constexpr, SAVED_GH: tl.constexpr,
    BLOCK_B: tl.constexpr, HP: tl.constexpr, W_RESIDENT: tl.constexpr, CHUNK: tl.constexpr,
    KP: tl.constexpr, RESTAGE: tl.constexpr,
    DOT_IN_ACC: tl.constexpr, F64: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    slots = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, HP)
    row_ok = slots < B
    rows = _block_rows(order_ptr, slots, row_ok, VALID)
    ok2 = row_ok[:, None] & (cols < H)[None, :]
    rows64 = rows.to(tl.int64)
    h_offs = rows64[:, None] * H + cols[None, :]
    scr = scr_ptr + pid.to(tl.int64) * (BLOCK_B * HP)

    if HAS_H0:
        h_init = _acc(tl.load(h0_ptr + h_offs, mask=ok2, other=0.0), F64)
    else:
        h_init = _acc(tl.zeros([BLOCK_B, HP], dtype=tl.float32), F64)
    if HAS_DHLAST:
        dh = _acc(tl.load(dhlast_ptr + h_offs, mask=ok2, other=0.0), F64)
    else:
        dh = _acc(tl.zeros([BLOCK_B, HP], dtype=tl.float32), F64)
    b_r = _load_bias(b_ptr, 0, H, cols, HAS_B, HP, F64)[None, :]
    b_z = _load_bias(b_ptr, 1, H, cols, HAS_B, HP, F64)[None, :]
    b_n = _load_bias(b_ptr, 2, H, cols, HAS_B, HP, F64)[None, :]
    # Under lengths, a row's end is its length; under a mask, the launcher's row ends.
    seq_len = tl.load(len_ptr + rows, mask=row_ok, other=0) if VALID != 0 else 0
    if W_RESIDENT:
        w_r = _load_w(w_ptr, 0, H, cols, cols, True, DOT_IN_ACC, F64)
        w_z = _load_w(w_ptr, 1, H, cols, cols, True, DOT_IN_ACC, F64)
        w_n = _load_w(w_ptr, 2, H, cols, cols, True, DOT_IN_ACC, F64)
    else:
        w_r = None
        w_z = None
        w_n = None

    n_steps = _block_steps(seq_len, T, VALID)
    out_ty = dgi_ptr.dtype.element_ty
    for t in range(n_steps, T):
        step = rows64 * T + t
        zeros = tl.zeros([BLOCK_B, HP], dtype=out_ty)
        s_offs = step[:, None] * H + cols[None, :]
        g_offs = step[:, None] * (3 * H) + cols[None, :]
        tl.store(hprev_ptr + s_offs, zeros, mask=ok2)
        tl.store(aux_ptr + s_offs, zeros, mask=ok2)
        tl.store(dgi_ptr + g_offs, zeros, mask=ok2)
        tl.store(dgi_ptr + g_offs + H, zeros, mask=ok2)
        tl.store(dgi_ptr + g_offs + 2 * H, zeros, mask=ok2)
        if MODE != _GRU:
            tl.store(datt_ptr + step, tl.zeros([BLOCK_B], dtype=datt_ptr.dtype.element_ty),
                     mask=row_ok)
    for i in range(n_steps):
        t = n_steps - 1 - i
        step = rows64 * T + t
        valid_row = _valid_rows(mask_ptr, row_ok, step, t, seq_len, VALID)
        valid = valid_row[:, None]

        # h_{t-1}: the saved state of the last valid step before t, or h0 (prev = -1).
        # Masked steps output zero, so under a mask the launcher passes that index;
        # otherwise every valid step follows a valid one.
        if VALID == 2:
            prev = tl.load(prev_ptr + step, mask=row_ok, other=-1)
        else:
            prev = tl.zeros([BLOCK_B], dtype=tl.int32) + (t - 1)
        has_prev = (prev >= 0)[:, None]
        p_offs = (rows64 * T + prev)[:, None] * H + cols[None, :]
        h_prev = _acc(tl.load(states_ptr + p_offs, mask=ok2 & has_prev, other=0.0), F64)
        h_prev = tl.where(has_prev, h_prev, h_init)

        # Recompute the gates of step t.
        g_offs = step[:, None] * (3 * H) + cols[None, :]
        g_r = _acc(tl.load(gi_ptr + g_offs, mask=ok2, other=0.0), F64)
        g_n = _acc(tl.load(gi_ptr + g_offs + 2 * H, mask=ok2, other=0.0), F64)
        # The forward's hidden projections when it saved them, else recomputed.
        if SAVED_GH:
            gh_r = tl.load(gh_ptr + g_offs, mask=ok2, other=0.0)
        else:
            gh_r = _matmul_w(h_prev, w_r, w_ptr, 0, H, cols, True, W_RESIDENT, CHUNK, KP, scr,
                             True, DOT_IN_ACC, F64, PREC)
        r = tl.sigmoid(g_r + gh_r + b_r)
        if TF:
            rh = r * h_prev
            if SAVED_GH:
                gh_n = tl.load(gh_ptr + g_offs + 2 * H, mask=ok2, other=0.0) + b_n
            else:
                gh_n = _matmul_w(rh, w_n, w_ptr, 2, H, cols, True, W_RESIDENT, CHUNK, KP, scr,
                                 True, DOT_IN_ACC, F64, PREC) + b_n
            n = _tanh(g_n + gh_n)
        else:
            if SAVED_GH:
                gh_n = tl.load(gh_ptr + g_offs + 2 * H, mask=ok2, other=0.0) + b_n
            else:
                gh_n = _matmul_w(h_prev, w_n, w_ptr, 2, H, cols, True, W_RESIDENT, CHUNK, KP,
                                 scr, RESTAGE, DOT_IN_ACC, F64, PREC) + b_n
            n = _tanh(g_n + r * gh_n)
        if MODE == _AGRU:
            a = _acc(tl.load(att_ptr + step, mask=row_ok, other=0.0), F64)[:, None]
            keep = 1.0 - a
        else:
            g_z = _acc(tl.load(gi_ptr + g_offs + H, mask=ok2, other=0.0), F64)
            if SAVED_GH:
                gh_z = tl.load(gh_ptr + g_offs + H, mask=ok2, other=0.0)
            else:
                gh_z = _matmul_w(h_prev, w_z, w_ptr, 1, H, cols, True, W_RESIDENT, CHUNK, KP,
                                 scr, TF or RESTAGE, DOT_IN_ACC, F64, PREC)
            z = tl.sigmoid(g_z + gh_z + b_z)
            if MODE == _AUGRU:
                a = _acc(tl.load(att_ptr + step, mask=row_ok, other=0.0), F64)[:, None]
                if TF:
                    keep = (1.0 - a) * z
                    dkeep_dz = 1.0 - a
                else:
                    keep = 1.0 - a * z
                    dkeep_dz = -a
            else:
                keep = z
                dkeep_dz = 1.0

        # h_t = n + keep * (h_{t-1} - n), differentiated. Each output is stored as soon
        # as it is known and each dot runs right after its operand: fewer (BLOCK_B, HP)
        # tensors live across the dots (the wide-H kernels are register bound).
        s_offs = step[:, None] * H + cols[None, :]
        tl.store(hprev_ptr + s_offs, tl.where(valid, h_prev, 0.0).to(out_ty), mask=ok2)
        dh_t = dh
        if HAS_DSTATES:
            dh_t += _acc(tl.load(dstates_ptr + s_offs, mask=ok2, other=0.0), F64)
        dkeep = dh_t * (h_prev - n)
        dpre_n = dh_t * (1.0 - keep) * (1.0 - n * n)
        dh_prev = dh_t * keep
        tl.store(dgi_ptr + g_offs + 2 * H, tl.where(valid, dpre_n, 0.0).to(out_ty), mask=ok2)
        if MODE == _AGRU:
            tl.store(dgi_ptr + g_offs + H, tl.zeros([BLOCK_B, HP], dtype=out_ty), mask=ok2)
            da = -tl.sum(dkeep, axis=1)
        else:
            dpre_z = dkeep * dkeep_dz * z * (1.0 - z)
            if MODE == _AUGRU:
                da = -tl.sum(dkeep * z, axis=1)
            tl.store(dgi_ptr + g_offs + H, tl.where(valid, dpre_z, 0.0).to(out_ty), mask=ok2)
            dh_prev += _matmul_w(dpre_z, w_z, w_ptr, 1, H, cols, False, W_RESIDENT, CHUNK, KP, scr,
                                 True, DOT_IN_ACC, F64, PREC)
        if MODE != _GRU:
            tl.store(datt_ptr + step, tl.where(valid_row, da, 0.0).to(datt_ptr.dtype.element_ty),
                     mask=row_ok)
        # The n block of dW_hh pairs d(gh_n) with h_{t-1} ("paper") or d(gi_n) with
        # r*h_{t-1} ("tensorflow"); aux holds the factor that is not already stored.
        if TF:
            tl.store(aux_ptr + s_offs, tl.where(valid, rh, 0.0).to(out_ty), mask=ok2)
            drh = _matmul_w(dpre_n, w_n, w_ptr, 2, H, cols, False, W_RESIDENT, CHUNK, KP, scr,
                            True, DOT_IN_ACC, F64, PREC)
            dr = drh * h_prev
            dh_prev += drh * r
        else:
            dgh_n = dpre_n * r
            tl.store(aux_ptr + s_offs, tl.where(valid, dgh_n, 0.0).to(out_ty), mask=ok2)
            dr = dpre_n * gh_n
            dh_prev += _matmul_w(dgh_n, w_n, w_ptr, 2, H, cols, False, W_RESIDENT, CHUNK, KP, scr,
                                 True, DOT_IN_ACC, F64, PREC)
        dpre_r = dr * r * (1.0 - r)
        tl.store(dgi_ptr + g_offs, tl.where(valid, dpre_r, 0.0).to(out_ty), mask=ok2)
        dh_prev += _matmul_w(dpre_r, w_r, w_ptr, 0, H, cols, False, W_RESIDENT, CHUNK, KP, scr,
                             True, DOT_IN_ACC, F64, PREC)
        dh = tl.where(valid, dh_prev, dh)

    tl.store(dh0_ptr + h_offs, dh.to(dh0_ptr.dtype.element_ty), mask=ok2)


# --- launch configuration --------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Rows of W_hh per slab when the weights are read per use (see ``_matmul_w``).
_CHUNK = 16
# Multiprocessors of the H200 whose launch configuration the interpreter reproduces.
_INTERPRETED_SMS = 132


def _launch_config(
    kind: str, batch: int, hidden: int, dtype: torch.dtype, device: torch.device,
    variant: str = "paper",
) -> dict:
    """Block sizes, warps, weight placement and dot types of the ``kind`` ("fwd"/"bwd")
    scan kernel.

    tl.dot needs every dim >= 16, so rows come in blocks of at least 16 and the hidden
    width is padded to a power of two >= 16. The row block grows (to 32, for
    HP <= 32 only: wider 32-row kernels spill 0.5-4 KB) only while there are still
    about as many programs as SMs: the scan is latency bound, so programs in flight
    beat bigger tiles. The rest follows sm_90 compiles (ptxas shared-memory, register
    and spill reports, ``python -m interest_kernels.bench.sm90``): W_hh stays on chip,
    3 (forward) or 6 (backward, both layouts) (HP, HP) tiles, up to HP = 64 for float32
    (32 for the "tensorflow" variant and float64) and 128 for 16-bit inputs. Wider
    kernels read W_hh per use in (16, HP) slabs (from L1/L2; W_hh is at most 768 KB)
    with one pipeline stage: shared memory stays under 20 KB, and the resident or
    whole-tile alternatives either do not fit (float32: 240 KB at HP = 128) or spill
    more. Row blocks of 64 (M = 64, Hopper's wgmma) spill 3-3.6 KB per thread in the
    backward, so the blocks stay at 16-32 rows (mma.sync). Warps grow with the tile and
    for the float32 backward: each thread holds a share of the dozen (BLOCK_B, HP)
    float32 tensors live in a step, and fewer warps spill them.
    ``_launch`` falls back to the slabs if resident tiles do not fit. CPU tensors (the
    interpreter) get the configuration of an H200 (132 SMs), so that what the tests
    run is what the GPU runs, except that bfloat16 dots run in float32 there.
    """
    hp = max(16, triton.next_power_of_2(hidden))
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = _INTERPRETED_SMS
    want = triton.next_power_of_2(triton.cdiv(batch, sms))
    block_b = min(32 if hp <= 32 else 16, max(16, want))
    half = dtype in (torch.float16, torch.bfloat16)
    fp32_bwd = kind == "bwd" and not half
    resident = _resident(hp, dtype, variant)
    if not resident:
        num_warps = min(32, hp // 4) if hp >= 256 or fp32_bwd else 8
    elif kind == "fwd":
        # float32 IEEE dots at HP = 64 spill with 4 warps.
        small = hp <= (64 if half else 32)
        num_warps = 4 if small and block_b == 16 else 8
    elif half:
        num_warps = 4 if hp <= 32 and block_b == 16 else 8
    else:
        # The float32 backward at HP = 64 (six resident tiles on FMA dots) spills
        # 490-590 B at 16 warps, 8-16 B at 32.
        num_warps = 8 if hp * block_b <= 512 else (16 if hp <= 32 else 32)
    return dict(
        BLOCK_B=block_b,
        HP=hp,
        W_RESIDENT=resident,
        **_slabs(hp, hidden, resident),
        RESTAGE=_restage(hp, dtype),
        # 16-bit inputs feed tl.dot 16-bit operands, except bfloat16 in the interpreter
        # (numpy has no bfloat16 matmul).
        DOT_IN_ACC=dtype in (torch.float32, torch.float64)
        or (dtype == torch.bfloat16 and _interpreting()),
        F64=dtype == torch.float64,
        PREC=_precision(dtype, device),
        num_warps=num_warps,
        num_stages=_stages(kind, hp, dtype, resident),
    )


def _resident(hp: int, dtype: torch.dtype, variant: str) -> bool:
    """Whether W_hh stays on chip (see ``_launch_config``)."""
    half = dtype in (torch.float16, torch.bfloat16)
    return hp <= 32 or (half and hp <= 128) or (
        dtype == torch.float32 and hp == 64 and variant == "paper")


def _saves_hidden_projections(hidden: int, dtype: torch.dtype, variant: str) -> bool:
    """Whether the forward saves gh = W_hh h_{t-1} for the backward: where W_hh is read
    in slabs at every use (float32/float64; 16-bit kernels would need 4-byte copies),
    (B, T, 3H) more written and read once costs less than a second pass over W_hh per
    step."""
    hp = max(16, triton.next_power_of_2(hidden))
    return dtype in (torch.float32, torch.float64) and not _resident(hp, dtype, variant)


def _stages(kind: str, hp: int, dtype: torch.dtype, resident: bool) -> int:
    """Pipeline stages of the T loop: one for the slab kernels (more would multi-buffer
    the per-use weight slabs) and for resident tiles of 256-byte rows (float32 at
    HP = 64, whose dots run on FMA units; the 16-bit backward at HP = 128, whose six
    tiles take 196 KB and 3 stages 220 KB of shared memory)."""
    if not resident:
        return 1
    wide_rows = hp * dtype.itemsize > 128
    return 1 if wide_rows and (kind == "bwd" or dtype in (torch.float32, torch.float64)) else 3


def _slabs(hp: int, hidden: int, resident: bool) -> dict:
    """CHUNK: rows of W_hh per slab (HP when resident); KP: the hidden size rounded up to
    a slab, from which the slabs hold only padding and are skipped."""
    if resident:
        return dict(CHUNK=hp, KP=hp)
    return dict(CHUNK=_CHUNK, KP=triton.cdiv(hidden, _CHUNK) * _CHUNK)


def _restage(hp: int, dtype: torch.dtype) -> bool:
    """Whether every slab dot writes its operand to the scratch rows, even one that
    they already hold: float32 kernels at HP >= 128 spill 2-4x more on sm_90 (ptxas)
    when the "paper" variant's dots share one write."""
    return hp >= 128 and dtype in (torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Configurations whose resident weights did not fit in shared memory on this GPU.
_TOO_BIG: set[tuple] = set()


def _launch(kernel, grid: tuple, args: tuple, constexprs: dict, cfg: dict,
            device: torch.device, hidden: int) -> None:
    """Launch ``kernel`` with ``args`` and this configuration's scratch rows; if its
    resident W_hh tiles exceed shared memory, read the weights in slabs instead
    (remembered per configuration); if that does not fit either, say so."""
    key = (kernel_name(kernel), device.index, tuple(sorted(cfg.items())),
           tuple(sorted(constexprs.items())))
    attempts = [cfg]
    if cfg["W_RESIDENT"]:
        attempts.append(dict(cfg, W_RESIDENT=False, **_slabs(cfg["HP"], hidden, False), num_stages=1))
    if key in _TOO_BIG:
        attempts = attempts[1:]
    with _device_guard(device):
        for i, attempt in enumerate(attempts):
            try:
                kernel[grid](*args, _scratch(attempt, grid[0], device), **constexprs, **attempt)
                return
            except OutOfResources as err:
                if i + 1 < len(attempts):
                    _TOO_BIG.add(key)
                    continue
                raise RuntimeError(
                    f"gru_scan (triton): a hidden size padded to {cfg['HP']} needs more "
                    f"on-chip memory than this GPU has ({err}); use the 'reference' backend"
                ) from err


def _scratch(cfg: dict, programs: int, device: torch.device) -> Tensor:
    """The (programs, BLOCK_B, HP) rows through which the slab-wise dots re-read their
    left operand, in the accumulation dtype; a placeholder when W_hh is resident."""
    if cfg["W_RESIDENT"]:
        return torch.empty((1,), device=device)
    dtype = torch.float64 if cfg["F64"] else torch.float32
    return torch.empty((programs * cfg["BLOCK_B"] * cfg["HP"],), dtype=dtype, device=device)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    if device.type == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device, which may not be the tensors' one.
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _row_ends(lengths: Optional[Tensor], mask: Optional[Tensor], steps: int) -> Optional[Tensor]:
    """(B,) int64: each row's last valid step + 1 (its length; under a mask, 0 for an
    all-masked row), or None when every step is valid. Lengths are clamped to [0, T]:
    the value checks may have been skipped (compile, CUDA graphs), and a block walks
    to its longest row, so an unchecked length must not take it past T."""
    if lengths is not None:
        return lengths.clamp(0, steps)
    if mask is None:
        return None
    if steps == 0:
        return torch.zeros(mask.shape[0], dtype=torch.int64, device=mask.device)
    pos = torch.arange(1, steps + 1, device=mask.device, dtype=torch.int64)
    return torch.where(mask, pos, 0).amax(dim=1)


def _longest_first(ends: Tensor) -> Tensor:
    """(B,) int32: the rows by decreasing end, ties in row order (deterministic), so
    that each program's block of rows stops at its first row's end."""
    return torch.argsort(ends, descending=True, stable=True).to(torch.int32)


def _valid_kind(lengths: Optional[Tensor], mask: Optional[Tensor]) -> int:
    if lengths is not None:
        return _BY_LENGTHS
    if mask is not None:
        return _BY_MASK
    return _ALL_VALID


# --- custom ops ------------------------------------------------------------------------
# triton_ops: their bodies are what torch.compile and AOTInductor trace, so every launch
# goes through wrap_triton and a symbolic batch (a dynamic dimension) picks its launch
# configuration without a guard on its value.


def _config_batch(batch: int) -> int:
    """The batch size the launch configuration is chosen for: a symbolic (dynamic) batch
    gets the configuration of batches up to 16 rows per SM (BLOCK_B = 16)."""
    return batch if isinstance(batch, int) else 1


@torch.library.triton_op("interest_kernels::gru_scan_fwd", mutates_args=())
def gru_scan_fwd(
    gi: Tensor,
    weight_hh: Tensor,
    bias_hh: Optional[Tensor],
    att: Optional[Tensor],
    h0: Optional[Tensor],
    lengths: Optional[Tensor],
    mask: Optional[Tensor],
    mode: str,
    variant: str,
    write_states: bool,
    save_gh: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The recurrence over precomputed input projections.

    gi (B, T, 3H) the input projections ``W_ih x_t + b_ih``; weight_hh (3H, H); bias_hh
    (3H,) or None; att (B, T) for modes "agru"/"augru", else None; h0 (B, H) or None;
    lengths (B,) int64 or mask (B, T) bool or neither; mode "gru" | "agru" | "augru";
    variant "paper" | "tensorflow". Returns ``(states, h_last, gh)``: states (B, T, H) in
    gi's dtype (an empty (0,) tensor when ``write_states`` is False), h_last (B, H), and
    when ``save_gh`` the hidden projections without bias (B, T, 3H) in the accumulation
    dtype at the steps the backward walks (else an empty (0,) tensor), which the backward
    then reads instead of recomputing them.
    """
    batch, steps, _ = gi.shape
    hidden = weight_hh.shape[1]
    states = gi.new_empty((batch, steps, hidden) if write_states else (0,))
    h_last = gi.new_empty((batch, hidden))
    gh = _gh_buffer(gi, save_gh)
    if batch == 0:
        return states, h_last, gh
    gi = gi.contiguous()
    dummy = gi
    ends = _row_ends(lengths, mask, steps)
    cfg = _launch_config("fwd", _config_batch(batch), hidden, gi.dtype, gi.device, variant)
    args = (
        gi,
        weight_hh.contiguous(),
        bias_hh.contiguous() if bias_hh is not None else dummy,
        att.contiguous() if att is not None else dummy,
        ends if ends is not None else dummy,
        _longest_first(ends) if ends is not None else dummy,
        mask.contiguous().view(torch.uint8) if mask is not None else dummy,
        h0.contiguous() if h0 is not None else dummy,
        states if write_states else dummy,
        h_last,
        gh if save_gh else dummy,
        batch,
        steps,
        hidden,
    )
    constexprs = dict(
        MODE=_KERNEL_MODES[mode],
        TF=variant == "tensorflow",
        VALID=_valid_kind(lengths, mask),
        HAS_B=bias_hh is not None,
        HAS_H0=h0 is not None,
        WRITE_STATES=write_states,
        SAVE_GH=save_gh,
    )
    grid = (triton.cdiv(batch, cfg["BLOCK_B"]),)
    _launch(wrap_triton(_gru_scan_fwd_kernel), grid, args, constexprs, cfg, gi.device, hidden)
    return states, h_last, gh


@gru_scan_fwd.register_fake
def _gru_scan_fwd_fake(gi, weight_hh, bias_hh, att, h0, lengths, mask, mode, variant, write_states,
                       save_gh):
    batch, steps, _ = gi.shape
    hidden = weight_hh.shape[1]
    states = gi.new_empty((batch, steps, hidden) if write_states else (0,))
    return states, gi.new_empty((batch, hidden)), _gh_buffer(gi, save_gh)


def _gh_buffer(gi: Tensor, save_gh: bool) -> Tensor:
    dtype = torch.float64 if gi.dtype == torch.float64 else torch.float32
    return gi.new_empty(gi.shape if save_gh else (0,), dtype=dtype)


@torch.library.triton_op("interest_kernels::gru_scan_bwd", mutates_args=())
def gru_scan_bwd(
    gi: Tensor,
    weight_hh: Tensor,
    bias_hh: Optional[Tensor],
    att: Optional[Tensor],
    h0: Optional[Tensor],
    lengths: Optional[Tensor],
    mask: Optional[Tensor],
    states: Tensor,
    gh: Optional[Tensor],
    dstates: Optional[Tensor],
    dh_last: Optional[Tensor],
    mode: str,
    variant: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reverse scan: the gradients of :func:`gru_scan_fwd` that need the recurrence.

    Inputs as for the forward, plus its states (B, T, H), its saved hidden projections
    gh (B, T, 3H) (None or empty: recomputed) and the upstream gradients
    d(states) (B, T, H) and d(h_last) (B, H) (None when unused). Returns, in gi's dtype
    unless noted:

    * dgi (B, T, 3H): gradient of the gate pre-activations on the input side (also of
      the r and z blocks of ``gh``),
    * aux (B, T, H): for "paper" d(gh_n), the n block's gradient on the hidden side;
      for "tensorflow" the operand ``r_t * h_{t-1}`` that multiplies W_hn,
    * hprev (B, T, H): h_{t-1} of each valid step (zero elsewhere),
    * datt (B, T) in att's dtype for "agru"/"augru", else an empty (0,) tensor,
    * dh0 (B, H) in h0's dtype (gi's when h0 is None).
    Every output is zero at invalid steps.
    """
    batch, steps, _ = gi.shape
    hidden = weight_hh.shape[1]
    dgi = torch.empty_like(gi)
    aux = gi.new_empty((batch, steps, hidden))
    hprev = gi.new_empty((batch, steps, hidden))
    need_att = _KERNEL_MODES[mode] != 0
    datt = att.new_empty((batch, steps)) if need_att else gi.new_empty((0,))
    dh0 = (h0 if h0 is not None else gi).new_empty((batch, hidden))
    if batch == 0:
        return dgi, aux, hprev, datt, dh0
    prev = None
    if mask is not None:
        # Index of the last valid step before t (-1: none, h0 is the previous state).
        pos = torch.arange(steps, device=gi.device, dtype=torch.int64)
        last = torch.where(mask, pos, -1).cummax(dim=1).values
        prev = torch.cat([last.new_full((batch, 1), -1), last[:, :-1]], dim=1)
        prev = prev.to(torch.int32).contiguous()
    gi = gi.contiguous()
    dummy = gi
    saved_gh = gh is not None and gh.numel() > 0
    ends = _row_ends(lengths, mask, steps)
    cfg = _launch_config("bwd", _config_batch(batch), hidden, gi.dtype, gi.device, variant)
    args = (
        gi,
        weight_hh.contiguous(),
        bias_hh.contiguous() if bias_hh is not None else dummy,
        att.contiguous() if att is not None else dummy,
        ends if ends is not None else dummy,
        _longest_first(ends) if ends is not None else dummy,
        mask.contiguous().view(torch.uint8) if mask is not None else dummy,
        prev if prev is not None else dummy,
        h0.contiguous() if h0 is not None else dummy,
        states.contiguous(),
        dstates.contiguous() if dstates is not None else dummy,
        dh_last.contiguous() if dh_last is not None else dummy,
        gh.contiguous() if saved_gh else dummy,
        dgi,
        aux,
        hprev,
        datt if need_att else dummy,
        dh0,
        batch,
        steps,
        hidden,
    )
    constexprs = dict(
        MODE=_KERNEL_MODES[mode],
        TF=variant == "tensorflow",
        VALID=_valid_kind(lengths, mask),
        HAS_B=bias_hh is not None,
        HAS_H0=h0 is not None,
        HAS_DSTATES=dstates is not None,
        HAS_DHLAST=dh_last is not None,
        SAVED_GH=saved_gh,
    )
    grid = (triton.cdiv(batch, cfg["BLOCK_B"]),)
    _launch(wrap_triton(_gru_scan_bwd_kernel), grid, args, constexprs, cfg, gi.device, hidden)
    return dgi, aux, hprev, datt, dh0


@gru_scan_bwd.register_fake
def _gru_scan_bwd_fake(
    gi, weight_hh, bias_hh, att, h0, lengths, mask, states, gh, dstates, dh_last, mode, variant
):
    batch, steps, _ = gi.shape
    hidden = weight_hh.shape[1]
    datt = att.new_empty((batch, steps)) if _KERNEL_MODES[mode] != 0 else gi.new_empty((0,))
    dh0 = (h0 if h0 is not None else gi).new_empty((batch, hidden))
    return (
        torch.empty_like(gi),
        gi.new_empty((batch, steps, hidden)),
        gi.new_empty((batch, steps, hidden)),
        datt,
        dh0,
    )


def _setup_context(ctx, inputs, output) -> None:
    gi, weight_hh, bias_hh, att, h0, lengths, mask, mode, variant, _, _ = inputs
    states, _, gh = output
    ctx.save_for_backward(gi, weight_hh, bias_hh, att, h0, lengths, mask, states, gh)
    ctx.mode = mode
    ctx.variant = variant
    # An unused output (the states when only h_last is wanted) then arrives as None
    # and the reverse scan skips reading a tensor of zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, dstates: Optional[Tensor], dh_last: Optional[Tensor], _dgh: Optional[Tensor]):
    gi, weight_hh, bias_hh, att, h0, lengths, mask, states, gh = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dgi, aux, hprev, datt, dh0 = gru_scan_bwd(
        gi, weight_hh, bias_hh, att, h0, lengths, mask, states, gh, dstates, dh_last,
        ctx.mode, ctx.variant,
    )
    hidden = weight_hh.shape[1]
    g = dgi.reshape(-1, 3 * hidden)
    aux2 = aux.reshape(-1, hidden)
    tf = ctx.variant == "tensorflow"
    d_weight_hh = d_bias_hh = None
    if needs[1]:
        hprev2 = hprev.reshape(-1, hidden)
        rz = g[:, : 2 * hidden].t().mm(hprev2)
        n = g[:, 2 * hidden :].t().mm(aux2) if tf else aux2.t().mm(hprev2)
        d_weight_hh = torch.cat([rz, n]).to(weight_hh.dtype)
    if bias_hh is not None and needs[2]:
        d_bias_hh = g.sum(0) if tf else torch.cat([g[:, : 2 * hidden].sum(0), aux2.sum(0)])
        d_bias_hh = d_bias_hh.to(bias_hh.dtype)
    return (
        dgi if needs[0] else None,
        d_weight_hh,
        d_bias_hh,
        datt if att is not None and needs[3] else None,
        dh0 if h0 is not None and needs[4] else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


gru_scan_fwd.register_autograd(_backward, setup_context=_setup_context)
# The op with its autograd for torch.func transforms (ops/func_transforms.py).
_FORWARD = TransformableOp(gru_scan_fwd, _setup_context, _backward)
register_sliced_vmap("interest_kernels::gru_scan_bwd")


# --- backend entry point ---------------------------------------------------------------


def gru_scan_triton(
    *,
    x: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    att: Optional[Tensor] = None,
    mode: str = "gru",
    variant: str = "paper",
    lengths: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    return_states: bool = True,
) -> tuple[Optional[Tensor], Tensor]:
    """Triton backend of ``gru_scan`` (arguments already validated and normalised).

    x (B, T, I); weight_ih (3H, I); weight_hh (3H, H); biases (3H,) or None; att (B, T)
    for the attentional modes (None for "gru"); lengths (B,) int64 or mask (B, T) bool
    or neither; h0 (B, H) or None. Returns ``(states (B, T, H) or None, h_last (B, H))``
    in x's dtype. The states are computed (and saved) without being returned when
    ``return_states`` is False but a gradient is needed: the backward reads them.
    """
    # Float32 parameters with low-precision x (autocast style) run in x's dtype; the
    # casts' backward returns float32 gradients.
    dtype = x.dtype
    bias_ih = bias_ih.to(dtype) if bias_ih is not None else None
    valid = valid_mask(lengths, mask, x.shape[1], x.device)
    if valid is not None:
        # Padding is never read: the projection GEMM (and its backward) sees zeros there.
        x = torch.where(valid.unsqueeze(-1), x, 0)
        att = torch.where(valid, att, 0) if att is not None else None
    projected = x * att.unsqueeze(-1) if mode == "aigru" else x
    gi = F.linear(projected, weight_ih.to(dtype), bias_ih)
    # gi's dtype, not x's: under autocast the projection may already run in 16 bits.
    weight_hh = weight_hh.to(gi.dtype)
    scan_att = att if mode in ("agru", "augru") else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (gi, weight_hh, bias_hh, scan_att, h0)
    )
    save_gh = needs_grad and _saves_hidden_projections(weight_hh.shape[1], gi.dtype, variant)
    states, h_last, _ = call(
        _FORWARD, gi, weight_hh, bias_hh, scan_att, h0, lengths, mask, mode, variant,
        return_states or needs_grad, save_gh,
    )
    return (states if return_states else None), h_last
