"""Where the MBA SGD step's time goes, against torch's sparse SGD step (CPU, 1 thread).

Many interleaved rounds of two steps on a (rows, 64) float32 table, each on its own random
batch of ids: ``MBAEmbedding`` + ``MBASGD`` (lambda > 0) and ``nn.Embedding(sparse=True)``
+ ``torch.optim.SGD``. Each step is split into its backward (the autograd graph down to the
table: the same for both but for the last node) and its optimiser step, timed in process
CPU time (robust to the waits of a shared machine), with the page faults of each part.
Prints medians, the median of the per-round ratios, and mean faults.

    python bench/profile_mba_step.py --rows 2000000 --ids 8192 --rounds 300
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from interest_kernels.nn.mba_embedding import MBAEmbedding
from interest_kernels.optim import MBASGD


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--ids", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = nn.Embedding(args.rows, 64, sparse=True)
    weight = table.weight
    mba = MBAEmbedding.from_embedding(table)
    mba_opt = MBASGD([weight], lr=0.01, weight_decay=1e-4)
    torch_opt = torch.optim.SGD([weight], lr=0.01)
    gen = torch.Generator().manual_seed(0)
    parts = ("backward", "step", "backward + step")
    times = {m: {p: [] for p in parts} for m in ("mba", "torch")}
    faults = {m: {p: [] for p in parts[:2]} for m in ("mba", "torch")}
    for i in range(args.rounds + args.warmup):
        for method in ("mba", "torch") if i % 2 else ("torch", "mba"):
            ids = torch.randint(0, args.rows, (args.ids,), generator=gen)
            out = mba(ids) if method == "mba" else F.embedding(ids, weight, sparse=True)
            loss = out.square().sum() / args.ids
            f0, t0 = _faults(), time.process_time()
            loss.backward()
            t1, f1 = time.process_time(), _faults()
            if method == "mba":
                mba_opt.step()
            else:
                torch_opt.step()
                torch_opt.zero_grad()
            t2, f2 = time.process_time(), _faults()
            if i >= args.warmup:
                for part, ms in zip(parts, ((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3)):
                    times[method][part].append(ms)
                faults[method]["backward"].append(f1 - f0)
                faults[method]["step"].append(f2 - f1)
    print(f"{args.rows} x 64 float32, {args.ids} ids, {args.rounds} rounds, process CPU ms (p50)")
    print(f"{'part':16s} {'MBA':>8s} {'torch':>8s} {'ratio':>7s} {'paired':>7s} {'faults MBA / torch':>20s}")
    for part in parts:
        a, b = times["mba"][part], times["torch"][part]
        paired = statistics.median(x / y for x, y in zip(a, b))
        fault = ""
        if part in faults["mba"]:
            fa, fb = (statistics.fmean(faults[m][part]) for m in ("mba", "torch"))
            fault = f"{fa:.0f} / {fb:.0f}"
        print(f"{part:16s} {statistics.median(a):8.3f} {statistics.median(b):8.3f} "
              f"{statistics.median(a) / statistics.median(b):6.2f}x {paired:6.2f}x {fault:>20s}")


if __name__ == "__main__":
    main()
