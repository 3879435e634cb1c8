"""Helpers of the multi-process training tests: a free port for the process group and
a training loop over a trainer's batches, shared by test_distributed.py and
test_distributed_sharded.py."""
from __future__ import annotations

import socket
from typing import Callable, Optional

from interest_kernels.train import Trainer


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
