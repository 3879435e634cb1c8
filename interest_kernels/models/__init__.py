"""CTR models built on the fused interest layers: DIN, DIEN, DMIN."""
from .common import BACKENDS, CTRModel, ModelOutput, make_optimizers, train_step
from .dien import DIEN
from .din import DIN
from .dmin import DMIN

MODELS = {"din": DIN, "dien": DIEN, "dmin": DMIN}

__all__ = ["BACKENDS", "CTRModel", "DIEN", "DIN", "DMIN", "MODELS", "ModelOutput", "make_optimizers",
           "train_step"]
