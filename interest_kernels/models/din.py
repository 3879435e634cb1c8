"""DIN (Zhou et al., KDD 2018): target attention over the behaviour sequence."""
from __future__ import annotations

from typing import Sequence

import torch

from ..data.common import Batch, FeatureSpec
from ..nn.target_attention import TargetAttention
from .common import MLP, CTRModel, ModelOutput

__all__ = ["DIN"]


class DIN(CTRModel):
    """Deep Interest Network.

    The target (item + category embedding, width D) scores every behaviour with the
    activation unit (SPEC section 1); the weighted sum of the behaviours is the user's
    interest in that target. The MLP input is ``[profile, target, sum of behaviours,
    attention output]``.

    Defaults follow the DIEN authors' DIN baseline and the DIN paper: 18 per embedding
    field (D = 36), attention units (80, 40) with sigmoid, unnormalised weights (paper;
    ``att_normalization="softmax"`` for the authors' code), MLP (200, 80) with Dice.
    Other keyword arguments go to :class:`CTRModel`.

    ``forward(batch) -> ModelOutput(logits (B,), None)``.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        embedding_dim: int = 18,
        att_hidden_units: Sequence[int] = (80, 40),
        att_activation: str = "sigmoid",
        att_normalization: str = "none",
        mlp_hidden_units: Sequence[int] = (200, 80),
        mlp_activation: str = "dice",
        dropout: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(
            spec, item_dim=embedding_dim, cat_dim=embedding_dim, user_dim=embedding_dim,
            context_dim=embedding_dim, **kwargs,
        )
        d = self.behaviour_dim
        self.attention = TargetAttention(
            d, att_hidden_units, activation=att_activation, normalization=att_normalization
        )
        self.mlp = MLP(self.profile_dim + 3 * d, mlp_hidden_units, mlp_activation, dropout)

    def compute(self, batch: Batch) -> ModelOutput:
        target = self.behaviours(batch.item, batch.cat)
        hist = self.behaviours(batch.hist_items, batch.hist_cats)
        interest = self.attention(target, hist, lengths=batch.lengths)
        return ModelOutput(self._head(self.profile(batch), target, hist.sum(dim=1), interest), None)

    def compute_candidates(
        self, users: Batch, item: torch.Tensor, cat: torch.Tensor, user_index: torch.Tensor
    ) -> torch.Tensor:
        target = self.behaviours(item, cat)
        hist = self.behaviours(users.hist_items, users.hist_cats)
        interest = self.attention(target, hist, lengths=users.lengths, key_index=user_index)
        return self._head(self.profile(users)[user_index], target, hist.sum(dim=1)[user_index], interest)

    def _head(self, profile: torch.Tensor, target: torch.Tensor, hist_sum: torch.Tensor,
              interest: torch.Tensor) -> torch.Tensor:
        # hist_sum: padding rows are zero (padding_idx 0).
        return self.mlp(torch.cat([profile, target, hist_sum, interest], dim=-1))
