"""Triton launches that ``torch.compile`` and ``torch.export`` trace, under the interpreter too.

The project's Triton kernels are ``torch.library.triton_op`` custom ops whose bodies launch
kernels through :func:`wrap_triton`. Eager calls launch the kernels directly. When a graph
is traced (``torch.compile``, or AOTInductor lowering an exported program), each launch
becomes a ``triton_kernel_wrapper`` higher-order op in the graph, so Inductor compiles the
kernels itself and an AOTInductor package embeds them: no Python, no Triton to serve.
(``torch.export`` keeps the ``triton_op`` as one custom-op node;
``ExportedProgram.run_decompositions(decompose_custom_triton_ops=True)`` and AOTInductor
expand it into the launches.)

:func:`torch.library.wrap_triton` returns an interpreted kernel (``TRITON_INTERPRET=1``) as
it is, which tracing cannot record. Here such a kernel is wrapped in a ``JITFunction``
that launches through the interpreter, so that CI traces the same graphs a GPU does.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch._library.triton import is_wrap_triton_enabled
from triton.runtime.jit import JITFunction

__all__ = ["kernel_name", "wrap_triton"]

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - every supported Triton has the interpreter
    InterpretedFunction = ()  # type: ignore[assignment,misc]


class _InterpretedKernel(JITFunction):
    """A ``JITFunction`` (what graph tracing records) of an interpreted kernel's source
    whose launches run through the interpreter."""

    def __init__(self, interpreted: Any) -> None:
        super().__init__(interpreted.fn, **interpreted.kwargs)
        self.interpreted = interpreted

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)

    @property
    def cache_key(self) -> str:
        # JITFunction's key hashes the called @triton.jit helpers, which the interpreter
        # made InterpretedFunctions it cannot hash; nothing is compiled, the source will do.
        return hashlib.sha256(f"{self.src}{self.starting_line_number}".encode()).hexdigest()


_INTERPRETED: dict[int, _InterpretedKernel] = {}


def kernel_name(launcher: Any) -> str:
    """The name of the ``@triton.jit`` function behind ``launcher``, a kernel or what
    :func:`wrap_triton` returned for one."""
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper

    kernel = launcher.kernel if isinstance(launcher, TraceableTritonKernelWrapper) else launcher
    return kernel.fn.__name__


def wrap_triton(kernel: Any) -> Any:
    """:func:`torch.library.wrap_triton`, which also traces interpreted kernels: call as
    ``wrap_triton(kernel)[grid](*args)`` inside a ``triton_op``."""
    if not is_wrap_triton_enabled():
        return kernel  # an eager launch: the kernel itself
    if isinstance(kernel, InterpretedFunction):
        twin = _INTERPRETED.get(id(kernel))
        if twin is None:
            twin = _INTERPRETED[id(kernel)] = _InterpretedKernel(kernel)
        kernel = twin
    return torch.library.wrap_triton(kernel)
