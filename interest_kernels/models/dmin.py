"""DMIN (Xiao et al., CIKM 2020): self-attentive behaviour refiner with an auxiliary loss,
and a multi-interest extractor whose heads are each pooled by target attention."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..data.common import Batch, FeatureSpec
from ..nn.gru import AuxiliaryLoss
from ..nn.target_attention import TargetAttention
from .common import MLP, CTRModel, ModelOutput, NegativeSampler

__all__ = ["DMIN"]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of q, k, v (B, H, T, d); ``allowed`` (B, 1, T or 1, T)
    bool says which keys each query sees (every query must see at least one)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _attendable(valid: torch.Tensor) -> torch.Tensor:
    # A row with no valid behaviour would make every softmax 0/0; let it attend to its
    # (padding) first step instead. Its outputs are masked out downstream.
    empty = ~valid.any(dim=1)
    return valid | (empty[:, None] & (torch.arange(valid.shape[1], device=valid.device) == 0))


class DMIN(CTRModel):
    """Deep Multi-Interest Network.

    * Behaviour refiner: behaviours (width D) plus learned position embeddings go
      through multi-head self-attention (``refiner_heads`` = H_R, query/key/value and
      output projections as ``nn.MultiheadAttention``), dropout, a residual connection
      and LayerNorm; the refined sequence is trained by the auxiliary next-behaviour
      loss (SPEC section 3, negatives from :class:`NegativeSampler`). The refiner is
      causal (step t sees steps <= t): otherwise state t would already contain
      behaviour t+1, which the auxiliary loss asks it to predict.
    * Multi-interest extractor: a second self-attention with ``interest_heads`` = H_E
      heads, each of width D, kept apart: head e gives a sequence (B, T, D) (dropout).
      Each step is joined with the embedding (width ``position_dim``) of its reversed
      position (1 = most recent behaviour); the target, padded with zeros to the same
      width, pools each head's sequence with its own target-attention MLP (the
      multi-head form of SPEC section 1: keys (B, E, T, D + P)), giving E interest
      vectors.
    * MLP on ``[profile, target, the E interests]``, with dropout.

    Paper settings as defaults: item embedding 36 (item 18 + category 18), position
    encoding 2, H_R 4, H_E 4, dropout 0.2, attention units (80, 40), MLP (200, 80) PReLU.
    Other keyword arguments go to :class:`CTRModel`.
    ``forward(batch) -> ModelOutput(logits (B,), aux_loss)``; ``aux_loss`` is None in eval.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        embedding_dim: int = 18,
        position_dim: int = 2,
        refiner_heads: int = 4,
        interest_heads: int = 4,
        dropout: float = 0.2,
        att_hidden_units: Sequence[int] = (80, 40),
        att_activation: str = "sigmoid",
        aux_hidden_units: Sequence[int] = (100, 50),
        mlp_hidden_units: Sequence[int] = (200, 80),
        mlp_activation: str = "prelu",
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(
            spec, item_dim=embedding_dim, cat_dim=embedding_dim, user_dim=embedding_dim,
            context_dim=embedding_dim, **kwargs,
        )
        d = self.behaviour_dim
        if d % refiner_heads:
            raise ValueError(f"refiner_heads ({refiner_heads}) must divide the behaviour width {d}")
        self.interest_heads = interest_heads
        self.dropout = dropout
        self.positions = nn.Embedding(spec.max_len, d)
        self.refiner_heads = refiner_heads
        self.refiner_qkv = nn.Linear(d, 3 * d)
        self.refiner_out = nn.Linear(d, d)
        self.refiner_norm = nn.LayerNorm(d)
        self.aux = AuxiliaryLoss(d, d, aux_hidden_units)
        self.sampler = NegativeSampler(spec.item_category, seed)
        self.extract_qkv = nn.Linear(d, 3 * interest_heads * d)
        self.reversed_positions = nn.Embedding(spec.max_len + 1, position_dim, padding_idx=0)
        self.attention = TargetAttention(
            d + position_dim, att_hidden_units, activation=att_activation, normalization="softmax",
            num_heads=interest_heads, per_head_mlp=True,
        )
        self.mlp = MLP(self.profile_dim + d + interest_heads * (d + position_dim), mlp_hidden_units,
                       mlp_activation, dropout)

    def compute(self, batch: Batch) -> ModelOutput:
        target = self.behaviours(batch.item, batch.cat)
        hist, keys, refined = self._interest_keys(batch)
        aux = None
        if self.training:
            neg_items, neg_cats = self.sampler(batch.hist_items.shape)
            aux = self.aux(refined, hist, self.behaviours(neg_items, neg_cats), lengths=batch.lengths)
        interests = self.attention(self._query(target, keys), keys, lengths=batch.lengths)  # (B, E, D + P)
        return ModelOutput(self._head(self.profile(batch), target, interests), aux)

    def compute_candidates(
        self, users: Batch, item: torch.Tensor, cat: torch.Tensor, user_index: torch.Tensor
    ) -> torch.Tensor:
        # Refiner and extractor heads run once per user; each candidate pools its user's heads.
        target = self.behaviours(item, cat)
        _, keys, _ = self._interest_keys(users)
        interests = self.attention(self._query(target, keys), keys, lengths=users.lengths, key_index=user_index)
        return self._head(self.profile(users)[user_index], target, interests)

    def _interest_keys(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(behaviours (B, T, D), the heads joined with the reversed positions, keys
        (B, E, T, D + P), the refined sequence (B, T, D))."""
        hist = self.behaviours(batch.hist_items, batch.hist_cats)
        b, t, d = hist.shape
        if t > self.positions.num_embeddings:
            raise ValueError(
                f"hist_items has {t} steps but the model was built for max_len {self.positions.num_embeddings}"
            )
        e = self.interest_heads
        valid = self.valid_mask(batch.lengths, t)
        attendable = _attendable(valid)
        keep = valid[..., None].to(hist.dtype)

        # Dropout acts on the sublayer outputs and in the MLP, not on the (B, H, T, T)
        # attention weights: drawing those masks costs a CPU more than the attention.
        h = self.refiner_heads
        x = hist + self.positions.weight[:t]
        q, k, v = self.refiner_qkv(x).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        causal = torch.ones(t, t, dtype=torch.bool, device=hist.device).tril()
        allowed = attendable[:, None, None, :] & causal
        refined = self.refiner_out(_attend(q, k, v, allowed).transpose(1, 2).reshape(b, t, d))
        refined = self.refiner_norm(x + F.dropout(refined, self.dropout, self.training)) * keep

        q, k, v = self.extract_qkv(refined).reshape(b, t, 3, e, d).permute(2, 0, 3, 1, 4)
        heads = F.dropout(_attend(q, k, v, attendable[:, None, None, :]), self.dropout, self.training)

        reversed_pos = (batch.lengths[:, None] - torch.arange(t, device=hist.device)).clamp(min=0)
        pos = self.reversed_positions(reversed_pos)  # (B, T, P), zero past the length
        keys = torch.cat([heads, pos[:, None].expand(b, e, t, pos.shape[-1])], dim=-1)
        return hist, keys, refined

    def _query(self, target: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The target (N, D) padded with zeros to the key width, one copy per head: (N, E, D + P)."""
        e, width = keys.shape[1], keys.shape[-1]
        return F.pad(target, (0, width - target.shape[-1]))[:, None].expand(target.shape[0], e, width)

    def _head(self, profile: torch.Tensor, target: torch.Tensor, interests: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([profile, target, interests.flatten(1)], dim=-1))
