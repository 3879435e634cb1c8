"""Run a public op on one named backend with fresh leaves: shared by the padding,
determinism and property tests."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from interest_kernels import BackendUnavailableError, use_backend
from interest_kernels._backend import registered_ops
from interest_kernels.testing import clone_inputs, grad_leaves


def backends(op_name: str) -> list[str]:
    """Every backend registered for the op family ``op_name``."""
    return sorted(registered_ops()[op_name].implementations)


def outputs_and_leaves(backend: str, fn: Callable, inputs: dict) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """``fn(**inputs)`` under ``use_backend(backend)`` on leaf copies of the inputs, every
    floating tensor and list of tensors requiring grad: (the non-None outputs, the leaves
    by name, list items as ``"name[i]"``). A backend that declines the call skips the test."""
    names = [k for k, v in inputs.items()
             if (isinstance(v, torch.Tensor) and v.is_floating_point())
             or (isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v))]
    kw = clone_inputs(inputs, None, names)
    try:
        with use_backend(backend):
            outs = fn(**kw)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    outs = [outs] if isinstance(outs, torch.Tensor) else [o for o in outs if o is not None]
    return outs, dict(grad_leaves(kw))
