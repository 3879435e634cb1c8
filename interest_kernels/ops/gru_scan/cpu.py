"""CPU path for the GRU-family scans: a lean recurrence with a hand-written backward.

* Rows are sorted by length (longest first), so at step t the rows still running are
  a prefix ``[:n_t]``: every op of that step, forward and backward, touches only those
  rows and no work is spent on padding (as ``pack_padded_sequence`` does). A ``mask``
  (any pattern) runs every row and keeps h with ``torch.where``.
* Forward: a few ops per step with no autograd graph; the gates the backward needs are
  kept per step.
* Backward: one reverse loop that computes the gate gradients of each step and folds
  them at once into the weight, bias and input gradients (small GEMMs accumulated in
  place), instead of autograd's graph of some thirty nodes per step.
* Every working tensor is one step in size. Measured on a 2-core AVX-512 VM, (T, B, 3H)
  buffers cost more than they save: a (B*T, I) x (I, 3H) GEMM with small I is 2-3x
  slower than the same work as per-step GEMMs whose output stays in cache, and fresh
  multi-megabyte buffers pay page faults on every call.

Same equations as ``reference.py``; tanh is computed as ``2 sigmoid(2x) - 1`` (torch's
CPU tanh is several times slower than its sigmoid; the two agree to float rounding).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..common import compute_dtype


def _tanh_(t: torch.Tensor) -> torch.Tensor:
    return t.mul_(2).sigmoid_().mul_(2).sub_(1)


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t.to(dtype) if t is not None else None


def _schedule(
    lengths: Optional[torch.Tensor], batch: int, seq_len: int
) -> tuple[Optional[torch.Tensor], list[int]]:
    """Row order (longest first) and, per step, how many leading rows still run."""
    if lengths is None:
        return None, [batch] * seq_len
    sorted_len, perm = torch.sort(lengths, descending=True, stable=True)
    len_list = sorted_len.tolist()
    counts, i = [], batch
    for t in range(seq_len):
        while i > 0 and len_list[i - 1] <= t:
            i -= 1
        counts.append(i)
    return perm, counts


def _rows(t: torch.Tensor, idx: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The rows ``idx`` (all when None) of a (B, ...) view, in ``dtype``."""
    return (t.index_select(0, idx) if idx is not None else t).to(dtype)


def _put_rows(dest: torch.Tensor, idx: Optional[torch.Tensor], src: torch.Tensor) -> None:
    if idx is None:
        dest.copy_(src)
    else:
        dest.index_copy_(0, idx, src.to(dest.dtype))


def _step_inputs(
    x: torch.Tensor, att: Optional[torch.Tensor], mask: Optional[torch.Tensor], t: int,
    idx: Optional[torch.Tensor], cdt: torch.dtype,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x and att of step t in ``cdt``; zeros at masked steps (padding is never read)."""
    x_t = _rows(x[:, t], idx, cdt)
    a = _rows(att[:, t : t + 1], idx, cdt) if att is not None else None
    if mask is not None:
        v = mask[:, t : t + 1]
        x_t = torch.where(v, x_t, 0)
        a = torch.where(v, a, 0) if a is not None else None
    return x_t, a


class _GRUScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        att: Optional[torch.Tensor],
        h0: Optional[torch.Tensor],
        weight_ih: torch.Tensor,
        weight_hh: torch.Tensor,
        bias_ih: Optional[torch.Tensor],
        bias_hh: Optional[torch.Tensor],
        lengths: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        mode: str,
        variant: str,
        return_states: bool,
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        ctx.set_materialize_grads(False)
        batch, seq_len, _ = x.shape
        hidden = weight_hh.shape[1]
        h2 = 2 * hidden
        cdt = compute_dtype(x.dtype)
        dev = x.device
        w_ih, w_hh = weight_ih.to(cdt), weight_hh.to(cdt)
        b_ih, b_hh = _cast(bias_ih, cdt), _cast(bias_hh, cdt)
        perm, counts = _schedule(lengths, batch, seq_len)
        padded = perm is not None and (seq_len == 0 or counts[-1] < batch)

        # b_hr, b_hz only ever add to gi's r and z parts; so does b_hn in the tensorflow
        # variant, where the reset gate acts before W_hn.
        b_gi = b_ih
        if b_hh is not None:
            extra = b_hh if variant == "tensorflow" else torch.cat([b_hh[:h2], b_hh.new_zeros(hidden)])
            b_gi = extra if b_ih is None else b_ih + extra
        b_hn = b_hh[h2:] if (b_hh is not None and variant == "paper") else None
        w_ih_t, w_rz_t, w_hn_t = w_ih.t(), w_hh[:h2].t(), w_hh[h2:].t()

        if h0 is not None:
            h = _rows(h0, perm, cdt).clone()
        else:
            h = torch.zeros(batch, hidden, dtype=cdt, device=dev)
        h_last = h.clone()  # rows of length 0 keep h0
        states = None
        if return_states:
            alloc = torch.zeros if (padded or mask is not None) else torch.empty
            states = alloc((batch, seq_len, hidden), dtype=x.dtype, device=dev)

        keep_gates = any(ctx.needs_input_grad[:7])
        saved = []
        for t, nb in enumerate(counts):
            if nb == 0:
                break
            idx = perm[:nb] if perm is not None else None
            h = h[:nb]
            x_t, a = _step_inputs(x, att, mask, t, idx, cdt)
            xs = x_t * a if mode == "aigru" else x_t
            gi = torch.addmm(b_gi, xs, w_ih_t) if b_gi is not None else torch.mm(xs, w_ih_t)
            rz = torch.addmm(gi[:, :h2], h, w_rz_t).sigmoid_()
            r, z = rz[:, :hidden], rz[:, hidden:]
            ghn = None
            if variant == "paper":
                ghn = torch.addmm(b_hn, h, w_hn_t) if b_hn is not None else torch.mm(h, w_hn_t)
                n = _tanh_(torch.addcmul(gi[:, h2:], r, ghn))
            else:
                n = _tanh_(torch.addmm(gi[:, h2:], r * h, w_hn_t))
            if mode in ("gru", "aigru"):
                h_new = torch.addcmul(n, z, h - n)
            elif mode == "agru":
                h_new = torch.addcmul(h, a, n - h)
            elif variant == "paper":
                h_new = torch.addcmul(h, z * a, n - h)
            else:
                h_new = torch.addcmul(n, z * (1 - a), h - n)
            v = None
            if mask is not None:
                v = mask[:, t : t + 1]
                h_new = torch.where(v, h_new, h)
            if states is not None:
                out = torch.where(v, h_new, 0) if v is not None else h_new
                _put_rows(states[:, t], idx, out)
            if keep_gates:
                saved.append((h, rz, n, ghn))
            h = h_new
            nb_next = counts[t + 1] if t + 1 < seq_len else 0
            if nb_next < nb:  # rows whose last step this was
                h_last[nb_next:nb] = h[nb_next:nb]
        h_last = h_last.to(x.dtype)
        if perm is not None:
            h_last = torch.empty_like(h_last).index_copy_(0, perm, h_last)

        if keep_gates:
            # Inputs go through save_for_backward (autograd checks they are not modified
            # in place); the per-step gates are this function's own intermediates.
            ctx.save_for_backward(x, att, mask, w_ih, w_hh, perm)
            ctx.steps = saved
            ctx.config = (mode, variant, weight_ih.dtype, h0 is not None, counts, padded)
        return states, h_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, d_states: Optional[torch.Tensor], d_h_last: Optional[torch.Tensor]):
        x, att, mask, w_ih, w_hh, perm = ctx.saved_tensors
        mode, variant, param_dtype, has_h0, counts, padded = ctx.config
        steps = ctx.steps
        batch, seq_len, input_size = x.shape
        x_dtype = x.dtype
        hidden = w_hh.shape[1]
        h2 = 2 * hidden
        cdt = w_hh.dtype
        dev = w_hh.device
        need = ctx.needs_input_grad
        alloc = torch.zeros if padded else torch.empty

        if d_h_last is not None:
            dh = _rows(d_h_last, perm, cdt).clone()
        else:
            dh = torch.zeros(batch, hidden, dtype=cdt, device=dev)
        want_dxs = need[0] or (mode == "aigru" and need[1])
        d_x = alloc((batch, seq_len, input_size), dtype=x_dtype, device=dev) if need[0] else None
        d_att = alloc((batch, seq_len), dtype=x_dtype, device=dev) if (need[1] and mode != "gru") else None
        d_w_ih = torch.zeros_like(w_ih)
        d_w_hh = torch.zeros_like(w_hh)
        d_b_ih = torch.zeros(3 * hidden, dtype=cdt, device=dev)
        d_b_hh = torch.zeros(3 * hidden, dtype=cdt, device=dev)
        w_hn, w_rz = w_hh[h2:], w_hh[:h2]

        for t in range(len(steps) - 1, -1, -1):
            nb = counts[t]
            idx = perm[:nb] if perm is not None else None
            h, rz, n, ghn = steps[t]
            x_t, a = _step_inputs(x, att, mask, t, idx, cdt)
            v = mask[:, t : t + 1] if mask is not None else None
            r, z = rz[:, :hidden], rz[:, hidden:]
            d = dh[:nb]
            if d_states is not None:
                d_out = _rows(d_states[:, t], idx, cdt)
                d = d + (torch.where(v, d_out, 0) if v is not None else d_out)
            # g: gradient reaching this step's update; a masked step passes d straight on.
            g = torch.where(v, d, 0) if v is not None else d
            da = None
            d_z = None
            if mode in ("gru", "aigru"):
                d_n, d_z, direct = g * (1 - z), g * (h - n), g * z
            elif mode == "agru":
                d_n, direct = g * a, g * (1 - a)
                da = (g * (n - h)).sum(1)
            elif variant == "paper":
                u = a * z
                d_n, d_u, direct = g * u, g * (n - h), g * (1 - u)
                d_z, da = d_u * a, (d_u * z).sum(1)
            else:
                u = (1 - a) * z
                d_n, d_u, direct = g * (1 - u), g * (h - n), g * u
                d_z, da = d_u * (1 - a), -(d_u * z).sum(1)
            if v is not None:
                direct = direct + d * ~v
            d_pre_n = d_n * (1 - n * n)
            d_pre_z = d_z * z * (1 - z) if d_z is not None else torch.zeros_like(d_n)
            if variant == "paper":
                d_pre_r = d_pre_n * ghn * r * (1 - r)
                d_gh = torch.cat([d_pre_r, d_pre_z, d_pre_n * r], dim=1)
                d_gi = torch.cat([d_pre_r, d_pre_z, d_pre_n], dim=1)
                torch.addmm(direct, d_gh, w_hh, out=dh[:nb])
                d_w_hh.addmm_(d_gh.t(), h)
                d_b_hh += d_gh.sum(0)
            else:
                # The reset gate multiplies h before W_hn: d(r h) feeds dr and dh_{t-1}.
                d_rh = d_pre_n @ w_hn
                d_gi = torch.cat([d_rh * h * r * (1 - r), d_pre_z, d_pre_n], dim=1)
                torch.addmm(torch.addcmul(direct, d_rh, r), d_gi[:, :h2], w_rz, out=dh[:nb])
                d_w_hh[:h2].addmm_(d_gi[:, :h2].t(), h)
                d_w_hh[h2:].addmm_(d_pre_n.t(), r * h)
                d_b_hh += d_gi.sum(0)
            xs = x_t * a if mode == "aigru" else x_t
            d_w_ih.addmm_(d_gi.t(), xs)
            d_b_ih += d_gi.sum(0)
            if want_dxs:
                d_xs = d_gi @ w_ih
                if mode == "aigru":
                    da = (d_xs * x_t).sum(1)
                    d_xs = d_xs * a
                if d_x is not None:
                    _put_rows(d_x[:, t], idx, d_xs)
            if d_att is not None:
                _put_rows(d_att[:, t], idx, da)

        d_h0 = None
        if has_h0 and need[2]:
            d_h0 = dh.to(x_dtype)
            if perm is not None:
                d_h0 = torch.empty_like(d_h0).index_copy_(0, perm, d_h0)
        return (
            d_x,
            d_att,
            d_h0,
            d_w_ih.to(param_dtype) if need[3] else None,
            d_w_hh.to(param_dtype) if need[4] else None,
            d_b_ih.to(param_dtype) if need[5] else None,
            d_b_hh.to(param_dtype) if need[6] else None,
            None,
            None,
            None,
            None,
            None,
        )


def gru_scan_cpu(
    x: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor] = None,
    bias_hh: Optional[torch.Tensor] = None,
    att: Optional[torch.Tensor] = None,
    *,
    mode: str = "gru",
    variant: str = "paper",
    lengths: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    h0: Optional[torch.Tensor] = None,
    return_states: bool = True,
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The scan of ``reference.gru_scan_reference`` with a fast CPU forward and backward.

    Takes the normalised arguments of ``op.gru_scan``; returns ``(states or None, h_last)``.
    """
    return _GRUScanCPU.apply(
        x, att, h0, weight_ih, weight_hh, bias_ih, bias_hh, lengths, mask, mode, variant, return_states
    )
