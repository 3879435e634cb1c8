"""interest_kernels: fused kernels for the user-interest layers of CTR models.

Functional ops dispatch to the best available backend for the tensors' device
("triton" on CUDA, "cpu"/"cuda" compiled or optimised paths, "reference" eager
PyTorch everywhere); ``use_backend(name)`` forces one.
"""
from ._backend import BackendUnavailableError, use_backend
from ._validation import value_checks

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "use_backend", "value_checks", "__version__"]
