"""The fused C++ target attention operators called directly (no module, no autograd), timed
by the thread's CPU time: on the shared 2-core VM a busy neighbour time-slices our thread,
which inflates wall-clock times but not the CPU time the thread itself used. Run it in two
builds (one after the other, or alternating) for an A/B of kernel changes.

Cases (float32, sigmoid, 1 thread):

* ``dien``: the attention of DIEN's ``InterestEvolving``: B 512, T 100, D 36, units
  (64, 16), raw scores, lengths spread evenly over 1..T; forward, and the recomputing
  backward (``target_attention_cpu_backward``);
* ``din``: B 1024, T 100, D 36, units (80, 40), softmax, full histories; forward, and the
  saving training operator's forward and backward;
* ``serving``: 1 user x 1,000 candidates, T 100, the history read through ``key_index``.

    python bench/time_cpu_attention_ops.py --rounds 11
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

from interest_kernels.ops.target_attention import cpu as ta_cpu

OPS = torch.ops.interest_kernels


def canonical_args(batch: int, seq_len: int, dim: int, units: tuple[int, ...], lengths: torch.Tensor,
                   rows: int | None = None, key_index: torch.Tensor | None = None,
                   seed: int = 0) -> list:
    """The operators' arguments (query (B, 1, D), keys (R, 1, T, D), ...), one MLP."""
    g = torch.Generator().manual_seed(seed)
    widths = (4 * dim,) + units
    return [torch.randn(batch, 1, dim, generator=g), torch.randn(rows or batch, 1, seq_len, dim, generator=g),
            key_index, lengths, None,
            [torch.randn(1, widths[i + 1], widths[i], generator=g) * widths[i] ** -0.5 for i in range(len(units))],
            [0.1 * torch.randn(1, h, generator=g) for h in units],
            torch.randn(1, units[-1], generator=g), torch.randn(1, generator=g), []]


def runners() -> dict[str, Callable[[], object]]:
    dien = canonical_args(512, 100, 36, (64, 16), 1 + (torch.arange(512) * 37) % 100)
    din = canonical_args(1024, 100, 36, (80, 40), torch.full((1024,), 100))
    serving = canonical_args(1000, 100, 36, (80, 40), torch.full((1,), 100), rows=1,
                             key_index=torch.zeros(1000, dtype=torch.long))
    out, scores = OPS.target_attention_cpu(*dien, "sigmoid", "none")
    go, gs = torch.randn_like(out), torch.randn_like(scores)
    t_out, t_scores, pre, stats = OPS.target_attention_cpu_train(*din, "sigmoid", "softmax", None)
    tgo, tgs = torch.randn_like(t_out), torch.randn_like(t_scores)
    return {
        "dien fwd": lambda: OPS.target_attention_cpu(*dien, "sigmoid", "none"),
        "dien bwd (recomputing)": lambda: OPS.target_attention_cpu_backward(go, gs, scores, *dien, "sigmoid", "none"),
        "din fwd": lambda: OPS.target_attention_cpu(*din, "sigmoid", "softmax"),
        "din train fwd (saving)": lambda: OPS.target_attention_cpu_train(*din, "sigmoid", "softmax", None),
        "din train bwd (saved)": lambda: OPS.target_attention_cpu_train_backward(
            tgo, tgs, t_scores, pre, stats, *din, "sigmoid", "softmax", None),
        "serving fwd (key_index)": lambda: OPS.target_attention_cpu(*serving, "sigmoid", "softmax"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    torch.set_num_threads(1)
    reason = ta_cpu.unavailable_reason()
    if reason:
        raise SystemExit(reason)
    runs = runners()
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            t0 = time.thread_time()
            fn()
            times[name].append((time.thread_time() - t0) * 1e3)
    print(f"{args.rounds} interleaved rounds, thread CPU time, medians; load average {os.getloadavg()}")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} |")


if __name__ == "__main__":
    main()
