"""Fused Triton kernels for target attention (SPEC section 1), forward and backward.

Modules, one role each:

* ``config``: tiles, grid and dot precision (the same under the interpreter as on an
  H200), and the limits the kernels decline beyond (``unsupported_reason``);
* ``layers``: Triton building blocks (packed-parameter loads, dots, activations);
* ``forward``, ``backward``, ``statistics``: the attention forward and backward kernels
  and the Dice batch-statistics kernel; ``weight_grads``: the backward's second kernel
  (the gradients of the first layer's matrices, W_2, the query and the q-term);
  ``segment``: the shared-history key gradients;
* ``pack``: the packed parameter layout; ``ops``: the ``torch.library`` custom ops and
  their autograd; ``attention``: the entry point from the public op.

Floor of one call (B rows, T keys, D, units H_1..H_L, element size s, parameters P
elements, 132 programs): the forward must read the keys (B T D s) and each program the
parameters once (132 P s), and runs ``2 B T (H_1 D + sum H_l H_{l+1} + H_L)`` MLP
FLOPs (the first layer's 4D inputs folded into D by ``M_r``); the backward reads the
keys again, writes dkeys, reads the parameters and writes one gradient partial per
program (2 x 132 P s), and runs about twice the forward's FLOPs on top of recomputing
it. At B 256, T 64, D 64, units (80, 40) fp32 that is 16.8 MB forward and 37.8 MB
backward; the kernels move 11.6 MB and 45.2 MB (fp16: 5.9 and 28.7 MB against floors of
8.4 and 18.9 MB; counted by
``python -m interest_kernels.bench.traffic``; ``bench/results/target_attention_triton.md``
has the figures and the sm_90 compile report).
"""
from .attention import target_attention_triton
from .config import unsupported_reason

__all__ = ["target_attention_triton", "unsupported_reason"]
