"""Embedding tables sharded row-wise over the ranks by torchrec, trained by exact MBA steps.

Placement and lookup are torchrec's: one ``EmbeddingCollection`` holds the model's
tables, torchrec's planner shards each of them ``ROW_WISE`` (rank r holds one
contiguous range of rows), and the sharded collection's forward routes each id to the
rank that owns its row and the rows back (its input and output all-to-alls).

The update is the project's. torchrec 1.8 offers only its ``FUSED`` compute kernel for
row-wise tables (``DENSE`` is refused for them, and FBGEMM's ``OptimType.NONE`` is
CUDA-only); a fused kernel applies FBGEMM's own optimiser inside the backward, whose
weight decay is not SPEC 5's MBA rule. So the lookup runs without autograd and its
output rows are made a leaf: the backward leaves the gradient of each looked-up row,
and :meth:`ShardedTables.route_rows` sends every (id, gradient row), and every id that
a sample counts (n_j counts samples), to the rank that owns the id. The owner adds the
global batch's counts to its rows' n_j and hands the rows to an MBA optimiser
(``MBASGD`` / ``MBAAdagrad`` / ``MBAAdam``, the project's C++ updates) over its local
shard, whose state covers the local rows only. Per step this moves the touched rows,
never a table; the step of W processes equals one process's step on the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from ..models.common import CTRModel
from ..ops.mba.op import check_finite_rows, check_lookup_ids, counted_positions
from ..optim._rows import PendingRows, push_rows

__all__ = [
    "ShardedTable", "ShardedTables", "counted_ids", "local_optimizer_state", "shard_tables",
    "torchrec_unavailable_reason", "whole_optimizer_state",
]


def torchrec_unavailable_reason() -> Optional[str]:
    """Why sharded tables cannot run here (torchrec or fbgemm-gpu missing), or None."""
    try:
        import torchrec  # noqa: F401
        import fbgemm_gpu  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the installation
        return (f"sharded tables need torchrec ({e}); install the extra: "
                "pip install --no-deps -r requirements-distributed.txt")
    return None


def counted_ids(ids: torch.Tensor, padding_idx: Optional[int]) -> torch.Tensor:
    """(C,): the ids that ``count_ids`` would count for this lookup, one entry per count."""
    flat, keep = counted_positions(ids, padding_idx)
    return flat[keep]


@dataclass
class _Lookup:
    """One forward lookup of a table: its ids, and the gradient of its rows once the
    backward has run (None if no backward reached them: then, as for ``MBAEmbedding``,
    the lookup neither counts nor updates)."""

    ids: torch.Tensor
    grad: Optional[torch.Tensor] = None

    def add_grad(self, grad: torch.Tensor) -> None:
        """The backward's hook (several backward passes before a step add up)."""
        self.grad = grad if self.grad is None else self.grad + grad


@dataclass
class _Table:
    """One sharded table: name, shape, padding id, the row range of each rank
    (``starts[r]`` to ``stops[r]``, empty for a rank without rows), this rank's rows and
    the lookups since the last step."""

    name: str
    key: str  # the table's key in the unsharded model's state_dict
    num_rows: int
    dim: int
    width: int  # the stored width: dim rounded up to FBGEMM's multiple of 4, the rest zeros
    padding_idx: Optional[int]
    starts: list[int]
    stops: list[int]
    local: torch.Tensor
    lookups: list[_Lookup] = field(default_factory=list)

    def owners(self, ids: torch.Tensor) -> torch.Tensor:
        """The rank that owns each of ``ids`` (1-D)."""
        ranks = [r for r in sorted(range(len(self.starts)), key=lambda r: self.starts[r])
                 if self.stops[r] > self.starts[r]]
        stops = torch.tensor([self.stops[r] for r in ranks], dtype=torch.int64, device=ids.device)
        return torch.tensor(ranks, dtype=torch.int64, device=ids.device)[torch.searchsorted(stops, ids, right=True)]


class ShardedTable(nn.Module):
    """Stand-in for one of a model's tables: ``forward(ids)`` of any shape S returns
    ``S + (D,)`` rows looked up through the sharded collection. It holds no parameter:
    the rows live in torchrec's shards, ``weight`` is this rank's shard
    (``local_rows`` of the table's N rows, starting at ``row_offset``)."""

    def __init__(self, tables: "ShardedTables", name: str) -> None:
        super().__init__()
        self._tables = [tables]  # a list: not a submodule, so not in state_dict or DDP
        self.name = name

    @property
    def _table(self) -> _Table:
        return self._tables[0].tables[self.name]

    @property
    def weight(self) -> torch.Tensor:
        return self._table.local

    @property
    def row_offset(self) -> int:
        return self._table.starts[dist.get_rank()]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._tables[0].lookup(self.name, ids)

    def extra_repr(self) -> str:
        t = self._table
        return f"{self.name}: {t.num_rows}, {t.dim}, rows [{self.row_offset}, {self.row_offset + t.local.shape[0]}) here"


class ShardedTables:
    """The model's tables in one torchrec ``EmbeddingCollection``, sharded row-wise.

    Built by :func:`shard_tables`. Every rank must call :meth:`lookup` (through the
    model's forward) and :meth:`route_rows` in the same order with the same tables, as
    for any collective.
    """

    def __init__(self, collection: nn.Module, tables: dict[str, _Table], device: torch.device) -> None:
        self.collection = collection
        self.tables = tables
        self.names = list(tables)
        self.device = device

    # --- lookup ---------------------------------------------------------------------------

    def lookup(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        from torchrec import KeyedJaggedTensor

        table = self.tables[name]
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        flat = ids.reshape(-1).long()
        check_lookup_ids(flat, table.num_rows)
        lengths = torch.zeros(len(self.names), dtype=torch.int32)
        lengths[self.names.index(name)] = flat.numel()
        features = KeyedJaggedTensor(keys=self.names, values=flat, lengths=lengths.to(flat.device))
        with torch.no_grad():
            rows = self.collection(features)[name].values()[:, : table.dim]
        if torch.is_grad_enabled():
            rows = rows.detach().requires_grad_()
            record = _Lookup(ids)
            table.lookups.append(record)
            rows.register_hook(record.add_grad)
        return rows.reshape(*ids.shape, table.dim)

    # --- the update -------------------------------------------------------------------------

    def local_weights(self) -> list[torch.Tensor]:
        """This rank's shard of every table, in the model's ``sparse_parameters`` order."""
        return [self.tables[name].local for name in self.names]

    def clear(self) -> None:
        """Forget the lookups since the last :meth:`route_rows`."""
        for table in self.tables.values():
            table.lookups.clear()

    def route_rows(self, counts: list[torch.Tensor]) -> None:
        """Send this step's gradient rows and counted ids to their owners; on each owner
        add the counts to ``counts`` (one (local_rows,) tensor per table, the MBA
        optimiser's n_j) and record the rows (local ids, in global batch order) for the
        optimiser over :meth:`local_weights`. A table looked up in this step gets an
        entry on every rank (perhaps empty), so the optimisers' step counts stay global."""
        routed = []
        for name, table_counts in zip(self.names, counts):
            table = self.tables[name]
            if not table.lookups:
                continue
            ids, rows, counted = self._step_rows(table)
            routed.append((table, table_counts, *self._to_owners(table, ids, rows, counted)))
        self._refuse_non_finite_rows([(ids, rows) for _, _, ids, rows, _ in routed])
        for table, table_counts, ids, rows, counted in routed:
            offset = table.starts[dist.get_rank()]
            table_counts.index_add_(0, counted - offset, torch.ones_like(counted, dtype=table_counts.dtype))
            push_rows(table.local, PendingRows(ids - offset, rows, None))

    def _refuse_non_finite_rows(self, received: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Raise on every rank, before any count or row is written, when any rank received
        a non-finite gradient row (the owner names the id), as one process refuses the step."""
        bad = [(ids, rows) for ids, rows in received if not bool(torch.isfinite(rows).all())]
        flag = torch.tensor([1 if bad else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if bad:
            check_finite_rows(*bad[0])
        if bool(flag):
            raise ValueError(
                "a gradient row sent to another rank's shard is not finite: the step was refused "
                "on every rank and nothing was written")

    def _step_rows(self, table: _Table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's (ids (K,), gradient rows (K, width), counted ids (C,)) of ``table``
        since the last step, padding lookups dropped; forgets the lookups."""
        ids = [torch.zeros(0, dtype=torch.int64, device=self.device)]
        rows = [torch.zeros(0, table.width, dtype=table.local.dtype, device=self.device)]
        counted = ids[:]
        for record in table.lookups:
            if record.grad is None:
                continue
            flat = record.ids.reshape(-1).long()
            grad = F.pad(record.grad.reshape(-1, table.dim), (0, table.width - table.dim))
            keep = flat != table.padding_idx if table.padding_idx is not None else slice(None)
            ids.append(flat[keep])
            rows.append(grad[keep].to(table.local.dtype))
            counted.append(counted_ids(record.ids, table.padding_idx))
        table.lookups.clear()
        return torch.cat(ids), torch.cat(rows), torch.cat(counted)

    def _to_owners(self, table: _Table, ids: torch.Tensor, rows: torch.Tensor,
                   counted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every rank's (ids, rows, counted ids) of ``table`` whose ids this rank owns,
        in rank order (so in the global batch's order): three all-to-alls."""
        world = dist.get_world_size()
        grad_owner, count_owner = table.owners(ids), table.owners(counted)
        grad_order = torch.sort(grad_owner, stable=True).indices
        count_order = torch.sort(count_owner, stable=True).indices
        sizes = torch.stack([torch.bincount(grad_owner, minlength=world),
                             torch.bincount(count_owner, minlength=world)], dim=1)  # (W, 2) sent
        received = torch.empty_like(sizes)
        dist.all_to_all_single(received, sizes)
        sent, got = sizes.tolist(), received.tolist()  # (W, 2) each: the only reads of sizes
        sent_rows, got_rows = [g for g, _ in sent], [g for g, _ in got]
        send_ids = torch.cat([part for pair in zip(ids[grad_order].split(sent_rows),
                                                   counted[count_order].split([c for _, c in sent]))
                              for part in pair])
        recv_ids = send_ids.new_empty(sum(map(sum, got)))
        dist.all_to_all_single(recv_ids, send_ids, [sum(pair) for pair in got], [sum(pair) for pair in sent])
        recv_rows = rows.new_empty(sum(got_rows), table.width)
        dist.all_to_all_single(recv_rows, rows[grad_order].contiguous(), got_rows, sent_rows)
        parts = recv_ids.split([n for pair in got for n in pair])
        return torch.cat(parts[0::2]), recv_rows, torch.cat(parts[1::2])

    # --- whole tables (checkpoints) ------------------------------------------------------------

    def _gather_rows(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The rows (N, ...) of every rank's ``local`` rows, on every rank."""
        table = self.tables[name]
        sizes = [stop - start for start, stop in zip(table.starts, table.stops)]
        longest = max(sizes)
        padded = local.new_zeros(longest, *local.shape[1:])
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def local_slice(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole table-shaped tensor (N, ...)."""
        table = self.tables[name]
        rank = dist.get_rank()
        return full[table.starts[rank] : table.stops[rank]]

    def whole_tables(self) -> dict[str, torch.Tensor]:
        """Every table whole, under its key in the unsharded model's state_dict."""
        return {t.key: self.gather(name, t.local) for name, t in self.tables.items()}

    def gather(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor of one table (N, D) or (N,) from every rank's rows of it (a
        shard of the table, of its counts or of an optimiser state; the padding columns
        dropped), on every rank."""
        table = self.tables[name]
        whole = self._gather_rows(name, local)
        return whole[:, : table.dim].contiguous() if whole.dim() == 2 else whole

    def local_part(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole tensor (N, D) or (N,) of one table, with the
        stored width (zero padding columns)."""
        table = self.tables[name]
        part = self.local_slice(name, whole)
        return F.pad(part, (0, table.width - table.dim)) if part.dim() == 2 else part.clone()

    @torch.no_grad()
    def load_whole_tables(self, state: dict[str, Any]) -> dict[str, Any]:
        """Copy this rank's rows of the whole tables in ``state`` (an unsharded model's
        state_dict) into the shards; returns the rest of ``state``."""
        for name, table in self.tables.items():
            if table.key not in state:
                raise KeyError(f"the state has no table {table.key}")
            whole = state[table.key]
            if tuple(whole.shape) != (table.num_rows, table.dim):
                raise ValueError(f"{table.key}: shape {tuple(whole.shape)}, the model's is {(table.num_rows, table.dim)}")
            table.local.copy_(self.local_part(name, whole.to(table.local)))
        keys = {t.key for t in self.tables.values()}
        return {k: v for k, v in state.items() if k not in keys}


def whole_optimizer_state(tables: ShardedTables, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state_dict that one MBA optimiser over the whole tables would hold, gathered
    from ``optimizer`` over this rank's shards (a collective). Counts read as counted
    online, as the single-process optimiser counts them; tables never stepped have no state."""
    local = optimizer.state_dict()
    state = {}
    for index, entry in local["state"].items():
        if "step" not in entry:
            continue
        name = tables.names[index]
        state[index] = {k: tables.gather(name, v) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        state[index]["online_counts"] = True
    return {"state": state, "param_groups": local["param_groups"]}


def local_optimizer_state(tables: ShardedTables, whole: dict[str, Any]) -> dict[str, Any]:
    """This rank's part of an MBA optimiser's state_dict over the whole tables (as
    :func:`whole_optimizer_state` or a single process writes it)."""
    state: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(tables.names):
        entry = whole["state"].get(index)
        if entry is None:
            rows = tables.tables[name].local.shape[0]
            entry = {"counts": torch.zeros(rows, dtype=torch.int64, device=tables.device)}
        else:
            entry = {k: tables.local_part(name, v) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        entry["online_counts"] = False
        state[index] = entry
    return {"state": state, "param_groups": whole["param_groups"]}

def _model_tables(model: CTRModel) -> Iterator[tuple[str, str, nn.Module, Any, Any]]:
    """(name, state_dict key, table module, its parent, the attribute or index to
    replace it at), in ``sparse_parameters`` order."""
    for attr in ("user_embedding", "item_embedding", "cat_embedding"):
        yield attr, f"{attr}.weight", getattr(model, attr), model, attr
    for k, table in enumerate(model.context_embeddings):
        yield f"context_embedding_{k}", f"context_embeddings.{k}.weight", table, model.context_embeddings, k


def _stored_width(dim: int) -> int:
    """FBGEMM's tables are a multiple of 4 wide: the columns past ``dim`` stay zero (their
    gradient is zero, and so is every MBA step of a zero row with zero state)."""
    return -(-dim // 4) * 4


def shard_tables(model: CTRModel, device: torch.device) -> ShardedTables:
    """Move ``model``'s tables into one torchrec ``EmbeddingCollection`` sharded
    row-wise over the process group (torchrec's planner places the rows) and replace
    each by a :class:`ShardedTable`. The tables' current values are copied into the
    shards (every rank must hold the same model); afterwards each rank keeps only its
    rows. Returns the tables, in ``model.sparse_parameters()`` order."""
    from torchrec import EmbeddingCollection, EmbeddingConfig
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
    from torchrec.distributed.shard import shard_modules
    from torchrec.distributed.types import ShardingEnv, ShardingType

    found = list(_model_tables(model))
    for name, key, module, _, _ in found:
        if module.weight.dtype != torch.float32:
            raise ValueError(f"sharded tables are float32; the table {name} is {module.weight.dtype}")
    configs = [EmbeddingConfig(name=name, embedding_dim=_stored_width(m.weight.shape[1]), num_embeddings=m.weight.shape[0],
                               feature_names=[name]) for name, _, m, _, _ in found]

    class _Holder(nn.Module):  # shard_modules shards the collections under a module
        def __init__(self) -> None:
            super().__init__()
            self.tables = EmbeddingCollection(tables=configs, device=torch.device("meta"))

    holder = _Holder()
    constraints = {name: ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value],
                                              compute_kernels=[EmbeddingComputeKernel.FUSED.value])
                   for name, _, _, _, _ in found}
    # The fused optimiser's settings never matter: the lookup runs without autograd.
    sharder = EmbeddingCollectionSharder(fused_params={"learning_rate": 0.0})
    group = dist.group.WORLD
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=dist.get_world_size()),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
        holder, [sharder], group)
    shard_modules(holder, env=ShardingEnv.from_process_group(group), device=device, plan=plan, sharders=[sharder])
    collection = holder.tables

    rank = dist.get_rank()
    state = collection.state_dict()
    tables: dict[str, _Table] = {}
    for name, key, module, _, _ in found:
        sharded = state[f"embeddings.{name}.weight"]
        by_rank = {m.placement.rank(): (m.shard_offsets[0], m.shard_sizes[0])
                   for m in sharded.metadata().shards_metadata}
        ranges = [by_rank.get(r, (0, 0)) for r in range(dist.get_world_size())]
        starts = [start for start, _ in ranges]
        stops = [start + size for start, size in ranges]
        tiled = sorted((start, stop) for start, stop in zip(starts, stops) if stop > start)
        if [s for s, _ in tiled] != [0] + [e for _, e in tiled[:-1]] or tiled[-1][1] != module.weight.shape[0]:
            raise RuntimeError(f"torchrec did not shard the table {name} into row ranges: {by_rank}")
        shards = sharded.local_shards()
        local = (shards[0].tensor if shards
                 else torch.zeros(0, _stored_width(module.weight.shape[1]), device=device))
        num_rows, dim = module.weight.shape
        with torch.no_grad():
            local.copy_(F.pad(module.weight[starts[rank] : stops[rank]], (0, _stored_width(dim) - dim)))
        tables[name] = _Table(name, key, num_rows, dim, _stored_width(dim), module.padding_idx, starts, stops, local)
    sharded_tables = ShardedTables(collection, tables, device)
    for name, _, _, parent, key in found:
        stand_in = ShardedTable(sharded_tables, name)
        if isinstance(key, int):
            parent[key] = stand_in
        else:
            setattr(parent, key, stand_in)
    return sharded_tables
