"""Registration of a C++ extension operator pair (a forward and its backward) with
``torch.library``: fake implementations for tracing and compiling, the forward's
autograd, and the backward's batching rule for ``torch.func`` transforms."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from .. import _extension
from .func_transforms import TransformableOp, register_sliced_vmap


def register_extension_op(
    forward: str,
    backward: str,
    forward_fake: Callable[..., Any],
    backward_fake: Callable[..., Any],
    setup_context: Callable[..., None],
    backward_fn: Callable[..., Sequence[Any]],
) -> Optional[TransformableOp]:
    """Registers ``forward`` and ``backward`` (qualified names, ``"namespace::name"``) once
    the compiled extension defines them, and returns the forward with its autograd for
    ``func_transforms.call``; None when the extension, or this operator in it, is absent
    (nothing is registered then)."""
    namespace, name = forward.split("::")
    op = getattr(getattr(torch.ops, namespace), name, None) if _extension.load() else None
    if op is None:
        return None
    torch.library.register_fake(forward)(forward_fake)
    torch.library.register_fake(backward)(backward_fake)
    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)
    register_sliced_vmap(backward)
    return TransformableOp(op.default, setup_context, backward_fn)
