"""Mini-batch-aware (MBA) optimisers for sparse embedding tables (SPEC section 5).

Each parameter is a table (N, D). Per step, the optimiser gathers the batch's lookups of
each table from

* ``MBAEmbedding``'s backward (ids and gradient rows, no gradient tensor at all), and/or
* a sparse COO ``.grad`` as ``nn.Embedding(sparse=True)`` / ``nn.EmbeddingBag(sparse=True)``
  leave it: its indices and values are read as they are (never coalesced); duplicates
  are reduced by the kernels, deterministically.

then updates the touched rows only, with ``lambda = weight_decay`` and frequencies n_j
from ``counts``:

* ``counts=None``: counted online, per table, before the update of each step (so n_j
  includes the current batch): with ``MBAEmbedding`` an id counts once per sample
  (row ``b`` of the ids it was called with, see ``count_ids``); from a sparse ``.grad``
  each lookup counts once (the sample structure is not in the gradient).
* a tensor (N,) (one table) or a sequence with one entry per parameter (a tensor, or
  None for online counting of that table): frequencies counted beforehand, read as is.

On the ``cpu`` backend the whole step of a table (checks, online counting, update) is one
call of ``interest_kernels::mba_*_step``; elsewhere the lookups are concatenated, counted
(``count_ids``) and applied with ``mba_*_update``, with the same result.

Tables with no gradient in a step are skipped entirely (their step count too). A table
with a dense gradient is an error: use ``sparse=True`` or ``MBAEmbedding``.
Counts, step counts and all state are in ``state_dict()`` and restored by
``load_state_dict`` in their own dtypes (float32 state of a float16 table stays float32).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch.optim import Optimizer

from ..ops.mba.op import (
    COUNT_DTYPES,
    OP,
    add_counts,
    compiled_ops,
    check_update_rows,
    mba_adagrad_update,
    mba_adam_update,
    mba_sgd_update,
)
from .._validation import check_float, value_checks_enabled
from ..ops.common import compute_dtype
from ._rows import PendingRows, clear_rows, take_rows

__all__ = ["MBAAdagrad", "MBAAdam", "MBASGD"]

CountsArg = Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]]


_NONNEGATIVE_HYPERPARAMETERS = ("lr", "weight_decay", "eps", "lr_decay", "initial_accumulator_value")


def _nonneg(name: str, value: float) -> float:
    return check_float(name, value, low=0.0)


class _MBAOptimizer(Optimizer):
    """Shared bookkeeping: collecting rows, counts, step counts, state_dict round trip."""

    _kind = ""  # "sgd", "adagrad" or "adam"
    _state_tensors: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], counts: CountsArg) -> None:
        super().__init__(params, defaults)
        tables = [p for group in self.param_groups for p in group["params"]]
        if counts is None:
            given: list[Optional[torch.Tensor]] = [None] * len(tables)
        elif isinstance(counts, torch.Tensor):
            if len(tables) != 1:
                raise ValueError(
                    f"counts is one tensor but there are {len(tables)} tables; pass a sequence "
                    "with one entry (tensor or None) per parameter"
                )
            given = [counts]
        else:
            given = list(counts)
            if len(given) != len(tables):
                raise ValueError(f"counts has {len(given)} entries for {len(tables)} tables")
        for p, c in zip(tables, given):
            if c is None:
                continue
            if not isinstance(c, torch.Tensor) or c.dim() != 1 or c.shape[0] != p.shape[0]:
                raise ValueError(
                    f"counts for a table of shape {tuple(p.shape)} must be a ({p.shape[0]},) "
                    f"tensor, got {tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}"
                )
            if c.dtype not in COUNT_DTYPES or c.device != p.device:
                raise TypeError(
                    f"counts must be int64/int32 (sample counts) on the table's device {p.device}, "
                    f"got {c.dtype} on {c.device}"
                )
            self.state[p]["counts"] = c
            self.state[p]["online_counts"] = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Groups may override the defaults: the same checks as the constructor's.
        for key in _NONNEGATIVE_HYPERPARAMETERS:
            if key in param_group:
                param_group[key] = _nonneg(key, param_group[key])
        super().add_param_group(param_group)
        for p in param_group["params"]:
            if p.dim() != 2:
                raise ValueError(f"MBA optimisers take embedding tables (N, D), got shape {tuple(p.shape)}")

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                clear_rows(p)

    def _lookups(self, p: torch.Tensor) -> list[PendingRows]:
        """This step's lookups of table ``p``, oldest first: the rows recorded by
        ``MBAEmbedding`` (grad_rows (K, D) in p's dtype), then a sparse ``.grad`` (each of
        whose rows counts as one sample)."""
        dim = p.shape[1]
        lookups = [PendingRows(rows.ids, rows.grad_rows.reshape(-1, dim).to(p.dtype), rows.padding_idx)
                   for rows in take_rows(p)]
        if p.grad is not None:
            if not p.grad.is_sparse:
                raise TypeError(
                    f"{type(self).__name__} needs sparse gradients: use nn.Embedding(sparse=True), "
                    "nn.EmbeddingBag(sparse=True) or MBAEmbedding for this table (shape "
                    f"{tuple(p.shape)}); optimise dense parameters with another optimiser"
                )
            grad = p.grad
            lookups.append(PendingRows(grad._indices()[0], grad._values().reshape(-1, dim), None))
        return lookups

    @staticmethod
    def _concatenate(lookups: list[PendingRows]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (K,) and grad_rows (K, D) of all lookups in order, padding positions dropped."""
        ids_parts, row_parts = [], []
        for lookup in lookups:
            flat, grad_rows = lookup.ids.reshape(-1), lookup.grad_rows
            if lookup.padding_idx is not None:
                keep = flat != lookup.padding_idx
                flat, grad_rows = flat[keep], grad_rows[keep]
            ids_parts.append(flat)
            row_parts.append(grad_rows)
        if len(ids_parts) == 1:
            return ids_parts[0], row_parts[0]
        return torch.cat([i.long() for i in ids_parts]), torch.cat(row_parts)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if "counts" not in state:
            state["counts"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
            state["online_counts"] = True
        if "step" not in state:
            state["step"] = 0
            acc = compute_dtype(p.dtype)
            for name in self._state_tensors:
                state[name] = torch.full(
                    p.shape, self._initial_state_value(group), dtype=acc, device=p.device
                )

    def _initial_state_value(self, group: dict[str, Any]) -> float:
        return 0.0

    def _update(
        self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
        ids: torch.Tensor, grad_rows: torch.Tensor, step: int,
    ) -> None:
        """Apply this optimiser's MBA update for step number ``step`` (1-based)."""
        raise NotImplementedError

    def _cpu_step(
        self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], step: int, lookups: list[PendingRows],
    ) -> tuple[torch.Tensor, ...]:
        """The whole step on the CPU kernels in one call: checks, online counting and the
        update of step number ``step``. Returns the tensors it wrote."""
        raise NotImplementedError

    @staticmethod
    def _step_args(state: dict[str, Any], lookups: list[PendingRows]) -> tuple[Any, ...]:
        """(counts, ids, grad_rows, padding_ids, count_online, check_finite) of a step op."""
        rows = [lookup.grad_rows for lookup in lookups]
        return (
            state["counts"], [lookup.ids for lookup in lookups], rows,
            [-1 if lookup.padding_idx is None else lookup.padding_idx for lookup in lookups],
            state["online_counts"], value_checks_enabled(*rows),
        )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One MBA step on every table that received gradient rows since the last step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                lookups = self._lookups(p)
                if not lookups:
                    continue
                state = self.state[p]
                if OP.select(p.device, kind=self._kind).name == "cpu":
                    # One kernel call checks everything before it counts or writes anything.
                    self._init_state(p, state, group)
                    written = self._cpu_step(p, state, group, state["step"] + 1, lookups)
                    if not torch.compiler.is_compiling():  # the kernel wrote through raw pointers
                        torch.autograd.graph.increment_version(list(written))
                else:
                    ids, grad_rows = self._concatenate(lookups)
                    # Before anything is counted: a refused step leaves every state unchanged.
                    check_update_rows(p, ids, grad_rows)
                    self._init_state(p, state, group)
                    if state["online_counts"]:
                        for lookup in lookups:
                            add_counts(lookup.ids, state["counts"], lookup.padding_idx)
                    self._update(p, state, group, ids, grad_rows, state["step"] + 1)
                state["step"] += 1
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore, keeping every state tensor's own dtype (torch would cast to the table's)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        tables = [p for group in self.param_groups for p in group["params"]]
        for index, entries in saved.items():
            p = tables[index]
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.detach().to(device=p.device, copy=True)


class MBASGD(_MBAOptimizer):
    """MBA SGD (DIN eq. 7): ``w_j <- w_j - lr (g_j + weight_decay * w_j / n_j)`` for touched j.

    Args:
        params: embedding tables (N, D) (float32/float16/bfloat16/float64) or param groups.
        lr: learning rate.
        weight_decay: SPEC's lambda (>= 0).
        counts: frequencies n_j; None counts online (see the module docstring).
    """

    _kind = "sgd"

    def __init__(self, params: Iterable[Any], lr: float, weight_decay: float = 0.0, counts: CountsArg = None) -> None:
        defaults = {"lr": _nonneg("lr", lr), "weight_decay": _nonneg("weight_decay", weight_decay)}
        super().__init__(params, defaults, counts)

    def _update(
        self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
        ids: torch.Tensor, grad_rows: torch.Tensor, step: int,
    ) -> None:
        mba_sgd_update(p, ids, grad_rows, state["counts"], lr=group["lr"], weight_decay=group["weight_decay"],
                       _rows_checked=True)

    def _cpu_step(
        self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], step: int, lookups: list[PendingRows],
    ) -> tuple[torch.Tensor, ...]:
        compiled_ops().mba_sgd_step(p, *self._step_args(state, lookups), group["lr"], group["weight_decay"])
        return p, state["counts"]


class MBAAdagrad(_MBAOptimizer):
    """MBA Adagrad: ``torch.optim.Adagrad``'s sparse step on ``g_j + weight_decay * w_j / n_j``.

    State per table: ``sum`` (N, D) float32 (float64 for a float64 table), starting at
    ``initial_accumulator_value``, and the step count (which drives ``lr_decay``).
    """

    _kind = "adagrad"

    _state_tensors = ("sum",)

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0, eps: float = 1e-10, counts: CountsArg = None,
    ) -> None:
        defaults = {
            "lr": _nonneg("lr", lr), "lr_decay": _nonneg("lr_decay", lr_decay),
            "weight_decay": _nonneg("weight_decay", weight_decay),
            "initial_accumulator_value": _nonneg("initial_accumulator_value", initial_accumulator_value),
            "eps": _nonneg("eps", eps),
        }
        super().__init__(params, defaults, counts)

    def _initial_state_value(self, group: dict[str, Any]) -> float:
        return group["initial_accumulator_value"]

    def _update(
        self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
        ids: torch.Tensor, grad_rows: torch.Tensor, step: int,
    ) -> None:
        mba_adagrad_update(
            p, state["sum"], ids, grad_rows, state["counts"], lr=group["lr"], step=step,
            weight_decay=group["weight_decay"], eps=group["eps"], lr_decay=group["lr_decay"],
            _rows_checked=True,
        )

    def _cpu_step(
        self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], step: int, lookups: list[PendingRows],
    ) -> tuple[torch.Tensor, ...]:
        compiled_ops().mba_adagrad_step(
            p, state["sum"], *self._step_args(state, lookups), group["lr"], group["weight_decay"], group["eps"],
            group["lr_decay"], step,
        )
        return p, state["sum"], state["counts"]


class MBAAdam(_MBAOptimizer):
    """MBA Adam: ``torch.optim.SparseAdam``'s step on ``g_j + weight_decay * w_j / n_j``.

    Moments ``exp_avg``/``exp_avg_sq`` (N, D) float32 change on touched rows only; the
    bias correction uses the table's global step count, as SparseAdam does.
    """

    _kind = "adam"

    _state_tensors = ("exp_avg", "exp_avg_sq")

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.0, counts: CountsArg = None,
    ) -> None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        betas = tuple(
            check_float(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True) for i, b in enumerate(betas)
        )
        defaults = {
            "lr": _nonneg("lr", lr), "betas": betas, "eps": _nonneg("eps", eps),
            "weight_decay": _nonneg("weight_decay", weight_decay),
        }
        super().__init__(params, defaults, counts)

    def _update(
        self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
        ids: torch.Tensor, grad_rows: torch.Tensor, step: int,
    ) -> None:
        mba_adam_update(
            p, state["exp_avg"], state["exp_avg_sq"], ids, grad_rows, state["counts"], lr=group["lr"],
            step=step, betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
            _rows_checked=True,
        )

    def _cpu_step(
        self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], step: int, lookups: list[PendingRows],
    ) -> tuple[torch.Tensor, ...]:
        beta1, beta2 = group["betas"]
        compiled_ops().mba_adam_step(
            p, state["exp_avg"], state["exp_avg_sq"], *self._step_args(state, lookups), group["lr"], beta1, beta2,
            group["eps"], group["weight_decay"], step,
        )
        return p, state["exp_avg"], state["exp_avg_sq"], state["counts"]
