"""CPU benchmark of the GRU-family scan (SPEC section 2) and DIEN's interest-evolving layer.

Contenders, float32, at B 512, T 100 and H = D in (36, 128), on 1 and 2 threads:

* ``layer``: DIEN's ``InterestEvolving`` with AUGRU (target attention, then the AUGRU over
  the behaviours): DeepCTR-Torch 0.3.0's layer against ``nn.InterestEvolving.from_deepctr``
  of it (same weights), lengths uniform in [1, T].
* ``scan``: the AUGRU scan alone, our ``gru_scan`` (cpu backend) with the same lengths.
* ``full``: every row of full length T: our scan in modes gru and augru against
  ``torch.nn.GRU`` (no attention; oneDNN/MKL's fused GRU on CPU) on the same (B, T, H).

Modes: ``fwd`` (grad mode off, as serving runs it) and ``fwd+bwd`` (forward with grad,
then backward of a random upstream gradient). Each round runs every contender once in
turn (interleaved), after warm-up; the tables give medians over the rounds. The floor is
the scan's GEMM FLOPs (2 * N * 3H * (I + H) forward, 3x that forward+backward, N the valid
steps) at the float32 rate of a 1024^3 matmul measured in the same run.

    python bench/bench_cpu_gru.py                   # writes bench/results/cpu_gru.local.json
    python bench/bench_cpu_gru.py --rounds 9 --out bench/results/cpu_gru.json --md bench/results/cpu_gru.md
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from interest_kernels.bench.harness import environment  # noqa: E402
from interest_kernels.nn.gru import InterestEvolving  # noqa: E402
from interest_kernels.ops.gru_scan.op import OP, gru_scan  # noqa: E402
from peers import load_deepctr  # noqa: E402

B, T = 512, 100


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _forward(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


def _forward_backward(fn: Callable[[], Any], leaves: list[torch.Tensor]) -> Callable[[], Any]:
    def run() -> Any:
        out = fn()
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o is not None]
        grads = [torch.ones_like(o) for o in outs]
        torch.autograd.grad(outs, leaves, grads, allow_unused=True)

    return run


def gemm_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    times = [_timed(lambda: a @ b) for _ in range(7)]
    return 2 * 1024**3 / (statistics.median(times) * 1e-3) / 1e9


def contenders(hidden: int) -> dict[str, Callable[[], Any]]:
    """Every timed callable at this width, by ``group/name/mode``."""
    g = torch.Generator().manual_seed(0)
    D = hidden
    dien = load_deepctr("deepctr_torch.models.dien")
    theirs = dien.InterestEvolving(D, gru_type="AUGRU", att_hidden_size=(64, 16))
    ours = InterestEvolving.from_deepctr(theirs)
    query = torch.randn(B, D, generator=g)
    keys = torch.randn(B, T, D, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    q_leaf, k_leaf = query.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    layer_theirs = lambda: theirs(q_leaf, k_leaf, lengths)  # noqa: E731
    layer_ours = lambda: ours(q_leaf, k_leaf, lengths)  # noqa: E731

    gru = ours.interest_evolution
    att = torch.rand(B, T, generator=g).requires_grad_(True)
    scan = lambda: gru_scan(k_leaf, gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh, att,  # noqa: E731
                            mode="augru", lengths=lengths)
    full_lengths = torch.full((B,), T)
    scan_full = lambda: gru_scan(k_leaf, gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh, att,  # noqa: E731
                                 mode="augru", lengths=full_lengths)
    gru_full = lambda: gru_scan(k_leaf, gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh,  # noqa: E731
                                mode="gru")
    torch_gru = torch.nn.GRU(D, D, batch_first=True)
    torch_full = lambda: torch_gru(k_leaf)  # noqa: E731

    params_theirs = [q_leaf, k_leaf] + list(theirs.parameters())
    params_ours = [q_leaf, k_leaf] + list(ours.parameters())
    scan_leaves = [k_leaf, att, gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh]
    out: dict[str, Callable[[], Any]] = {}
    for name, fn, leaves in [
        ("layer/deepctr", layer_theirs, params_theirs),
        ("layer/ours", layer_ours, params_ours),
        ("scan/ours_augru", scan, scan_leaves),
        ("full/ours_augru", scan_full, scan_leaves),
        ("full/ours_gru", gru_full, scan_leaves[:1] + scan_leaves[2:]),
        ("full/torch_nn_gru", torch_full, [k_leaf] + list(torch_gru.parameters())),
    ]:
        out[f"{name}/fwd"] = _forward(fn)
        out[f"{name}/fwd+bwd"] = _forward_backward(fn, leaves)
    valid = int(lengths.sum())
    out["_valid_steps"] = valid  # type: ignore[assignment]
    return out


def run(hidden: int, threads: int, rounds: int) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    fns = contenders(hidden)
    valid = fns.pop("_valid_steps")
    for fn in fns.values():  # warm-up (and first-call allocations)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    rate = gemm_gflops()
    rows = []
    for name, ts in times.items():
        group, who, mode = name.split("/")
        steps = B * T if group == "full" else valid
        fwd_flops = 2 * steps * 3 * hidden * (hidden + hidden)
        flops = fwd_flops * (1 if mode == "fwd" else 3)
        p50 = statistics.median(ts)
        rows.append(dict(
            group=group, contender=who, mode=mode, B=B, T=T, H=hidden, threads=threads,
            dtype="float32", p50_ms=p50, min_ms=min(ts), rounds=rounds, scan_gflop=flops / 1e9,
            gemm_gflops=rate, floor_ms=flops / (rate * 1e9) * 1e3,
        ))
    return rows


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# GRU-family scan and InterestEvolving (AUGRU) on CPU, float32",
        "",
        f"Command: `{command}`",
        "",
        "Medians over interleaved rounds (every contender once per round). `floor`: the scan's",
        "GEMM FLOPs at the 1024^3 float32 matmul rate measured in the same run (the layer rows",
        "use the scan's floor; the attention MLP comes on top). `x deepctr` / `x nn.GRU`: how",
        "many times faster than that contender in the same group, mode and threads.",
        "",
        "| threads | H | group | contender | mode | p50 ms | ratio | floor ms | floor / p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["threads"], r["H"], r["group"], r["mode"]): r["p50_ms"] for r in rows
            if r["contender"] in ("deepctr", "torch_nn_gru")}
    for r in rows:
        key = (r["threads"], r["H"], r["group"], r["mode"])
        ref = base.get(key)
        if r["group"] == "scan":
            ref = base.get((r["threads"], r["H"], "layer", r["mode"]))
            ratio = f"{ref / r['p50_ms']:.1f}x deepctr layer" if ref else ""
        elif ref is not None and r["contender"] not in ("deepctr", "torch_nn_gru"):
            ratio = f"{ref / r['p50_ms']:.2f}x " + ("deepctr" if r["group"] == "layer" else "nn.GRU")
        else:
            ratio = ""
        lines.append(
            f"| {r['threads']} | {r['H']} | {r['group']} | {r['contender']} | {r['mode']} | "
            f"{r['p50_ms']:.2f} | {ratio} | {r['floor_ms']:.2f} | {r['floor_ms'] / r['p50_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[36, 128])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="bench/results/cpu_gru.local.json")
    parser.add_argument("--md", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    print("gru_scan on CPU runs backend:", OP.select(torch.device("cpu")).name)
    rows = []
    for threads in args.threads:
        for hidden in args.hidden:
            rows += run(hidden, threads, args.rounds)
            print(f"done: {threads} thread(s), H {hidden}", flush=True)
    table = markdown(rows, command)
    print(table)
    with open(args.out, "w") as f:
        json.dump({"command": command, "environment": environment(torch.device("cpu")),
                   "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
