"""``python -m interest_kernels.bench.sm90``: every Triton kernel compiled for sm_90, no GPU.

Each op family's representative calls (:data:`FAMILY_CALLS`) run forward and backward on
CPU tensors with the Triton backend forced and ``JITFunction.run`` replaced: each launch
is specialised exactly as the JIT would (argument types, 16-byte divisibility, constexprs,
``num_warps``/``num_stages``), compiled for ``GPUTarget("cuda", 90, 64)`` (sm_90a) with the
ptxas that ships with Triton, and never run. Kernels and their configurations are thus
found from the launch code itself, whatever the kernel modules look like. The
configurations are the ones the launch code picks for CPU tensors, which are the GPU's
wherever the launcher uses the same tiles under the interpreter as on an H200 (issue 10,
item 3); the report lists each configuration so that a difference shows.

Recorded per compiled kernel: registers per thread, spill stores/loads and stack frame
(ptxas ``-v``), shared memory (Triton's allocation plus ptxas's static), and how many
``wgmma`` (Hopper warpgroup MMA) and ``mma.sync`` instructions the PTX holds.

Limits checked (:func:`violations`): shared memory at most 227 KB per block, the sm_90
opt-in maximum (CUDA C++ Programming Guide, compute capability 9.0 table); spills at most
:data:`SPILL_BOUND_BYTES` per thread (stores or loads).

Must run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled): the CLI
re-executes itself without it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

from . import traffic
from .traffic import MeterCase

SM90_SHARED_LIMIT_BYTES = 227 * 1024
# Spills a kernel may have per thread (stores or loads) before the check fails: a few
# local-memory round trips that L1 absorbs; the previous session's worst at the
# benchmark configurations was 600 B (fp16 target-attention backward).
SPILL_BOUND_BYTES = 256


@dataclass
class CompiledKernel:
    family: str
    kernel: str
    call: str  # the representative call that launched it
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack_frame: Optional[int] = None
    shared_bytes: Optional[int] = None
    wgmma: int = 0
    mma: int = 0
    seconds: float = 0.0
    error: Optional[str] = None


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_shared": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, stack frame, spills and static shared memory from ``ptxas -v``."""
    out = {}
    for key, pattern in _PTXAS.items():
        found = pattern.findall(log)
        out[key] = max(int(v) for v in found) if found else 0
    return out


# --- representative calls -------------------------------------------------------------


def _ta_calls(quick: bool) -> Iterator[MeterCase]:
    forms = [("float16", "sigmoid")] if quick else [
        (dt, act) for dt in ("float32", "float16", "bfloat16") for act in ("sigmoid", "prelu", "dice")
    ]
    for dt, act in forms:
        yield traffic.target_attention_case(256, 64, 64, (80, 40), _dtype(dt), act)


def _gru_calls(quick: bool) -> Iterator[MeterCase]:
    forms = [(128, "float16")] if quick else [
        (h, dt) for h in (36, 64, 128, 256) for dt in ("float32", "float16", "bfloat16")
    ]
    for hidden, dt in forms:
        yield traffic.gru_scan_case(256, 64, hidden, "augru", _dtype(dt))


def _dice_calls(quick: bool) -> Iterator[MeterCase]:
    for dt in ("float32",) if quick else ("float32", "float16", "bfloat16"):
        yield traffic.dice_case(16384, 80, _dtype(dt))


def _dtype(name: str):
    import torch

    return getattr(torch, name)


# Representative calls per family: the meter's cases at the benchmark shapes.
FAMILY_CALLS: dict[str, Callable[[bool], Iterator[MeterCase]]] = {
    "target_attention": _ta_calls,
    "gru_scan": _gru_calls,
    "dice": _dice_calls,
}


# --- capture and compile ---------------------------------------------------------------


@contextlib.contextmanager
def _triton_backend_on_cpu() -> Iterator[None]:
    """Let the op dispatch choose the triton backend for CPU tensors without the
    interpreter (its launches are compiled here, never run)."""
    from interest_kernels import _backend

    original = _backend.triton_unavailable_reason
    patched = []
    for mod in list(sys.modules.values()):
        if mod is not _backend and getattr(mod, "triton_unavailable_reason", None) is original:
            patched.append(mod)
            mod.triton_unavailable_reason = lambda device: None if device.type == "cpu" else original(device)
    try:
        yield
    finally:
        for mod in patched:
            mod.triton_unavailable_reason = original


class _Compiler:
    """Replaces ``JITFunction.run`` while active: compiles each new specialisation for
    sm_90 and records it under the current call's label."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", 90, 64)
        self.backend = make_backend(self.target)
        self.results: list[CompiledKernel] = []
        self.call = ""
        self._seen: set = set()

    def run(self, jit_fn, args: tuple, kwargs: dict) -> None:
        import triton
        from triton import knobs
        from triton.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature

        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        binder = create_function_from_signature(jit_fn.signature, jit_fn.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        key = (jit_fn.fn.__qualname__, jit_fn.fn.__module__, str(specialization), str(options))
        if key in self._seen:
            return
        self._seen.add(key)
        options, signature, constexprs, attrs = jit_fn._pack_args(self.backend, kwargs, bound, specialization, options)
        names = [p.name for p in jit_fn.params]
        result = CompiledKernel(
            family=_family_of(jit_fn.fn.__module__), kernel=jit_fn.fn.__name__, call=self.call,
            constexprs={names[path[0]]: _plain(v) for path, v in constexprs.items() if len(path) == 1},
            num_warps=options.num_warps, num_stages=options.num_stages,
        )
        start = time.perf_counter()
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), knobs.nvidia.scope():
                knobs.nvidia.dump_ptxas_log = True
                compiled = triton.compile(ASTSource(jit_fn, signature, constexprs, attrs),
                                          target=self.target, options=options.__dict__)
            ptxas = parse_ptxas_log(log.getvalue())
            ptx = compiled.asm["ptx"]
            result.registers = ptxas["registers"]
            result.spill_stores = ptxas["spill_stores"]
            result.spill_loads = ptxas["spill_loads"]
            result.stack_frame = ptxas["stack_frame"]
            result.shared_bytes = compiled.metadata.shared + ptxas["static_shared"]
            result.wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
            result.mma = len(re.findall(r"\bmma\.sync", ptx))
        except Exception as err:  # a kernel that does not compile is a finding, not a crash
            lines = str(err).strip().splitlines() or [""]
            where = f"{lines[0]} " if len(lines) > 1 else ""  # Triton's "at line:col:"
            result.error = f"{type(err).__name__}: {where}{lines[-1]}"
        result.seconds = round(time.perf_counter() - start, 2)
        self.results.append(result)


def _family_of(module: str) -> str:
    """The op family of a kernel module: the package under ``interest_kernels.ops``
    (``...ops.target_attention.triton.backward`` -> ``target_attention``)."""
    parts = module.split(".")
    return parts[parts.index("ops") + 1] if "ops" in parts[:-1] else parts[-2]


def _plain(v: Any) -> Any:
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def compile_families(families: list[str], quick: bool = False, log: Callable[[str], None] = lambda s: None
                     ) -> list[CompiledKernel]:
    """Run each family's representative calls forward and backward, compiling every
    launch for sm_90 instead of running it."""
    return compile_cases([case for family in families for case in FAMILY_CALLS[family](quick)], log)


def compile_cases(cases: Iterable[MeterCase], log: Callable[[str], None] = lambda s: None
                  ) -> list[CompiledKernel]:
    """:func:`compile_families` for the given meter cases (e.g. one form of the full
    report, checked alone); each kernel is filed under its module's family."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("sm90 compiles need TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    import torch
    from triton.runtime.jit import JITFunction

    import interest_kernels  # noqa: F401  (registers every op)
    from interest_kernels._backend import use_backend
    from interest_kernels.testing import clone_inputs

    compiler = _Compiler()
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        compiler.run(self, args, kwargs)

    JITFunction.run = run
    try:
        with _triton_backend_on_cpu(), use_backend("triton"):
            for case in cases:
                label = f"{case.label} {str(case.dtype).replace('torch.', '')}"
                compiler.call = label
                before = len(compiler.results)
                out = case.call(clone_inputs(case.make(), None, case.grad_inputs))
                outs = [t for t in traffic._tensors(out) if t.requires_grad]
                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
                log(f"{label}: {len(compiler.results) - before} new kernels")
    finally:
        JITFunction.run = original_run
    return compiler.results


def violations(results: list[CompiledKernel], spill_bound: int = SPILL_BOUND_BYTES) -> list[str]:
    """Each kernel over the sm_90 shared-memory limit, over the spill bound, or not compiling."""
    bad = []
    for r in results:
        where = f"{r.family}.{r.kernel} ({r.call}; warps {r.num_warps}, stages {r.num_stages})"
        if r.error:
            bad.append(f"{where}: does not compile: {r.error}")
            continue
        if r.shared_bytes > SM90_SHARED_LIMIT_BYTES:
            bad.append(f"{where}: {r.shared_bytes} B shared memory > {SM90_SHARED_LIMIT_BYTES} B")
        if max(r.spill_stores, r.spill_loads) > spill_bound:
            bad.append(f"{where}: spills {r.spill_stores}/{r.spill_loads} B (stores/loads) > {spill_bound} B")
    return bad


def markdown(results: list[CompiledKernel]) -> str:
    lines = [
        "| family | kernel | call | warps | stages | regs | spill st/ld B | stack B | shared KB | wgmma | mma "
        "| config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cfg = ", ".join(f"{k}={v}" for k, v in r.constexprs.items() if k.isupper())
        if r.error:
            lines.append(f"| {r.family} | {r.kernel} | {r.call} | {r.num_warps} | {r.num_stages} | "
                         f"error: {r.error} | | | | | | {cfg} |")
            continue
        lines.append(
            f"| {r.family} | {r.kernel} | {r.call} | {r.num_warps} | {r.num_stages} | {r.registers} | "
            f"{r.spill_stores}/{r.spill_loads} | {r.stack_frame} | {r.shared_bytes / 1024:.1f} | "
            f"{r.wgmma} | {r.mma} | {cfg} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m interest_kernels.bench.sm90", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILY_CALLS), choices=list(FAMILY_CALLS))
    parser.add_argument("--quick", action="store_true", help="one representative call per family (CI)")
    parser.add_argument("--out", default="bench/results/sm90.local.json",
                        help="JSON path; the markdown table goes next to it (.md)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cli = argv if argv is not None else sys.argv[1:]
        os.execve(sys.executable, [sys.executable, "-m", "interest_kernels.bench.sm90", *cli], env)

    # A fresh cache: a cached kernel would skip ptxas and its register report.
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        start = time.perf_counter()
        results = compile_families(args.families, args.quick,
                                   log=lambda s: print(s, file=sys.stderr, flush=True))
        seconds = time.perf_counter() - start
    import triton

    bad = violations(results)
    command = "python -m interest_kernels.bench.sm90 " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {"command": command, "triton": triton.__version__, "target": "GPUTarget('cuda', 90, 64): sm_90a",
           "shared_limit_bytes": SM90_SHARED_LIMIT_BYTES, "spill_bound_bytes": SPILL_BOUND_BYTES,
           "seconds": round(seconds, 1), "violations": bad, "kernels": [asdict(r) for r in results]}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    table = markdown(results)
    md_path = args.out[:-5] + ".md" if args.out.endswith(".json") else args.out + ".md"
    with open(md_path, "w") as f:
        f.write(f"# sm_90 compile report\n\nCommand: `{command}` (triton {triton.__version__}, "
                f"{seconds:.0f} s)\n\nLimits: shared memory <= {SM90_SHARED_LIMIT_BYTES} B per block, "
                f"spills <= {SPILL_BOUND_BYTES} B per thread.\n\n{table}\n"
                + ("Violations:\n\n" + "\n".join(f"- {b}" for b in bad) + "\n" if bad else "No violations.\n"))
    print(table)
    for b in bad:
        print("VIOLATION:", b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
