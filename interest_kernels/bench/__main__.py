"""``python -m interest_kernels.bench``: the validation and benchmark report.

Runs every op's cases at a named shape set on the best device present: checks each
available backend against the eager reference on the benchmark's inputs (the max
error column), then times the backends, the eager reference and ``torch.compile``
of the reference and the peer libraries' layers, forward, backward and forward+backward.
Writes the raw rows and the machine (device, torch, triton, measured copy bandwidth and
matmul rates) to JSON and the markdown table next to it, appends long-form rows to a CSV
(``bench/results/<device>.local.csv`` unless ``--csv`` names another), and prints the
table. Default paths are inside the repository, wherever the command runs from.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .cases import ALL_CASES, SHAPE_SETS
from .harness import RESULTS_DIR, Row, append_csv, markdown_table, measure_machine, run_case, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interest_kernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="*", default=sorted(ALL_CASES), choices=sorted(ALL_CASES))
    parser.add_argument("--shapes", choices=SHAPE_SETS, default=None,
                        help="shape set (default: 'realistic' on CUDA, 'cpu' otherwise)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="time torch.compile of the reference (auto: on CUDA only; on CPU, Inductor "
                             "takes minutes per case, the GRU loop unrolling over T)")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                        help="same as --compile off")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement")
    parser.add_argument("--out", default=None,
                        help="JSON path (default bench/results/last_<device>.local.json, not committed)")
    parser.add_argument("--csv", default=None,
                        help="long-form CSV to append to (default bench/results/<device>.local.csv)")
    args = parser.parse_args(argv)

    import interest_kernels  # noqa: F401  (registers every op)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = args.shapes or ("realistic" if device.type == "cuda" else "cpu")
    out = args.out or os.path.join(RESULTS_DIR, f"last_{device.type}.local.json")
    csv_path = args.csv or os.path.join(RESULTS_DIR, f"{device.type}.local.csv")

    print(f"measuring {device} (copy bandwidth, matmul rate) ...", flush=True)
    machine = measure_machine(device)
    compile_baseline = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    rows: list[Row] = []
    t0 = time.time()
    for op in args.ops:
        for case in ALL_CASES[op](shapes):
            rows += run_case(case, device, machine, compile_baseline=compile_baseline, budget_s=args.budget)
    write_results(out, machine, rows)
    append_csv(csv_path, machine, rows)
    table = markdown_table(machine, rows)
    md = os.path.splitext(out)[0] + ".md"
    with open(md, "w") as f:
        f.write(table)
    print()
    print(table)
    skipped = sorted({f"{r.op}/{r.backend}: {r.note}" for r in rows if r.note.startswith("skipped")})
    if not compile_baseline:
        skipped.append("all/compile: torch.compile baseline off (pass --compile on)")
    if skipped:
        print("Skipped on this machine:")
        for line in skipped:
            print("  " + line)
    failed = [r for r in rows if r.note.startswith("failed")]
    print(f"\n{len(rows)} rows in {time.time() - t0:.0f} s; results: {out}, {md} and {csv_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
