"""Where the time of ``nn.InterestEvolving`` (AUGRU) goes on CPU, at the shape of
``bench_cpu_gru.py`` (B 512, T 100, D = H 36, attention units (64, 16), lengths uniform in
1..T, float32).

1. Interleaved rounds of the layer, of its target attention alone (the scores' gradient
   given) and of its AUGRU scan alone (the scores as a leaf), forward (no grad) and
   forward+backward: the layer minus its two parts is what the module's Python glue and the
   autograd engine between them cost. Medians.
2. ``torch.profiler`` ranges of the two custom operators' autograd. Both the forward's
   ``Function.apply`` and the backward node are named ``GeneratedBackwardFor_<op>...``: the
   forward range sits inside the operator and its self time is the C++ kernel's own work
   (gate passes, fused MLP), not overhead; the backward node's self time is the glue.
3. The layer's fwd+bwd with its attention saving the pre-activations or recomputing them
   (``save_pre_activations``; the layer's default recomputes), interleaved on the same module,
   with the minor page faults of each call.

    python bench/profile_cpu_gru.py --rounds 15 --threads 1
"""
from __future__ import annotations

import argparse
import collections
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from interest_kernels.nn.gru import InterestEvolving  # noqa: E402
from interest_kernels.ops.gru_scan.op import gru_scan  # noqa: E402
from peers import load_deepctr  # noqa: E402

B, T, D = 512, 100, 36


def callables() -> tuple[dict, InterestEvolving]:
    """The timed callables by name (``layer``/``attention``/``scan``, ``fwd``/``fwd+bwd``),
    and the layer."""
    g = torch.Generator().manual_seed(0)
    dien = load_deepctr("deepctr_torch.models.dien")
    layer = InterestEvolving.from_deepctr(dien.InterestEvolving(D, gru_type="AUGRU", att_hidden_size=(64, 16)))
    query = torch.randn(B, D, generator=g).requires_grad_(True)
    keys = torch.randn(B, T, D, generator=g).requires_grad_(True)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    with torch.no_grad():
        _, scores = layer.attention(query, keys, lengths)
    att = scores.clone().requires_grad_(True)
    grad_scores = torch.randn(B, T, generator=g)
    gru = layer.interest_evolution

    def scan():
        return gru_scan(keys, gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh, att, mode="augru",
                        lengths=lengths, return_states=False)[1]

    parts = {
        "layer": (lambda: layer(query, keys, lengths), [query, keys, *layer.parameters()], None),
        "attention": (lambda: layer.attention(query, keys, lengths)[1],
                      [query, keys, *layer.attention.parameters()], grad_scores),
        "scan": (scan, [keys, att, *gru.parameters()], None),
    }
    out = {}
    for name, (fn, leaves, grad) in parts.items():
        def forward(fn=fn):
            with torch.no_grad():
                fn()

        def forward_backward(fn=fn, leaves=leaves, grad=grad):
            y = fn()
            torch.autograd.grad([y], leaves, [torch.ones_like(y) if grad is None else grad], allow_unused=True)

        out[f"{name}/fwd"] = forward
        out[f"{name}/fwd+bwd"] = forward_backward
    return out, layer


def profiler_ranges(fn, iters: int = 3) -> list[tuple[str, str, float, float]]:
    """(range, parent, total ms, self ms) per iteration of the custom ops' autograd ranges."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    acc: dict = collections.defaultdict(lambda: [0.0, 0.0])
    for e in prof.events():
        if e.name.startswith("GeneratedBackwardFor"):
            parent = e.cpu_parent.name if e.cpu_parent is not None else "-"
            acc[(e.name, parent)][0] += e.cpu_time_total / 1e3 / iters
            acc[(e.name, parent)][1] += e.self_cpu_time_total / 1e3 / iters
    return [(name, parent, tot, own) for (name, parent), (tot, own) in acc.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fns, layer = callables()
    for fn in fns.values():
        fn()
        fn()
    load_start = os.getloadavg()
    times: dict = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    p50 = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{args.rounds} interleaved rounds, {args.threads} thread(s), medians; load average "
          f"{[round(x, 2) for x in load_start]} -> {[round(x, 2) for x in os.getloadavg()]}\n")
    print("| mode | layer ms | attention ms | scan ms | layer - parts ms |\n|---|---|---|---|---|")
    for mode in ("fwd", "fwd+bwd"):
        lay, att, scan = (p50[f"{n}/{mode}"] for n in ("layer", "attention", "scan"))
        print(f"| {mode} | {lay:.2f} | {att:.2f} | {scan:.2f} | {lay - att - scan:+.2f} |")
    print("\nProfiler ranges of the layer's fwd+bwd, per iteration (profiler overhead included):\n")
    print("| range | inside | total ms | self ms |\n|---|---|---|---|")
    for name, parent, tot, own in profiler_ranges(fns["layer/fwd+bwd"]):
        inside = "backward engine" if parent.startswith("autograd::engine") else parent
        print(f"| `{name}` | `{inside}` | {tot:.1f} | {own:.1f} |")

    times, faults = collections.defaultdict(list), collections.defaultdict(list)
    for _ in range(args.rounds):
        for save in (True, False):
            layer.attention.save_pre_activations = save
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fns["layer/fwd+bwd"]()
            times[save].append((time.perf_counter() - t0) * 1e3)
            faults[save].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    layer.attention.save_pre_activations = False
    print("\nThe layer's fwd+bwd by what its attention keeps for the backward:\n")
    print("| attention backward | fwd+bwd ms | page faults per call |\n|---|---|---|")
    for save, what in ((True, "saving"), (False, "recomputing")):
        print(f"| {what} | {statistics.median(times[save]):.2f} | {statistics.median(faults[save]):.0f} |")


if __name__ == "__main__":
    main()
