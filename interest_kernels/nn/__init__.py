"""torch.nn modules over the fused ops, with converters from DeepCTR-Torch and FuxiCTR."""
from .dice import Dice
from .gru import GRU, AttentionalGRU, AuxiliaryLoss, InterestEvolving
from .mba_embedding import MBAEmbedding
from .target_attention import TargetAttention

__all__ = ["AttentionalGRU", "AuxiliaryLoss", "Dice", "GRU", "InterestEvolving", "MBAEmbedding",
           "TargetAttention"]
