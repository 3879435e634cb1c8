"""Count what Triton kernels move and multiply, by running them under the interpreter.

:class:`TrafficMeter` wraps, while it is active, the Triton interpreter's masked load and
store, its atomic read-modify-write and its dot (``InterpreterBuilder.create_masked_load``,
``create_masked_store``, ``create_atomic_rmw``, ``create_dot``; unmasked and tensor-
descriptor loads and stores go through the masked ones) and its launcher
(``InterpretedFunction.run``), and adds every access to the kernel being launched:

* bytes loaded and stored, counting only the lanes whose mask is true;
* distinct 32-byte sectors loaded and stored over each kernel's launches (the traffic
  DRAM would see if every repeated access hit in cache);
* bytes per kernel argument (which buffer the traffic goes to);
* dot FLOPs (2*M*N*K per dot, batch dims included) by operand dtype and input
  precision, and a histogram of dot shapes (M, N, K).

Triton reads ``TRITON_INTERPRET`` when it is imported and when a kernel is decorated, so
the interpreter must be on before triton is first imported: :func:`require_interpreter`
turns it on, or says why it cannot.
An atomic read-modify-write counts as a load and a store of its active lanes.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

SECTOR_BYTES = 32
# Distinct-sector arrays are merged once their pending entries exceed this.
_MERGE_AT = 1 << 22


def require_interpreter() -> None:
    """Turn the Triton interpreter on, or fail clearly if triton was imported without
    it: triton.language's own jit helpers are then compiled functions, which an
    interpreted kernel cannot call."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise RuntimeError(
            "the traffic meter needs the Triton interpreter, but triton was imported without "
            "it: set TRITON_INTERPRET=1 in the environment of the process"
        )
    os.environ["TRITON_INTERPRET"] = "1"


class _SectorSet:
    """Distinct sector numbers, accumulated as sorted unique arrays merged lazily."""

    def __init__(self) -> None:
        self._merged = np.empty(0, dtype=np.uint64)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0

    def add(self, sectors: np.ndarray) -> None:
        if sectors.size:
            self._pending.append(sectors)
            self._pending_size += sectors.size
            if self._pending_size > _MERGE_AT:
                self._merge()

    def _merge(self) -> None:
        if self._pending:
            self._merged = np.unique(np.concatenate([self._merged, *self._pending]))
            self._pending = []
            self._pending_size = 0

    def count(self) -> int:
        self._merge()
        return int(self._merged.size)

    def union_count(self, other: "_SectorSet") -> int:
        self._merge()
        other._merge()
        return int(np.union1d(self._merged, other._merged).size)


@dataclass
class KernelTraffic:
    """What every launch of one kernel (in one phase) loaded, stored and multiplied."""

    kernel: str
    family: str
    phase: str
    launches: int = 0
    grids: list[tuple] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    bytes_loaded: int = 0
    bytes_stored: int = 0
    dot_flops: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    dot_shapes: collections.Counter = field(default_factory=collections.Counter)
    by_argument: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(lambda: [0, 0]))
    _loaded: _SectorSet = field(default_factory=_SectorSet, repr=False)
    _stored: _SectorSet = field(default_factory=_SectorSet, repr=False)

    @property
    def sectors_loaded(self) -> int:
        return self._loaded.count()

    @property
    def sectors_stored(self) -> int:
        return self._stored.count()

    @property
    def distinct_bytes(self) -> int:
        """Bytes of the distinct sectors loaded plus those of the distinct sectors
        stored: each sector read from and written back to DRAM at most once."""
        return SECTOR_BYTES * (self.sectors_loaded + self.sectors_stored)

    @property
    def total_bytes(self) -> int:
        return self.bytes_loaded + self.bytes_stored

    def as_dict(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "family": self.family,
            "phase": self.phase,
            "launches": self.launches,
            "grids": [list(g) for g in self.grids],
            "options": self.options,
            "bytes_loaded": self.bytes_loaded,
            "bytes_stored": self.bytes_stored,
            "sectors_loaded": self.sectors_loaded,
            "sectors_stored": self.sectors_stored,
            "distinct_bytes": self.distinct_bytes,
            "dot_flops": dict(self.dot_flops),
            "dot_shapes": [
                {"M": m, "N": n, "K": k, "dtype": dt, "count": c}
                for (m, n, k, dt), c in sorted(self.dot_shapes.items())
            ],
            "by_argument": {
                name: {"loaded": lo, "stored": st}
                for name, (lo, st) in sorted(self.by_argument.items(), key=lambda kv: -sum(kv[1]))
            },
        }


class _Launch:
    """The kernel being launched and the address ranges of its tensor arguments."""

    def __init__(self, record: KernelTraffic, arg_names: list[str], args: tuple, kwargs: dict):
        self.record = record
        spans: dict[tuple[int, int], str] = {}
        named = list(zip(arg_names, args)) + [(k, v) for k, v in kwargs.items() if k in arg_names]
        for name, value in named:
            extent = _extent(value)
            if extent is not None and extent[1] > extent[0]:
                spans.setdefault(extent, name)  # a buffer passed twice keeps its first name
        order = sorted(spans)
        self.starts = np.array([s for s, _ in order], dtype=np.uint64)
        self.ends = np.array([e for _, e in order], dtype=np.uint64)
        self.names = [spans[s] for s in order]

    def attribute(self, addrs: np.ndarray, nbytes: int, column: int) -> None:
        """Add ``nbytes`` per address to the argument whose buffer holds it."""
        by_arg = self.record.by_argument
        if not self.names:
            by_arg["(unknown)"][column] += int(addrs.size) * nbytes
            return
        idx = np.searchsorted(self.starts, addrs, side="right").astype(np.int64) - 1
        inside = (idx >= 0) & (addrs < self.ends[np.maximum(idx, 0)])
        counts = np.bincount(idx[inside], minlength=len(self.names))
        for i in np.nonzero(counts)[0]:
            by_arg[self.names[i]][column] += int(counts[i]) * nbytes
        outside = int(addrs.size - inside.sum())
        if outside:
            by_arg["(unknown)"][column] += outside * nbytes


def _extent(value: Any) -> Optional[tuple[int, int]]:
    """[first byte, last byte + 1) of a tensor argument, else None."""
    import torch

    if not isinstance(value, torch.Tensor) or value.numel() == 0:
        return None
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(value.shape, value.stride()))
    start = value.data_ptr()
    return start, start + span * value.element_size()


def _element_bytes(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def _active(ptrs, mask) -> np.ndarray:
    addrs = np.asarray(ptrs.data).astype(np.uint64, copy=False)
    if mask is None:
        return addrs.ravel()
    m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
    return addrs[m]


class TrafficMeter:
    """While active (``with TrafficMeter() as m``), count every interpreted launch.

    ``m.phase(name)`` labels the launches made inside it (e.g. "fwd", "bwd");
    ``m.records`` lists one :class:`KernelTraffic` per (phase, kernel) in launch order.
    """

    def __init__(self) -> None:
        self.records: list[KernelTraffic] = []
        self._by_key: dict[tuple[str, str], KernelTraffic] = {}
        self._phase = ""
        self._launch: Optional[_Launch] = None
        self._saved: list[tuple[Any, str, Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    # --- what the wrapped interpreter calls -------------------------------------------

    def _begin(self, fn, arg_names: list[str], grid, args: tuple, kwargs: dict) -> Optional[_Launch]:
        name = fn.__name__
        module = getattr(fn, "__module__", "") or ""
        parts = module.split(".")
        family = parts[-2] if len(parts) >= 2 else module
        key = (self._phase, f"{family}.{name}")
        record = self._by_key.get(key)
        if record is None:
            record = KernelTraffic(kernel=name, family=family, phase=self._phase)
            self._by_key[key] = record
            self.records.append(record)
        record.launches += 1
        grid_t = tuple(grid) if isinstance(grid, (tuple, list)) else ("callable",)
        if grid_t not in record.grids:
            record.grids.append(grid_t)
        if not record.options:
            record.options = {k: v for k, v in kwargs.items()
                              if isinstance(v, (bool, int, float, str))}
        previous, self._launch = self._launch, _Launch(record, arg_names, args, kwargs)
        return previous

    def _on_access(self, ptrs, mask, store: bool) -> None:
        launch = self._launch
        if launch is None:
            return
        addrs = _active(ptrs, mask)
        nbytes = _element_bytes(ptrs)
        record = launch.record
        if store:
            record.bytes_stored += int(addrs.size) * nbytes
            record._stored.add(np.unique(addrs // SECTOR_BYTES))
        else:
            record.bytes_loaded += int(addrs.size) * nbytes
            record._loaded.add(np.unique(addrs // SECTOR_BYTES))
        launch.attribute(addrs, nbytes, int(store))

    def _on_dot(self, a, b, input_precision) -> None:
        launch = self._launch
        if launch is None:
            return
        *batch, m, k = a.data.shape
        n = b.data.shape[-1]
        count = int(np.prod(batch)) if batch else 1
        dtype = str(a.dtype.scalar) if hasattr(a.dtype, "scalar") else str(a.dtype)
        precision = getattr(input_precision, "name", None) or str(input_precision)
        if dtype == "fp32":
            dtype = f"fp32/{precision.lower()}"
        launch.record.dot_flops[dtype] += 2.0 * m * n * k * count
        launch.record.dot_shapes[(m, n, k, dtype)] += count

    # --- patching ------------------------------------------------------------------------

    def __enter__(self) -> "TrafficMeter":
        require_interpreter()
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        meter = self
        load, store = builder.create_masked_load, builder.create_masked_store
        rmw, dot = builder.create_atomic_rmw, builder.create_dot
        run = interpreter.InterpretedFunction.run

        def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
            meter._on_access(ptrs, mask, store=False)
            return load(self, ptrs, mask, other, cache_policy, is_volatile)

        def masked_store(self, ptrs, value, mask, cache_policy):
            meter._on_access(ptrs, mask, store=True)
            return store(self, ptrs, value, mask, cache_policy)

        def atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
            meter._on_access(ptr, mask, store=False)
            meter._on_access(ptr, mask, store=True)
            return rmw(self, rmw_op, ptr, val, mask, sem, scope)

        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            meter._on_dot(a, b, input_precision)
            return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

        def launch(fn_self, *args, grid, warmup, **kwargs):
            if warmup:
                return run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            previous = meter._begin(fn_self.fn, fn_self.arg_names, grid, args, kwargs)
            try:
                return run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                meter._launch = previous

        self._saved = [
            (builder, "create_masked_load", load),
            (builder, "create_masked_store", store),
            (builder, "create_atomic_rmw", rmw),
            (builder, "create_dot", dot),
            (interpreter.InterpretedFunction, "run", run),
        ]
        builder.create_masked_load = masked_load
        builder.create_masked_store = masked_store
        builder.create_atomic_rmw = atomic_rmw
        builder.create_dot = create_dot
        interpreter.InterpretedFunction.run = launch
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in self._saved:
            setattr(owner, name, original)
        self._saved = []
