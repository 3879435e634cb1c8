"""``python -m interest_kernels.bench.traffic``: what each Triton kernel moves, counted.

Runs each Triton op family (target attention, GRU scan, Dice) forward and backward on
CPU tensors under the Triton interpreter with :class:`~interest_kernels.bench.meter.
TrafficMeter` active, and reports per kernel (per launched ``@triton.jit`` function and
phase): launches and grids, bytes loaded and stored (active lanes only), distinct
32-byte sectors, the buffers the bytes go to, dot FLOPs and the histogram of dot shapes
(M, N, K), and per phase the ratio of the counted bytes to the op's floor
(:func:`~interest_kernels.bench.cases.meter_floors`).

H200 estimate per kernel, the largest of three times (no latency, no launch cost; a
scan's T dependent steps are not modelled):
  * HBM: distinct sector bytes at 4.8 TB/s (vendor datasheet, /work/.library/device/
    H200.md; 4.3 TB/s copy measured on one, KINDS.md);
  * L2: all bytes loaded and stored at ``--l2-tbps`` TB/s, 10 by default. Neither
    H200.md nor HOPPER.md/KINDS.md gives an L2 bandwidth (KINDS.md: 60 MB of L2 on the
    H200 seen here); a third-party profiling write-up quotes about 12 TB/s for the
    H100 SXM's L2. 10 TB/s is an assumption, a little under that, to be measured on
    the device;
  * dots: FLOPs by operand dtype at the dense tensor-core rates of the datasheet
    (H200.md): 989 TFLOP/s fp16/bf16, 494 tf32, 1979 fp8; IEEE fp32 and fp64 at 67
    (FMA units; fp64 tensor cores). The interpreter runs the dots of some 16-bit paths
    in fp32 (see each kernel's launch configuration): the dtype column says what ran.

Torch ops around the kernels (projections, parameter-gradient sums) are not counted.
Targets: the committed tables under ``bench/results/traffic_*.md|json`` with the command
that made them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

from interest_kernels._backend import use_backend
from interest_kernels.testing import clone_inputs

from . import cases
from .harness import Floor
from .meter import KernelTraffic, TrafficMeter

HBM_BYTES_PER_S = 4.8e12
DEFAULT_L2_TBPS = 10.0
# Dense tensor-core (or FMA) rates by the dtype key TrafficMeter records, FLOP/s.
DOT_FLOPS_PER_S = {
    "fp16": 989e12,
    "bf16": 989e12,
    "fp32/tf32": 494e12,
    "fp32/tf32x3": 494e12 / 3,
    "fp32/ieee": 67e12,
    "fp64": 67e12,
    "fp8e4nv": 1979e12,
    "fp8e5": 1979e12,
}
_FALLBACK_DOT_RATE = 67e12
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MeterCase:
    """One op at one shape and dtype: inputs, the call, its floors per phase."""

    op: str
    label: str
    dtype: torch.dtype
    shape: dict[str, Any]
    make: Callable[[], dict[str, Any]]
    call: Callable[[dict[str, Any]], Any]
    grad_inputs: tuple[str, ...]
    floors: dict[str, Floor] = field(default_factory=dict)


# --- cases -----------------------------------------------------------------------------


def _full_lengths(inp: dict[str, Any], T: int) -> dict[str, Any]:
    inp["lengths"] = torch.full_like(inp["lengths"], T)
    return inp


def target_attention_case(B: int, T: int, D: int, units: tuple[int, ...], dtype: torch.dtype,
                          activation: str = "sigmoid") -> MeterCase:
    """Target attention with full lengths, softmax, the given hidden activation."""
    from interest_kernels.ops.target_attention.op import target_attention

    from interest_kernels.ops.dice.reference import DiceParams

    make = cases._ta_make(B, T, D, units)
    shape = {"B": B, "T": T, "D": D, "units": list(units), "activation": activation}

    def call(inp: dict[str, Any]) -> Any:
        extra = {}
        if activation == "dice":  # training mode: the batch-statistics kernels run too
            extra["dice_params"] = [
                DiceParams(alpha=torch.full((h,), 0.25, dtype=dtype), running_mean=torch.zeros(h),
                           running_var=torch.ones(h)) for h in units]
        if activation == "prelu":
            extra["prelu_weights"] = [torch.full((h,), 0.25, dtype=dtype) for h in units]
        return target_attention(**inp, activation=activation, normalization="softmax", **extra)

    return MeterCase(
        op="target_attention", label=f"B{B}_T{T}_D{D}_u{'x'.join(map(str, units))}_{activation}",
        dtype=dtype, shape=shape,
        make=lambda: _full_lengths(make(torch.device("cpu"), dtype), T),
        call=call,
        grad_inputs=("query", "keys", "weights", "biases", "out_weight", "out_bias"),
        floors=cases.meter_floors("target_attention", shape, dtype),
    )


def gru_scan_case(B: int, T: int, H: int, mode: str, dtype: torch.dtype,
                  lengths: str = "full") -> MeterCase:
    """GRU-family scan, input size H, over full lengths or ("random") the benchmark
    cases' lengths, uniform in 1..T."""
    make = cases._gru_make(B, T, H, mode)
    shape = {"B": B, "T": T, "H": H, "mode": mode}
    full = lengths == "full"
    return MeterCase(
        op="gru_scan", label=f"{mode}_B{B}_T{T}_H{H}" + ("" if full else f"_{lengths}_lengths"),
        dtype=dtype, shape=shape,
        make=lambda: _full_lengths(make(torch.device("cpu"), dtype), T) if full
        else make(torch.device("cpu"), dtype),
        call=cases._gru_call,
        grad_inputs=("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "att"),
        floors=cases.meter_floors("gru_scan", shape, dtype),
    )


def dice_case(N: int, C: int, dtype: torch.dtype) -> MeterCase:
    """Dice in training mode on an (N, C) input."""
    shape = {"N": N, "C": C}
    make = cases._dice_make(N, C)
    return MeterCase(
        op="dice", label=f"N{N}_C{C}", dtype=dtype, shape=shape,
        make=lambda: make(torch.device("cpu"), dtype), call=cases._dice_call,
        grad_inputs=("x", "alpha"), floors=cases.meter_floors("dice", shape, dtype),
    )


# --- running and estimating ----------------------------------------------------------


def _tensors(out: Any) -> Iterable[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)


def meter_case(case: MeterCase, phases: tuple[str, ...] = ("fwd", "bwd")) -> list[KernelTraffic]:
    """Run ``case`` on the Triton backend under the meter: the forward as phase "fwd",
    then (if asked) the backward of every differentiable output as phase "bwd"."""
    backward = "bwd" in phases
    inputs = clone_inputs(case.make(), None, case.grad_inputs if backward else ())
    with use_backend("triton"), TrafficMeter() as meter:
        with torch.set_grad_enabled(backward), meter.phase("fwd"):
            out = case.call(inputs)
        if backward:
            outs = [t for t in _tensors(out) if t.requires_grad]
            grads = [torch.randn_like(t) for t in outs]
            with meter.phase("bwd"):
                torch.autograd.backward(outs, grads)
    return [r for r in meter.records if r.phase in phases]


def estimate(record: KernelTraffic, l2_bytes_per_s: float) -> dict[str, Any]:
    """H200 seconds of ``record`` by HBM, L2 and dot rate, and which bounds it."""
    times = {
        "hbm": record.distinct_bytes / HBM_BYTES_PER_S,
        "l2": record.total_bytes / l2_bytes_per_s,
        "dot": sum(f / DOT_FLOPS_PER_S.get(dt, _FALLBACK_DOT_RATE) for dt, f in record.dot_flops.items()),
    }
    bound = max(times, key=times.get)
    return {"seconds": times[bound], "bound": bound, **{f"{k}_seconds": v for k, v in times.items()}}


def summarize(case: MeterCase, records: list[KernelTraffic], l2_bytes_per_s: float,
              seconds: float) -> dict[str, Any]:
    kernels = []
    for r in records:
        row = r.as_dict()
        row["estimate"] = estimate(r, l2_bytes_per_s)
        kernels.append(row)
    phases = {}
    for phase in dict.fromkeys(r.phase for r in records):
        rows = [k for k in kernels if k["phase"] == phase]
        total = sum(k["bytes_loaded"] + k["bytes_stored"] for k in rows)
        distinct = sum(k["distinct_bytes"] for k in rows)
        floor = case.floors.get(phase)
        phases[phase] = {
            "bytes": total,
            "distinct_bytes": distinct,
            "dot_flops": sum(sum(k["dot_flops"].values()) for k in rows),
            "estimate_seconds": sum(k["estimate"]["seconds"] for k in rows),
            "floor_bytes": floor.bytes if floor else None,
            "floor_seconds": floor.bytes / HBM_BYTES_PER_S if floor else None,
            "bytes_over_floor": total / floor.bytes if floor and floor.bytes else None,
            "distinct_over_floor": distinct / floor.bytes if floor and floor.bytes else None,
        }
    return {"op": case.op, "label": case.label, "dtype": str(case.dtype).replace("torch.", ""),
            "shape": case.shape, "meter_seconds": round(seconds, 2), "phases": phases, "kernels": kernels}


# --- report --------------------------------------------------------------------------------


def _mb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def _us(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1e6:.1f}"


def _shapes(kernel: dict[str, Any]) -> str:
    parts = [f"({s['M']},{s['N']},{s['K']}) {s['dtype']} x{s['count']}" for s in kernel["dot_shapes"]]
    return "<br>".join(parts) if parts else "-"


def _buffers(kernel: dict[str, Any], top: int = 3) -> str:
    items = list(kernel["by_argument"].items())[:top]
    return ", ".join(f"{name} {_mb(v['loaded'])}/{_mb(v['stored'])}" for name, v in items)


def markdown(results: list[dict[str, Any]], l2_tbps: float) -> str:
    lines = [
        f"H200 estimate: max(distinct bytes / 4.8 TB/s HBM, all bytes / {l2_tbps:g} TB/s L2 "
        "(assumed), dot FLOPs / dense rate by dtype). MB = 1e6 bytes. Buffers: loaded/stored MB "
        "of the three busiest kernel arguments.",
        "",
        "| case | dtype | phase | kernel | launches | grid | loaded MB | stored MB | distinct MB "
        "| dot GFLOP | dot shapes (M,N,K) | est. us (bound) | busiest buffers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for k in res["kernels"]:
            est = k["estimate"]
            lines.append(
                f"| {res['op']} {res['label']} | {res['dtype']} | {k['phase']} | {k['kernel']} | "
                f"{k['launches']} | {' '.join('x'.join(map(str, g)) for g in k['grids'])} | "
                f"{_mb(k['bytes_loaded'])} | {_mb(k['bytes_stored'])} | {_mb(k['distinct_bytes'])} | "
                f"{sum(k['dot_flops'].values()) / 1e9:.3f} | {_shapes(k)} | "
                f"{_us(est['seconds'])} ({est['bound']}) | {_buffers(k)} |"
            )
    lines += [
        "",
        "Per phase: all kernels' bytes against the op's floor (`bench/cases.py: meter_floors`).",
        "",
        "| case | dtype | phase | bytes MB | distinct MB | floor MB | bytes / floor | distinct / floor "
        "| est. us | floor us (HBM) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for phase, p in res["phases"].items():
            ratio = "-" if p["bytes_over_floor"] is None else f"{p['bytes_over_floor']:.2f}"
            dratio = "-" if p["distinct_over_floor"] is None else f"{p['distinct_over_floor']:.2f}"
            lines.append(
                f"| {res['op']} {res['label']} | {res['dtype']} | {phase} | {_mb(p['bytes'])} | "
                f"{_mb(p['distinct_bytes'])} | {_mb(p['floor_bytes'])} | {ratio} | {dratio} | "
                f"{_us(p['estimate_seconds'])} | {_us(p['floor_seconds'])} |"
            )
    return "\n".join(lines) + "\n"


def _environment() -> dict[str, Any]:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "interpreter": True}


def build_cases(args: argparse.Namespace) -> list[MeterCase]:
    dtypes = [_DTYPES[d] for d in args.dtypes]
    out: list[MeterCase] = []
    if "target_attention" in args.ops:
        B, T, D = args.ta
        for dtype in dtypes:
            out.append(target_attention_case(B, T, D, tuple(args.units), dtype, args.activation))
    if "gru_scan" in args.ops:
        B, T = args.gru
        for H in args.hidden:
            for mode in args.modes:
                for dtype in dtypes:
                    for lengths in args.gru_lengths:
                        out.append(gru_scan_case(B, T, H, mode, dtype, lengths))
    if "dice" in args.ops:
        for N, C in args.dice:
            for dtype in dtypes:
                out.append(dice_case(N, C, dtype))
    return out


def _pair(text: str) -> tuple[int, int]:
    n, c = text.lower().split("x")
    return int(n), int(c)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interest_kernels.bench.traffic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", default=["target_attention", "gru_scan", "dice"],
                        choices=["target_attention", "gru_scan", "dice"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=sorted(_DTYPES))
    parser.add_argument("--phases", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    parser.add_argument("--ta", nargs=3, type=int, default=[256, 64, 64], metavar=("B", "T", "D"),
                        help="target attention shape (issue 10's goal shape by default)")
    parser.add_argument("--units", nargs="+", type=int, default=[80, 40])
    parser.add_argument("--activation", default="sigmoid",
                        choices=["sigmoid", "relu", "prelu", "dice", "identity"])
    parser.add_argument("--gru", nargs=2, type=int, default=[256, 64], metavar=("B", "T"))
    parser.add_argument("--hidden", nargs="+", type=int, default=[36, 128], help="GRU hidden sizes")
    parser.add_argument("--gru-lengths", nargs="+", default=["full"], choices=["full", "random"],
                        help="GRU row lengths: all T, or uniform in 1..T")
    parser.add_argument("--modes", nargs="+", default=["augru", "gru"], choices=["gru", "aigru", "agru", "augru"])
    parser.add_argument("--dice", nargs="+", type=_pair, default=[(16384, 80), (16384, 40)], metavar="NxC")
    parser.add_argument("--l2-tbps", type=float, default=DEFAULT_L2_TBPS, help="assumed L2 bandwidth")
    parser.add_argument("--out", default="bench/results/traffic.local.json",
                        help="JSON path; the markdown table goes next to it (.md)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        # Importing this package has already imported triton (through torch), so the
        # interpreter can only be turned on in a fresh process.
        os.environ["TRITON_INTERPRET"] = "1"
        cli = argv if argv is not None else sys.argv[1:]
        os.execv(sys.executable, [sys.executable, "-m", "interest_kernels.bench.traffic", *cli])

    import interest_kernels  # noqa: F401  (registers every op)

    torch.manual_seed(0)
    results = []
    for case in build_cases(args):
        start = time.perf_counter()
        records = meter_case(case, tuple(args.phases))
        seconds = time.perf_counter() - start
        results.append(summarize(case, records, args.l2_tbps * 1e12, seconds))
        print(f"metered {case.op} {case.label} {case.dtype} in {seconds:.1f} s", file=sys.stderr, flush=True)
    command = "python -m interest_kernels.bench.traffic " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(results, args.l2_tbps)
    doc = {"command": command, "environment": _environment(),
           "roofline": {"hbm_bytes_per_s": HBM_BYTES_PER_S, "l2_bytes_per_s": args.l2_tbps * 1e12,
                        "dot_flops_per_s": DOT_FLOPS_PER_S, "sector_bytes": 32},
           "results": results}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    md_path = args.out[:-5] + ".md" if args.out.endswith(".json") else args.out + ".md"
    with open(md_path, "w") as f:
        f.write(f"# Triton kernel traffic (interpreter)\n\nCommand: `{command}`\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
