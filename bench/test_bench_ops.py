"""pytest-benchmark entries for every op case (``pytest bench --benchmark-only``).

The shape set comes from ``IK_BENCH_SHAPES`` (default ``smoke``, which CI runs once
each with ``--benchmark-disable`` so the cases stay runnable). Every backend that can
run on this machine is timed forward and forward+backward, next to the eager reference.
Triton on CPU (the interpreter) is not timed.
"""
from __future__ import annotations

import os

import pytest
import torch

import interest_kernels  # noqa: F401  (registers every op)
from interest_kernels._backend import registered_ops, use_backend
from interest_kernels.bench.cases import ALL_CASES
from interest_kernels.bench.harness import fresh_inputs, make_runner

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = os.environ.get("IK_BENCH_SHAPES", "smoke")


def _params():
    for op_name, make_cases in ALL_CASES.items():
        for case in make_cases(SHAPES):
            op = registered_ops()[case.op]
            backends = ["eager"] + [
                b for b in op.implementations
                if b != "reference" and op.reasons(device=DEVICE, dtype=case.dtype)[b] is None
                and not (b == "triton" and DEVICE.type == "cpu")
            ]
            for backend in backends:
                for mode in case.modes:
                    yield pytest.param(case, backend, mode,
                                       id=f"{case.op}-{case.label}-{str(case.dtype)[6:]}-{backend}-{mode}")


@pytest.mark.parametrize("case,backend,mode", list(_params()))
def test_bench(benchmark, case, backend, mode):
    inputs = fresh_inputs(case, case.make(DEVICE, case.dtype), grad=mode in ("bwd", "full"))
    if backend == "eager":
        fn = case.reference
    else:
        def fn(inp):
            with use_backend(backend):
                return case.call(inp)
    run = make_runner(fn, inputs, mode)

    def timed():
        out = run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(case.shape)
    benchmark(timed)
