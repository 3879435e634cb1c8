"""Train, evaluate or score DIN, DIEN or DMIN on generated, Amazon, Taobao or MovieLens data.

    python -m interest_kernels.train --model din|dien|dmin --data SOURCE [options]
    python -m interest_kernels.train --config run.toml [options]      (options override the file)
    python -m interest_kernels.train --eval-only CKPT [--data SOURCE] [--split test]
    python -m interest_kernels.train --predict CKPT --out scores.csv [--data SOURCE] [--split test]

Embedding tables are trained by an MBA optimiser (``--sparse-optim``), everything else by
Adam, both under one learning-rate schedule (``--warmup-steps``, ``--lr-decay``). The
validation split (``--valid-fraction`` of the training users) and the test split are
scored (AUC, GAUC, logloss; SPEC section 7) after every epoch and every ``--eval-every``
steps; ``--early-stop METRIC`` stops when the validation metric has not improved for
``--patience`` evaluations and keeps the best model (``--best-checkpoint``). Throughput
counts training samples per second of training steps (evaluation excluded).

Checkpoints hold the model (with the negative sampler's generator), both optimisers
(MBA frequency counts and moments included), the torch RNG states, the data position,
the vocabularies and the settings that shape the run; the resolved settings are also
written beside the checkpoint as TOML (a valid ``--config`` file). ``--resume``
continues exactly where the saved run stopped (the next steps see the same batches,
draws and losses) and runs to the new command's ``--epochs`` / ``--max-steps``.

``--compare`` trains the fused and the reference backends from the same seed and prints
their losses, metrics and speeds side by side.

``torchrun --nproc_per_node N -m interest_kernels.train ...`` trains on N processes
(:mod:`interest_kernels.distributed`): ``--batch-size`` per process, the global batch's
losses, the same metrics on every rank (early stopping decides alike), rank 0 alone
logging and writing checkpoints. ``--compare``, ``--eval-only`` and ``--predict`` run in
one process.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .data import (
    BatchIterator, Dataset, Vocab, generate_amazon, generate_taobao, hold_out_users, load_amazon, load_movielens,
    load_taobao,
)
from .data.common import Batch, Samples, eval_batches
from .distributed.context import DistContext, init_from_env, launched_by_torchrun
from .metrics import METRICS, auc, better, ctr_metrics
from .models import MODELS, CTRModel, make_optimizers, train_step

__all__ = [
    "TrainConfig", "RunResult", "Trainer", "auc", "build_dataset", "run", "evaluate_checkpoint",
    "predict_checkpoint", "lr_factor", "main",
]

LR_DECAYS = ("none", "linear", "cosine")


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
    tables: str = "replicated"
    gru_type: str = "AUGRU"
    max_steps: Optional[int] = None
    eval_batch_size: int = 1024
    valid_fraction: float = 0.0
    eval_every: Optional[int] = None
    early_stop: Optional[str] = None
    patience: int = 3
    warmup_steps: int = 0
    lr_decay: str = "none"
    min_lr_ratio: float = 0.0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)

    # Settings a resumed run takes from its own command line, not from the checkpoint.
    RESUMABLE = ("epochs", "max_steps", "device", "eval_batch_size", "eval_every", "early_stop", "patience",
                 "tables")


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    test_logloss: float
    test_auc: float
    test_gauc: float
    samples_per_s: float
    valid: Optional[dict[str, float]] = None


@dataclass
class RunResult:
    config: TrainConfig
    losses: list[float]
    epochs: list[EpochResult]
    samples_per_s: float
    steps: int
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    best: Optional[dict[str, Any]] = None
    test: Optional[dict[str, float]] = None


# --- data ------------------------------------------------------------------------------


def _load_source(config: TrainConfig, workdir: Optional[str], vocabs: Optional[dict[str, Vocab]]) -> Dataset:
    kind, _, path = config.data.partition(":")
    if kind == "generated":
        if path not in ("", "amazon", "taobao"):
            raise ValueError(f"--data generated takes no path or ':amazon' / ':taobao', got {config.data!r}")
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="interest_kernels_data_") as tmp:
                return _load_source(config, tmp, vocabs)
        if path == "taobao":
            csv_path = generate_taobao(os.path.join(workdir, "UserBehavior.csv"), seed=config.seed, **config.data_kwargs)
            return load_taobao(csv_path, max_len=config.max_len, seed=config.seed, vocabs=vocabs)
        generate_amazon(workdir, **{"max_len": config.max_len, "seed": config.seed, **config.data_kwargs})
        return load_amazon(workdir, max_len=config.max_len, vocabs=vocabs)
    if kind == "amazon" and path:
        return load_amazon(path, max_len=config.max_len, vocabs=vocabs)
    if kind == "taobao" and path:
        return load_taobao(path, max_len=config.max_len, seed=config.seed, vocabs=vocabs)
    if kind == "movielens" and path:
        return load_movielens(path, max_len=config.max_len, seed=config.seed, vocabs=vocabs)
    raise ValueError(
        f"--data must be generated, generated:taobao, amazon:DIR, taobao:CSV or movielens:DIR, got {config.data!r}"
    )


def build_dataset(
    config: TrainConfig,
    workdir: Optional[str] = None,
    vocabs: Optional[dict[str, Vocab]] = None,
    log: Optional[Callable[[str], Any]] = None,
) -> Dataset:
    """The data the config names, with ``config.valid_fraction`` of the training users
    held out as the validation split; its summary goes to ``log``, then every split is
    checked to hold both labels. Generated data is written to ``workdir`` (a temporary
    directory, removed afterwards, when None) and read back through the loader of its
    layout. ``vocabs`` (a checkpoint's) fixes the id -> index maps."""
    dataset = _load_source(config, workdir, vocabs)
    if config.valid_fraction:
        dataset.train, dataset.valid = hold_out_users(dataset.train, config.valid_fraction, config.seed)
    if log is not None:
        log(dataset.summary())
    dataset.check()
    return dataset


# --- the learning-rate schedule -----------------------------------------------------------


def lr_factor(config: TrainConfig, step: int, total_steps: int) -> float:
    """The multiplier of both base learning rates at 0-based ``step`` of a run of
    ``total_steps``: linear warm-up over ``warmup_steps`` (from 1/warmup), then constant
    ("none") or a linear / cosine decay to ``min_lr_ratio`` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_decay == "none":
        return 1.0
    span = max(total_steps - config.warmup_steps - 1, 1)
    done = min(max(step - config.warmup_steps, 0) / span, 1.0)
    shape = 1 - done if config.lr_decay == "linear" else (1 + math.cos(math.pi * done)) / 2
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape


def planned_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    total = config.epochs * batches_per_epoch
    return min(total, config.max_steps) if config.max_steps is not None else total


# --- the model and its training state -----------------------------------------------------


def build_model(config: TrainConfig, dataset: Dataset) -> CTRModel:
    if config.model not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {config.model!r}")
    kwargs = dict(config.model_kwargs)
    if config.model == "dien":
        kwargs.setdefault("gru_type", config.gru_type)
    if config.model in ("dien", "dmin"):
        kwargs.setdefault("seed", config.seed)
    return MODELS[config.model](dataset.spec, backend=config.backend, embedding=config.embedding, **kwargs)


class EarlyStopping:
    """Tracks the best value of a validation metric and the evaluations since."""

    def __init__(self, metric: str, patience: int) -> None:
        self.metric = metric
        self.patience = patience
        self.best: Optional[float] = None
        self.best_step = 0
        self.since_best = 0

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation; True when it is the best so far."""
        if better(self.metric, value, self.best):
            self.best, self.best_step, self.since_best = value, step, 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.since_best = state["best"], state["best_step"], state["since_best"]


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
        self.stopper = EarlyStopping(config.early_stop, config.patience) if config.early_stop else None

    def set_lr(self, factor: float) -> None:
        for opt, base in ((self.sparse_opt, self.config.sparse_lr), (self.dense_opt, self.config.dense_lr)):
            for group in opt.param_groups:
                group["lr"] = base * factor

    def step(self, batch: Batch) -> float:
        """One training step on ``batch`` (on the CPU; moved here); returns the loss."""
        self.model.train()
        loss = train_step(self.model, self.sparse_opt, self.dense_opt, batch.to(self.device))
        self.steps += 1
        return float(loss)

    def samples_in(self, batch: Batch) -> int:
        """Training samples that a step on ``batch`` covers."""
        return batch.size

    @torch.no_grad()
    def predict(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(users, labels, logits) of every sample, in order, on the CPU."""
        self.model.eval()
        users, labels, logits = [], [], []
        for batch in eval_batches(samples, self.config.eval_batch_size):
            logits.append(self.model(batch.to(self.device)).logits.float().cpu())
            labels.append(batch.label)
            users.append(batch.user)
        if not logits:
            empty = torch.zeros(0)
            return empty.long(), empty, empty
        return torch.cat(users), torch.cat(labels), torch.cat(logits)

    def evaluate(self, samples: Samples) -> dict[str, float]:
        """``{"auc", "gauc", "logloss"}`` of the model on ``samples``."""
        return ctr_metrics(*self.predict(samples))

    def model_state(self) -> dict[str, Any]:
        """The model's state_dict (whole tables included)."""
        return self.model.state_dict()

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "config": dataclasses.asdict(self.config),
            "model": self.model_state(),
            "sparse_opt": self.sparse_opt.state_dict(),
            "dense_opt": self.dense_opt.state_dict(),
            "data": self.batches.state_dict(),
            "steps": self.steps,
            "rng": rng,
            "vocabs": {kind: vocab.tokens() for kind, vocab in self.dataset.vocabs.items()},
            "early_stop": self.stopper.state_dict() if self.stopper else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_model_state(state["model"])
        self.sparse_opt.load_state_dict(state["sparse_opt"])
        self.dense_opt.load_state_dict(state["dense_opt"])
        self.batches.load_state_dict(state["data"])
        self.steps = int(state["steps"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.stopper is not None and state.get("early_stop"):
            self.stopper.load_state_dict(state["early_stop"])

    def save(self, path: str) -> None:
        self.write_checkpoint(self.state_dict(), path)

    def write_checkpoint(self, state: dict[str, Any], path: str) -> None:
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)
        write_config_file(self.config, config_path_beside(path))


def read_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_vocabs(state: dict[str, Any]) -> Optional[dict[str, Vocab]]:
    saved = state.get("vocabs")
    return {kind: Vocab.from_tokens(tokens) for kind, tokens in saved.items()} if saved else None


def load_checkpoint_config(path: str, overrides: dict[str, Any]) -> TrainConfig:
    """The saved run's config with ``overrides``: settings in
    :attr:`TrainConfig.RESUMABLE` replace the saved ones, any other must equal them."""
    saved = read_checkpoint(path)["config"]
    for key, value in overrides.items():
        if key not in TrainConfig.RESUMABLE and value != saved.get(key):
            raise ValueError(f"--resume: {key}={value!r} differs from the checkpoint's {saved.get(key)!r}")
        saved[key] = value
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


# --- training --------------------------------------------------------------------------


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


def _check_run(config: TrainConfig, trainer: Trainer) -> None:
    """Errors for a run that would train nothing or cannot do what it is asked."""
    if config.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {config.epochs}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {config.max_steps}")
    if config.eval_every is not None and config.eval_every < 1:
        raise ValueError(f"--eval-every must be >= 1, got {config.eval_every}")
    if config.lr_decay not in LR_DECAYS:
        raise ValueError(f"--lr-decay must be one of {LR_DECAYS}, got {config.lr_decay!r}")
    if config.early_stop is not None:
        if config.early_stop not in METRICS:
            raise ValueError(f"--early-stop must be one of {METRICS}, got {config.early_stop!r}")
        if trainer.dataset.valid is None:
            raise ValueError("--early-stop needs a validation split: give --valid-fraction (e.g. 0.1)")
        if config.patience < 1:
            raise ValueError(f"--patience must be >= 1, got {config.patience}")
    if trainer.batches.epoch >= config.epochs or (config.max_steps is not None and trainer.steps >= config.max_steps):
        raise ValueError(
            f"nothing to train: the run is at step {trainer.steps} (epoch {trainer.batches.epoch}) and "
            f"stops at --epochs {config.epochs}, --max-steps {config.max_steps}"
        )


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def run(
    config: TrainConfig,
    *,
    dataset: Optional[Dataset] = None,
    checkpoint: Optional[str] = None,
    checkpoint_every: Optional[int] = None,
    best_checkpoint: Optional[str] = None,
    resume: Optional[str] = None,
    quiet: bool = False,
    log: Callable[[str], Any] = print,
    dist_context: Optional[DistContext] = None,
) -> RunResult:
    """Train as ``config`` says; returns the per-step losses, per-epoch metrics and speed.

    ``resume`` restores a checkpoint first (its config must match ``config`` except for
    :attr:`TrainConfig.RESUMABLE`). ``checkpoint`` is written every ``checkpoint_every``
    steps and at the end; with early stopping the best model is written to
    ``best_checkpoint`` (kept in memory when None) and restored at the end, and the
    final test metrics (``RunResult.test``) are those of that best model.

    ``dist_context``: this process's rank in a multi-process run (from
    :func:`interest_kernels.distributed.init_from_env`); ``config.batch_size`` is then per
    process, the losses and metrics are the global ones on every rank (the ranks share
    the evaluation), and rank 0 alone logs and writes the checkpoints.
    """
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: CUDA is not available")
    if dist_context is None and config.tables != "replicated":
        raise ValueError(f"--tables {config.tables}: tables are sharded over processes; launch with torchrun")
    if dist_context is not None and not dist_context.is_main:
        quiet, log = True, (lambda *_: None)
    state = read_checkpoint(resume) if resume is not None else None
    if dataset is None:
        dataset = build_dataset(config, vocabs=checkpoint_vocabs(state) if state else None, log=log)
    if dist_context is None:
        trainer = Trainer(config, dataset)
    else:
        from .distributed.trainer import DistributedTrainer

        trainer = DistributedTrainer(config, dataset, dist_context)
    if state is not None:
        trainer.load_state_dict(state)
    _check_run(config, trainer)
    total = planned_steps(config, len(trainer.batches))
    tag = f"[{config.model}/{config.backend}]"
    result = RunResult(config, [], [], float("nan"), trainer.steps)
    best_state: Optional[dict[str, Any]] = None

    def evaluate(epoch: int) -> dict[str, dict[str, float]]:
        nonlocal best_state
        scores = {}
        for split in ("valid", "test"):
            samples = getattr(dataset, split)
            if samples is not None:
                scores[split] = trainer.evaluate(samples)
                result.evaluations.append({"step": trainer.steps, "epoch": epoch, "split": split, **scores[split]})
        log(f"{tag} step {trainer.steps}: " + "; ".join(f"{s} {_format(m)}" for s, m in scores.items()))
        if trainer.stopper is not None and trainer.stopper.update(scores["valid"][config.early_stop], trainer.steps):
            result.best = {"step": trainer.steps, "epoch": epoch, config.early_stop: trainer.stopper.best}
            if best_checkpoint:
                trainer.save(best_checkpoint)
            else:
                best_state = copy.deepcopy(trainer.model_state())
        return scores

    train_time, train_samples = 0.0, 0
    stop = False
    while trainer.batches.epoch < config.epochs and not stop:
        epoch = trainer.batches.epoch
        progress = _Progress(len(trainer.batches) - trainer.batches.position, f"epoch {epoch + 1}/{config.epochs}", quiet)
        epoch_losses, epoch_time, epoch_samples = [], 0.0, 0
        for batch in trainer.batches.epoch_batches():
            trainer.set_lr(lr_factor(config, trainer.steps, total))
            start = time.perf_counter()
            loss = trainer.step(batch)  # a float: the step has finished on the device
            epoch_time += time.perf_counter() - start
            epoch_samples += trainer.samples_in(batch)
            epoch_losses.append(loss)
            progress.update(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {trainer.steps}")
            if checkpoint and checkpoint_every and trainer.steps % checkpoint_every == 0:
                trainer.save(checkpoint)
            end_of_epoch = trainer.batches.epoch != epoch
            if config.eval_every and trainer.steps % config.eval_every == 0 and not end_of_epoch:
                evaluate(epoch + 1)
                if trainer.stopper is not None and trainer.stopper.should_stop:
                    stop = True
                    break
            if config.max_steps is not None and trainer.steps >= config.max_steps:
                stop = True
                break
        progress.close()
        result.losses += epoch_losses
        train_time += epoch_time
        train_samples += epoch_samples
        if trainer.batches.epoch == epoch:
            break  # stopped inside the epoch: no end-of-epoch evaluation
        scores = evaluate(epoch + 1)
        speed = epoch_samples / epoch_time if epoch_time else float("nan")
        mean_loss = sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("nan")
        test = scores["test"]
        result.epochs.append(
            EpochResult(epoch + 1, mean_loss, test["logloss"], test["auc"], test["gauc"], speed, scores.get("valid"))
        )
        log(f"{tag} epoch {epoch + 1}: train loss {mean_loss:.4f}, test logloss {test['logloss']:.4f}, "
            f"test AUC {test['auc']:.4f}, test GAUC {test['gauc']:.4f}, {speed:,.0f} samples/s")
        if trainer.stopper is not None and trainer.stopper.should_stop:
            break
    if checkpoint:
        trainer.save(checkpoint)
    stopper = trainer.stopper
    if stopper is not None and stopper.best is not None:
        if best_checkpoint and os.path.exists(best_checkpoint):
            trainer.load_model_state(read_checkpoint(best_checkpoint)["model"])
        elif best_state is not None:
            trainer.load_model_state(best_state)
        else:  # the best came before a resume and was held in memory only
            log(f"{tag} the best model (step {stopper.best_step}) was not saved (no --best-checkpoint); "
                f"keeping the last one")
            stopper = None
    if stopper is not None and stopper.best is not None:
        result.best = result.best or {"step": stopper.best_step, config.early_stop: stopper.best}
        log(f"{tag} kept the model of step {stopper.best_step} (best valid {config.early_stop} {stopper.best:.4f})")
    result.test = trainer.evaluate(dataset.test)
    result.steps = trainer.steps
    result.samples_per_s = train_samples / train_time if train_time else float("nan")
    return result


def compare(config: TrainConfig, *, quiet: bool = False, log: Callable[[str], Any] = print) -> dict[str, RunResult]:
    """Train the fused and the reference backends from the same seed on the same data."""
    dataset = build_dataset(config, log=log)
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
        log(f"epoch {f_ep.epoch} test GAUC       {f_ep.test_gauc:14.5f}{r_ep.test_gauc:14.5f}")
    log(f"{'samples/s':24}{fused.samples_per_s:14,.0f}{ref.samples_per_s:14,.0f}")
    log(f"speed-up fused/reference: {fused.samples_per_s / ref.samples_per_s:.2f}x; "
        f"largest step-loss difference: {diff:.3g} over {len(fused.losses)} steps")
    return results


# --- evaluation and prediction from a checkpoint ---------------------------------------------


def _trainer_from_checkpoint(path: str, data: Optional[str], log: Callable[[str], Any], **overrides: Any) -> Trainer:
    """A trainer holding the checkpoint's model, on ``data`` (default: the data it was
    trained on) read with the checkpoint's vocabularies."""
    state = read_checkpoint(path)
    config = load_checkpoint_config(path, {k: v for k, v in overrides.items() if v is not None})
    if data is not None:
        config = dataclasses.replace(config, data=data)
    dataset = _load_source(config, None, checkpoint_vocabs(state))
    if config.valid_fraction:
        dataset.train, dataset.valid = hold_out_users(dataset.train, config.valid_fraction, config.seed)
    log(dataset.summary())
    trainer = Trainer(config, dataset)
    trainer.model.load_state_dict(state["model"])
    return trainer


def _split(trainer: Trainer, split: str) -> Samples:
    samples = trainer.dataset.splits().get(split)
    if samples is None:
        raise ValueError(f"--split {split}: the data has no such split (it has {tuple(trainer.dataset.splits())})")
    if len(samples) == 0:
        raise ValueError(f"--split {split}: the split is empty")
    return samples


def evaluate_checkpoint(path: str, *, data: Optional[str] = None, split: str = "test", device: Optional[str] = None,
                        log: Callable[[str], Any] = print) -> dict[str, float]:
    """AUC, GAUC and logloss of a checkpoint's model on one split."""
    trainer = _trainer_from_checkpoint(path, data, log, device=device)
    metrics = trainer.evaluate(_split(trainer, split))
    log(f"[{trainer.config.model}] {path} on {trainer.dataset.source} {split}: {_format(metrics)}")
    return metrics


def predict_checkpoint(path: str, out: str, *, data: Optional[str] = None, split: str = "test",
                       device: Optional[str] = None, log: Callable[[str], Any] = print) -> int:
    """Write ``user,item,score,label`` (raw ids, ``<unk>`` for ids the checkpoint's
    vocabularies lack; the click probability) for every sample of one split, in the
    split's order, to the CSV ``out``; returns the number of rows."""
    trainer = _trainer_from_checkpoint(path, data, log, device=device)
    samples = _split(trainer, split)
    _, labels, logits = trainer.predict(samples)
    users, items = trainer.dataset.vocabs["user"].tokens(), trainer.dataset.vocabs["item"].tokens()
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "item", "score", "label"])
        for u, i, p, y in zip(samples.user.tolist(), samples.item.tolist(), torch.sigmoid(logits).tolist(),
                              labels.tolist()):
            writer.writerow([users[u], items[i], f"{p:.6g}", int(y)])
    log(f"[{trainer.config.model}] wrote {len(samples)} scores of {trainer.dataset.source} {split} to {out}")
    return len(samples)


# --- configuration files -----------------------------------------------------------------


def config_path_beside(checkpoint: str) -> str:
    """Where the resolved settings of a checkpoint are written: ``run.pt`` -> ``run.toml``."""
    return os.path.splitext(checkpoint)[0] + ".toml"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to a config file")


def write_config_file(config: TrainConfig, path: str) -> None:
    """The settings of ``config`` as a TOML file that ``--config`` reads back."""
    lines = ["# interest_kernels.train settings (keys are the command-line flags)"]
    tables = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, dict):
            tables.append((f.name, value))
        elif value is not None:
            lines.append(f"{f.name} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def read_config_file(path: str, parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(command-line arguments equivalent to the file's flag settings, its
    ``model_kwargs`` / ``data_kwargs`` tables)."""
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: no such file: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not valid TOML: {e}") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    tables: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        dest = key.replace("-", "_")
        if dest in ("model_kwargs", "data_kwargs"):
            if not isinstance(value, dict):
                raise ValueError(f"--config {path}: {key} must be a table")
            tables[dest] = value
            continue
        action = actions.get(dest)
        if action is None or dest in ("config", "help"):
            known = sorted(k for k in actions if k not in ("config", "help"))
            raise ValueError(f"--config {path}: unknown setting {key!r} (known: {', '.join(known)})")
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: {key} must be true or false, got {value!r}")
            argv += [action.option_strings[0]] if value else []
        else:
            argv += [action.option_strings[0], str(value)]
    return argv, tables


# --- the command line ------------------------------------------------------------------------

DATA_LAYOUTS = """\
data sources (--data):
  generated           a small generated set in the Amazon layout (default; written to a temporary folder)
  generated:taobao    a small generated Taobao behaviour file
  amazon:DIR          DIR/local_train_splitByUser and DIR/local_test_splitByUser, lines
                      'label<TAB>user<TAB>item<TAB>category<TAB>item history<TAB>category history',
                      histories joined by \\x02 (the DIEN authors' layout); optional vocabularies
                      DIR/uid_voc.txt, mid_voc.txt, cat_voc.txt ('raw_id<TAB>index', <unk> at 0)
  taobao:CSV          Tianchi UserBehavior.csv: 'user_id,item_id,category_id,behavior_type,timestamp',
                      behavior_type pv|buy|cart|fav, optional header; each user's last click is the test
  movielens:DIR       GroupLens files as distributed: ml-100k u.data + u.item; ml-1m ratings.dat +
                      movies.dat; ml-20m/25m ratings.csv + movies.csv. Rating >= 4 is a click; users split
                      at random 100,000 : 38,493 (ML-20M's proportion) into training and test users
Vocabularies are built in memory (nothing is written into data folders) and saved in checkpoints.

config files (--config run.toml): keys are the flags ('batch_size = 256' or 'batch-size = 256'), plus
optional [model_kwargs] and [data_kwargs] tables; flags on the command line override the file.
Checkpoints get their resolved settings beside them (run.pt -> run.toml), a valid --config file.
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the command."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and shows every option's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not any(action.default is skip for skip in (None, False, argparse.SUPPRESS))
        if shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text.strip()


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(prog="python -m interest_kernels.train", description=__doc__.split("\n")[0],
                                epilog=DATA_LAYOUTS, formatter_class=_HelpFormatter)
    p.add_argument("--config", help="read settings from this TOML file (flags override it)")
    p.add_argument("--model", choices=tuple(MODELS), default=d.model, help="the CTR model")
    p.add_argument("--data", default=d.data, help="generated | generated:taobao | amazon:DIR | taobao:CSV | movielens:DIR")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split")
    p.add_argument("--max-steps", type=int, help="stop after this many steps in all")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training samples per step")
    p.add_argument("--backend", choices=("fused", "reference"), default=d.backend,
                   help="fused kernels or the eager reference ops")
    p.add_argument("--device", default=d.device, help="torch device")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the model, data order, negatives and splits")
    p.add_argument("--max-len", type=int, default=d.max_len, help="behaviours kept per history")
    p.add_argument("--sparse-optim", choices=("sgd", "adagrad", "adam"), default=d.sparse_optim,
                   help="the MBA optimiser of the embedding tables")
    p.add_argument("--sparse-lr", type=float, default=d.sparse_lr, help="base learning rate of the embedding tables")
    p.add_argument("--dense-lr", type=float, default=d.dense_lr, help="base learning rate of Adam (all other weights)")
    p.add_argument("--mba-lambda", type=float, default=d.mba_lambda, help="MBA regularisation strength (SPEC 5)")
    p.add_argument("--embedding", choices=("mba", "torch"), default=d.embedding, help="embedding table implementation")
    p.add_argument("--tables", choices=("replicated", "sharded"), default=d.tables,
                   help="under torchrun: every rank holds the tables, or each holds its rows (torchrec)")
    p.add_argument("--gru-type", choices=("AUGRU", "AGRU", "AIGRU", "GRU"), default=d.gru_type,
                   help="DIEN's interest-evolving layer")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warm-up")
    p.add_argument("--lr-decay", choices=LR_DECAYS, default=d.lr_decay, help="decay after the warm-up, to the last step")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="the decay's final fraction of the rate")
    p.add_argument("--valid-fraction", type=float, default=d.valid_fraction,
                   help="share of the training users held out as the validation split")
    p.add_argument("--eval-every", type=int, help="also evaluate every N steps (besides every epoch)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="samples per evaluation batch")
    p.add_argument("--early-stop", choices=METRICS, help="stop when this validation metric stops improving")
    p.add_argument("--patience", type=int, default=d.patience, help="evaluations without improvement before stopping")
    p.add_argument("--checkpoint", help="write a checkpoint here (at the end, and every --checkpoint-every steps)")
    p.add_argument("--checkpoint-every", type=int, help="also write --checkpoint every N steps")
    p.add_argument("--best-checkpoint", help="with --early-stop: write the best model's checkpoint here "
                   "(default: beside --checkpoint as NAME.best.pt, else kept in memory)")
    p.add_argument("--resume", help="continue the run saved in this checkpoint")
    p.add_argument("--compare", action="store_true", help="train both backends from the same seed")
    p.add_argument("--eval-only", metavar="CKPT", help="only evaluate this checkpoint (on --split)")
    p.add_argument("--predict", metavar="CKPT", help="write this checkpoint's scores of --split to --out")
    p.add_argument("--out", help="the CSV that --predict writes (user,item,score,label)")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test", help="the split --eval-only / --predict use")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); fewer threads than the "
                   "machine's cores often run small models faster on a shared machine")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("model_kwargs", "data_kwargs"))


def _given(argv: Sequence[str], key: str) -> bool:
    flag = f"--{key.replace('_', '-')}"
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _write_json(path: str, payload: Any) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def _main(argv: list[str], parser: argparse.ArgumentParser) -> int:
    pre, _ = parser.parse_known_args(argv)
    tables: dict[str, dict[str, Any]] = {}
    if pre.config:
        file_argv, tables = read_config_file(pre.config, parser)
        argv = file_argv + argv
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if launched_by_torchrun():
        for flag in ("compare", "eval_only", "predict"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} runs in one process; launch it without torchrun")
    dist_context = init_from_env(args.device)  # None unless under torchrun
    settings = {key: getattr(args, key) for key in SETTINGS}
    settings.update(tables)
    if args.eval_only or args.predict:
        if args.eval_only and args.predict:
            raise ValueError("give --eval-only or --predict, not both")
        data = args.data if _given(argv, "data") else None
        device = args.device if _given(argv, "device") else None
        if args.eval_only:
            metrics = evaluate_checkpoint(args.eval_only, data=data, split=args.split, device=device)
            if args.json:
                _write_json(args.json, {"checkpoint": args.eval_only, "split": args.split, **metrics})
            return 0
        if not args.out:
            raise ValueError("--predict needs --out FILE.csv")
        predict_checkpoint(args.predict, args.out, data=data, split=args.split, device=device)
        return 0
    if args.compare:
        if args.resume or args.checkpoint:
            raise ValueError("--compare does not take --resume or --checkpoint")
        results = compare(TrainConfig(**settings), quiet=args.quiet)
    else:
        if args.resume:
            from .distributed.trainer import resume_config

            overrides = {k: v for k, v in settings.items() if k in TrainConfig.RESUMABLE or _given(argv, k)}
            world = 1 if dist_context is None else dist_context.world_size
            config = resume_config(args.resume, overrides, world)
        else:
            config = TrainConfig(**settings)
        if dist_context is not None:
            config = dataclasses.replace(config, device=str(dist_context.device))
        best = args.best_checkpoint
        if best is None and config.early_stop and args.checkpoint:
            best = os.path.splitext(args.checkpoint)[0] + ".best.pt"
        result = run(config, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                     best_checkpoint=best, resume=args.resume, quiet=args.quiet, dist_context=dist_context)
        if dist_context is not None:
            dist_context.close()
            if not dist_context.is_main:
                return 0
        print(f"[{config.model}/{config.backend}] {result.steps} steps, {result.samples_per_s:,.0f} samples/s; "
              f"test {_format(result.test)}")
        results = {config.backend: result}
    if args.json:
        _write_json(args.json, {k: dataclasses.asdict(v) for k, v in results.items()})
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; an error prints one line (``error: ...``) and returns 2, or
    raises with its traceback under ``--debug``."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    parser = _parser()
    try:
        return _main(argv, parser)
    except Exception as e:  # noqa: BLE001 -- every failure becomes one line unless --debug
        if "--debug" in argv:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, (ValueError, OSError, KeyError)):
            message = f"{type(e).__name__}: {message}"
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
