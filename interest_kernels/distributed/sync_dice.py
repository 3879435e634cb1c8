"""Dice with the statistics of the global batch (as ``nn.SyncBatchNorm`` for BatchNorm).

Dice normalises with the mean and variance of the batch it sees (SPEC section 4). A rank
seeing half of the global batch would normalise with its half's statistics and train a
different model than one process on the whole batch; :class:`SyncDice` all-reduces the
statistics over the ranks (two passes: the mean, then the biased variance about it),
differentiably, so the forward, the gradients and the running statistics are those of
the global batch. Evaluation uses the running statistics and no collectives.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..nn.dice import Dice
from ..ops.dice.reference import dice_reference, update_running_stats

__all__ = ["SyncDice", "convert_sync_dice"]


class _SumOverRanks(torch.autograd.Function):
    """The sum of ``x`` over the ranks; its gradient, the sum of the upstream gradients
    over the ranks (every rank's loss depends on every rank's ``x``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(x)


class SyncDice(Dice):
    """:class:`Dice` whose training statistics span all ranks of the process group.
    Same parameters, buffers and state-dict keys as ``Dice``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        flat = x.reshape(-1, x.shape[-1])
        stats = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
        count = torch.tensor([float(flat.shape[0])], dtype=stats.dtype, device=stats.device)
        sums = _sum_over_ranks(torch.cat([stats.sum(dim=0), count]))
        n = sums[-1].detach()
        mean = sums[:-1] / n.clamp(min=1)
        var = _sum_over_ranks(((stats - mean) ** 2).sum(dim=0)) / n.clamp(min=1)
        update_running_stats(self.running_mean, self.running_var, mean.detach(), var.detach(),
                             int(n), self.momentum)
        out = dice_reference(flat, self.alpha, mean, var, self.weight, self.bias, training=False, eps=self.eps)
        return out.reshape(x.shape)


def convert_sync_dice(module: nn.Module) -> nn.Module:
    """Turn every :class:`Dice` under ``module`` into a :class:`SyncDice` in place (the
    same tensors, so optimisers built before keep working). Returns ``module``.

    Dice layers that a fused target-attention op reads through ``dice_params()`` (an
    attention unit with ``activation="dice"``) are not run through ``forward`` and keep
    per-rank statistics.
    """
    for sub in module.modules():
        if type(sub) is Dice:
            sub.__class__ = SyncDice
    return module
