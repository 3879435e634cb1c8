"""Timing, memory, floors and result files shared by every benchmark case.

A :class:`Case` describes one op at one shape and dtype: how to make inputs, how to call
the public op (whose backend is forced with ``use_backend``), the eager reference, and
the floor: the bytes that must move and the FLOPs that must run. The runner times each
available backend, the eager reference, ``torch.compile`` of the reference and the peer
libraries' layers (DeepCTR-Torch, FuxiCTR, ``torch.nn.GRU``) on the same weights, forward
(no grad, as in serving), backward alone and forward+backward, and checks every backend
against the reference once on the same inputs before timing it.

Timing: the contenders of one measurement run in interleaved rounds (one call each per
round), so a load change on a shared machine biases none of them; on CUDA each call is
timed with CUDA events after the L2 cache is flushed (as ``triton.testing.do_bench``).
A spread p80/p20 above ``NOISY_SPREAD`` marks the row: the machine was busy.

The floor is turned into seconds with rates measured on the same machine in the same
run (copy bandwidth and matmul rate), so "fraction of floor" means the share of what
this machine can do that a backend achieves.
"""
from __future__ import annotations

import csv
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

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")
NOISY_SPREAD = 1.5  # p80 / p20 above this: the machine was busy during the measurement


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
    floor: Callable[[str], Floor]  # "fwd" or "full"; "bwd" is their difference
    grad_inputs: tuple[str, ...] = ()
    stateful: bool = False  # the call mutates buffers (running statistics): no torch.compile baseline
    modes: tuple[str, ...] = ("fwd", "bwd", "full")  # "bwd" backward alone, "full" forward+backward;
    # others run without grad
    peers: Optional[Callable[[Inputs], dict[str, "Peer"]]] = None  # the peer layers on the case's weights


@dataclass
class Peer:
    """A peer library's layer holding a case's weights: ``call(inputs)`` runs it on the
    case's inputs; ``params`` are its own parameters (differentiated in backward modes)."""

    call: Callable[[Inputs], Any]
    params: list[torch.Tensor] = field(default_factory=list)


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


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """A function timing one call in ms. CUDA: CUDA events around the call, after the L2
    cache is flushed by writing a buffer larger than it; CPU: wall clock."""
    if device.type != "cuda":
        def wall(fn: Callable[[], Any]) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return wall
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)

    def events(fn: Callable[[], Any]) -> float:
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return events


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device,
                     budget_s: float = 1.0) -> dict[str, tuple[float, float, float]]:
    """p20, p50, p80 (ms) of each function's call, timed in interleaved rounds: every
    round calls each function once, so a change of load hits all of them alike. About
    ``budget_s`` seconds per function, 3 to 200 rounds."""
    timer = _timer(device)
    one = {}
    for name, fn in fns.items():
        fn()
        sync(device)
        one[name] = max(timer(fn), 1e-3)
    rounds = int(min(200, max(3, budget_s * 1e3 / max(one.values()))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: percentiles(t) for name, t in times.items()}


def time_fn(fn: Callable[[], Any], device: torch.device, budget_s: float = 1.0) -> tuple[float, float, float]:
    """p20, p50, p80 of one call's time in ms (see :func:`time_interleaved`)."""
    return time_interleaved({"fn": fn}, device, budget_s)["fn"]


def spread_note(p20: Optional[float], p80: Optional[float]) -> str:
    """A warning when the spread of a measurement says the machine was busy."""
    if p20 and p80 and p80 / p20 > NOISY_SPREAD:
        return f"noisy: p80/p20 = {p80 / p20:.1f}"
    return ""


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


def mode_floor(case: Case, mode: str) -> Floor:
    """The case's floor in ``mode``; backward alone is forward+backward less forward."""
    if mode != "bwd":
        return case.floor(mode)
    full, fwd = case.floor("full"), case.floor("fwd")
    return Floor(bytes=full.bytes - fwd.bytes, flops=full.flops - fwd.flops)


def fresh_inputs(case: Case, inputs: Inputs, grad: bool) -> Inputs:
    """Leaf copies of ``inputs``; with ``grad`` the case's gradient inputs require grad."""
    return clone_inputs(inputs, None, case.grad_inputs if grad else ())


def _ones_like_outputs(fn: Callable[[Inputs], Any], inputs: Inputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    outs = [o for o in _first_tensor(fn(inputs)) if o.requires_grad]
    return outs, [torch.ones_like(o) for o in outs]


def make_runner(fn: Callable[[Inputs], Any], inputs: Inputs, mode: str,
                extra_leaves: tuple[torch.Tensor, ...] = ()) -> Callable[[], Any]:
    """One timed call of ``fn``: no grad; (mode "full") forward plus the gradients of
    every leaf (the inputs' and ``extra_leaves``, a peer's parameters) with an all-ones
    upstream gradient; (mode "bwd") those gradients alone, the forward run once before."""
    leaves = [t for _, t in grad_leaves(inputs)] + list(extra_leaves)
    if mode == "bwd":
        outs, gs = _ones_like_outputs(fn, inputs)

        def run_bwd() -> Any:
            return torch.autograd.grad(outs, leaves, gs, allow_unused=True, retain_graph=True)
        return run_bwd
    if mode != "full":
        def run() -> Any:
            with torch.no_grad():
                return fn(inputs)
        return run

    def run_full() -> Any:
        outs, gs = _ones_like_outputs(fn, inputs)
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


@dataclass
class _Contender:
    name: str
    call: Callable[[Inputs], Any]
    note: str = ""
    params: tuple[torch.Tensor, ...] = ()
    checked: bool = True  # compared with the reference (peers hold converted weights: checked in tests)


def _contenders(case: Case, device: torch.device, inputs: Inputs, compile_baseline: bool,
                rows: list[Row]) -> list[_Contender]:
    """The backends that can run ``case`` here (a skipped row for each that cannot), the
    eager reference, ``torch.compile`` of it, and the peer layers."""
    op = registered_ops()[case.op]
    found: list[_Contender] = []
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

        found.append(_Contender(name, call))
    low_precision = case.dtype in (torch.float16, torch.bfloat16)
    found.append(_Contender("eager", case.reference, "reference" + (" (fp32 math)" if low_precision else "")))
    if compile_baseline and not case.stateful:
        found.append(_Contender("compile", torch.compile(case.reference, dynamic=False), "torch.compile(reference)"))
    if case.peers is not None:
        try:
            peers = case.peers(inputs)
        except ImportError as exc:
            rows.append(Row(case.op, case.label, case.shape, str(case.dtype), "peers", "-", note=f"skipped: {exc}"))
            peers = {}
        for name, peer in peers.items():
            found.append(_Contender(name, peer.call, "peer library, same weights", tuple(peer.params), checked=False))
    return found


def run_case(
    case: Case, device: torch.device, machine: Machine, *, compile_baseline: bool = True,
    budget_s: float = 1.0, log: Optional[Callable[[str], None]] = None,
) -> list[Row]:
    """Time every available backend of ``case``, the eager and compiled reference and the
    peers, each mode's contenders in interleaved rounds."""
    log = log or (lambda line: print(line, flush=True))
    rows: list[Row] = []
    inputs = case.make(device, case.dtype)
    shape_note = ", ".join(f"{k}={v}" for k, v in case.shape.items())
    contenders = _contenders(case, device, inputs, compile_baseline, rows)

    with torch.no_grad():
        expected = case.reference(fresh_inputs(case, inputs, False))
    for mode in case.modes:
        fl = mode_floor(case, mode)
        fms = floor_ms(fl, machine, case.dtype)
        runs: dict[str, Callable[[], Any]] = {}
        errs: dict[str, Optional[float]] = {}
        for c in contenders:
            try:
                errs[c.name] = None
                if mode not in ("bwd", "full") and c.checked:
                    with torch.no_grad():
                        errs[c.name] = _max_err(c.call(fresh_inputs(case, inputs, False)), expected)
                for p in c.params:
                    p.requires_grad_(mode in ("bwd", "full"))
                runs[c.name] = make_runner(c.call, fresh_inputs(case, inputs, grad=mode in ("bwd", "full")),
                                           mode, c.params if mode in ("bwd", "full") else ())
            except (RuntimeError, BackendUnavailableError) as exc:
                msg = str(exc).splitlines()[0][:160]
                rows.append(Row(case.op, case.label, case.shape, str(case.dtype), c.name, mode, note=f"failed: {msg}"))
                log(f"  {case.op} {case.label} {c.name} {mode}: failed ({msg})")
        try:
            timed = time_interleaved(runs, device, budget_s)
        except (RuntimeError, BackendUnavailableError) as exc:
            msg = str(exc).splitlines()[0][:160]
            rows += [Row(case.op, case.label, case.shape, str(case.dtype), name, mode, note=f"failed: {msg}")
                     for name in runs]
            log(f"  {case.op} {case.label} {mode}: failed ({msg})")
            continue
        for c in contenders:
            if c.name not in timed:
                continue
            p20, p50, p80 = timed[c.name]
            note = "; ".join(n for n in (c.note, spread_note(p20, p80)) if n)
            row = Row(
                case.op, case.label, case.shape, str(case.dtype), c.name, mode, p20, p50, p80,
                _peak_mb(device, runs[c.name]),
                gbps=fl.bytes / (p50 * 1e-3) / 1e9, tflops=fl.flops / (p50 * 1e-3) / 1e12,
                floor_ms=fms, fraction_of_floor=fms / p50 if p50 > 0 else None,
                max_abs_err=errs[c.name], note=note,
            )
            rows.append(row)
            log(f"  {case.op} [{shape_note}] {str(case.dtype)[6:]} {c.name:>12} {mode:>4}: "
                f"{p50:9.3f} ms  ({row.fraction_of_floor:.1%} of floor)")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def write_results(path: str, machine: Machine, rows: list[Row]) -> None:
    """The raw rows and the machine as JSON at ``path`` (replaced)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": asdict(machine), "rows": [asdict(r) for r in rows]}, f, indent=1)


CSV_COLUMNS = ("when", "git_sha", "device", "device_name", "torch", "triton", "cuda", "op", "label", "shape",
               "dtype", "backend", "mode", "p20_ms", "p50_ms", "p80_ms", "peak_mem_mb", "gbps", "tflops",
               "floor_ms", "fraction_of_floor", "max_abs_err", "note")


def append_csv(path: str, machine: Machine, rows: list[Row]) -> None:
    """Append one long-form line per timed row (skipped and failed rows are left out) to
    the CSV at ``path``, with the machine and versions on every line; the header is
    written when the file is new. Runs accumulate, as in Liger-Kernel's benchmarks."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for r in rows:
            if r.p50_ms is None:
                continue
            line = {k: v for k, v in asdict(r).items() if k in CSV_COLUMNS}
            line.update(shape=";".join(f"{k}={v}" for k, v in r.shape.items()), dtype=r.dtype.replace("torch.", ""),
                        when=machine.when, git_sha=machine.git_sha, device=machine.device,
                        device_name=machine.device_name, torch=machine.torch, triton=machine.triton, cuda=machine.cuda)
            writer.writerow(line)


def read_csv(path: str) -> list[dict[str, Any]]:
    """The lines of a results CSV, numbers as floats (empty cells as None)."""
    numeric = {"p20_ms", "p50_ms", "p80_ms", "peak_mem_mb", "gbps", "tflops", "floor_ms", "fraction_of_floor",
               "max_abs_err"}
    with open(path, newline="") as f:
        return [{k: (float(v) if v else None) if k in numeric else v for k, v in line.items()}
                for line in csv.DictReader(f)]


def _fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


PEER_BASELINE = "deepctr"  # the speedup column beside "x eager": DeepCTR-Torch's layer


def markdown_table(machine: Machine, rows: list[Row]) -> str:
    """One markdown table: a line per (case, backend, mode), with speedups over the eager
    reference and over DeepCTR-Torch's layer, and a warning when timings were noisy."""
    head = (
        f"Machine: {machine.device_name} ({machine.device}); torch {machine.torch}; "
        f"triton {machine.triton}; CUDA {machine.cuda}; git {machine.git_sha}; "
        f"copy {machine.copy_gbps:.0f} GB/s; matmul "
        + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in machine.matmul_tflops.items())
        + f"; {machine.when}\n\n"
    )
    noisy = sum(1 for r in rows if "noisy" in r.note)
    if noisy:
        head += (f"**Warning: {noisy} of {sum(1 for r in rows if r.p50_ms)} measurements had p80/p20 above "
                 f"{NOISY_SPREAD}: the machine was busy; compare ratios within one case, not absolute times.**\n\n")
    lines = [
        f"| op | shape | dtype | backend | mode | p50 ms | p20-p80 ms | x eager | x {PEER_BASELINE} | peak MB | GB/s "
        "| TFLOP/s | of floor | max err | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r.op, r.label, r.dtype, r.mode, r.backend): r.p50_ms for r in rows if r.p50_ms}
    for r in rows:
        key = (r.op, r.label, r.dtype, r.mode)
        eager, peer = base.get(key + ("eager",)), base.get(key + (PEER_BASELINE,))
        speed = _fmt(eager / r.p50_ms, ".2f") if eager and r.p50_ms else ""
        speed_peer = _fmt(peer / r.p50_ms, ".2f") if peer and r.p50_ms else ""
        shape = " ".join(f"{k}={v}" for k, v in r.shape.items())
        span = f"{_fmt(r.p20_ms, '.3f')}-{_fmt(r.p80_ms, '.3f')}" if r.p50_ms else ""
        lines.append(
            f"| {r.op} | {shape} | {r.dtype.replace('torch.', '')} | {r.backend} | {r.mode} | "
            f"{_fmt(r.p50_ms, '.3f')} | {span} | {speed} | {speed_peer} | {_fmt(r.peak_mem_mb, '.1f')} | "
            f"{_fmt(r.gbps, '.1f')} | {_fmt(r.tflops, '.3f')} | {_fmt(r.fraction_of_floor, '.1%')} | "
            f"{_fmt(r.max_abs_err, '.2e')} | {r.note} |"
        )
    return head + "\n".join(lines) + "\n"


__all__ = ["CSV_COLUMNS", "Case", "Floor", "Machine", "Peer", "REPO_ROOT", "RESULTS_DIR", "Row", "append_csv",
           "environment", "floor_ms", "fresh_inputs", "make_runner", "markdown_table", "measure_machine",
           "mode_floor", "percentiles", "read_csv", "run_case", "spread_note", "sync", "time_fn",
           "time_interleaved", "write_results"]
