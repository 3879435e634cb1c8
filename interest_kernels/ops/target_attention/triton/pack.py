"""The kernels' parameter layout: every MLP weight in one packed row per group.

One ``torch.cat`` packs the weights a kernel reads (layout in ``layers.py``), so the
kernels take two pointers instead of a dozen, and the backward returns one packed
gradient that autograd splits back into the parameters (views, no copies) after a single
reduction over programs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def weight_row_size(dim: int, hidden: Sequence[int]) -> int:
    """Entries of one packed weight row (layers.py's layout)."""
    h = list(hidden) + [0] * (3 - len(hidden))
    return 2 * h[0] * dim + h[1] * h[0] + h[1] + h[2] * h[1] + h[2] + hidden[-1] + 1


def weight_prefix(dim: int, hidden: Sequence[int], layers: int) -> int:
    """Entries of a packed row that hold the first ``layers`` hidden layers."""
    h = list(hidden) + [0] * (3 - len(hidden))
    ends = [2 * h[0] * dim, 2 * h[0] * dim + h[1] * h[0] + h[1]]
    ends.append(ends[1] + h[2] * h[1] + h[2])
    return ends[layers - 1]


def act_prefix(hidden: Sequence[int], layers: int) -> int:
    """Entries of a packed activation row that hold the first ``layers`` layers."""
    return 3 * sum(hidden[:layers])


def pack_weights(w_kd: torch.Tensor, w_p: torch.Tensor,
                 layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 w_o: torch.Tensor, b_o: torch.Tensor) -> torch.Tensor:
    """(G, S) packed rows from grouped tensors: w_kd, w_p (G, H1, D); (w_l (G, H_l,
    H_{l-1}), c_l (G, H_l)) for layers 2..L; w_o (G, H_L); b_o (G,). One dtype: the
    parameters' own if they share one, else float32."""
    parts = [w_kd, w_p] + [t for pair in layers for t in pair] + [w_o, b_o.unsqueeze(1)]
    groups = w_kd.shape[0]
    dtypes = {t.dtype for t in parts}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return torch.cat([t.reshape(groups, -1).to(dtype) for t in parts], dim=1)


def pack_act_params(acts: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """(G, 3 * sum H_l) float32 from per-layer (G, 3, H_l) activation parameters."""
    if not acts:
        return None
    groups = acts[0].shape[0]
    return torch.cat([a.reshape(groups, -1).float() for a in acts], dim=1)
