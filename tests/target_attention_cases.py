"""Inputs for target attention tests, shared by the reference and the kernel tests.

:func:`make_case` draws fresh random keyword inputs for the public op (every floating
tensor a leaf that may get a gradient, Dice tensors as separate inputs); :func:`call`
turns them back into the op's arguments, optionally under a forced backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from interest_kernels import use_backend
from interest_kernels.ops.dice.reference import DiceParams


def make_case(
    *,
    batch: int = 3,
    seq_len: int = 4,
    dim: int = 3,
    units: tuple[int, ...] = (5, 4),
    activation: str = "sigmoid",
    normalization: str = "softmax",
    valid: str = "lengths",
    heads: Optional[int] = None,
    per_head: bool = False,
    query_per_head: bool = False,
    rows: Optional[int] = None,
    prelu_shared: bool = False,
    dice_training: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
) -> dict:
    """Keyword inputs for :func:`call`.

    ``valid``: "lengths" (one row of length 0 and one of T), "mask" (random, one row all
    masked), "none". ``rows``: shared-history form with that many history rows;
    ``heads``: multi-head form (``per_head``: one MLP per head; ``query_per_head``: (B, E, D)).
    """
    n_rows = rows or batch
    lead = (heads,) if per_head else ()
    kshape = (n_rows,) + ((heads,) if heads else ()) + (seq_len, dim)
    qshape = (batch, heads, dim) if query_per_head else (batch, dim)
    widths = (4 * dim,) + units
    inp: dict = {
        "query": torch.randn(qshape, dtype=dtype),
        "keys": torch.randn(kshape, dtype=dtype),
        "weights": [torch.randn(lead + (widths[i + 1], widths[i]), dtype=dtype) * widths[i] ** -0.5
                    for i in range(len(units))],
        "biases": [0.1 * torch.randn(lead + (h,), dtype=dtype) for h in units],
        "out_weight": torch.randn(lead + (1, units[-1]), dtype=dtype),
        "out_bias": torch.randn(lead + (1,), dtype=dtype),
        "activation": activation,
        "normalization": normalization,
    }
    if valid == "lengths":
        lengths = torch.randint(0, seq_len + 1, (n_rows,))
        lengths[0] = 0
        lengths[-1] = seq_len
        inp["lengths"] = lengths
    elif valid == "mask":
        mask = torch.rand(n_rows, seq_len) > 0.4
        mask[0] = False
        mask[-1, 0] = True
        inp["mask"] = mask
    if rows:
        inp["key_index"] = torch.randint(0, rows, (batch,))
        inp["key_index"][:2] = torch.tensor([0, rows - 1])
    if activation == "prelu":
        inp["prelu_weights"] = [0.1 + 0.3 * torch.rand(lead + ((1,) if prelu_shared else (h,)), dtype=dtype)
                                for h in units]
    if activation == "dice":
        for i, h in enumerate(units):
            inp[f"dice_alpha{i}"] = torch.rand(lead + (h,), dtype=dtype)
            inp[f"dice_weight{i}"] = 1 + 0.2 * torch.randn(lead + (h,), dtype=dtype)
            inp[f"dice_bias{i}"] = 0.2 * torch.randn(lead + (h,), dtype=dtype)
        inp["dice_training"] = dice_training
        inp["dice_stats"] = [(0.1 * torch.randn(lead + (h,)), 1 + torch.rand(lead + (h,))) for h in units]
    return {k: _to(v, device) for k, v in inp.items()}


def _to(v, device: torch.device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, list):
        return [_to(x, device) for x in v]
    if isinstance(v, tuple):
        return tuple(_to(x, device) for x in v)
    return v


def call(fn, backend: Optional[str] = None):
    """``fn`` (the reference or the public op) taking :func:`make_case` inputs; each call
    gets fresh copies of the Dice running statistics."""

    def run(**kw):
        alphas = sorted(k for k in kw if k.startswith("dice_alpha"))
        if alphas:
            training = kw.pop("dice_training")
            stats = kw.pop("dice_stats")
            kw["dice_params"] = [
                DiceParams(kw.pop(f"dice_alpha{i}"), stats[i][0].clone(), stats[i][1].clone(),
                           kw.pop(f"dice_weight{i}"), kw.pop(f"dice_bias{i}"),
                           training=training, momentum=0.1, eps=1e-8)
                for i in range(len(alphas))
            ]
        kw.setdefault("return_scores", True)
        if backend is None:
            return fn(**kw)
        with use_backend(backend):
            return fn(**kw)

    return run


def grad_names(inp: dict) -> list[str]:
    """Every input whose gradient the tests compare."""
    return [k for k, v in inp.items()
            if (isinstance(v, torch.Tensor) and v.is_floating_point())
            or k in ("weights", "biases", "prelu_weights")]
