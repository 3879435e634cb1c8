"""Launch configuration of the target-attention kernels: one choice for the GPU and CI.

The kernels launch with the same tiles, warps and grid under the Triton interpreter as
on an H200, so what CI checks is what the GPU runs (only the dot precision differs: the
interpreter computes every dot exactly).

* Grid: persistent, about one program per SM. ``NUM_SMS`` is the H200's 132 under the
  interpreter and the device's SM count on a GPU; a head's rows are walked (strided) by
  at most ``min(B, max(1, NUM_SMS // E))`` programs (the weight-gradient kernel gives
  half of them to its first unit chunk and to its narrower second one only as many as
  keep it as fast, ``ops._chunk_programs``), and by no more than keep the busiest
  program's row count: 150 rows take 75 programs of 2, not 132 of which 18 walk 2.
* Tiles: ``BLOCK_T`` = 64 key positions, so every ``tl.dot`` whose rows are positions has
  M = 64 (Hopper's warpgroup MMA size); every width (D, each layer) is padded to a power
  of two, at least 16. A row shorter than 64 positions leaves lanes of its tile masked.
* The matrices a program needs stay on chip: the MLP's weight matrices (loaded once per
  program), the per-row first-layer matrix, and in the backward W_3's gradient
  accumulator; the gradients of W_kd, W_p and W_2 are accumulated by a second kernel
  over chunks of ``UNIT_CHUNK`` first-layer units (``weight_grads.py``). Per-unit
  vectors (q-term, biases, score weights, activation parameters) are loaded per tile
  and per-unit gradients summed in place in the program's partial row (L1/L2 traffic
  instead of registers: ``layers.tile_vec``).
  That bounds the widths; :func:`unsupported_reason` declines the rest, which then
  run on the next backend.
* Dot precision: float16/bfloat16 inputs multiply in their dtype with float32
  accumulation (the backward's gradient dots in bfloat16 for bfloat16 only: float16
  would flush small gradients); float32 inputs use TF32 by default, or IEEE float32
  with ``INTEREST_KERNELS_FP32_DOTS=ieee`` (see :func:`fp32_dot_precision`). The
  interpreter computes every dot exactly, and runs bfloat16 dots on float32 operands
  (numpy has no bfloat16 arithmetic).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton

ACTIVATIONS = {"identity": 0, "sigmoid": 1, "relu": 2, "prelu": 3, "dice": 4}
MAX_LAYERS = 3
NUM_SMS = 132  # an H200; the persistent grid's size under the interpreter
BLOCK_T = 64
NUM_WARPS = 8
# The data-gradient kernel (backward.py) runs with 4 warps: its dots chain (each result
# feeds the next), for which Triton lays a 64-row tile over all warps along M, so with
# 8 warps both warpgroups hold (and compute) the same rows and save no registers
# (sm90_target_attention_spills.md). Two such programs per SM would keep 8 warps per SM
# but double the per-program weight reads (+2.5 MB at the fp16 benchmark).
DATA_GRAD_WARPS = 4
# First-layer units per chunk: per program of the weight-gradient kernel (weight_grads.py)
# and per step of the data-gradient kernel's layer-1 chain (backward.py).
UNIT_CHUNK = 64
# H200 dense tensor-core FLOPs per byte of L2 traffic (989 TFLOP/s 16-bit, 494 TF32, 67
# IEEE float32, over the ~10 TB/s L2 that bench/traffic.py assumes), by dot precision:
# the weight-gradient kernel's cost model for sizing its unit chunks' grids (ops.py).
DOT_FLOPS_PER_L2_BYTE = {"16-bit": 99, "tf32": 49, "ieee": 7}
# On-chip limits (padded sizes). The backward holds the most (the first layer's per-row
# matrix, the deeper layers' weights and W_3's gradient accumulator) and its shared
# memory grows with the padded weight-matrix elements H_1 x D + H_2 x H_1 + H_3 x H_2.
# Measured for sm_90 (limit 227 KB) before the weight-gradient kernel was split off:
# 16384 elements (units (80, 40), D = 64) took 224 KB in float32 and 192 KB in float16,
# 24576 took 352 KB in float32, 288 KB in float16 and 120 KB in bfloat16
# (bench/results/target_attention_triton.md); the split backward takes 128 / 112 KB at
# 16384 (sm90_target_attention.md). Rule for widening: admit a configuration at a dtype
# when every kernel fits 227 KB of shared memory and spills (stores and loads, per kernel
# and activation form) no more than the worst admitted configuration at that dtype.
# Re-measured after the data-gradient kernel took layer 1 in UNIT_CHUNK chunks
# (sm90_target_attention_spills.md, "Round 5c"): D 128 with units (80, 40) fits shared
# memory (at most 176 KB float32) and its weight-gradient kernel is within the admitted
# worst, but in float32 and float16 its forward (which still holds layer 1 padded to 128
# units: sigmoid 372 B float32, 104 B float16, against 180 B and 0 B admitted), its Dice
# statistics kernel and its data-gradient kernel (float32 sigmoid 680/740 B against
# 532/584 B; H_2 = 40 is not a multiple of 16: 444 B with H_2 = 48) spill more, and
# units (200, 80) need 512 / 416 KB (float32 / float16), so the limits stand.
MAX_DIM = 128
MAX_UNITS = 128
MAX_WEIGHT_ELEMENTS = {torch.float32: 16384, torch.float16: 16384, torch.bfloat16: 32768}
FP32_DOTS_ENV = "INTEREST_KERNELS_FP32_DOTS"


def pad(n: int) -> int:
    """The padded tile width of a dimension of size n: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(int(n)))


def unsupported_reason(
    dtype: Optional[torch.dtype] = None,
    num_layers: Optional[int] = None,
    hidden_units: Optional[Sequence[int]] = None,
    dim: Optional[int] = None,
    **_: object,
) -> Optional[str]:
    """Why the Triton kernels cannot take a call with these facts (None when they can).

    The same limits hold on the GPU and under the interpreter."""
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the Triton kernels take float32/float16/bfloat16 inputs, not {dtype}"
    if num_layers is not None and not 1 <= num_layers <= MAX_LAYERS:
        return f"the Triton kernels take 1 to {MAX_LAYERS} hidden layers, not {num_layers}"
    if dim and pad(dim) > MAX_DIM:
        return (f"the Triton kernels take D up to {MAX_DIM} (the first layer's weights stay "
                f"on chip), got D = {dim}")
    if hidden_units:
        if any(pad(h) > MAX_UNITS for h in hidden_units):
            return (f"the Triton kernels take layers of up to {MAX_UNITS} units (every weight "
                    f"stays on chip), got units {tuple(hidden_units)}")
        if dim and dtype is not None:
            widths = [pad(dim)] + [pad(h) for h in hidden_units]
            total = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
            if total > MAX_WEIGHT_ELEMENTS[dtype]:
                return (f"the Triton kernels keep the weights on chip, at most "
                        f"{MAX_WEIGHT_ELEMENTS[dtype]} padded weight-matrix elements in "
                        f"{dtype}; units {tuple(hidden_units)} with D = {dim} need {total}")
    return None


def fp32_dot_precision() -> str:
    """``tl.dot`` input precision for float32 inputs: "tf32" (default) or "ieee".

    Set ``INTEREST_KERNELS_FP32_DOTS=ieee`` for IEEE float32 products (slower, about
    1e-6 relative error instead of TF32's ~1e-3 per product)."""
    value = os.environ.get(FP32_DOTS_ENV, "tf32").lower()
    if value not in ("tf32", "ieee"):
        raise ValueError(f"{FP32_DOTS_ENV} must be 'tf32' or 'ieee', got {value!r}")
    return value


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NUM_SMS


def launch_config(keys: torch.Tensor, hidden: Sequence[int], dim: int) -> dict:
    """Tile sizes (constexprs) and dot precisions for the kernels, fixed by the shapes."""
    blocks = [pad(h) for h in hidden] + [16] * (MAX_LAYERS - len(hidden))
    # The interpreter multiplies bfloat16 operands wrongly (numpy has no bfloat16), so
    # there, and only there, bfloat16 dots take float32 operands.
    bf16 = keys.dtype == torch.bfloat16 and not _interpreting()
    return dict(
        BLOCK_T=BLOCK_T, BD=pad(dim), BH1=blocks[0], BH2=blocks[1], BH3=blocks[2],
        LOWP=keys.dtype == torch.float16 or bf16, LOWP_BWD=bf16, PREC=fp32_dot_precision(),
        num_warps=NUM_WARPS, num_stages=1,
    )
