"""The process group of a multi-process run, set up from torchrun's environment.

``torchrun --nproc_per_node N -m interest_kernels.train ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in every process;
:func:`init_from_env` reads them and joins the group: gloo for CPU training, NCCL for
CUDA (one GPU per process, ``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_from_env", "launched_by_torchrun"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: ``rank`` of ``world_size``, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group (after a barrier, so no rank leaves while another
        still needs it). Call it once the trainers are gone: a DDP wrapper freed after
        the group (the last owner of gloo's threads) can deadlock on the GIL in gloo's
        shutdown, so unreachable ones (DDP's hooks make cycles) are collected first."""
        if dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> Optional[DistContext]:
    """Join the process group described by the environment; None for a single process.

    ``device`` is the run's ``--device``: ``cpu`` trains with gloo; ``cuda`` (or
    ``cuda:K``, whose index is then replaced) trains on ``cuda:LOCAL_RANK`` with NCCL.
    """
    if not launched_by_torchrun():
        return None
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"WORLD_SIZE is set but {name} is not: launch with torchrun")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kind = torch.device(device).type
    if kind == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()}")
        here = torch.device("cuda", local)
        torch.cuda.set_device(here)
        backend = "nccl"
    elif kind == "cpu":
        here, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"--device {device}: distributed training runs on cpu (gloo) or cuda (NCCL)")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, device_id=here if kind == "cuda" else None)
    return DistContext(rank, world, here)
