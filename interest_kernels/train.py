"""Train DIN, DIEN or DMIN on generated, Amazon or Taobao data.

    python -m interest_kernels.train --model din|dien|dmin
        [--data generated|generated:taobao|amazon:DIR|taobao:CSV] [--epochs N] [--batch-size B]
        [--backend fused|reference] [--compare] [--checkpoint PATH] [--resume PATH] [--device DEV]

Embedding tables are trained by an MBA optimiser (``--sparse-optim``), everything else by
Adam. After every epoch the held-out split is scored (logloss, AUC). Throughput counts
training samples per second of training steps (evaluation excluded).

Checkpoints hold the model (with the negative sampler's generator), both optimisers
(MBA frequency counts and moments included), the torch RNG states, the data position
and the settings that shape the run; ``--resume`` continues exactly where the saved
run stopped: the next steps see the same batches, draws and losses.

``--compare`` trains the fused and the reference backends from the same seed and prints
their losses, metrics and speeds side by side.

``torchrun --nproc_per_node N -m interest_kernels.train ...`` trains on N processes
(:mod:`interest_kernels.distributed`): ``--batch-size`` per process, the global batch's
losses, rank 0 alone logging and writing checkpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch.nn import functional as F

from .data import BatchIterator, Dataset, generate_amazon, generate_taobao, load_amazon, load_taobao
from .data.common import Batch, Samples, eval_batches
from .distributed.context import DistContext, init_from_env
from .models import MODELS, CTRModel, make_optimizers, train_step

__all__ = ["TrainConfig", "RunResult", "Trainer", "auc", "build_dataset", "run", "main"]


def auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a
    random negative, ties counting one half (the Mann-Whitney statistic with average
    ranks). labels (N,) in {0, 1}, scores (N,). NaN when one class is absent."""
    labels = labels.reshape(-1).to(torch.float64)
    scores = scores.reshape(-1).to(torch.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and scores {tuple(scores.shape)} differ in shape")
    n_pos = float(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    upper = counts.cumsum(0).to(torch.float64)
    mean_rank = upper - (counts.to(torch.float64) - 1) / 2  # 1-based average rank of each tie group
    rank_sum = float((mean_rank[inverse] * labels).sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass
class TrainConfig:
    """Everything that shapes a run (saved in checkpoints)."""

    model: str = "din"
    data: str = "generated"
    epochs: int = 3
    batch_size: int = 128
    backend: str = "fused"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 0
    max_len: int = 30
    sparse_optim: str = "adam"
    sparse_lr: float = 3e-3
    dense_lr: float = 1e-3
    mba_lambda: float = 1e-4
    embedding: str = "mba"
    gru_type: str = "AUGRU"
    max_steps: Optional[int] = None
    eval_batch_size: int = 1024
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)

    # Settings that may differ between a saved run and its resumption.
    RESUMABLE = ("epochs", "max_steps", "device", "eval_batch_size")


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    test_logloss: float
    test_auc: float
    samples_per_s: float


@dataclass
class RunResult:
    config: TrainConfig
    losses: list[float]
    epochs: list[EpochResult]
    samples_per_s: float
    steps: int


def build_dataset(config: TrainConfig, workdir: Optional[str] = None) -> Dataset:
    """The data the config names. Generated data is written to ``workdir`` (to a
    temporary directory, removed afterwards, when None) and read back through the
    loader of its layout."""
    kind, _, path = config.data.partition(":")
    if kind == "generated":
        if path not in ("", "amazon", "taobao"):
            raise ValueError(f"--data generated takes no path or ':amazon' / ':taobao', got {config.data!r}")
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="interest_kernels_data_") as tmp:
                return build_dataset(config, tmp)
        if path == "taobao":
            csv = generate_taobao(os.path.join(workdir, "UserBehavior.csv"), seed=config.seed, **config.data_kwargs)
            return load_taobao(csv, max_len=config.max_len, seed=config.seed)
        generate_amazon(workdir, **{"max_len": config.max_len, "seed": config.seed, **config.data_kwargs})
        return load_amazon(workdir, max_len=config.max_len)
    if kind == "amazon" and path:
        return load_amazon(path, max_len=config.max_len)
    if kind == "taobao" and path:
        return load_taobao(path, max_len=config.max_len, seed=config.seed)
    raise ValueError(f"--data must be generated, generated:taobao, amazon:DIR or taobao:CSV, got {config.data!r}")


def build_model(config: TrainConfig, dataset: Dataset) -> CTRModel:
    if config.model not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {config.model!r}")
    kwargs = dict(config.model_kwargs)
    if config.model == "dien":
        kwargs.setdefault("gru_type", config.gru_type)
    if config.model in ("dien", "dmin"):
        kwargs.setdefault("seed", config.seed)
    return MODELS[config.model](dataset.spec, backend=config.backend, embedding=config.embedding, **kwargs)


class Trainer:
    """Model, optimisers and data position of one run, with checkpoint save/restore."""

    def __init__(self, config: TrainConfig, dataset: Dataset) -> None:
        self.config = config
        self.dataset = dataset
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.model = build_model(config, dataset).to(self.device)
        self.sparse_opt, self.dense_opt = make_optimizers(
            self.model, sparse=config.sparse_optim, sparse_lr=config.sparse_lr,
            dense_lr=config.dense_lr, mba_lambda=config.mba_lambda,
        )
        self.batches = BatchIterator(dataset.train, config.batch_size, seed=config.seed)
        self.steps = 0

    def step(self, batch) -> float:
        """One training step on ``batch`` (on the CPU; moved here); returns the loss."""
        self.model.train()
        loss = train_step(self.model, self.sparse_opt, self.dense_opt, batch.to(self.device))
        self.steps += 1
        return float(loss)

    def samples_in(self, batch: Batch) -> int:
        """Training samples that a step on ``batch`` covers (over all processes)."""
        return batch.size

    @torch.no_grad()
    def evaluate(self, samples: Samples) -> tuple[float, float]:
        """(logloss, AUC) of the model on ``samples``."""
        self.model.eval()
        logits, labels = [], []
        for batch in eval_batches(samples, self.config.eval_batch_size):
            logits.append(self.model(batch.to(self.device)).logits.float().cpu())
            labels.append(batch.label)
        logit, label = torch.cat(logits), torch.cat(labels)
        logloss = float(F.binary_cross_entropy_with_logits(logit, label))
        return logloss, auc(label, logit)

    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "sparse_opt": self.sparse_opt.state_dict(),
            "dense_opt": self.dense_opt.state_dict(),
            "data": self.batches.state_dict(),
            "steps": self.steps,
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.sparse_opt.load_state_dict(state["sparse_opt"])
        self.dense_opt.load_state_dict(state["dense_opt"])
        self.batches.load_state_dict(state["data"])
        self.steps = int(state["steps"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)


def load_checkpoint_config(path: str, overrides: dict[str, Any]) -> TrainConfig:
    """The saved run's config with the settings in ``overrides`` that may change on resume."""
    saved = torch.load(path, map_location="cpu", weights_only=True)["config"]
    for key, value in overrides.items():
        if key not in TrainConfig.RESUMABLE and value != saved.get(key):
            raise ValueError(f"--resume: {key}={value!r} differs from the checkpoint's {saved.get(key)!r}")
        saved[key] = value
    return TrainConfig(**saved)


class _Progress:
    """tqdm when installed and wanted, else a line every ``every`` steps."""

    def __init__(self, total: int, desc: str, quiet: bool) -> None:
        self.bar = None
        self.quiet = quiet
        self.desc = desc
        self.total = total
        self.count = 0
        if not quiet:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, loss: float) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif not self.quiet and (self.count % 50 == 0 or self.count == self.total):
            print(f"{self.desc}: {self.count}/{self.total} loss {loss:.4f}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(
    config: TrainConfig,
    *,
    dataset: Optional[Dataset] = None,
    checkpoint: Optional[str] = None,
    checkpoint_every: Optional[int] = None,
    resume: Optional[str] = None,
    quiet: bool = False,
    log=print,
    dist_context: Optional[DistContext] = None,
) -> RunResult:
    """Train as ``config`` says; returns the per-step losses, per-epoch metrics and speed.

    ``resume`` restores a checkpoint first (its config must match ``config`` except for
    :attr:`TrainConfig.RESUMABLE`). ``checkpoint`` is written every ``checkpoint_every``
    steps and at the end.

    ``dist_context``: this process's rank in a multi-process run (from
    :func:`interest_kernels.distributed.init_from_env`); ``config.batch_size`` is then per
    process, the losses and metrics are the global ones on every rank (the ranks share
    the evaluation), and rank 0 alone logs and writes the checkpoint.
    """
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: CUDA is not available")
    dataset = dataset if dataset is not None else build_dataset(config)
    if dist_context is None:
        trainer = Trainer(config, dataset)
    else:  # distributed hook: this rank's trainer; rank 0 alone logs
        from .distributed.trainer import DistributedTrainer

        trainer = DistributedTrainer(config, dataset, dist_context)
        if not dist_context.is_main:
            quiet, log = True, (lambda *_: None)
    if resume is not None:
        trainer.load_state_dict(torch.load(resume, map_location="cpu", weights_only=True))
    losses: list[float] = []
    epochs: list[EpochResult] = []
    train_time, train_samples = 0.0, 0
    stop = False
    while trainer.batches.epoch < config.epochs and not stop:
        epoch = trainer.batches.epoch
        progress = _Progress(len(trainer.batches) - trainer.batches.position, f"epoch {epoch + 1}/{config.epochs}", quiet)
        epoch_losses, epoch_time, epoch_samples = [], 0.0, 0
        for batch in trainer.batches.epoch_batches():
            start = time.perf_counter()
            loss = trainer.step(batch)  # a float: the step has finished on the device
            elapsed = time.perf_counter() - start
            epoch_time += elapsed
            epoch_samples += trainer.samples_in(batch)
            epoch_losses.append(loss)
            progress.update(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {trainer.steps}")
            if checkpoint and checkpoint_every and trainer.steps % checkpoint_every == 0:
                trainer.save(checkpoint)
            if config.max_steps is not None and trainer.steps >= config.max_steps:
                stop = True
                break
        progress.close()
        losses += epoch_losses
        train_time += epoch_time
        train_samples += epoch_samples
        if trainer.batches.epoch == epoch:
            break  # stopped inside the epoch: no evaluation
        logloss, area = trainer.evaluate(dataset.test)
        speed = epoch_samples / epoch_time if epoch_time else float("nan")
        mean_loss = sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("nan")
        epochs.append(EpochResult(epoch + 1, mean_loss, logloss, area, speed))
        log(
            f"[{config.model}/{config.backend}] epoch {epoch + 1}: train loss {mean_loss:.4f}, "
            f"test logloss {logloss:.4f}, test AUC {area:.4f}, {speed:,.0f} samples/s"
        )
    if checkpoint:
        trainer.save(checkpoint)
    speed = train_samples / train_time if train_time else float("nan")
    return RunResult(config, losses, epochs, speed, trainer.steps)


def compare(config: TrainConfig, *, quiet: bool = False, log=print) -> dict[str, RunResult]:
    """Train the fused and the reference backends from the same seed on the same data."""
    dataset = build_dataset(config)
    results = {}
    for backend in ("fused", "reference"):
        results[backend] = run(dataclasses.replace(config, backend=backend), dataset=dataset, quiet=quiet, log=log)
    fused, ref = results["fused"], results["reference"]
    diff = max((abs(a - b) for a, b in zip(fused.losses, ref.losses)), default=float("nan"))
    log("")
    log(f"{'':24}{'fused':>14}{'reference':>14}")
    for f_ep, r_ep in zip(fused.epochs, ref.epochs):
        log(f"epoch {f_ep.epoch} train loss      {f_ep.train_loss:14.5f}{r_ep.train_loss:14.5f}")
        log(f"epoch {f_ep.epoch} test logloss    {f_ep.test_logloss:14.5f}{r_ep.test_logloss:14.5f}")
        log(f"epoch {f_ep.epoch} test AUC        {f_ep.test_auc:14.5f}{r_ep.test_auc:14.5f}")
    log(f"{'samples/s':24}{fused.samples_per_s:14,.0f}{ref.samples_per_s:14,.0f}")
    log(f"speed-up fused/reference: {fused.samples_per_s / ref.samples_per_s:.2f}x; "
        f"largest step-loss difference: {diff:.3g} over {len(fused.losses)} steps")
    return results


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m interest_kernels.train", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=tuple(MODELS), default=d.model)
    p.add_argument("--data", default=d.data, help="generated | generated:taobao | amazon:DIR | taobao:CSV")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--backend", choices=("fused", "reference"), default=d.backend)
    p.add_argument("--compare", action="store_true", help="train both backends from the same seed")
    p.add_argument("--checkpoint", help="write a checkpoint here (at the end, and every --checkpoint-every steps)")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--resume", help="continue the run saved in this checkpoint")
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-len", type=int, default=d.max_len, help="behaviours kept per history")
    p.add_argument("--max-steps", type=int, help="stop after this many steps in all")
    p.add_argument("--sparse-optim", choices=("sgd", "adagrad", "adam"), default=d.sparse_optim)
    p.add_argument("--sparse-lr", type=float, default=d.sparse_lr)
    p.add_argument("--dense-lr", type=float, default=d.dense_lr)
    p.add_argument("--mba-lambda", type=float, default=d.mba_lambda)
    p.add_argument("--embedding", choices=("mba", "torch"), default=d.embedding)
    p.add_argument("--gru-type", choices=("AUGRU", "AGRU", "AIGRU", "GRU"), default=d.gru_type)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); fewer threads than the "
                   "machine's cores often run small models faster on a shared machine")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist_context = init_from_env(args.device)  # distributed hook: None unless under torchrun
    if dist_context is not None and args.compare:
        raise SystemExit("--compare runs in one process; launch it without torchrun")
    settings = {
        "model": args.model, "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size,
        "backend": args.backend, "device": args.device, "seed": args.seed, "max_len": args.max_len,
        "sparse_optim": args.sparse_optim, "sparse_lr": args.sparse_lr, "dense_lr": args.dense_lr,
        "mba_lambda": args.mba_lambda, "embedding": args.embedding, "gru_type": args.gru_type,
        "max_steps": args.max_steps,
    }
    if args.compare:
        if args.resume or args.checkpoint:
            raise SystemExit("--compare does not take --resume or --checkpoint")
        results = compare(TrainConfig(**settings), quiet=args.quiet)
    else:
        if args.resume:
            given = list(argv) if argv is not None else sys.argv[1:]
            explicit = {
                k: v for k, v in settings.items()
                if any(a == f"--{k.replace('_', '-')}" or a.startswith(f"--{k.replace('_', '-')}=") for a in given)
            }
            from .distributed.trainer import resume_config

            world = 1 if dist_context is None else dist_context.world_size
            config = resume_config(args.resume, explicit, world)
        else:
            config = TrainConfig(**settings)
        if dist_context is not None:
            config = dataclasses.replace(config, device=str(dist_context.device))
        result = run(config, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                     resume=args.resume, quiet=args.quiet, dist_context=dist_context)
        results = {config.backend: result}
        if dist_context is not None:
            dist_context.close()
            if not dist_context.is_main:
                return 0
        print(f"[{config.model}/{config.backend}] {result.steps} steps, {result.samples_per_s:,.0f} samples/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: dataclasses.asdict(v) for k, v in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
