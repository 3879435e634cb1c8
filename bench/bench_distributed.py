"""Training throughput on 1 and 2 processes (CPU, gloo): replicated or sharded tables, DDP.

    python bench/bench_distributed.py [--models din dien] [--batch-size 256] [--history 50]
        [--steps 30] [--rounds 2] [--out FILE.json]

Each configuration trains ``interest_kernels.train``'s trainer (the one the torchrun CLI
uses) on random ids over realistic vocabularies (100k items, 1k categories, 10k users)
with one torch thread per process, and reports samples/s of the global batch (median
step time of rank 0 after warm-up steps; each step ends with collectives, so the ranks'
steps take the same time). Configurations:

* ``1 proc, 1 thread``: one process, batch B;
* ``1 proc, 2 threads``: one process on the same two cores as two processes, batch 2B;
* ``2 procs``: two processes of batch B each (global batch 2B), tables replicated;
* ``2 procs, sharded``: the same with the tables sharded row-wise by torchrec
  (``--tables sharded``; skipped when torchrec is not installed).

Rounds alternate the configurations, so load changes on a shared machine bias none.
Writes long-form rows and the machine to JSON and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

from interest_kernels.bench.harness import environment
from interest_kernels.data import Dataset, FeatureSpec, Samples
from interest_kernels.distributed import init_from_env
from interest_kernels.distributed.sharded import torchrec_unavailable_reason
from interest_kernels.train import Trainer, TrainConfig

HERE = os.path.dirname(os.path.abspath(__file__))
WARMUP = 3


def make_dataset(samples: int, history: int) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    item_category = torch.randint(1, 1_000, (100_000,), generator=gen)
    item_category[0] = 0
    spec = FeatureSpec(num_users=10_000, num_items=100_000, num_cats=1_000, context_sizes=(),
                       max_len=history, item_category=item_category)
    lengths = torch.randint(history // 2, history + 1, (samples,), generator=gen)
    items = torch.randint(1, spec.num_items, (samples, history), generator=gen) * (torch.arange(history) < lengths[:, None])
    item = torch.randint(1, spec.num_items, (samples,), generator=gen)
    train = Samples(
        user=torch.randint(1, spec.num_users, (samples,), generator=gen), item=item, cat=item_category[item],
        hist_start=torch.arange(samples) * history, lengths=lengths,
        context=torch.zeros(samples, 0, dtype=torch.int64),
        label=torch.randint(0, 2, (samples,), generator=gen).float(),
        behaviour_items=items.flatten(), behaviour_cats=item_category[items].flatten(), max_len=history,
    )
    return Dataset(train, train, spec, {}, "random")


def step_times(trainer: Trainer, steps: int) -> list[float]:
    times = []
    while len(times) < steps + WARMUP:
        for batch in trainer.batches.epoch_batches():
            start = time.perf_counter()
            trainer.step(batch)
            times.append(time.perf_counter() - start)
            if len(times) == steps + WARMUP:
                break
    return times[WARMUP:]


def _rank(rank: int, world: int, port: int, config: TrainConfig, history: int, steps: int, out: str) -> None:
    from interest_kernels.distributed.trainer import DistributedTrainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    context = init_from_env("cpu")
    dataset = make_dataset(config.batch_size * world * (steps + WARMUP), history)
    times = step_times(DistributedTrainer(config, dataset, context), steps)
    if context.is_main:
        with open(out, "w") as f:
            json.dump(times, f)
    context.close()


def measure(config: TrainConfig, world: int, threads: int, history: int, steps: int) -> list[float]:
    """Step times (s) of ``world`` processes (``threads`` torch threads when one)."""
    if world == 1:
        torch.set_num_threads(threads)
        dataset = make_dataset(config.batch_size * (steps + WARMUP), history)
        return step_times(Trainer(config, dataset), steps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(HERE, "results", ".bench_distributed_times.local.json")
    mp.spawn(_rank, args=(world, port, config, history, steps, out), nprocs=world, join=True)
    with open(out) as f:
        times = json.load(f)
    os.remove(out)
    return times


def markdown(rows: list[dict], command: str, machine: dict) -> str:
    lines = [
        "# Distributed training throughput (CPU, gloo, replicated and sharded tables)", "",
        f"Command: `{command}`", "",
        f"Machine: {machine['device_name']}, {machine['cpus']} cores shared with other jobs (load average "
        f"{machine['load_before']:.1f} at the start), torch {machine['torch']}, git {machine['git_sha']}. "
        "With 2 cores, 2 processes compete with each other (and with the machine's other work) for the "
        "same cores: this measures the overhead of the exchange, not the scaling of a real cluster.", "",
        "| model | configuration | global batch | step ms (p50) | samples/s | vs 1 proc, 1 thread |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row['configuration']} | {row['global_batch']} | {row['step_ms_p50']:.1f} "
                     f"| {row['samples_per_s']:,.0f} | {row['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["din", "dien"])
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "distributed_cpu.local.json"),
                   help="JSON rows; the markdown table goes beside it (.md)")
    args = p.parse_args()
    machine = {**environment(torch.device("cpu")), "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    # (name, processes, threads per process, global batch in units of --batch-size, tables)
    configurations = [("1 proc, 1 thread", 1, 1, 1, "replicated"), ("1 proc, 2 threads", 1, 2, 2, "replicated"),
                      ("2 procs", 2, 1, 2, "replicated")]
    if torchrec_unavailable_reason() is None:
        configurations.append(("2 procs, sharded", 2, 1, 2, "sharded"))
    rows = []
    for model in args.models:
        base = TrainConfig(model=model, device="cpu", max_len=args.history)
        times: dict[str, list[float]] = {name: [] for name, *_ in configurations}
        for _ in range(args.rounds):
            for name, world, threads, scale, tables in configurations:
                config = dataclasses.replace(base, batch_size=args.batch_size * scale // world, tables=tables)
                times[name] += measure(config, world, threads, args.history, args.steps)
                print(f"{model} {name}: {statistics.median(times[name]) * 1e3:.1f} ms", flush=True)
        for name, world, threads, scale, tables in configurations:
            p50 = statistics.median(times[name])
            global_batch = args.batch_size * scale
            rows.append({"model": model, "configuration": name, "processes": world, "threads_per_process": threads, "tables": tables,
                         "global_batch": global_batch, "history": args.history, "step_ms_p50": p50 * 1e3,
                         "samples_per_s": global_batch / p50})
        first = rows[-len(configurations)]["samples_per_s"]
        for row in rows[-len(configurations):]:
            row["speedup"] = row["samples_per_s"] / first
    command = "python bench/bench_distributed.py " + " ".join(sys.argv[1:])
    with open(args.out, "w") as f:
        json.dump({"command": command, "machine": machine, "rows": rows}, f, indent=1)
    table = markdown(rows, command, machine)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
