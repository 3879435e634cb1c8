"""Target attention (SPEC section 1): DIN activation unit + attention pooling."""
from .op import target_attention
from .reference import target_attention_reference

__all__ = ["target_attention", "target_attention_reference"]
