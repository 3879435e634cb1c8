"""Backend selection for every op.

Each op family registers its implementations ("reference", "triton", "cpu", "cuda")
with an :class:`Op`. A call picks the first implementation, in the op's order of
preference for the tensors' device, that accepts it; every implementation states
*why* it cannot take a call, and when none can (or a forced one cannot) the error
lists every reason.

A backend is forced with ``use_backend(name)`` or the environment variable
``INTEREST_KERNELS_BACKEND``; the context manager wins over the variable.

Leaving the fast path is never silent: when the device's preferred backend declines a
call and a later one runs it, a :class:`BackendFallbackWarning` says which backend
declined, why, and which one runs instead; once per (op, declined backend, reason).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import operator
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

BACKEND_NAMES = ("reference", "triton", "cpu", "cuda")
ENV_VAR = "INTEREST_KERNELS_BACKEND"

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "interest_kernels_backend", default=None
)


class BackendUnavailableError(RuntimeError):
    """No registered backend can run this call; the message lists why for each."""


class BackendFallbackWarning(UserWarning):
    """The preferred backend declined a call and a slower one runs it (warned once per
    op, backend and reason)."""


_warned_fallbacks: set[tuple[str, str, str]] = set()


def _warn_fallback(op: str, declined: str, reason: str, chosen: str) -> None:
    key = (op, declined, reason)
    if key in _warned_fallbacks:
        return
    _warned_fallbacks.add(key)
    warnings.warn(
        f"{op}: the {declined} backend declined this call ({reason}); running it on the "
        f"{chosen} backend instead. Further calls declined for this reason are not reported.",
        BackendFallbackWarning,
        stacklevel=5,
    )


def _check_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force every op called inside the block onto backend ``name``.

    ``None`` restores automatic selection inside the block, overriding the
    environment variable. Raises ``BackendUnavailableError`` at call time if the
    forced backend cannot run a call (it never silently falls back).
    """
    if name is not None:
        _check_name(name)
    token = _forced.set(name if name is not None else "")
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Optional[str]:
    """The backend forced by ``use_backend`` or ``INTEREST_KERNELS_BACKEND``, if any."""
    name = _forced.get()
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or None
        if name is not None:
            _check_name(name)
    return name or None


# --- facts about this machine that backends use to say why they cannot run ---------


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why Triton kernels cannot run on tensors of ``device`` (None when they can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return (
            "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported"
        )
    return f"Triton does not run on {device.type} tensors"


def extension_unavailable_reason() -> Optional[str]:
    """Why the compiled extension ``interest_kernels._C`` cannot be used (None if it can)."""
    from . import _extension

    return _extension.unavailable_reason()


# --- the registry --------------------------------------------------------------------

WhyNot = Callable[..., Optional[str]]


@dataclass
class Implementation:
    name: str
    fn: Callable[..., Any]
    why_not: WhyNot
    limits: str = ""  # what it declines, in words, for ``python -m interest_kernels.info``


@dataclass
class Op:
    """One op family and its implementations.

    ``preference`` maps a device type to the backends tried, in order, when none
    is forced. ``why_not`` callables receive the same keyword arguments as
    :meth:`select` and return a reason string, or None when they accept the call.
    """

    name: str
    preference: dict[str, tuple[str, ...]]
    implementations: dict[str, Implementation] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _EVERY_OP[id(self)] = self

    def register(self, backend: str, why_not: Optional[WhyNot] = None, limits: str = ""):
        """Decorator registering ``fn`` as ``backend``; ``limits`` describes in words the
        calls ``why_not`` declines (listed by ``python -m interest_kernels.info``)."""
        _check_name(backend)

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.implementations[backend] = Implementation(
                backend, fn, why_not or (lambda **_: None), limits
            )
            return fn

        return decorate

    def reasons(self, **facts: Any) -> dict[str, Optional[str]]:
        """For each backend name: None if it would accept the call, else why not."""
        out: dict[str, Optional[str]] = {}
        for name in BACKEND_NAMES:
            impl = self.implementations.get(name)
            out[name] = (
                f"{self.name} has no {name} implementation"
                if impl is None
                else impl.why_not(**facts)
            )
        return out

    def select(self, device: torch.device, **facts: Any) -> Implementation:
        """The implementation that runs a call on ``device`` with these facts.

        Under ``torch.compile`` the choice is made once, while tracing, and becomes a
        constant of the graph (the forced backend lives in a context variable that
        Dynamo cannot trace). A size that is symbolic there (``dynamic=True``) is made
        concrete first: the choice depends on it, so the graph is specialised on it.
        """
        name = _select_name(id(self), device, tuple((k, _concrete(v)) for k, v in facts.items()))
        return self.implementations[name]

    def _select_name(self, device: torch.device, facts: dict[str, Any]) -> str:
        facts = dict(facts, device=device)
        forced = forced_backend()
        if forced is not None:
            impl = self.implementations.get(forced)
            reason = (
                f"{self.name} has no {forced} implementation"
                if impl is None
                else impl.why_not(**facts)
            )
            if reason is None:
                return forced
            raise BackendUnavailableError(
                f"{self.name}: backend {forced!r} was forced "
                f"(use_backend / {ENV_VAR}) but cannot run this call: {reason}"
            )
        order = self.preference.get(device.type, ("reference",))
        tried = []
        declined: Optional[tuple[str, str]] = None  # the first implemented backend that declined
        for name in order:
            impl = self.implementations.get(name)
            if impl is None:
                tried.append(f"{name}: not implemented for {self.name}")
                continue
            reason = impl.why_not(**facts)
            if reason is None:
                if declined is not None:
                    _warn_fallback(self.name, declined[0], declined[1], name)
                return name
            tried.append(f"{name}: {reason}")
            if declined is None:
                declined = (name, reason)
        raise BackendUnavailableError(
            f"{self.name}: no backend can run this call on {device}:\n  "
            + "\n  ".join(tried)
        )


def _concrete(value: Any) -> Any:
    """``value`` with every symbolic integer in it (a traced size) replaced by its value
    (``operator.index`` specialises it under Dynamo, where ``int`` would keep it symbolic
    and a traced size passes ``isinstance(size, int)``, not ``torch.SymInt``)."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return operator.index(value)
    if isinstance(value, tuple):
        return tuple(_concrete(v) for v in value)
    return value


def _assume_constant_result(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What ``torch.compiler.assume_constant_result`` does (mark ``fn`` for Dynamo),
    without importing torch._dynamo, which takes seconds and imports triton."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_assume_constant_result
def _select_name(op_id: int, device: torch.device, facts: tuple[tuple[str, Any], ...]) -> str:
    return _EVERY_OP[op_id]._select_name(device, dict(facts))


# Every Op made (test-local ones too) by id, so the traced selection receives only
# constants; _REGISTRY holds the package's op families, made with define_op.
_EVERY_OP: dict[int, Op] = {}
_REGISTRY: dict[str, Op] = {}


def define_op(name: str, preference: dict[str, tuple[str, ...]]) -> Op:
    """Create (once) and return the :class:`Op` named ``name``."""
    if name not in _REGISTRY:
        _REGISTRY[name] = Op(name, preference)
    return _REGISTRY[name]


def registered_ops() -> dict[str, Op]:
    """Every op family registered so far, by name."""
    return dict(_REGISTRY)
