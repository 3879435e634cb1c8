"""``python -m interest_kernels.info``: what this machine offers, and why anything is missing.

Prints the versions of torch, triton and CUDA, whether the compiled extension loads,
and for every op and device which backend a call would take and why each other
backend would not.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import sys
from typing import Optional

import torch

import interest_kernels

from ._backend import BACKEND_NAMES, ENV_VAR, forced_backend, registered_ops
from ._extension import unavailable_reason as extension_reason


def _triton_version() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def report() -> str:
    """The text that ``python -m interest_kernels.info`` prints."""
    lines = [f"interest_kernels {interest_kernels.__version__}"]
    lines.append(f"python {platform.python_version()} on {platform.machine()} ({platform.system()})")
    lines.append(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    tv = _triton_version()
    lines.append(f"triton {tv}" if tv else "triton: not installed (Triton backends unavailable)")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("CUDA: no device visible (CPU only)")
    ext = extension_reason()
    lines.append("compiled extension interest_kernels._C: " + ("loaded" if ext is None else ext))
    forced = forced_backend()
    if forced:
        lines.append(f"backend forced by {ENV_VAR}: {forced}")

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines.append("")
    lines.append("op / device: backend a float32 call takes; why the others would not")
    for name, op in sorted(registered_ops().items()):
        for device in devices:
            try:
                chosen = op.select(device, dtype=torch.float32).name
            except interest_kernels.BackendUnavailableError as exc:
                chosen = f"NONE ({exc})"
            lines.append(f"  {name} on {device.type}: {chosen}")
            for backend, reason in op.reasons(device=device, dtype=torch.float32).items():
                if backend in op.implementations and backend != chosen:
                    lines.append(f"      {backend}: {reason or 'available (not preferred here)'}")
    lines.append("")
    lines.append("limits: the calls each backend declines (a declined call runs on the next")
    lines.append("backend of the device's order, with a BackendFallbackWarning once per reason)")
    for name, op in sorted(registered_ops().items()):
        for backend, impl in op.implementations.items():
            if impl.limits:
                lines.append(f"  {name} / {backend}: {impl.limits}")
    lines.append("")
    lines.append(f"backends: {', '.join(BACKEND_NAMES)}; force one with use_backend(name) or {ENV_VAR}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
