"""Training-step (and forward) time of DIN, DIEN and DMIN, fused vs reference backend.

    python bench/bench_models.py [--models din dien dmin] [--batch-sizes 128 2048]
        [--history 100] [--devices cpu cuda] [--iters 5] [--threads N] [--out FILE.json]

One step = forward with the training loss (DIEN/DMIN: auxiliary loss included),
backward, the MBA step on the embedding tables and the Adam step on the rest, as
``interest_kernels.train`` runs it. ``forward`` = the eval-mode forward under no_grad
(serving). Inputs: random ids over realistic vocabularies (100k items, 1k categories,
10k users), histories of ``--history`` steps with lengths uniform in [history/2, history].
Both backends start from the same weights and batches; each step's loss is compared
(``max_step_loss_diff``). The two backends' steps alternate, so load changes on a
shared machine bias neither.

Prints a table and writes long-form rows (model, batch, history, backend, device,
mode, p20/p50/p80 ms, samples/s, the machine) to JSON; the default file name ends in
``.local.json``, which git ignores.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

import torch

from interest_kernels.bench.harness import environment, percentiles, sync
from interest_kernels.data import Batch, FeatureSpec
from interest_kernels.models import MODELS, CTRModel, make_optimizers, train_step

HERE = os.path.dirname(os.path.abspath(__file__))


def make_spec(history: int) -> FeatureSpec:
    gen = torch.Generator().manual_seed(0)
    item_category = torch.randint(1, 1_000, (100_000,), generator=gen)
    item_category[0] = 0
    return FeatureSpec(num_users=10_000, num_items=100_000, num_cats=1_000, context_sizes=(),
                       max_len=history, item_category=item_category)


def make_batch(spec: FeatureSpec, batch_size: int, history: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(history // 2, history + 1, (batch_size,), generator=gen)
    valid = torch.arange(history) < lengths[:, None]
    items = torch.randint(1, spec.num_items, (batch_size, history), generator=gen) * valid
    return Batch(
        user=torch.randint(1, spec.num_users, (batch_size,), generator=gen),
        item=torch.randint(1, spec.num_items, (batch_size,), generator=gen),
        cat=torch.randint(1, spec.num_cats, (batch_size,), generator=gen),
        hist_items=items,
        hist_cats=spec.item_category[items],
        lengths=lengths,
        context=torch.zeros(batch_size, 0, dtype=torch.int64),
        label=torch.randint(0, 2, (batch_size,), generator=gen).float(),
    )


def _step_fns(name: str, spec: FeatureSpec, backend: str, batches: list[Batch], device: torch.device,
              losses: list[float]) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)  # both backends start from the same weights
    model: CTRModel = MODELS[name](spec, backend=backend).to(device)
    sparse_opt, dense_opt = make_optimizers(model)
    counter = iter(range(10**9))
    # Each model keeps its own RNG stream (dropout), as the backends' steps interleave.
    rng = [torch.get_rng_state()]

    def timed_step() -> None:
        batch = batches[next(counter) % len(batches)]
        torch.set_rng_state(rng[0])
        model.train()
        loss = train_step(model, sparse_opt, dense_opt, batch)
        rng[0] = torch.get_rng_state()
        losses.append(float(loss))

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        model(batches[0])

    return {"train_step": timed_step, "forward": forward}


def bench_one(name: str, spec: FeatureSpec, batch_size: int, history: int, device: torch.device,
              warmup: int, iters: int) -> list[dict[str, Any]]:
    """Rows for both backends and both modes. The backends' calls alternate, so a change
    in the machine's load (a shared machine) biases neither."""
    batches = [make_batch(spec, batch_size, history, seed).to(device) for seed in range(4)]
    backends = ("fused", "reference")
    losses: dict[str, list[float]] = {b: [] for b in backends}
    fns = {b: _step_fns(name, spec, b, batches, device, losses[b]) for b in backends}
    rows = []
    for mode in ("train_step", "forward"):
        times: dict[str, list[float]] = {b: [] for b in backends}
        for i in range(warmup + iters):
            for b in backends:
                start = time.perf_counter()
                fns[b][mode]()
                sync(device)
                if i >= warmup:
                    times[b].append((time.perf_counter() - start) * 1e3)
        for b in backends:
            p20, p50, p80 = percentiles(times[b])
            rows.append(dict(
                model=name, batch=batch_size, history=history, backend=b, device=str(device), mode=mode,
                p20_ms=p20, p50_ms=p50, p80_ms=p80,
                samples_per_s=batch_size / p50 * 1e3,
            ))
    diff = max(abs(a - b) for a, b in zip(losses["fused"], losses["reference"]))
    for row in rows:
        row["max_step_loss_diff"] = diff
    return rows


def machine(device: torch.device) -> dict[str, Any]:
    return dict(device=str(device), threads=torch.get_num_threads(), **environment(device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 2048])
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU runs")
    p.add_argument("--out", help="JSON file (default bench/results/models_<devices>.local.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = make_spec(args.history)
    rows, machines = [], []
    for dev in args.devices:
        device = torch.device(dev)
        machines.append(machine(device))
        for batch_size in args.batch_sizes:
            for name in args.models:
                rows += bench_one(name, spec, batch_size, args.history, device, args.warmup, args.iters)
                _print(rows[-4:])
    out = args.out or os.path.join(HERE, "results", f"models_{'_'.join(args.devices)}.local.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machines": machines, "rows": rows}, f, indent=1)
    print()
    _print(rows, header=True)
    print(f"\nwrote {out}")


def _print(rows: list[dict[str, Any]], header: bool = False) -> None:
    if header:
        print(f"{'model':6}{'device':7}{'batch':>6}{'mode':>11}{'fused ms':>11}{'ref ms':>11}{'speed-up':>9}"
              f"{'fused samples/s':>17}")
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((r["model"], r["device"], r["batch"], r["mode"]), {})[r["backend"]] = r
    for (model, device, batch, mode), pair in by_key.items():
        f, ref = pair.get("fused"), pair.get("reference")
        if f is None or ref is None:
            continue
        print(f"{model:6}{device:7}{batch:>6}{mode:>11}{f['p50_ms']:11.1f}{ref['p50_ms']:11.1f}"
              f"{ref['p50_ms'] / f['p50_ms']:8.2f}x{f['samples_per_s']:17,.0f}", flush=True)


if __name__ == "__main__":
    main()
