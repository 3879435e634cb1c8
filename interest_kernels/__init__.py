"""interest_kernels: fused kernels for the user-interest layers of CTR models.

Functional ops dispatch to the best available backend for the tensors' device
("triton" on CUDA, "cpu"/"cuda" compiled or optimised paths, "reference" eager
PyTorch everywhere); ``use_backend(name)`` forces one. Modules live in
``interest_kernels.nn``, optimizers in ``interest_kernels.optim``, the CTR models in
``interest_kernels.models``, data loaders in ``interest_kernels.data``, AUC / GAUC /
logloss in ``interest_kernels.metrics`` and the training job in ``interest_kernels.train``.
Importing the package imports neither triton nor torch._dynamo (each Triton backend
imports triton when it first runs).
"""
from . import data, metrics, models, nn, optim
from ._backend import BackendFallbackWarning, BackendUnavailableError, use_backend
from ._validation import value_checks
from .ops.aux_loss.op import dien_aux_loss
from .ops.dice.op import dice
from .ops.dice.reference import DiceParams, dice_reference
from .ops.gru_scan.op import gru_scan
from .ops.gru_scan.reference import gru_scan_reference
from .ops.mba.op import count_ids, dedup_rows, mba_adagrad_update, mba_adam_update, mba_sgd_update
from .ops.target_attention.op import target_attention
from .ops.target_attention.reference import target_attention_reference

__version__ = "0.1.0"

__all__ = [
    "BackendFallbackWarning",
    "BackendUnavailableError",
    "DiceParams",
    "count_ids",
    "data",
    "dedup_rows",
    "dice",
    "dice_reference",
    "dien_aux_loss",
    "gru_scan",
    "gru_scan_reference",
    "mba_adagrad_update",
    "mba_adam_update",
    "mba_sgd_update",
    "metrics",
    "models",
    "nn",
    "optim",
    "target_attention",
    "target_attention_reference",
    "use_backend",
    "value_checks",
    "__version__",
]
