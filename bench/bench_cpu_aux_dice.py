"""Would fused C++ CPU kernels for DIEN's auxiliary loss (SPEC 3) and standalone Dice (SPEC 4) pay?

Both now have C++ kernels (the ``cpu`` backend), built because this measurement said they
would pay: the aux loss ``csrc/aux_loss_cpu.cpp`` (valid pairs only), Dice
``csrc/dice_cpu.cpp``; each is timed against its reference too. Each is timed (float32, interleaved rounds, process
time, medians) against the least any fused kernel must do:

* aux loss, B 512, T 100, H = E = 36, MLP (100, 50), lengths uniform in [1, T] (``--batch``
  and ``--min-length`` change B and the shortest length; DIEN in bench_models.py draws
  lengths in [T/2, T]): the MLP's
  GEMMs on the valid (t, t+1) pairs only, positives and negatives (forward: the three
  layers; forward+backward: plus the input and weight gradients of the two hidden layers);
* Dice, training, (B*T, C) = (51200, 80) (DIN's attention width): the memory passes of a
  two-pass kernel (forward: one read for the statistics, one read + write to apply;
  forward+backward: plus one read of x and the gradient for the reductions and one
  read + write for dx), timed as the equivalent torch reductions and elementwise ops.

    python bench/bench_cpu_aux_dice.py --threads 1 --out bench/results/cpu_aux_dice.json --md bench/results/cpu_aux_dice.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from interest_kernels import use_backend
from interest_kernels.ops.aux_loss.op import dien_aux_loss
from interest_kernels.ops.dice.op import dice

T, H, UNITS, C = 100, 36, (100, 50), 80


def contenders(B: int = 512, min_length: int = 1) -> dict[str, Callable[[], Any]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(min_length, T + 1, (B,), generator=g)
    leaf = lambda *shape: torch.randn(*shape, generator=g).requires_grad_(True)  # noqa: E731
    states, pos, neg = leaf(B, T, H), leaf(B, T, H), leaf(B, T, H)
    ws, bs = [leaf(UNITS[0], 2 * H), leaf(UNITS[1], UNITS[0])], [leaf(UNITS[0]), leaf(UNITS[1])]
    wo, bo = leaf(1, UNITS[1]), leaf(1)
    leaves = [states, pos, neg, *ws, *bs, wo, bo]
    def aux_on(backend: str) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with use_backend(backend):
                return dien_aux_loss(states, pos, neg, ws, bs, wo, bo, lengths=lengths)
        return call

    pairs = int((torch.arange(1, T)[None] < lengths[:, None]).sum())
    rows = 2 * pairs  # positives and negatives
    x0, y1, y2 = torch.randn(rows, 2 * H), torch.randn(rows, UNITS[0]), torch.randn(rows, UNITS[1])
    w1, w2, w3 = ws[0].detach(), ws[1].detach(), wo.detach().reshape(-1)

    def gemm_fwd() -> None:
        torch.mm(x0, w1.t()), torch.mm(y1, w2.t()), torch.mv(y2, w3)

    def gemm_fwd_bwd() -> None:
        gemm_fwd()
        torch.mm(y2, w2), torch.mm(y2.t(), y1), torch.mm(y1, w1), torch.mm(y1.t(), x0)

    x = torch.randn(512 * T, C, generator=g).requires_grad_(True)  # Dice: always (51200, C)
    alpha, weight, bias = torch.rand(C).requires_grad_(True), torch.ones(C).requires_grad_(True), torch.zeros(C).requires_grad_(True)
    running = (torch.zeros(C), torch.ones(C))
    def dice_on(backend: str) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with use_backend(backend):
                return dice(x, alpha, *running, weight, bias, training=True)
        return call

    xd = x.detach()

    def passes_fwd() -> None:
        xd.sum(0), torch.mul(xd, 2.0)

    def passes_fwd_bwd() -> None:
        passes_fwd()
        (xd * xd).sum(0), torch.mul(xd, 2.0)

    def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return fn()
        return run

    def with_backward(fn: Callable[[], Any], grad_leaves: list[torch.Tensor]) -> Callable[[], Any]:
        def run() -> None:
            out = fn()
            torch.autograd.grad(out, grad_leaves, torch.ones_like(out))
        return run

    return {
        "aux_loss/reference/fwd": no_grad(aux_on("reference")),
        "aux_loss/reference/fwd+bwd": with_backward(aux_on("reference"), leaves),
        "aux_loss/cpu/fwd": no_grad(aux_on("cpu")),
        "aux_loss/cpu/fwd+bwd": with_backward(aux_on("cpu"), leaves),
        "aux_loss/floor/fwd": gemm_fwd,
        "aux_loss/floor/fwd+bwd": gemm_fwd_bwd,
        "dice/reference/fwd": no_grad(dice_on("reference")),
        "dice/reference/fwd+bwd": with_backward(dice_on("reference"), [x, alpha, weight, bias]),
        "dice/cpu/fwd": no_grad(dice_on("cpu")),
        "dice/cpu/fwd+bwd": with_backward(dice_on("cpu"), [x, alpha, weight, bias]),
        "dice/floor/fwd": passes_fwd,
        "dice/floor/fwd+bwd": passes_fwd_bwd,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=512, help="B of the aux loss")
    parser.add_argument("--min-length", type=int, default=1, help="aux loss lengths uniform in [this, T]")
    parser.add_argument("--out", default="bench/results/cpu_aux_dice.local.json")
    parser.add_argument("--md", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fns = contenders(args.batch, args.min_length)
    for fn in fns.values():
        fn(), fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append((time.process_time() - t0) * 1e3)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    command = "python " + " ".join(sys.argv)
    lines = [
        "# Would C++ kernels for the aux loss and Dice pay? (CPU, float32)", "",
        f"Command: `{command}` ({args.threads} thread(s), process time, medians of "
        f"{args.rounds} interleaved rounds).", "",
        "| op | mode | reference ms | floor ms | reference / floor | above floor ms | fused cpu ms | cpu / floor | reference / cpu |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for op in ("aux_loss", "dice"):
        for mode in ("fwd", "fwd+bwd"):
            ref, floor = p50[f"{op}/reference/{mode}"], p50[f"{op}/floor/{mode}"]
            fused = p50.get(f"{op}/cpu/{mode}")
            rows.append(dict(op=op, mode=mode, reference_ms=ref, floor_ms=floor, cpu_ms=fused, threads=args.threads))
            extra = f"{fused:.2f} | {fused / floor:.2f}x | {ref / fused:.2f}x" if fused else "not built | | "
            lines.append(f"| {op} | {mode} | {ref:.2f} | {floor:.2f} | {ref / floor:.2f}x | {ref - floor:.2f} | {extra} |")
    table = "\n".join(lines) + "\n"
    print(table)
    with open(args.out, "w") as f:
        json.dump({"command": command, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
