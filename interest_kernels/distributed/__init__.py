"""Training across processes (``torchrun --nproc_per_node N -m interest_kernels.train``).

* :mod:`.context`: the process group from torchrun's environment (gloo on CPU, NCCL on GPU).
* :mod:`.data`: each rank's slice of every global batch.
* :mod:`.replicated`: tables replicated on every rank, dense layers under DDP.
* :mod:`.sharded`: tables sharded row-wise over the ranks by torchrec (``--tables
  sharded``), each shard updated by the MBA optimisers with the global batch's counts
  (imported on use: it needs torchrec).
* :mod:`.rows`: the all-gather of the tables' gradient rows before the MBA step.
* :mod:`.sync_dice`, :mod:`.sampler`: Dice statistics and auxiliary-loss negatives of the
  global batch, so W processes train the same model as one process on the whole batch.
* :mod:`.trainer`: the CLI's trainer across processes (imported on use: it needs
  :mod:`interest_kernels.train`).
"""
from .context import DistContext, init_from_env, launched_by_torchrun
from .data import Shard, ShardedBatches
from .rows import exchange_rows
from .sampler import ShardNegativeSampler, convert_shard_samplers, set_shard
from .sync_dice import SyncDice, convert_sync_dice

__all__ = [
    "DistContext",
    "Shard",
    "ShardNegativeSampler",
    "ShardedBatches",
    "SyncDice",
    "convert_shard_samplers",
    "convert_sync_dice",
    "exchange_rows",
    "init_from_env",
    "launched_by_torchrun",
    "set_shard",
]
