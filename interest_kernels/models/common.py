"""What DIN, DIEN and DMIN share: feature embeddings, the final MLP, the backend switch,
negative sampling, and the split into sparse (MBA) and dense (Adam) parameters.

Feature groups (see :class:`interest_kernels.data.Batch`): the user profile (user id),
the target item (item id + category id, concatenated: width ``item_dim + cat_dim``),
the behaviour sequence (the same two tables, so a behaviour and a target live in one
space) with its lengths, and K categorical context fields. Index 0 of every table is
padding / unknown (``padding_idx=0``: never trained).
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Any, ContextManager, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._backend import use_backend
from .._validation import INDEX_DTYPES, check_choice, check_in_range, check_shape, check_tensor
from ..data.common import Batch, FeatureSpec
from ..nn.dice import Dice
from ..nn.mba_embedding import MBAEmbedding
from ..nn.sparse_embedding import SparseGradEmbedding
from ..optim import MBAAdagrad, MBAAdam, MBASGD

__all__ = [
    "BACKENDS",
    "EMBEDDINGS",
    "ModelOutput",
    "CTRModel",
    "MLP",
    "NegativeSampler",
    "make_optimizers",
]

BACKENDS = ("fused", "reference")
EMBEDDINGS = ("mba", "torch")
MLP_ACTIVATIONS = ("dice", "prelu", "relu", "sigmoid")
SPARSE_OPTIMIZERS = {"sgd": MBASGD, "adagrad": MBAAdagrad, "adam": MBAAdam}


class ModelOutput(NamedTuple):
    """logits (B,) float32 and the auxiliary loss (0-d) of models that have one, else None."""

    logits: torch.Tensor
    aux_loss: Optional[torch.Tensor]


def _table(num: int, dim: int, kind: str) -> nn.Module:
    # Both start N(0, 1) with a zero padding row.
    if kind == "mba":
        return MBAEmbedding(num, dim, padding_idx=0)
    return SparseGradEmbedding(num, dim, padding_idx=0, sparse=True)  # compiles for training


class MLP(nn.Module):
    """Fully connected tower ending in one logit: Linear -> activation (-> dropout) per
    hidden width, then Linear(hidden[-1], 1). ``forward(x (B, in)) -> (B,)``."""

    def __init__(self, in_features: int, hidden_units: Sequence[int], activation: str, dropout: float = 0.0) -> None:
        super().__init__()
        check_choice("activation", activation, MLP_ACTIVATIONS)
        layers: list[nn.Module] = []
        width = in_features
        for units in hidden_units:
            layers.append(nn.Linear(width, units))
            if activation == "dice":
                layers.append(Dice(units))
            elif activation == "prelu":
                layers.append(nn.PReLU(units))
            elif activation == "relu":
                layers.append(nn.ReLU())
            else:
                layers.append(nn.Sigmoid())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = units
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


# Samplers by key, so that the registered op below finds a sampler's generator from an int.
_SAMPLERS: "weakref.WeakValueDictionary[int, NegativeSampler]" = weakref.WeakValueDictionary()
_sampler_keys = itertools.count()


@torch.library.custom_op(
    "interest_kernels::sample_negative_items", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def _sample_negative_items(sampler: int, num_items: int, shape: list[int], device: torch.device) -> torch.Tensor:
    """Item indices uniform in [1, num_items), drawn from the generator of sampler ``sampler``."""
    items = torch.randint(1, num_items, tuple(shape), generator=_SAMPLERS[sampler].generator)
    return items.to(device)


@_sample_negative_items.register_fake
def _sample_negative_items_fake(sampler: int, num_items: int, shape: list[int], device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.int64, device=device)


# Each call advances the generator: compiled graphs must neither drop, merge nor repeat it.
torch.fx.node.has_side_effect(torch.ops.interest_kernels.sample_negative_items.default)


class NegativeSampler(nn.Module):
    """Negative behaviours for the auxiliary loss: item indices drawn uniformly from
    [1, num_items) with this module's own seeded generator (on the CPU, so CPU and GPU
    runs draw the same ids), each with its category from ``item_category``.

    The generator state is part of ``state_dict()`` (extra state), so a restored
    checkpoint draws the same next negatives.
    """

    def __init__(self, item_category: torch.Tensor, seed: int) -> None:
        super().__init__()
        if item_category.dim() != 1 or item_category.shape[0] < 2:
            raise ValueError(
                f"item_category must be (num_items,) with num_items >= 2, got {tuple(item_category.shape)}"
            )
        self.register_buffer("item_category", item_category.clone())
        self.generator = torch.Generator().manual_seed(seed)
        # An op of the graph (torch.compile cannot trace a Generator argument).
        self.key = next(_sampler_keys)
        _SAMPLERS[self.key] = self

    def forward(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(items, categories), both int64 of ``shape`` on the buffer's device."""
        num_items = self.item_category.shape[0]
        items = torch.ops.interest_kernels.sample_negative_items(
            self.key, num_items, list(shape), self.item_category.device
        )
        return items, self.item_category[items]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.key = next(_sampler_keys)  # a copy draws from its own generator
        _SAMPLERS[self.key] = self

    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


class CTRModel(nn.Module):
    """Base of the interest models: embeddings, backend switch, loss, parameter groups.

    Args:
        spec: vocabulary sizes (:class:`interest_kernels.data.FeatureSpec`).
        item_dim, cat_dim, user_dim, context_dim: embedding widths per field.
        backend: ``"fused"`` (dispatch chooses: Triton on CUDA, the optimised CPU paths
            on CPU; ``INTEREST_KERNELS_BACKEND`` still applies) or ``"reference"``
            (every op of the forward, and of the MBA updates in :func:`train_step`-style
            loops that use :meth:`backend_context`, runs the eager reference).
        embedding: ``"mba"`` (:class:`MBAEmbedding`) or ``"torch"``
            (``nn.Embedding(sparse=True)``); both are trained by the MBA optimisers.
        aux_weight: alpha in ``L = L_target + alpha * L_aux`` (models with an auxiliary loss).

    Subclasses implement ``forward(batch) -> ModelOutput(logits (B,), aux_loss)`` on a
    :class:`interest_kernels.data.Batch` of B samples with histories (B, T).
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        item_dim: int,
        cat_dim: int,
        user_dim: int,
        context_dim: int,
        backend: str = "fused",
        embedding: str = "mba",
        aux_weight: float = 1.0,
    ) -> None:
        super().__init__()
        check_choice("backend", backend, BACKENDS)
        check_choice("embedding", embedding, EMBEDDINGS)
        self.backend = backend
        self.aux_weight = float(aux_weight)
        self.user_embedding = _table(spec.num_users, user_dim, embedding)
        self.item_embedding = _table(spec.num_items, item_dim, embedding)
        self.cat_embedding = _table(spec.num_cats, cat_dim, embedding)
        self.context_embeddings = nn.ModuleList(_table(n, context_dim, embedding) for n in spec.context_sizes)
        self.behaviour_dim = item_dim + cat_dim
        self.profile_dim = user_dim + context_dim * len(spec.context_sizes)

    # --- features -------------------------------------------------------------------

    def behaviours(self, items: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        """[item embedding, category embedding]: ids of any shape S -> S + (behaviour_dim,)."""
        return torch.cat([self.item_embedding(items), self.cat_embedding(cats)], dim=-1)

    def profile(self, batch: Batch) -> torch.Tensor:
        """User embedding and context embeddings, concatenated: (B, profile_dim)."""
        parts = [self.user_embedding(batch.user)]
        parts += [table(batch.context[:, k]) for k, table in enumerate(self.context_embeddings)]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def valid_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
        """(B, T) bool, True at t < lengths[b]."""
        return torch.arange(steps, device=lengths.device) < lengths[:, None]

    # --- running ----------------------------------------------------------------------

    def backend_context(self) -> ContextManager[None]:
        """The op dispatch this model's ``backend`` asks for, as a context manager."""
        return use_backend("reference") if self.backend == "reference" else contextlib.nullcontext()

    def forward(self, batch: Batch) -> ModelOutput:
        with self.backend_context():
            return self.compute(batch)

    def compute(self, batch: Batch) -> ModelOutput:
        """The model proper (under the backend chosen by :meth:`forward`)."""
        raise NotImplementedError

    def score_candidates(
        self, users: Batch, item: torch.Tensor, cat: torch.Tensor, user_index: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Logits (N,) of N candidates (``item``, ``cat`` (N,)) for U users, each user's
        history read once (the shared-history attention, ``key_index = user_index``).

        ``users``: a :class:`Batch` whose ``user``, ``hist_items``, ``hist_cats``,
        ``lengths`` and ``context`` hold U rows (its ``item``, ``cat`` and ``label`` are
        not read); ``user_index`` (N,) in [0, U): the user of each candidate, None when
        U = 1. Equals ``forward`` of the batch that repeats user ``user_index[n]``'s row
        for candidate n, without building it. Inference only: no auxiliary loss.
        """
        if user_index is None:
            if users.user.shape[0] != 1:
                raise ValueError(f"user_index is required for {users.user.shape[0]} users (it may be None for one)")
            user_index = torch.zeros_like(item)
        for name, t in (("item", item), ("cat", cat), ("user_index", user_index)):
            check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES, device=users.user.device)
            check_shape(name, t, item.shape, "one entry per candidate")
        check_in_range("user_index", user_index, 0, users.user.shape[0], "the users' rows", high_inclusive=False)
        with self.backend_context():
            return self.compute_candidates(users, item, cat, user_index.long())

    def compute_candidates(
        self, users: Batch, item: torch.Tensor, cat: torch.Tensor, user_index: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`score_candidates` proper, arguments checked."""
        raise NotImplementedError

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total training loss (0-d) and its parts (``target``, ``aux``) as detached 0-d
        tensors, left on the device so a step never waits for it."""
        out = self(batch)
        target = F.binary_cross_entropy_with_logits(out.logits.float(), batch.label)
        parts = {"target": target.detach()}
        if out.aux_loss is None:
            return target, parts
        parts["aux"] = out.aux_loss.detach()
        return target + self.aux_weight * out.aux_loss, parts

    # --- parameter groups ---------------------------------------------------------------

    def sparse_parameters(self) -> Iterator[nn.Parameter]:
        """The embedding tables (trained by an MBA optimiser)."""
        yield self.user_embedding.weight
        yield self.item_embedding.weight
        yield self.cat_embedding.weight
        for table in self.context_embeddings:
            yield table.weight

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return (p for p in self.parameters() if id(p) not in sparse)


def make_optimizers(
    model: CTRModel,
    *,
    sparse: str = "adam",
    sparse_lr: float = 3e-3,
    dense_lr: float = 1e-3,
    mba_lambda: float = 1e-4,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """(MBA optimiser over the embedding tables, Adam over everything else).

    ``mba_lambda`` is SPEC section 5's lambda, with frequencies counted online.
    """
    check_choice("sparse", sparse, tuple(SPARSE_OPTIMIZERS))
    kwargs: dict[str, Any] = {"lr": sparse_lr, "weight_decay": mba_lambda}
    sparse_opt = SPARSE_OPTIMIZERS[sparse](list(model.sparse_parameters()), **kwargs)
    dense_opt = torch.optim.Adam(list(model.dense_parameters()), lr=dense_lr)
    return sparse_opt, dense_opt


def train_step(
    model: CTRModel, sparse_opt: torch.optim.Optimizer, dense_opt: torch.optim.Optimizer, batch: Batch
) -> torch.Tensor:
    """One training step: loss, backward, the MBA step (under the model's backend) and
    the dense step. Returns the detached 0-d loss, still on the device."""
    sparse_opt.zero_grad()
    dense_opt.zero_grad()
    loss, _ = model.loss(batch)
    loss.backward()
    with model.backend_context():
        sparse_opt.step()
    dense_opt.step()
    return loss.detach()
