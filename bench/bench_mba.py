"""CPU benchmark of the MBA sparse optimiser steps (SPEC section 5).

One step = backward of a lookup into a (N, 64) float32 table + the optimiser update,
timed per step (the forward runs outside the timer) in wall time and in the process's
CPU time (which, on a machine shared with other jobs, leaves out the time the step waited
for a core); the sparse SGD steps run in interleaved rounds, each on its own random
batches, and their rows also give the median over rounds of each round's ratio to torch's
step (``paired_ratio_p50``, wall and CPU). Compared:

* SGD: ``MBAEmbedding`` + ``MBASGD`` (lambda > 0), ``nn.Embedding(sparse=True)`` +
  ``MBASGD``, torch's unregularised sparse SGD (``nn.Embedding(sparse=True)`` +
  ``torch.optim.SGD``), and torch's dense SGD with ``weight_decay`` (what L2 costs
  without MBA: a dense (N, D) gradient and a pass over the whole table).
* Adagrad: ``MBAAdagrad`` vs ``torch.optim.Adagrad`` on the sparse gradient.
* Adam: ``MBAAdam`` vs ``torch.optim.SparseAdam``.

Writes long-form rows to bench/results/mba_cpu.local.json (not committed; pass --out to
name a results file) and prints a table.

    python bench/bench_mba.py                      # 1M, 2M, 10M rows; 4k and 64k ids
    python bench/bench_mba.py --rows 1000000 --ids 4096 --iters 5
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from interest_kernels import _extension
from interest_kernels.bench.harness import environment, percentiles
from interest_kernels.nn.mba_embedding import MBAEmbedding
from interest_kernels.optim import MBAAdagrad, MBAAdam, MBASGD

DIM = 64
LAM = 1e-4


def _time_steps(
    step: Callable[[torch.Tensor], None], batches: list[torch.Tensor], lookup, warmup: int,
) -> tuple[list[float], list[float]]:
    """Wall and CPU milliseconds of backward + update per batch (forward excluded)."""
    wall, cpu = [], []
    for i, ids in enumerate(batches):
        out = lookup(ids)
        loss = out.square().sum() / ids.shape[0]
        start, start_cpu = time.perf_counter(), time.process_time()
        loss.backward()
        step(ids)
        if i >= warmup:
            wall.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - start_cpu) * 1e3)
    return wall, cpu


def _run_case(rows: int, ids_per_batch: int, iters: int, warmup: int, which: set[str]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, rows, (ids_per_batch,), generator=gen) for _ in range(iters + warmup)]
    unique = int(torch.unique(batches[0]).numel())
    table = nn.Embedding(rows, DIM, sparse=True)
    weight = table.weight
    mba = MBAEmbedding.from_embedding(table)  # the same Parameter, gradient rows to the optimiser
    results = []

    def record(optimizer: str, method: str, ms: tuple[list[float], list[float]], **extra: float) -> None:
        wall, cpu = ms
        results.append({
            "op": "mba_step", "optimizer": optimizer, "method": method, "num_rows": rows, "dim": DIM,
            "batch_ids": ids_per_batch, "unique_ids": unique, "dtype": "float32",
            **dict(zip(("ms_p20", "ms_p50", "ms_p80"), percentiles(wall))),
            **dict(zip(("cpu_ms_p20", "cpu_ms_p50", "cpu_ms_p80"), percentiles(cpu))), **extra,
        })
        print(f"  {optimizer:8s} {method:34s} p50 {results[-1]['ms_p50']:9.2f} ms, CPU {results[-1]['cpu_ms_p50']:9.2f} ms",
              flush=True)

    def sparse_lookup(ids):
        return F.embedding(ids, weight, sparse=True)

    def clear():
        weight.grad = None
        gc.collect()

    if "sgd" in which:
        # The three sparse steps in interleaved rounds (order rotating, each method on its
        # own batches, so no method finds rows another just brought into cache).
        own = {m: [torch.randint(0, rows, (ids_per_batch,), generator=gen) for _ in range(iters + warmup)]
               for m in ("mba (MBAEmbedding)", "mba (Embedding sparse=True)", "torch sparse, no regularisation")}
        mba_opt = MBASGD([weight], lr=0.01, weight_decay=LAM)
        sparse_opt = MBASGD([weight], lr=0.01, weight_decay=LAM)
        torch_opt = torch.optim.SGD([weight], lr=0.01)
        steps = {
            "mba (MBAEmbedding)": (lambda ids: mba_opt.step(), mba),
            "mba (Embedding sparse=True)": (lambda ids: (sparse_opt.step(), sparse_opt.zero_grad()), sparse_lookup),
            "torch sparse, no regularisation": (lambda ids: (torch_opt.step(), torch_opt.zero_grad()), sparse_lookup),
        }
        wall: dict[str, list[float]] = {m: [] for m in steps}
        cpu: dict[str, list[float]] = {m: [] for m in steps}
        names = list(steps)
        for i in range(iters + warmup):
            for j in range(len(names)):
                m = names[(i + j) % len(names)]
                step, lookup = steps[m]
                w, c = _time_steps(step, [own[m][i]], lookup, 1 if i < warmup else 0)
                wall[m] += w
                cpu[m] += c
        base = names[-1]
        for m in names:
            record("sgd", m, (wall[m], cpu[m]),
                   paired_ratio_p50=statistics.median(a / b for a, b in zip(wall[m], wall[base])),
                   cpu_paired_ratio_p50=statistics.median(a / b for a, b in zip(cpu[m], cpu[base])))
        del mba_opt, sparse_opt, torch_opt
        clear()
        opt = torch.optim.SGD([weight], lr=0.01, weight_decay=LAM)
        dense_batches = batches[: max(2, min(len(batches), 4))]
        record("sgd", "torch dense, weight_decay", _time_steps(
            lambda ids: (opt.step(), opt.zero_grad()), dense_batches, lambda ids: F.embedding(ids, weight), 1))
        del opt
        clear()
    if "adagrad" in which:
        opt = MBAAdagrad([weight], lr=0.01, weight_decay=LAM)
        record("adagrad", "mba (MBAEmbedding)", _time_steps(lambda ids: opt.step(), batches, mba, warmup))
        del opt
        clear()
        opt = torch.optim.Adagrad([weight], lr=0.01)
        record("adagrad", "torch sparse, no regularisation", _time_steps(lambda ids: (opt.step(), opt.zero_grad()), batches, sparse_lookup, warmup))
        del opt
        clear()
    if "adam" in which:
        opt = MBAAdam([weight], lr=0.01, weight_decay=LAM)
        record("adam", "mba (MBAEmbedding)", _time_steps(lambda ids: opt.step(), batches, mba, warmup))
        del opt
        clear()
        opt = torch.optim.SparseAdam([weight], lr=0.01)
        record("adam", "torch SparseAdam, no regularisation", _time_steps(lambda ids: (opt.step(), opt.zero_grad()), batches, sparse_lookup, warmup))
        del opt
        clear()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 2_000_000, 10_000_000])
    parser.add_argument("--ids", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adagrad", "adam"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "mba_cpu.local.json"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not _extension.load():
        print(f"warning: {_extension.unavailable_reason()}; MBA runs the eager reference")
    env = environment(torch.device("cpu"))
    meta = {
        "torch": env["torch"], "threads": torch.get_num_threads(), "machine": env["device_name"],
        "git_sha": env["git_sha"], "backend": "cpu" if _extension.load() else "reference",
    }
    rows = []
    for n in args.rows:
        for k in args.ids:
            print(f"table {n} x {DIM} float32, {k} ids per batch", flush=True)
            rows += [dict(r, **meta) for r in _run_case(n, k, args.iters, args.warmup, set(args.optimizers))]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\n{'optimizer':9s} {'method':36s} {'rows':>9s} {'ids':>6s} {'p50 ms':>9s} {'vs torch sparse':>15s}"
          f" {'CPU p50 ms':>10s} {'CPU vs torch':>12s} {'paired wall / CPU':>18s}")
    for r in rows:
        base = next((b for b in rows if b["optimizer"] == r["optimizer"] and b["num_rows"] == r["num_rows"]
                     and b["batch_ids"] == r["batch_ids"] and b["method"].startswith("torch") and "dense" not in b["method"]), None)
        ratio = f"{r['ms_p50'] / base['ms_p50']:.2f}x" if base else ""
        cpu_ratio = f"{r['cpu_ms_p50'] / base['cpu_ms_p50']:.2f}x" if base else ""
        paired = f"{r['paired_ratio_p50']:.2f}x / {r['cpu_paired_ratio_p50']:.2f}x" if "paired_ratio_p50" in r else ""
        print(f"{r['optimizer']:9s} {r['method']:36s} {r['num_rows']:9d} {r['batch_ids']:6d} {r['ms_p50']:9.2f} {ratio:>15s}"
              f" {r['cpu_ms_p50']:10.2f} {cpu_ratio:>12s} {paired:>18s}")
    print(f"\nwrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
