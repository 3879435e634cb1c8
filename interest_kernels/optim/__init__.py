"""Mini-batch-aware (MBA) optimisers for sparse embedding tables (SPEC section 5)."""
from .mba import MBAAdagrad, MBAAdam, MBASGD

__all__ = ["MBAAdagrad", "MBAAdam", "MBASGD"]
