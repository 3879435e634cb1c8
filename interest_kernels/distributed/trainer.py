"""The training CLI's :class:`~interest_kernels.train.Trainer` across processes.

Tables replicated on every rank (``--tables replicated``, see :mod:`.replicated`) or
sharded row-wise over the ranks by torchrec (``--tables sharded``, see :mod:`.sharded`);
the dense layers under DDP either way. Every rank builds
the same model from the same seed (rank 0's tables and dense weights are broadcast to
make sure), trains on its slice of each global batch, and returns the global batch's
loss from :meth:`step`. Evaluation is shared: every rank scores a slice of the held-out
samples and all get the same predictions, hence the same metrics (so early stopping
decides alike on every rank). Rank 0 alone writes checkpoints; they hold the whole model
(sharded tables and their optimiser state gathered whole) and the global data position,
so any world size and either table mode (one process included) resumes them.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..data import Dataset
from ..data.common import Batch, Samples
from ..models.common import SPARSE_OPTIMIZERS
from ..train import Trainer, TrainConfig, load_checkpoint_config
from .context import DistContext
from .data import ShardedBatches
from .replicated import broadcast_tables, shard_loss, wrap_dense
from .rows import all_gather_1d, exchange_rows
from .sampler import convert_shard_samplers, set_shard
from .sharded import local_optimizer_state, shard_tables, torchrec_unavailable_reason, whole_optimizer_state
from .sync_dice import convert_sync_dice

__all__ = ["DistributedTrainer", "resume_config"]


class DistributedTrainer(Trainer):
    """One rank's model (tables replicated or sharded, dense layers under DDP), optimisers
    and share of the data. ``config.batch_size`` is the per-process batch size."""

    def __init__(self, config: TrainConfig, dataset: Dataset, context: DistContext) -> None:
        if config.tables not in ("replicated", "sharded"):
            raise ValueError(f"tables must be 'replicated' or 'sharded', got {config.tables!r}")
        if config.tables == "sharded":
            reason = torchrec_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"--tables sharded: {reason}")
            if config.embedding != "mba":
                raise ValueError("--tables sharded counts n_j per sample as MBAEmbedding does: use --embedding mba")
        super().__init__(config, dataset)
        self.context = context
        convert_sync_dice(self.model)
        convert_shard_samplers(self.model)
        broadcast_tables(self.model)
        self.sharded = None
        if config.tables == "sharded":
            self.sharded = shard_tables(self.model, self.device)
            local = self.sharded.local_weights()
            self.sparse_opt = SPARSE_OPTIMIZERS[config.sparse_optim](
                local, lr=config.sparse_lr, weight_decay=config.mba_lambda,
                counts=[torch.zeros(w.shape[0], dtype=torch.int64, device=w.device) for w in local],
            )
        self.ddp = wrap_dense(self.model, self.device)
        self.tables = list(self.model.sparse_parameters())
        self.batches = ShardedBatches(
            dataset.train, config.batch_size, rank=context.rank, world_size=context.world_size, seed=config.seed
        )
        self._own_random_stream()

    def _own_random_stream(self) -> None:
        """Give each rank other than 0 its own torch random stream (dropout masks), derived
        from the shared one, so the ranks' slices do not get the same masks."""
        if self.context.rank:
            torch.manual_seed(int(torch.randint(2**62, ())) + self.context.rank)

    def samples_in(self, batch: Batch) -> int:
        """Samples of the global batch that ``batch`` is this rank's slice of."""
        return self.batches.shard.global_rows

    @torch.no_grad()
    def predict(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(users, labels, logits) of every sample, in order, on the CPU, the same on every
        rank: each rank scores its contiguous share of the samples and the logits are
        all-gathered (every rank holds the whole split, so users and labels are its own).
        Every rank runs as many batches (its last ones perhaps empty): the lookups of
        sharded tables are collectives."""
        self.model.eval()
        parts = torch.arange(len(samples)).tensor_split(self.context.world_size)
        share = samples.subset(parts[self.context.rank])
        size, rows = self.config.eval_batch_size, len(share)
        rounds = -(-max(part.numel() for part in parts) // size)
        batches = (share.batch(torch.arange(min(i * size, rows), min((i + 1) * size, rows))) for i in range(rounds))
        logits = [self.model(b.to(self.device)).logits.float() for b in batches]
        mine = torch.cat(logits) if logits else torch.zeros(0, device=self.device)
        logit = torch.cat(all_gather_1d(mine, [part.numel() for part in parts])).cpu()
        return samples.user.to(torch.int64), samples.label.to(torch.float32), logit

    def step(self, batch: Batch) -> float:
        """One step on this rank's slice of the global batch; returns the global batch's loss."""
        self.model.train()
        shard = self.batches.shard
        set_shard(self.model, shard)
        self.sparse_opt.zero_grad()
        self.dense_opt.zero_grad()
        if self.sharded is not None:
            self.sharded.clear()
        loss = shard_loss(self.ddp, self.model, batch.to(self.device), shard)
        loss.backward()
        if self.sharded is None:
            exchange_rows(self.tables)
        else:
            self.sharded.route_rows([self.sparse_opt.state[w]["counts"] for w in self.tables])
        with self.model.backend_context():
            self.sparse_opt.step()
        self.dense_opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        self.steps += 1
        return float(total)

    def state_dict(self) -> dict[str, Any]:
        """The whole run's state, as one process would hold it (sharded tables and their
        optimiser state gathered: a collective, every rank calls it)."""
        state = {**super().state_dict(), "world_size": self.context.world_size}
        if self.sharded is not None:
            state["sparse_opt"] = whole_optimizer_state(self.sharded, self.sparse_opt)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sharded is not None:  # this rank's rows of the whole optimiser state
            state = {**state, "sparse_opt": local_optimizer_state(self.sharded, state["sparse_opt"])}
        super().load_state_dict(state)  # rank 0's random state, on every rank
        self._own_random_stream()

    def model_state(self) -> dict[str, Any]:
        state = super().model_state()
        if self.sharded is not None:
            state.update(self.sharded.whole_tables())  # a collective
        return state

    def load_model_state(self, state: dict[str, Any]) -> None:
        if self.sharded is not None:
            state = self.sharded.load_whole_tables(state)  # the rest of the state
        super().load_model_state(state)

    def save(self, path: str) -> None:
        """Rank 0 writes the checkpoint (every replica holds the same state; sharded
        tables are gathered first); every rank returns once it is written, so any of them
        may read it back (the best model)."""
        if self.sharded is not None or self.context.is_main:
            state = self.state_dict()
            if self.context.is_main:
                self.write_checkpoint(state, path)
        dist.barrier()


def resume_config(path: str, overrides: dict[str, Any], world_size: int) -> TrainConfig:
    """The config to resume checkpoint ``path`` with on ``world_size`` processes.

    The run continues with the saved global batch size (so it sees the same batches and
    losses as the saved run would have), split over the new world size: the per-process
    ``batch_size`` becomes the global batch size over ``world_size``, which must divide
    it. A ``batch_size`` in ``overrides`` must equal that quotient.
    """
    rest = {k: v for k, v in overrides.items() if k != "batch_size"}
    saved = torch.load(path, map_location="cpu", weights_only=True)
    global_batch = int(saved["data"]["batch_size"])
    if global_batch % world_size:
        raise ValueError(
            f"--resume: the checkpoint's global batch of {global_batch} samples does not split over "
            f"{world_size} processes; resume on a world size that divides it"
        )
    per_process = global_batch // world_size
    if overrides.get("batch_size", per_process) != per_process:
        raise ValueError(
            f"--batch-size {overrides['batch_size']}: resuming a global batch of {global_batch} on "
            f"{world_size} processes takes --batch-size {per_process}"
        )
    config = load_checkpoint_config(path, rest)
    config.batch_size = per_process
    return config
