"""Helpers of the multi-process training tests: a free port for the process group, the
two-process spawn over a small generated dataset, and a training loop over a trainer's
batches, shared by test_distributed.py and test_distributed_sharded.py."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable, Optional

import torch.multiprocessing as mp

from interest_kernels.data import generate_amazon
from interest_kernels.train import Trainer


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(worker: Callable, root: Path) -> tuple[str, Path]:
    """Generate the small dataset under ``root`` and run ``worker(rank, port, data, out)``
    in 2 processes; returns the dataset's spec and the folder the workers wrote to."""
    # 39 users x 3 = 117 training samples: every epoch ends with a global batch of 5 (3 + 2 rows).
    data = generate_amazon(str(root / "data"), num_users=39, num_items=50, num_cats=5, train_per_user=3,
                           test_per_user=1, min_len=1, max_len=6, seed=0)
    out = root / "out"
    out.mkdir()
    mp.spawn(worker, args=(free_port(), f"amazon:{data}", str(out)), nprocs=2, join=True)
    return f"amazon:{data}", out


def train_steps(trainer: Trainer, steps: int, at_step: Optional[Callable[[int], object]] = None) -> list[float]:
    """The losses of ``steps`` training steps, epoch after epoch; ``at_step(trainer.steps)``
    after each."""
    losses = []
    while len(losses) < steps:
        for batch in trainer.batches.epoch_batches():
            losses.append(trainer.step(batch))
            if at_step is not None:
                at_step(trainer.steps)
            if len(losses) == steps:
                break
    return losses
