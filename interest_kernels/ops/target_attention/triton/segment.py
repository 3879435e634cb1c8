"""Key gradients of a shared history: per-row gradients summed into their history rows.

With ``key_index`` several queries read one history row, so the backward kernel writes
one key gradient per query row and this kernel adds them up per history row in a fixed
order (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...traceable_triton import wrap_triton


@triton.jit(do_not_specialize=["TD"])
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


def sum_rows_by_history(dk_rows: torch.Tensor, key_index: torch.Tensor, heads: int,
                        n_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum per-row key gradients (R, T, D) into their key rows (n_keys, T, D); row
    r = b*E + e belongs to key row key_index[b]*E + e. No host synchronisation."""
    rows, seq_len, dim = dk_rows.shape
    dev = dk_rows.device
    head = torch.arange(heads, device=dev)
    key_row = (key_index.clamp(0, max(n_keys // heads - 1, 0)).reshape(-1, 1) * heads
               + head).reshape(-1)  # (R,)
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
    wrap_triton(_segment_sum_kernel)[(n_keys, triton.cdiv(td, block))](
        dk_rows, order, start, dst, td, BLOCK=block)
    return dst
