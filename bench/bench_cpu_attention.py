"""CPU benchmark of target attention: the fused C++ kernel (the ``cpu`` backend) against
DeepCTR-Torch's ``AttentionSequencePoolingLayer`` on the same converted weights.

Cases (float32, every history full length):

* ``din``: B 1024, T 100, D 36, units (80, 40), sigmoid and Dice (training mode, batch
  statistics), forward (no grad) and forward + backward (every parameter and input);
* ``dien-attention``: the attention inside DIEN's ``InterestEvolving`` (B 512, T 100,
  D 36, units (64, 16), sigmoid, raw scores, the scores returned and differentiated,
  lengths spread evenly over 1..T; its floor counts the valid positions), forward and forward + backward;
* ``serving``: 1 user x 1,000 candidates, T 100, D 36, sigmoid, no grad. DeepCTR-Torch
  scores the history expanded to (1000, 100, 36); ours reads the one history row through
  ``key_index`` (and, for reference, the expanded history too).

With gradients the ``cpu`` backend lets the backward recompute the hidden layers; ``ours
(saving)`` is the same with ``SAVE_PRE_ACTIVATIONS`` on (the forward keeps the
pre-activations for the backward), the measurement behind that default. Dice in training
always keeps them.

Timing: ``--rounds`` interleaved rounds (each implementation once per round, order
rotating), medians (p20/p50/p80 reported) per thread count (1 and 2), wall-clock and the
process's CPU time. The floor is the FLOPs of SPEC's identity form (per position
``2 D H1 + 2 H1 H2 + 2 H2 + 2 D``; forward + backward counts 3x the forward, no
recomputation) at the rate of float32 GEMMs of the layer shapes on a cache-resident tile
(torch.mm, MKL), measured in the same run. On AMD CPUs MKL runs a non-AVX-512 path and
the fused kernels can pass this floor; ``bench/fma_peak.cpp`` measures the core's FMA
ceiling.

    python bench/bench_cpu_attention.py --out bench/results/cpu_attention.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

from interest_kernels import use_backend
from interest_kernels.bench.harness import environment, percentiles
from interest_kernels.nn.target_attention import TargetAttention
from interest_kernels.ops.target_attention import cpu as ta_cpu

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from peers import load_deepctr  # noqa: E402

D, UNITS, DIEN_UNITS = 36, (80, 40), (64, 16)


def identity_form_flops(positions: int, units=UNITS) -> float:
    h1, h2 = units
    return positions * (2 * D * h1 + 2 * h1 * h2 + 2 * h2 + 2 * D)


def gemm_rate(rounds: int, units: tuple[int, int] = UNITS) -> float:
    """FLOP/s of float32 GEMMs of the attention MLP's shapes on a cache-resident tile of
    2,048 positions ((P, D) x (D, H1) and (P, H1) x (H1, H2)), best of ``rounds`` x 20."""
    positions = 2048
    a1, b1 = torch.randn(positions, D), torch.randn(D, units[0])
    a2, b2 = torch.randn(positions, units[0]), torch.randn(units[0], units[1])
    c1, c2 = torch.empty(positions, units[0]), torch.empty(positions, units[1])
    flops = 20 * 2 * positions * (D * units[0] + units[0] * units[1])
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(20):
            torch.mm(a1, b1, out=c1)
            torch.mm(a2, b2, out=c2)
        best = min(best, time.perf_counter() - t0)
    return flops / best


def build(activation: str, training: bool, units=UNITS, return_score: bool = False):
    seq = load_deepctr("deepctr_torch.layers.sequence")
    peer = seq.AttentionSequencePoolingLayer(
        att_hidden_units=units, att_activation="Dice" if activation == "dice" else activation,
        weight_normalization=False, return_score=return_score, supports_masking=False,
        embedding_dim=D)
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0, 0.1)
    peer.train(training)
    ours = TargetAttention.from_deepctr(peer)
    ours.train(training)
    return peer, ours


def din_runners(activation: str, batch: int, seq_len: int) -> dict[str, dict[str, Callable[[], Any]]]:
    peer, ours = build(activation, training=True)
    q = torch.randn(batch, 1, D)
    k = torch.randn(batch, seq_len, D)
    lengths = torch.full((batch, 1), seq_len, dtype=torch.long)
    params_peer = list(peer.parameters())
    params_ours = list(ours.parameters())

    def fwd(mod):
        def run():
            with torch.no_grad():
                mod(q, k, lengths)
        return run

    def full(mod, params):
        qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)

        def run():
            out = mod(qg, kg, lengths)
            torch.autograd.grad(out.sum(), [qg, kg] + params)
        return run

    return {
        "fwd": {"deepctr": fwd(peer), "ours": fwd(ours)},
        "fwd+bwd": {"deepctr": full(peer, params_peer), "ours": full(ours, params_ours),
                    "ours (saving)": saving(full(ours, params_ours))},
    }


def saving(run: Callable[[], Any]) -> Callable[[], Any]:
    """``run`` with the forward keeping the pre-activations for the backward."""
    def wrapped():
        ta_cpu.SAVE_PRE_ACTIVATIONS = True
        try:
            run()
        finally:
            ta_cpu.SAVE_PRE_ACTIVATIONS = False
    return wrapped


def dien_lengths(batch: int, seq_len: int) -> torch.Tensor:
    """History lengths of the DIEN case: spread evenly over 1..T."""
    return 1 + (torch.arange(batch) * 37) % seq_len


def dien_runners(batch: int, seq_len: int) -> dict[str, dict[str, Callable[[], Any]]]:
    """The attention of DIEN's InterestEvolving: only the scores are used."""
    peer, ours = build("sigmoid", training=True, units=DIEN_UNITS, return_score=True)
    ours.return_scores = True
    q = torch.randn(batch, 1, D)
    k = torch.randn(batch, seq_len, D)
    lengths = dien_lengths(batch, seq_len).reshape(batch, 1)
    w = torch.randn(batch, seq_len)  # a fixed linear read-out of the scores
    params_peer, params_ours = list(peer.parameters()), list(ours.parameters())

    def fwd(mod, pick):
        def run():
            with torch.no_grad():
                pick(mod(q, k, lengths))
        return run

    def full(mod, params, pick):
        qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)

        def run():
            scores = pick(mod(qg, kg, lengths))
            torch.autograd.grad((scores * w).sum(), [qg, kg] + params)
        return run

    peer_scores = lambda out: out.squeeze(1)  # noqa: E731  (B, 1, T)
    our_scores = lambda out: out[1]  # noqa: E731
    return {
        "fwd": {"deepctr": fwd(peer, peer_scores), "ours": fwd(ours, our_scores)},
        "fwd+bwd": {"deepctr": full(peer, params_peer, peer_scores),
                    "ours": full(ours, params_ours, our_scores),
                    "ours (saving)": saving(full(ours, params_ours, our_scores))},
    }


def serving_runners(candidates: int, seq_len: int) -> dict[str, dict[str, Callable[[], Any]]]:
    peer, ours = build("sigmoid", training=False)
    q = torch.randn(candidates, 1, D)
    history = torch.randn(1, seq_len, D)
    expanded = history.expand(candidates, seq_len, D).contiguous()
    lengths_one = torch.full((1,), seq_len, dtype=torch.long)
    lengths_all = torch.full((candidates, 1), seq_len, dtype=torch.long)
    key_index = torch.zeros(candidates, dtype=torch.long)

    def run_peer():
        with torch.no_grad():
            peer(q, expanded, lengths_all)

    def run_shared():
        with torch.no_grad():
            ours(q, history, lengths_one, key_index=key_index)

    def run_expanded():
        with torch.no_grad():
            ours(q, expanded, lengths_all)

    return {"no-grad": {"deepctr": run_peer, "ours (key_index)": run_shared, "ours (expanded)": run_expanded}}


def interleaved(runners: dict[str, Callable[[], Any]], rounds: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU times (ms) of each runner, rounds interleaved."""
    names = list(runners)
    for fn in runners.values():
        fn()  # warm-up
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            t0, c0 = time.perf_counter(), time.process_time()
            runners[name]()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--out", default="bench/results/cpu_attention.local.json")
    args = ap.parse_args()

    rows: list[dict] = []
    load_start = os.getloadavg()
    for threads in args.threads:
        torch.set_num_threads(threads)
        rate = gemm_rate(10)
        cases = [(f"din-{a}", args.batch, din_runners(a, args.batch, args.seq_len))
                 for a in ("sigmoid", "dice")]
        cases = [(c, b, r, UNITS, b * args.seq_len) for c, b, r in cases]
        dien_batch = args.batch // 2
        cases.append(("dien-attention", dien_batch, dien_runners(dien_batch, args.seq_len), DIEN_UNITS,
                      int(dien_lengths(dien_batch, args.seq_len).sum())))
        cases.append(("serving", args.candidates, serving_runners(args.candidates, args.seq_len), UNITS,
                      args.candidates * args.seq_len))
        with use_backend("cpu"):
            for case, batch, modes, units, positions in cases:
                for mode, runners in modes.items():
                    times, cpu_times = interleaved(runners, args.rounds)
                    base = statistics.median(times["deepctr"])
                    cpu_base = statistics.median(cpu_times["deepctr"])
                    flops = identity_form_flops(positions, units) * (3 if mode == "fwd+bwd" else 1)
                    floor_ms = flops / rate * 1e3
                    for impl, t in times.items():
                        p20, p50, p80 = percentiles(t)
                        cpu_p50 = statistics.median(cpu_times[impl])
                        row = dict(case=case, mode=mode, impl=impl, threads=threads, batch=batch,
                                   seq_len=args.seq_len, dim=D, units=list(units),
                                   p20_ms=p20, p50_ms=p50, p80_ms=p80,
                                   speedup_vs_deepctr=base / p50, floor_ms=floor_ms,
                                   cpu_p50_ms=cpu_p50, cpu_speedup_vs_deepctr=cpu_base / cpu_p50,
                                   fraction_of_floor=floor_ms / p50, gemm_gflops=rate / 1e9)
                        rows.append(row)
                        print(f"{threads}t {case:12s} {mode:8s} {impl:18s} p50 {p50:8.2f} ms  "
                              f"x{base / p50:5.2f} vs deepctr  floor {floor_ms:6.2f} ms "
                              f"({floor_ms / p50:5.1%})  cpu {cpu_p50:8.2f} ms x{cpu_base / cpu_p50:5.2f}",
                              flush=True)
    load = {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]}
    result = {"command": " ".join(["python"] + sys.argv), "env": environment(torch.device("cpu")),
              "rounds": args.rounds, "load_average_1_5_15min": load, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    md = args.out.replace(".json", ".md")
    with open(md, "w") as f:
        f.write(f"# CPU target attention vs DeepCTR-Torch\n\n`{result['command']}`  \n"
                f"{result['env']}, {args.rounds} interleaved rounds, medians; float32, histories full "
                f"length (dien-attention: lengths spread over 1..T). Load average (1, 5, 15 min) at start {load['start']}, at end {load['end']} "
                f"({os.cpu_count()} cores). Floor: FLOPs of the identity form (fwd+bwd: 3x fwd) at the GEMM rate "
                "measured in the same run. CPU ms: the process's CPU time per call (all threads; with 1 "
                "thread it is not inflated when other jobs time-slice the core, as wall-clock time is).\n\n"
                "| threads | case | mode | impl | p50 ms | p20-p80 ms | vs DeepCTR | floor ms | of floor "
                "| CPU ms | vs DeepCTR (CPU) |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['threads']} | {r['case']} | {r['mode']} | {r['impl']} | {r['p50_ms']:.2f} | "
                    f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f} | {r['speedup_vs_deepctr']:.2f}x | "
                    f"{r['floor_ms']:.2f} | {r['fraction_of_floor']:.0%} | {r['cpu_p50_ms']:.2f} | "
                    f"{r['cpu_speedup_vs_deepctr']:.2f}x |\n")
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
