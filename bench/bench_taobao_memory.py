"""Peak memory of the Taobao loader on a generated UserBehavior file of a few million rows.

    python bench/bench_taobao_memory.py --users 100000 --clicks 30 --items 100000 [--max-len 50] [--out FILE.json]

Writes the file once (generate_taobao), then loads it in a fresh process and reports the
peak resident memory of that process above its resident memory after ``import torch``
(``getrusage`` maxrss), per row of the file, with the samples and load time. The loader
keeps every click, so memory grows with the rows; the point is the bytes per row, which
give the bound on the full 100M-row file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from interest_kernels.data import load_taobao
start = time.perf_counter()
ds = load_taobao(sys.argv[1], max_len=int(sys.argv[2]))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stats = next(iter(ds.stats.values()))
print(json.dumps({"base_kib": base, "peak_kib": peak, "seconds": seconds, "lines": stats.lines,
                  "samples": len(ds.train) + len(ds.test), "clicks": int(ds.train.behaviour_items.numel())}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--clicks", type=int, default=30, help="clicks per user")
    p.add_argument("--items", type=int, default=100_000, help="item ids drawn from (Tianchi: 4.2M over 100M rows)")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args()
    from interest_kernels.data import generate_taobao

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "UserBehavior.csv")
        start = time.perf_counter()
        generate_taobao(path, num_users=args.users, num_items=args.items, num_cats=9_000,
                        clicks_per_user=args.clicks, seed=0)
        generated = time.perf_counter() - start
        size = os.path.getsize(path)
        child = subprocess.run([sys.executable, "-c", CHILD, path, str(args.max_len)],
                               capture_output=True, text=True, check=True)
    result = json.loads(child.stdout)
    grown = (result["peak_kib"] - result["base_kib"]) * 1024
    result.update(file_bytes=size, generate_seconds=generated, max_len=args.max_len,
                  peak_above_torch_bytes=grown, bytes_per_row=grown / result["lines"],
                  command=" ".join(["python", *sys.argv]))
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
