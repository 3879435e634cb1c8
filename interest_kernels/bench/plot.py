"""``python -m interest_kernels.bench.plot``: speedup plots from a long-form results CSV.

    python -m interest_kernels.bench.plot bench/results/cpu.csv --out bench/results/plots

One PNG per op, device and dtype (``<op>_<device>_<dtype>.png``): the speedup of each
backend over the eager reference (left) and over DeepCTR-Torch's layer (right), against
the history length T (top) and the batch size B (bottom), forward (solid) and
forward+backward (dashed). Each point is the newest measurement of its shape in the CSV.
Needs matplotlib (``pip install interest_kernels[plots]``).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Any, Optional

from .harness import PEER_BASELINE, RESULTS_DIR, read_csv

BASELINES = ("eager", PEER_BASELINE)
AXES = ("T", "B")
MODES = {"fwd": "-", "full": "--"}


def _shape(line: dict[str, Any]) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line["shape"].split(";") if "=" in part)


def newest(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest line of each (device, op, shape, dtype, backend, mode)."""
    keep: dict[tuple, dict[str, Any]] = {}
    for line in lines:
        key = (line["device"], line["op"], line["shape"], line["dtype"], line["backend"], line["mode"])
        if key not in keep or line["when"] >= keep[key]["when"]:
            keep[key] = line
    return list(keep.values())


def speedup_series(lines: list[dict[str, Any]], axis: str, baseline: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """For one op, device and dtype: {(backend, mode): [(axis value, speedup over
    ``baseline``)]}, over the largest group of shapes that differ in ``axis`` alone."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        shape = _shape(line)
        if axis in shape:
            rest = tuple(sorted((k, v) for k, v in shape.items() if k != axis))
            groups[rest].append(line)
    if not groups:
        return {}
    best = max(groups.values(), key=lambda g: len({_shape(x)[axis] for x in g}))
    if len({_shape(x)[axis] for x in best}) < 2:
        return {}
    base = {(_shape(x)[axis], x["mode"]): x["p50_ms"] for x in best if x["backend"] == baseline}
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for x in best:
        ref: Optional[float] = base.get((_shape(x)[axis], x["mode"]))
        if x["backend"] == baseline or x["mode"] not in MODES or not ref or not x["p50_ms"]:
            continue
        series[(x["backend"], x["mode"])].append((int(_shape(x)[axis]), ref / x["p50_ms"]))
    return {k: sorted(v) for k, v in series.items()}


def plot(csv_path: str, out_dir: str) -> list[str]:
    """Write the PNGs for every op, device and dtype in ``csv_path``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = newest(read_csv(csv_path))
    by_key: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        by_key[(line["op"], line["device"], line["dtype"])].append(line)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (op, device, dtype), group in sorted(by_key.items()):
        panels = {(axis, base): speedup_series(group, axis, base) for axis in AXES for base in BASELINES}
        if not any(panels.values()):
            continue
        backends = sorted({backend for series in panels.values() for backend, _ in series})
        colors = {b: f"C{i}" for i, b in enumerate(backends)}  # one colour per backend, a line style per mode
        fig, axes = plt.subplots(len(AXES), len(BASELINES), figsize=(11, 8), squeeze=False)
        for i, axis in enumerate(AXES):
            for j, base in enumerate(BASELINES):
                ax = axes[i][j]
                for (backend, mode), points in sorted(panels[(axis, base)].items()):
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, MODES[mode], marker="o", label=f"{backend} {mode}", color=colors[backend])
                ax.axhline(1.0, color="grey", linewidth=0.8)
                ax.set_xscale("log", base=2)
                ax.set_xlabel(axis)
                ax.set_ylabel(f"speedup over {base} (p50)")
                ax.set_title(f"vs {base}, over {axis}")
                if panels[(axis, base)]:
                    ax.legend(fontsize=7)
        fig.suptitle(f"{op} on {device} ({group[0]['device_name']}), {dtype}; git {group[0]['git_sha']}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_{device}_{dtype}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interest_kernels.bench.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="a long-form CSV written by python -m interest_kernels.bench")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "plots"), help="folder for the PNGs")
    args = parser.parse_args(argv)
    for path in plot(args.csv, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
