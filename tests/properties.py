"""Shared pieces of the property-based tests (``tests/test_properties_*.py``).

Every op family is checked on random configurations against its eager reference, forward
and every gradient, on every backend registered for the family (enumerated from the op
registry, so a backend added later is covered without editing the tests). Backends that
decline a configuration (``BackendUnavailableError`` under ``use_backend``) skip it.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default) is derandomised and sized to the CI
budget; ``thorough`` draws fresh examples, at least 2,000 per family on the eager and
compiled backends and a few hundred under the (slow) Triton interpreter.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import pytest
import torch
from hypothesis import HealthCheck, reject, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st

import interest_kernels  # noqa: F401  (registers every op family)
from interest_kernels import BackendUnavailableError, use_backend
from interest_kernels._backend import registered_ops
from interest_kernels.testing import check_against_reference

from backend_runs import backends  # noqa: F401  (the tests take it from here)

_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("thorough", **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

# Examples per (family, backend): the Triton interpreter runs a kernel in Python, so
# its examples cost about a second each and get a small share.
_BUDGET = {
    "ci": {"triton": 5, "other": 100},
    "thorough": {"triton": 150, "other": 2000},
}


def budget(backend: str) -> int:
    """Examples per (family, backend) in the active profile."""
    table = _BUDGET.get(PROFILE, _BUDGET["ci"])
    return table["triton" if backend == "triton" else "other"]


def run_on(backend: str, fn: Callable) -> Callable:
    """``fn`` run under ``use_backend(backend)``."""

    def run(**kw):
        with use_backend(backend):
            return fn(**kw)

    return run


def check_backend(backend: str, op: Callable, reference: Callable, inputs: dict, **kw) -> None:
    """``check_against_reference`` of ``op`` under ``use_backend(backend)``; an example
    the backend declines is rejected (hypothesis draws another)."""
    try:
        check_against_reference(run_on(backend, op), reference, inputs, **kw)
    except BackendUnavailableError:
        reject()


def device_reason(op_name: str, backend: str) -> Optional[str]:
    """Why ``backend`` of ``op_name`` cannot run float32 CPU calls at all (None if it may)."""
    why_not = registered_ops()[op_name].implementations[backend].why_not
    try:
        return why_not(device=torch.device("cpu"), dtype=torch.float32)
    except TypeError:  # a why_not that needs more facts decides per example
        return None


def run_examples(check: Callable[[], None], op_name: str, backend: str) -> None:
    """Run a ``@given`` test; a backend that cannot run on this machine, or that declines
    every example, is skipped."""
    reason = device_reason(op_name, backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    try:
        check()
    except Unsatisfiable:
        pytest.skip(f"the {backend} backend declined every example on this machine")


def sizes(high: int) -> st.SearchStrategy[int]:
    """A batch or sequence size in [0, high], 0 about one time in ``high + 1`` (hypothesis
    itself would favour the boundary far more)."""
    return st.sampled_from(list(range(1, high + 1)) + [0])


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


def low_precision_dtypes(backend: str) -> list[torch.dtype]:
    """float16, and bfloat16 where the backend runs it on this machine (the Triton
    interpreter has no bfloat16 dot on CPU)."""
    if backend == "triton" and not torch.cuda.is_available():
        return [torch.float16]
    return [torch.float16, torch.bfloat16]


def dtypes(backend: str) -> st.SearchStrategy[torch.dtype]:
    """Mostly float32; float64 and the low-precision dtypes as well."""
    choices = [torch.float32, torch.float32, torch.float64] + low_precision_dtypes(backend)
    if backend == "triton":
        choices = [torch.float32, torch.float32] + low_precision_dtypes(backend)
    return st.sampled_from(choices)


def valid_positions(draw, rows: int, seq_len: int, gen: torch.Generator) -> dict:
    """``{}``, ``{"lengths": ...}`` or ``{"mask": ...}`` for ``rows`` sequences of T steps;
    masks are bool, integer or float 0/1, and rows may be all masked."""
    kind = draw(st.sampled_from(["none", "lengths", "mask"]))
    if kind == "none":
        return {}
    if kind == "lengths":
        lengths = torch.randint(0, seq_len + 1, (rows,), generator=gen)
        if rows and draw(st.booleans()):
            lengths[0] = 0
        dtype = draw(st.sampled_from([torch.int64, torch.int32]))
        return {"lengths": lengths.to(dtype)}
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    mask = torch.rand(rows, seq_len, generator=gen) < density
    if rows and seq_len and draw(st.booleans()):
        mask[0] = False
    dtype = draw(st.sampled_from([torch.bool, torch.bool, torch.int64, torch.float32]))
    return {"mask": mask.to(dtype)}
