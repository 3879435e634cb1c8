"""DIEN (Zhou et al., AAAI 2019): GRU interest extractor with an auxiliary loss, and an
attention-driven GRU that follows the interest relevant to the target."""
from __future__ import annotations

from typing import Sequence

import torch

from ..data.common import Batch, FeatureSpec
from ..nn.gru import GRU, AuxiliaryLoss, InterestEvolving
from ..ops.gru_scan.op import gru_scan
from .common import MLP, CTRModel, ModelOutput, NegativeSampler

__all__ = ["DIEN"]


class DIEN(CTRModel):
    """Deep Interest Evolution Network.

    * Interest extractor: a GRU (hidden = behaviour width D) over the behaviours; its
      state ``h_t`` is trained by the auxiliary loss (SPEC section 3) to tell the next
      behaviour ``e_{t+1}`` from a negative item drawn uniformly from the item
      vocabulary (:class:`NegativeSampler`, seeded by ``seed``).
    * Interest evolving: target attention (units (80, 40), softmax over valid steps, as
      the DIEN code) scores the extractor states and drives an AUGRU (``gru_type``:
      ``"AUGRU"``, ``"AGRU"``, ``"AIGRU"`` or ``"GRU"``; ``gru_variant`` ``"paper"`` or
      ``"tensorflow"``); its last state is the evolved interest.
    * MLP (200, 80, PReLU as the DIEN code) on ``[profile, target, sum of behaviours,
      target * sum, evolved interest]``; loss ``L_target + aux_weight * L_aux``.

    Other keyword arguments go to :class:`CTRModel`.
    ``forward(batch) -> ModelOutput(logits (B,), aux_loss)``; ``aux_loss`` is None in eval.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        embedding_dim: int = 18,
        gru_type: str = "AUGRU",
        gru_variant: str = "paper",
        att_hidden_units: Sequence[int] = (80, 40),
        att_activation: str = "sigmoid",
        aux_hidden_units: Sequence[int] = (100, 50),
        mlp_hidden_units: Sequence[int] = (200, 80),
        mlp_activation: str = "prelu",
        dropout: float = 0.0,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(
            spec, item_dim=embedding_dim, cat_dim=embedding_dim, user_dim=embedding_dim,
            context_dim=embedding_dim, **kwargs,
        )
        d = self.behaviour_dim
        self.gru_type = gru_type
        self.extractor = GRU(d, d)
        self.aux = AuxiliaryLoss(d, d, aux_hidden_units)
        self.sampler = NegativeSampler(spec.item_category, seed)
        self.evolving = InterestEvolving(
            d, gru_type, att_hidden_units, att_activation=att_activation,
            att_weight_normalization=True, variant=gru_variant,
        )
        self.mlp = MLP(self.profile_dim + 4 * d, mlp_hidden_units, mlp_activation, dropout)

    def compute(self, batch: Batch) -> ModelOutput:
        target = self.behaviours(batch.item, batch.cat)
        hist = self.behaviours(batch.hist_items, batch.hist_cats)
        states, _ = self.extractor(hist, batch.lengths)
        aux = None
        if self.training:
            neg_items, neg_cats = self.sampler(batch.hist_items.shape)
            neg = self.behaviours(neg_items, neg_cats)
            aux = self.aux(states, hist, neg, lengths=batch.lengths)
        interest = self.evolving(target, states, batch.lengths)
        return ModelOutput(self._head(self.profile(batch), target, hist.sum(dim=1), interest), aux)

    def compute_candidates(
        self, users: Batch, item: torch.Tensor, cat: torch.Tensor, user_index: torch.Tensor
    ) -> torch.Tensor:
        # The extractor runs once per user; the evolving layer once per candidate.
        target = self.behaviours(item, cat)
        hist = self.behaviours(users.hist_items, users.hist_cats)
        states, _ = self.extractor(hist, users.lengths)
        interest = self._evolve_candidates(target, states, users.lengths, user_index)
        return self._head(self.profile(users)[user_index], target, hist.sum(dim=1)[user_index], interest)

    def _evolve_candidates(
        self, target: torch.Tensor, states: torch.Tensor, lengths: torch.Tensor, user_index: torch.Tensor
    ) -> torch.Tensor:
        """``self.evolving`` for candidates (N, D) over the states (U, T, D) of their users:
        the attention reads each user's states once; the GRU runs per candidate."""
        evolving = self.evolving
        if evolving.gru_type == "GRU":  # the GRU does not depend on the candidate
            interests, _ = evolving.interest_evolution(states, lengths)
            return evolving.attention(target, interests, lengths=lengths, key_index=user_index)
        _, scores = evolving.attention(target, states, lengths=lengths, key_index=user_index)
        gru = evolving.interest_evolution
        if evolving.gru_type == "AIGRU":
            weights = (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
            mode, variant = "aigru", "paper"
        else:
            weights = (gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh)
            mode, variant = gru.mode, gru.variant
        _, h_last = gru_scan(
            states[user_index], *weights, scores, mode=mode, variant=variant, lengths=lengths[user_index],
            return_states=False,
        )
        return h_last

    def _head(self, profile: torch.Tensor, target: torch.Tensor, hist_sum: torch.Tensor,
              interest: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([profile, target, hist_sum, target * hist_sum, interest], dim=-1))
