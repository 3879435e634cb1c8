"""Per-phase profile of the fused CPU target attention at the DIN benchmark shape
(B 1024, T 100, D 36, units (80, 40), float32, full-length histories), operator by
operator, against the floor of ``bench_cpu_attention.py`` (FLOPs of SPEC's identity form
at the rate of float32 GEMMs of the layer shapes measured in the same run).

A phase's cost is the difference between two operator calls that differ in that phase
only: the first layer alone (identity activation, units (80,)), plus the hidden layer
(identity, (80, 40)), plus the activation (sigmoid or Dice with given statistics), and
Dice in training (the statistics inside the training operator). Medians of ``--rounds``
interleaved rounds.

    python bench/profile_cpu_attention.py --rounds 7 --threads 1
"""
from __future__ import annotations

import argparse
import statistics

import torch

import interest_kernels.ops.target_attention.cpu as ta_cpu
from bench_cpu_attention import gemm_rate, identity_form_flops, interleaved

B, T, D = 1024, 100, 36


def args_for(units, activation):
    q = torch.randn(B, 1, D)
    k = torch.randn(B, 1, T, D)
    widths = (4 * D,) + tuple(units)
    ws = [torch.randn(1, widths[i + 1], widths[i]) * 0.1 for i in range(len(units))]
    cs = [torch.randn(1, h) * 0.1 for h in units]
    wo, co = torch.randn(1, units[-1]) * 0.1, torch.zeros(1)
    lengths = torch.full((B,), T, dtype=torch.long)
    ap = []
    if activation == "dice":
        for h in units:
            ap += [torch.rand(1, h), torch.rand(1, h) + 0.5, torch.randn(1, h) * 0.1]
    return (q, k, None, lengths, None, ws, cs, wo, co, ap)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    assert ta_cpu.unavailable_reason() is None
    ops = torch.ops.interest_kernels
    cases = {
        "first layer (identity, (80,))": (args_for((80,), "identity"), "identity"),
        "+ hidden layer (identity, (80, 40))": (args_for((80, 40), "identity"), "identity"),
        "+ sigmoid": (args_for((80, 40), "sigmoid"), "sigmoid"),
        "+ dice, given statistics": (args_for((80, 40), "dice"), "dice"),
    }
    runs = {}
    for name, (args, act) in cases.items():
        runs[f"fwd recompute | {name}"] = lambda args=args, act=act: ops.target_attention_cpu(*args, act, "softmax")
        out, s = ops.target_attention_cpu(*args, act, "softmax")
        g = torch.randn_like(out)
        runs[f"bwd recompute | {name}"] = lambda args=args, act=act, g=g, s=s: ops.target_attention_cpu_backward(
            g, None, s, *args[:5], *args[5:], act, "softmax")
        runs[f"fwd saving z  | {name}"] = lambda args=args, act=act: ops.target_attention_cpu_train(*args, act, "softmax", None)
        out, s, pre, _ = ops.target_attention_cpu_train(*args, act, "softmax", None)
        runs[f"bwd saved z   | {name}"] = lambda args=args, act=act, g=g, s=s, pre=pre: ops.target_attention_cpu_train_backward(
            g, None, s, pre, [], *args, act, "softmax", None)
    dargs, _ = cases["+ dice, given statistics"]
    eps = [1e-8, 1e-8]
    runs["fwd dice batch statistics (train op)"] = lambda: ops.target_attention_cpu_train(*dargs, "dice", "softmax", eps)
    out, s, pre, st = ops.target_attention_cpu_train(*dargs, "dice", "softmax", eps)
    g = torch.randn_like(out)
    runs["bwd dice batch statistics (train op)"] = lambda: ops.target_attention_cpu_train_backward(
        g, None, s, pre, st, *dargs, "dice", "softmax", eps)
    rate = gemm_rate(10)
    floor = identity_form_flops(B * T) / rate * 1e3
    times, _ = interleaved(runs, a.rounds)
    print(f"threads {a.threads}, GEMM rate {rate / 1e9:.1f} GFLOP/s, forward floor {floor:.2f} ms, "
          f"fwd+bwd floor {3 * floor:.2f} ms")
    for n in runs:
        print(f"{n:60s} {statistics.median(times[n]):8.2f} ms")


if __name__ == "__main__":
    main()
