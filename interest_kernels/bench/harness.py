"""Timing, memory, floors and result files shared by every benchmark case.

A :class:`Case` describes one op at one shape and dtype: how to make inputs, how to call
the public op (whose backend is forced with ``use_backend``), the eager reference, and
the floor: the bytes that must move and the FLOPs that must run. The runner times each
available backend, the eager reference and ``torch.compile`` of the reference, forward
(no grad, as in serving) and forward+backward, and checks every backend against the
reference once on the same inputs before timing it.

The floor is turned into seconds with rates measured on the same machine in the same
run (copy bandwidth and matmul rate), so "fraction of floor" means the share of what
this machine can do that a backend achieves.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from interest_kernels._backend import BackendUnavailableError, registered_ops, use_backend
from interest_kernels.testing import clone_inputs, grad_leaves

Inputs = dict[str, Any]


@dataclass
class Floor:
    """What a call must do at least: bytes moved to/from memory and FLOPs."""

    bytes: float
    flops: float


@dataclass
class Case:
    op: str
    label: str
    shape: dict[str, Any]
    dtype: torch.dtype
    make: Callable[[torch.device, torch.dtype], Inputs]
    call: Callable[[Inputs], Any]
    reference: Callable[[Inputs], Any]
    floor: Callable[[str], Floor]  # by mode
    grad_inputs: tuple[str, ...] = ()
    stateful: bool = False  # the call mutates buffers (running statistics): no torch.compile baseline
    modes: tuple[str, ...] = ("fwd", "full")  # "full" forward+backward; others run without grad


@dataclass
class Row:
    op: str
    label: str
    shape: dict[str, Any]
    dtype: str
    backend: str
    mode: str
    p20_ms: Optional[float] = None
    p50_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    gbps: Optional[float] = None
    tflops: Optional[float] = None
    floor_ms: Optional[float] = None
    fraction_of_floor: Optional[float] = None
    max_abs_err: Optional[float] = None
    note: str = ""


@dataclass
class Machine:
    device: str
    device_name: str
    torch: str
    triton: Optional[str]
    cuda: Optional[str]
    git_sha: Optional[str]
    copy_gbps: float
    matmul_tflops: dict[str, float] = field(default_factory=dict)
    when: str = ""


def _first_tensor(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so a wall-clock reading covers the work queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(times_ms: list[float]) -> tuple[float, float, float]:
    """p20, p50, p80 of a list of timings (every benchmark reports these three)."""
    q = statistics.quantiles(times_ms, n=10) if len(times_ms) >= 2 else times_ms * 9
    return q[1], statistics.median(times_ms), q[7]


def environment(device: torch.device) -> dict[str, Any]:
    """What a result depends on besides the code: device name, torch, triton, CUDA, git."""
    triton_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        pass
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip() or None
    except OSError:
        sha = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device_name": name, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "git_sha": sha}


def time_fn(fn: Callable[[], Any], device: torch.device, budget_s: float = 1.0) -> tuple[float, float, float]:
    """p20, p50, p80 of one call's wall time in ms (CUDA: synchronised per call)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(200, max(3, budget_s / one)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return percentiles(times)


def measure_machine(device: torch.device) -> Machine:
    """Copy bandwidth and matmul rates of ``device``, measured now."""
    n = (256 << 20) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    _, p50, _ = time_fn(lambda: dst.copy_(src), device, budget_s=0.5)
    copy_gbps = 2 * n / (p50 * 1e-3) / 1e9
    rates = {}
    size = 8192 if device.type == "cuda" else 1024
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32,)
    for dt in dtypes:
        a = torch.randn(size, size, device=device).to(dt)
        b = torch.randn(size, size, device=device).to(dt)
        _, p50, _ = time_fn(lambda: a @ b, device, budget_s=0.5)
        rates[str(dt).replace("torch.", "")] = 2 * size**3 / (p50 * 1e-3) / 1e12
    return Machine(
        device=device.type, **environment(device), copy_gbps=copy_gbps, matmul_tflops=rates,
        when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def floor_ms(floor: Floor, machine: Machine, dtype: torch.dtype) -> float:
    rate = machine.matmul_tflops.get(str(dtype).replace("torch.", ""), machine.matmul_tflops.get("float32", 1.0))
    t_bytes = floor.bytes / (machine.copy_gbps * 1e9)
    t_flops = floor.flops / (rate * 1e12)
    return max(t_bytes, t_flops) * 1e3


def fresh_inputs(case: Case, inputs: Inputs, grad: bool) -> Inputs:
    """Leaf copies of ``inputs``; with ``grad`` the case's gradient inputs require grad."""
    return clone_inputs(inputs, None, case.grad_inputs if grad else ())


def make_runner(fn: Callable[[Inputs], Any], inputs: Inputs, mode: str) -> Callable[[], Any]:
    """One timed call of ``fn``: no grad, or (mode "full") forward plus the gradients of
    every leaf with an all-ones upstream gradient."""
    if mode != "full":
        def run() -> Any:
            with torch.no_grad():
                return fn(inputs)
        return run
    grads: dict[int, torch.Tensor] = {}
    leaves = [t for _, t in grad_leaves(inputs)]

    def run_full() -> Any:
        outs = [o for o in _first_tensor(fn(inputs)) if o.requires_grad]
        gs = []
        for i, o in enumerate(outs):
            if i not in grads:
                grads[i] = torch.ones_like(o)
            gs.append(grads[i])
        return torch.autograd.grad(outs, leaves, gs, allow_unused=True)
    return run_full


def _max_err(a: Any, b: Any) -> float:
    ta, tb = _first_tensor(a), _first_tensor(b)
    errs = [float((x.double() - y.double()).abs().max()) for x, y in zip(ta, tb) if x.numel()]
    return max(errs) if errs else 0.0


def _peak_mb(device: torch.device, run: Callable[[], Any]) -> Optional[float]:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_case(
    case: Case, device: torch.device, machine: Machine, *, compile_baseline: bool = True,
    budget_s: float = 1.0, log: Optional[Callable[[str], None]] = None,
) -> list[Row]:
    """Time every available backend of ``case`` plus the eager and compiled reference."""
    log = log or (lambda line: print(line, flush=True))
    rows: list[Row] = []
    inputs = case.make(device, case.dtype)
    op = registered_ops()[case.op]
    shape_note = ", ".join(f"{k}={v}" for k, v in case.shape.items())
    contenders: list[tuple[str, Callable[[Inputs], Any], str]] = []
    for name in op.implementations:
        if name == "reference":
            continue
        reason = op.reasons(device=device, dtype=case.dtype).get(name)
        if reason is None and name == "triton" and device.type == "cpu":
            reason = "Triton on CPU runs only in the interpreter: a correctness tool, not timed"
        if reason is not None:
            rows.append(Row(case.op, case.label, case.shape, str(case.dtype), name, "-", note=f"skipped: {reason}"))
            continue

        def call(inp: Inputs, _name: str = name) -> Any:
            with use_backend(_name):
                return case.call(inp)

        contenders.append((name, call, ""))
    contenders.append(("eager", case.reference, "reference"))
    if compile_baseline and not case.stateful:
        compiled = torch.compile(case.reference, dynamic=False)
        contenders.append(("compile", compiled, "torch.compile(reference)"))

    with torch.no_grad():
        expected = case.reference(fresh_inputs(case, inputs, False))
    for mode in case.modes:
        fl = case.floor(mode)
        fms = floor_ms(fl, machine, case.dtype)
        for name, fn, note in contenders:
            inp = fresh_inputs(case, inputs, grad=(mode == "full"))
            run = make_runner(fn, inp, mode)
            err = None
            try:
                if mode != "full":
                    with torch.no_grad():
                        err = _max_err(fn(fresh_inputs(case, inputs, False)), expected)
                p20, p50, p80 = time_fn(run, device, budget_s)
                peak = _peak_mb(device, run)
            except (RuntimeError, BackendUnavailableError) as exc:
                msg = str(exc).splitlines()[0][:160]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(Row(case.op, case.label, case.shape, str(case.dtype), name, mode, note=f"failed: {msg}"))
                log(f"  {case.op} {case.label} {name} {mode}: failed ({msg})")
                continue
            row = Row(
                case.op, case.label, case.shape, str(case.dtype), name, mode, p20, p50, p80, peak,
                gbps=fl.bytes / (p50 * 1e-3) / 1e9, tflops=fl.flops / (p50 * 1e-3) / 1e12,
                floor_ms=fms, fraction_of_floor=fms / p50 if p50 > 0 else None,
                max_abs_err=err, note=note,
            )
            rows.append(row)
            log(f"  {case.op} [{shape_note}] {str(case.dtype)[6:]} {name:>9} {mode:>4}: "
                f"{p50:9.3f} ms  ({row.fraction_of_floor:.1%} of floor)")
    return rows


def write_results(path: str, machine: Machine, rows: list[Row]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": asdict(machine), "rows": [asdict(r) for r in rows]}, f, indent=1)


def _fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(machine: Machine, rows: list[Row]) -> str:
    """One markdown table: a line per (case, backend, mode), with speedups over eager."""
    head = (
        f"Machine: {machine.device_name} ({machine.device}); torch {machine.torch}; "
        f"triton {machine.triton}; CUDA {machine.cuda}; git {machine.git_sha}; "
        f"copy {machine.copy_gbps:.0f} GB/s; matmul "
        + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in machine.matmul_tflops.items())
        + f"; {machine.when}\n\n"
    )
    lines = [
        "| op | shape | dtype | backend | mode | p50 ms | p20-p80 ms | x eager | peak MB | GB/s | TFLOP/s | of floor | max err | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager = {(r.op, r.label, r.dtype, r.mode): r.p50_ms for r in rows if r.backend == "eager" and r.p50_ms}
    for r in rows:
        base = eager.get((r.op, r.label, r.dtype, r.mode))
        speed = _fmt(base / r.p50_ms, ".2f") if base and r.p50_ms else ""
        shape = " ".join(f"{k}={v}" for k, v in r.shape.items())
        span = f"{_fmt(r.p20_ms, '.3f')}-{_fmt(r.p80_ms, '.3f')}" if r.p50_ms else ""
        lines.append(
            f"| {r.op} | {shape} | {r.dtype.replace('torch.', '')} | {r.backend} | {r.mode} | "
            f"{_fmt(r.p50_ms, '.3f')} | {span} | {speed} | {_fmt(r.peak_mem_mb, '.1f')} | "
            f"{_fmt(r.gbps, '.1f')} | {_fmt(r.tflops, '.3f')} | {_fmt(r.fraction_of_floor, '.1%')} | "
            f"{_fmt(r.max_abs_err, '.2e')} | {r.note} |"
        )
    return head + "\n".join(lines) + "\n"


__all__ = ["Case", "Floor", "Row", "Machine", "environment", "fresh_inputs", "make_runner",
           "measure_machine", "percentiles", "run_case", "sync",
           "write_results", "markdown_table", "time_fn", "floor_ms"]
