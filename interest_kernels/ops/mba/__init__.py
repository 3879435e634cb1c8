"""Mini-batch-aware (MBA) sparse optimiser updates (SPEC section 5)."""
from .op import count_ids, dedup_rows, mba_adagrad_update, mba_adam_update, mba_sgd_update

__all__ = ["count_ids", "dedup_rows", "mba_adagrad_update", "mba_adam_update", "mba_sgd_update"]
