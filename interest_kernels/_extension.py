"""Loading of the compiled extension ``interest_kernels._C`` (C++/CUDA ops).

The package imports and its Triton and reference ops work without it; only ops that
need it fail, with the reason recorded here.
"""
from __future__ import annotations

import importlib
from typing import Optional

_loaded: Optional[bool] = None
_reason: Optional[str] = None


def load() -> bool:
    """Import ``interest_kernels._C`` once (registering its torch.library ops)."""
    global _loaded, _reason
    if _loaded is None:
        try:
            importlib.import_module("interest_kernels._C")
            _loaded, _reason = True, None
        except ImportError as exc:
            _loaded = False
            _reason = (
                f"the compiled extension interest_kernels._C is not available ({exc}); "
                "build it with `pip install --no-build-isolation -e .` "
                "(needs a C++ compiler, and nvcc for the CUDA kernels)"
            )
    return bool(_loaded)


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded, else why it is not."""
    load()
    return _reason
