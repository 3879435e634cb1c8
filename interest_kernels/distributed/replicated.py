"""Data-parallel training with replicated embedding tables.

Every rank holds all tables and the dense layers and trains on its slice of each global
batch (:mod:`.data`). The dense gradients are summed over the ranks by DDP; the
tables' gradient rows are all-gathered (:func:`.rows.exchange_rows`) so that every
replica applies the same MBA step with the global batch's ids, gradient rows and
frequency counts. Each rank's loss is its share of the global batch's loss (the sum of
its samples' terms over the global sample count; the auxiliary loss likewise over the
global number of valid (t, t+1) pairs), so the summed gradients are those of the global
batch's mean loss, and a run on W processes follows the same trajectory as one process
on the whole batch (up to float rounding).
"""
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from ..data.common import Batch
from ..models.common import CTRModel
from .data import Shard

__all__ = ["wrap_dense", "shard_loss", "sum_gradients_hook", "broadcast_tables"]


def sum_gradients_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: sum the bucket over the ranks (DDP's default averages;
    each rank's loss is already its share of the global mean). The module does not
    postpone annotations: DDP checks this one."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_dense(model: CTRModel, device: torch.device) -> DistributedDataParallel:
    """``model`` under DDP for its dense parameters; its tables are left out of DDP
    (their rows travel through :func:`exchange_rows`)."""
    tables = {id(p) for p in model.sparse_parameters()}
    ignored = [name for name, p in model.named_parameters() if id(p) in tables]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    ddp = DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None,
        forward_sync_buffers=False,  # the running buffers (Dice statistics) are synchronised
    )
    ddp.register_comm_hook(None, sum_gradients_hook)
    return ddp


@torch.no_grad()
def broadcast_tables(model: CTRModel) -> None:
    """Rank 0's tables on every rank (DDP broadcasts the dense parameters itself)."""
    for table in model.sparse_parameters():
        dist.broadcast(table, 0)


def shard_loss(ddp: DistributedDataParallel, model: CTRModel, batch: Batch, shard: Shard) -> torch.Tensor:
    """This rank's share of the global batch's loss (0-d); the shares sum to
    :meth:`CTRModel.loss` of the global batch: the mean target cross-entropy plus
    ``aux_weight`` times the auxiliary loss, a mean over the batch's valid (t, t+1) pairs."""
    out = ddp(batch)
    loss = F.binary_cross_entropy_with_logits(out.logits.float(), batch.label, reduction="sum")
    loss = loss / max(shard.global_rows, 1)
    if out.aux_loss is None:
        return loss
    pairs = (batch.lengths - 1).clamp(min=0).sum()
    total_pairs = pairs.clone()
    dist.all_reduce(total_pairs)
    share = pairs.to(out.aux_loss.dtype) / total_pairs.clamp(min=1).to(out.aux_loss.dtype)
    return loss + model.aux_weight * out.aux_loss * share
