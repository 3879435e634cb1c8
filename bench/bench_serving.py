"""Serving latency of DIN: eager, torch.compile, the AOTInductor package, DeepCTR-Torch.

    python bench/bench_serving.py [--history 50] [--threads 1] [--budget 2] [--out bench/results/serving_cpu]

Cases (CPU): one user x {100, 1000} candidates (``score_candidates``: the user's history
read once; DeepCTR scores the expanded (N, T, D) batch, as it has no shared-history form)
and batches of {1, 256, 4096} requests, each with its own user and history (the
``score`` entry point). Per case and contender: latency p50/p99 over repeated calls
(warm-up excluded), throughput = scored rows / mean latency. Contenders run interleaved
in rounds, so load changes on a shared machine bias none of them.

Contenders, all with the same weights (the model: DIN with the paper's sizes: embeddings
18 per field (D = 36), attention (80, 40) sigmoid, MLP (200, 80) Dice; 100k items, 1k
categories, 10k users; histories of ``--history`` steps, lengths uniform in [T/2, T]):

* ``eager``: the module under ``torch.no_grad`` (fused CPU backend).
* ``compile``: ``torch.compile`` (Inductor, ``dynamic=True``) of the same module.
* ``package``: the AOTInductor package of ``python -m interest_kernels.export``,
  loaded with ``torch._inductor.package.load_package`` (the C++ runner ``ik_serve`` runs the
  same package; the Python call adds a few microseconds).
* ``deepctr``: DeepCTR-Torch's ``AttentionSequencePoolingLayer`` (weights copied) between
  the same ``nn.Embedding`` lookups and the same Linear + Dice MLP that DeepCTR's DIN
  runs, in eager. Its scores are checked against ours (``max_diff``).

Writes ``OUT.json`` (rows + machine) and ``OUT.md`` (a table).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch
from torch._inductor.package import load_package
from torch.nn import functional as F

from interest_kernels.bench.harness import environment
from interest_kernels.export import CandidateScoringModule, ScoringModule, export_package
from interest_kernels.models import DIN

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from bench_models import make_batch, make_spec  # noqa: E402
from peers import load_deepctr  # noqa: E402

CANDIDATES = (100, 1000)
BATCHES = (1, 256, 4096)


class DeepCTRDIN(torch.nn.Module):
    """Our DIN's weights in DeepCTR-Torch's attention layer, with the same embedding
    lookups and MLP: the eager baseline a DeepCTR user serves."""

    def __init__(self, model: DIN) -> None:
        super().__init__()
        seq = load_deepctr("deepctr_torch.layers.sequence")
        att = model.attention
        self.model = model
        self.attention = seq.AttentionSequencePoolingLayer(
            att_hidden_units=att.hidden_units, att_activation="sigmoid", weight_normalization=False,
            embedding_dim=model.behaviour_dim,
        )
        with torch.no_grad():
            for ours, theirs in zip(att.layers, self.attention.local_att.dnn.linears):
                theirs.weight.copy_(ours.weight)
                theirs.bias.copy_(ours.bias)
            self.attention.local_att.dense.weight.copy_(att.score.weight)
            self.attention.local_att.dense.bias.copy_(att.score.bias)
        self.eval()

    def forward(self, user, item, cat, hist_items, hist_cats, lengths, context):
        m = self.model
        target = torch.cat([F.embedding(item, m.item_embedding.weight), F.embedding(cat, m.cat_embedding.weight)], -1)
        hist = torch.cat([F.embedding(hist_items, m.item_embedding.weight),
                          F.embedding(hist_cats, m.cat_embedding.weight)], -1)
        interest = self.attention(target[:, None], hist, lengths[:, None])[:, 0]
        profile = F.embedding(user, m.user_embedding.weight)
        x = torch.cat([profile, target, hist.sum(1), interest], -1)
        return torch.sigmoid(m.mlp(x))


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench_case(contenders: dict[str, Callable[[], torch.Tensor]], budget_s: float, min_reps: int = 5):
    """Latencies (ms) per contender, rounds interleaved until each has ``budget_s`` of
    samples (and at least ``min_reps``)."""
    for fn in contenders.values():  # warm-up
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    spent = dict.fromkeys(contenders, 0.0)
    while min(spent.values()) < budget_s or min(len(t) for t in times.values()) < min_reps:
        for name, fn in contenders.items():
            if spent[name] >= budget_s and len(times[name]) >= min_reps:
                continue
            ms = _timed(fn)
            times[name].append(ms)
            spent[name] += ms / 1e3
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, default=2.0, help="seconds of samples per contender and case")
    p.add_argument("--package", help="reuse this package (exported from the same seed) instead of exporting")
    p.add_argument("--out", default=os.path.join(HERE, "results", "serving_cpu.local"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = make_spec(args.history)
    model = DIN(spec).eval()
    scoring, candidates = ScoringModule(model), CandidateScoringModule(model)
    baseline = DeepCTRDIN(model)

    start = time.perf_counter()
    compiled_score = torch.compile(scoring, dynamic=True)
    compiled_cand = torch.compile(candidates, dynamic=True)
    package = args.package
    if package is None:
        package = os.path.join(tempfile.mkdtemp(prefix="ik_bench_"), "din.pt2")
        export_package(model, package)
        print(f"exported the package in {time.perf_counter() - start:.0f} s", flush=True)
    score_pkg = load_package(package, "score")
    cand_pkg = load_package(package, "candidates")

    rows = []
    cases = [("candidates", n) for n in CANDIDATES] + [("batch", b) for b in BATCHES]
    for kind, n in cases:
        if kind == "candidates":
            user = make_batch(spec, 1, args.history, seed=n)
            item = torch.randint(1, spec.num_items, (n,))
            cat = spec.item_category[item]
            cand_args = (user.user, user.hist_items, user.hist_cats, user.lengths, user.context, item, cat,
                         torch.zeros(n, dtype=torch.int64))
            expanded = (user.user.expand(n), item, cat, user.hist_items.expand(n, -1), user.hist_cats.expand(n, -1),
                        user.lengths.expand(n), user.context.expand(n, -1))
            contenders = {
                "eager": lambda: candidates(*cand_args),
                "compile": lambda: compiled_cand(*cand_args),
                "package": lambda: cand_pkg(*cand_args),
                "deepctr": lambda: baseline(*expanded),
            }
        else:
            batch = make_batch(spec, n, args.history, seed=n)
            score_args = tuple(batch[:7])
            contenders = {
                "eager": lambda: scoring(*score_args),
                "compile": lambda: compiled_score(*score_args),
                "package": lambda: score_pkg(*score_args),
                "deepctr": lambda: baseline(*score_args),
            }
        with torch.no_grad():
            outputs = {name: fn() for name, fn in contenders.items()}
            reference = outputs["eager"]
            times = bench_case(contenders, args.budget)
        for name, ts in times.items():
            ts_sorted = sorted(ts)
            p99 = ts_sorted[min(len(ts_sorted) - 1, int(round(0.99 * (len(ts_sorted) - 1))))]
            row = {
                "case": f"1 user x {n} candidates" if kind == "candidates" else f"batch of {n} requests",
                "kind": kind, "rows": n, "history": args.history, "contender": name, "reps": len(ts),
                "p50_ms": statistics.median(ts), "p99_ms": p99,
                "rows_per_s": n / (statistics.fmean(ts) / 1e3),
                "max_diff": float((outputs[name].float() - reference).abs().max()),
            }
            rows.append(row)
            print(f"{row['case']:>26} {name:>8}: p50 {row['p50_ms']:9.3f} ms  p99 {row['p99_ms']:9.3f} ms  "
                  f"{row['rows_per_s']:12.0f} rows/s  ({len(ts)} reps, max diff {row['max_diff']:.1e})", flush=True)

    env = environment(torch.device("cpu"))
    env["threads"] = args.threads
    with open(args.out + ".json", "w") as f:
        json.dump({"command": " ".join(["python", "bench/bench_serving.py"] + sys.argv[1:]), "environment": env,
                   "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rows, env, " ".join(["python", "bench/bench_serving.py"] + sys.argv[1:])))
    print(f"wrote {args.out}.json and .md")
    return 0


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    lines = [
        "# Serving latency, DIN, CPU", "",
        f"`{command}`", "",
        f"torch {env.get('torch')}, {env.get('threads')} thread(s), {env.get('device_name', env.get('cpu', ''))}.", "",
        "| case | contender | p50 ms | p99 ms | rows/s | p50 speed-up vs DeepCTR | reps | max diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["case"]: r["p50_ms"] for r in rows if r["contender"] == "deepctr"}
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['contender']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['rows_per_s']:.0f} | "
            f"{base[r['case']] / r['p50_ms']:.1f}x | {r['reps']} | {r['max_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
