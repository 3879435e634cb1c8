"""Benchmark cases: each op at named shape sets, with its floor.

Shape sets:
  ``smoke``      tiny, for the pytest-benchmark smoke run and CI;
  ``cpu``        sizes a 2-core CPU runs in seconds;
  ``sweep``      target attention and the AUGRU scan over history lengths T and batch
                 sizes B, for the plots (``python -m interest_kernels.bench.plot``);
  ``realistic``  the issues' GPU shapes (B 1k-8k, T 50-1000, D 32-128; T=10,000).

Peers, timed on the same weights beside our backends: DeepCTR-Torch's
``AttentionSequencePoolingLayer`` and FuxiCTR's ``DIN_Attention`` (target attention),
DeepCTR-Torch's ``DynamicGRU`` with its AGRU/AUGRU cells and ``torch.nn.GRU`` (cuDNN on
CUDA) on packed sequences (GRU scan), ``torch.optim.SGD``/``SparseAdam`` on a sparse
gradient (the MBA step, without the regularisation they cannot express).

Floors (what no implementation can avoid):
  target attention, forward: read the keys once and the query, write the output;
    FLOPs of the MLP with the first layer split by SPEC's identity (the keys' part,
    2*H1*2D per position, the query's part once per row), the hidden layers, the score
    and the weighted sum. Forward+backward: keys read three times (forward, backward
    recompute, backward gradient) and their gradient written; FLOPs four times the
    forward MLP (forward, recompute, two gradient products).
  GRU scan, forward: read x, write the states; FLOPs 2*B*T*3H*(I+H) for the two
    projections. Forward+backward: x and the states read again, dx written; three times
    the FLOPs.
  Dice: read x once and write y once (forward); backward reads x and dy, writes dx.
  MBA SGD step: read and write each touched row, read every gradient row and id
    (bounded by the batch's ids, never by the table's rows).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from interest_kernels._backend import use_backend

from . import peers
from .harness import Case, Floor, Peer

SHAPE_SETS = ("smoke", "cpu", "sweep", "realistic")


def _on_reference(call: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """``call`` run on the eager reference backend: the baseline every case is timed against."""

    def reference(inp: dict[str, Any]) -> Any:
        with use_backend("reference"):
            return call(inp)

    return reference


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- target attention --------------------------------------------------------------


def _ta_make(B: int, T: int, D: int, units: tuple[int, ...]) -> Callable[[torch.device, torch.dtype], dict[str, Any]]:
    def make(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        dims = (4 * D,) + units
        weights = [torch.randn(o, i, generator=g) / i**0.5 for i, o in zip(dims[:-1], dims[1:])]
        biases = [torch.randn(o, generator=g) * 0.1 for o in units]
        return {
            "query": torch.randn(B, D, generator=g).to(device, dtype),
            "keys": torch.randn(B, T, D, generator=g).to(device, dtype),
            "weights": [w.to(device, dtype) for w in weights],
            "biases": [b.to(device, dtype) for b in biases],
            "out_weight": (torch.randn(1, units[-1], generator=g) / units[-1] ** 0.5).to(device, dtype),
            "out_bias": torch.zeros(1).to(device, dtype),
            "lengths": torch.randint(1, T + 1, (B,), generator=g).to(device),
        }

    return make


def _ta_call(inp: dict[str, Any]) -> Any:
    from interest_kernels.ops.target_attention.op import target_attention

    return target_attention(**inp, activation="sigmoid", normalization="softmax")


def _ta_peers(inp: dict[str, Any]) -> dict[str, Peer]:
    """DeepCTR-Torch and FuxiCTR target attention holding the case's weights."""
    weights = [inp["weights"], inp["biases"], inp["out_weight"], inp["out_bias"]]
    weights = [[w.detach() for w in ws] if isinstance(ws, list) else ws.detach() for ws in weights]
    deepctr = peers.deepctr_attention_like(*weights)
    fuxictr = peers.fuxictr_attention_like(*weights)
    T = inp["keys"].shape[1]

    def call_deepctr(i: dict[str, Any]) -> Any:
        return deepctr(i["query"].unsqueeze(1), i["keys"], i["lengths"].unsqueeze(1))

    def call_fuxictr(i: dict[str, Any]) -> Any:
        mask = torch.arange(T, device=i["keys"].device) < i["lengths"].unsqueeze(1)
        return fuxictr(i["query"], i["keys"], mask.to(i["keys"].dtype))

    return {"deepctr": Peer(call_deepctr, list(deepctr.parameters())),
            "fuxictr": Peer(call_fuxictr, list(fuxictr.parameters()))}


def _ta_floor(B: int, T: int, D: int, units: tuple[int, ...], dtype: torch.dtype) -> Callable[[str], Floor]:
    s = _size(dtype)
    per_pos = 2 * units[0] * 2 * D + sum(2 * a * b for a, b in zip(units[:-1], units[1:])) + 2 * units[-1] + 2 * D
    per_row = 2 * units[0] * D

    def floor(mode: str) -> Floor:
        flops = B * T * per_pos + B * per_row
        keys = B * T * D * s
        if mode == "fwd":
            return Floor(bytes=keys + 2 * B * D * s, flops=flops)
        return Floor(bytes=4 * keys + 4 * B * D * s, flops=4 * flops)

    return floor


def target_attention_cases(shape_set: str) -> Iterator[Case]:
    shapes = {
        "smoke": [(8, 5, 8, (8, 4))],
        "cpu": [(256, 50, 32, (80, 40)), (1024, 100, 36, (80, 40))],
        "sweep": [(256, T, 36, (80, 40)) for T in (25, 50, 100, 200)]
        + [(B, 100, 36, (80, 40)) for B in (64, 1024)],
        "realistic": [(4096, 200, 64, (80, 40)), (1024, 50, 32, (80, 40)), (8192, 100, 128, (80, 40)),
                      (256, 10_000, 64, (80, 40))],
    }[shape_set]
    dtypes = (torch.float32, torch.bfloat16) if shape_set == "realistic" else (torch.float32,)
    for B, T, D, units in shapes:
        for dtype in dtypes:
            yield Case(
                op="target_attention", label=f"B{B}_T{T}_D{D}", dtype=dtype,
                shape={"B": B, "T": T, "D": D, "units": "x".join(map(str, units))},
                make=_ta_make(B, T, D, units), call=_ta_call, reference=_on_reference(_ta_call),
                floor=_ta_floor(B, T, D, units, dtype),
                grad_inputs=("query", "keys", "weights", "biases", "out_weight", "out_bias"),
                peers=_ta_peers,
            )


# --- GRU scan ------------------------------------------------------------------------


def _gru_make(B: int, T: int, H: int, mode: str) -> Callable[[torch.device, torch.dtype], dict[str, Any]]:
    def make(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        k = H**-0.5
        inp: dict[str, Any] = {
            "x": torch.randn(B, T, H, generator=g).to(device, dtype),
            "weight_ih": ((torch.rand(3 * H, H, generator=g) * 2 - 1) * k).to(device, dtype),
            "weight_hh": ((torch.rand(3 * H, H, generator=g) * 2 - 1) * k).to(device, dtype),
            "bias_ih": ((torch.rand(3 * H, generator=g) * 2 - 1) * k).to(device, dtype),
            "bias_hh": ((torch.rand(3 * H, generator=g) * 2 - 1) * k).to(device, dtype),
            "lengths": torch.randint(1, T + 1, (B,), generator=g).to(device),
            "mode": mode,
        }
        if mode != "gru":
            inp["att"] = torch.rand(B, T, generator=g).to(device, dtype)
        return inp

    return make


def _gru_call(inp: dict[str, Any]) -> Any:
    from interest_kernels.ops.gru_scan.op import gru_scan

    return gru_scan(**inp)


def _gru_peers(inp: dict[str, Any]) -> dict[str, Peer]:
    """On packed sequences (the peers' way of skipping padded steps): DeepCTR-Torch's
    ``DynamicGRU`` for agru/augru, ``torch.nn.GRU`` for gru."""
    from torch.nn.utils.rnn import pack_padded_sequence

    weights = [inp[k].detach() for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    lengths = inp["lengths"].cpu()
    mode = inp["mode"]

    def pack(t: torch.Tensor) -> Any:
        return pack_padded_sequence(t, lengths, batch_first=True, enforce_sorted=False)

    if mode == "gru":
        gru = peers.torch_gru_like(*weights)
        return {"torch.nn.GRU": Peer(lambda i: gru(pack(i["x"]))[0].data, list(gru.parameters()))}
    if mode not in ("agru", "augru"):
        return {}
    dyn = peers.deepctr_attentional_gru_like(*weights, mode=mode)
    return {"deepctr": Peer(lambda i: dyn(pack(i["x"]), pack(i["att"].unsqueeze(-1))).data,
                            list(dyn.parameters()))}


def _gru_floor(B: int, T: int, H: int, dtype: torch.dtype) -> Callable[[str], Floor]:
    s = _size(dtype)

    def floor(mode: str) -> Floor:
        flops = 2 * B * T * 3 * H * (H + H)
        io = B * T * H * s
        if mode == "fwd":
            return Floor(bytes=2 * io + B * T * s, flops=flops)
        return Floor(bytes=5 * io + 2 * B * T * s, flops=3 * flops)

    return floor


def gru_scan_cases(shape_set: str) -> Iterator[Case]:
    shapes = {
        "smoke": [(4, 5, 8)],
        "cpu": [(512, 100, 36), (256, 100, 128)],
        "sweep": [(256, T, 36) for T in (25, 50, 100, 200)] + [(B, 50, 36) for B in (64, 1024)],
        "realistic": [(2048, 100, 36), (2048, 100, 128)],
    }[shape_set]
    dtypes = (torch.float32, torch.bfloat16) if shape_set == "realistic" else (torch.float32,)
    for B, T, H in shapes:
        for mode in ("augru",) if shape_set == "sweep" else ("augru", "gru"):
            for dtype in dtypes:
                yield Case(
                    op="gru_scan", label=f"{mode}_B{B}_T{T}_H{H}", dtype=dtype,
                    shape={"mode": mode, "B": B, "T": T, "H": H},
                    make=_gru_make(B, T, H, mode), call=_gru_call, reference=_on_reference(_gru_call),
                    floor=_gru_floor(B, T, H, dtype),
                    grad_inputs=("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "att"),
                    peers=_gru_peers,
                )


# --- Dice ----------------------------------------------------------------------------


def _dice_make(N: int, C: int) -> Callable[[torch.device, torch.dtype], dict[str, Any]]:
    def make(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        return {
            "x": torch.randn(N, C, generator=g).to(device, dtype),
            "alpha": (torch.rand(C, generator=g) * 0.5).to(device),
            "running_mean": torch.zeros(C, device=device),
            "running_var": torch.ones(C, device=device),
        }

    return make


def _dice_call(inp: dict[str, Any]) -> Any:
    from interest_kernels.ops.dice.op import dice

    return dice(**inp, training=True)


def dice_cases(shape_set: str) -> Iterator[Case]:
    shapes = {"smoke": [(64, 8)], "cpu": [(100_000, 80)], "sweep": [],
              "realistic": [(4096 * 200, 80), (4096 * 200, 40)]}[shape_set]
    dtypes = (torch.float32, torch.bfloat16) if shape_set == "realistic" else (torch.float32,)
    for N, C in shapes:
        for dtype in dtypes:
            yield Case(
                op="dice", label=f"N{N}_C{C}", dtype=dtype, shape={"N": N, "C": C},
                make=_dice_make(N, C), call=_dice_call, reference=_on_reference(_dice_call),
                floor=_dice_floor(N, C, dtype), grad_inputs=("x", "alpha"), stateful=True,
            )


def _dice_floor(N: int, C: int, dtype: torch.dtype) -> Callable[[str], Floor]:
    s = _size(dtype)

    def floor(mode: str) -> Floor:
        return Floor(bytes=(2 if mode == "fwd" else 5) * N * C * s, flops=0.0)

    return floor


# --- MBA sparse update ---------------------------------------------------------------


def _mba_make(N: int, D: int, n_ids: int) -> Callable[[torch.device, torch.dtype], dict[str, Any]]:
    def make(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, N, (n_ids,), generator=g)
        return {
            "weight": (torch.randn(N, D, generator=g) * 0.01).to(device, dtype),
            "ids": ids.to(device),
            "grad_rows": torch.randn(n_ids, D, generator=g).to(device, dtype),
            "counts": torch.randint(1, 100, (N,), generator=g).to(device),
        }

    return make


def _mba_call(inp: dict[str, Any]) -> Any:
    from interest_kernels.ops.mba.op import mba_sgd_update

    mba_sgd_update(inp["weight"], inp["ids"], inp["grad_rows"], inp["counts"], lr=0.01, weight_decay=1e-4)
    return inp["weight"]


def _mba_peers(inp: dict[str, Any]) -> dict[str, Peer]:
    """torch's own sparse steps on the same rows, without the MBA term: SGD on a sparse
    gradient (the sum of duplicates is its coalesce) and SparseAdam."""
    weight = inp["weight"]
    sgd = torch.optim.SGD([weight], lr=0.01)
    adam = torch.optim.SparseAdam([weight], lr=0.01)

    def step(opt: torch.optim.Optimizer) -> Any:
        def run(i: dict[str, Any]) -> Any:
            weight.grad = torch.sparse_coo_tensor(i["ids"].unsqueeze(0), i["grad_rows"], weight.shape)
            opt.step()
            return weight
        return run

    return {"torch.optim.SGD": Peer(step(sgd)), "torch.optim.SparseAdam": Peer(step(adam))}


def mba_cases(shape_set: str) -> Iterator[Case]:
    shapes = {"smoke": [(1000, 8, 64)], "cpu": [(1_000_000, 64, 4096), (1_000_000, 64, 65536)], "sweep": [],
              "realistic": [(10_000_000, 64, 65536), (10_000_000, 128, 262144)]}[shape_set]
    for N, D, n_ids in shapes:
        s = _size(torch.float32)

        def floor(mode: str, D: int = D, n_ids: int = n_ids, s: int = s) -> Floor:
            # at most n_ids distinct rows: read and write each, read every gradient row and id
            return Floor(bytes=2 * n_ids * D * s + n_ids * D * s + 2 * n_ids * 8, flops=0.0)

        yield Case(
            op="mba_update", label=f"N{N}_D{D}_ids{n_ids}", dtype=torch.float32,
            shape={"rows": N, "D": D, "ids": n_ids}, make=_mba_make(N, D, n_ids), call=_mba_call,
            reference=_on_reference(_mba_call), floor=floor, stateful=True, modes=("step",),
            peers=_mba_peers,
        )


# --- traffic-meter floors (issue 10) ----------------------------------------------------

# A persistent grid of one program per H200 multiprocessor.
H200_SMS = 132


def _ta_parameter_bytes(D: int, units: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of the attention MLP's parameters: layers, biases, the score layer."""
    dims = (4 * D,) + tuple(units)
    count = sum(i * o + o for i, o in zip(dims[:-1], dims[1:])) + units[-1] + 1
    return count * _size(dtype)


def meter_floors(op: str, shape: dict[str, Any], dtype: torch.dtype,
                 programs: int = H200_SMS) -> dict[str, Floor]:
    """Floors of the forward ("fwd") and the backward alone ("bwd") that the traffic
    meter (``python -m interest_kernels.bench.traffic``) divides the counted bytes by.

    target attention (shape B, T, D, units): issue 10's floors, which let a persistent
      grid of ``programs`` programs load every parameter once each (forward) and also
      write one gradient partial each (backward):
        fwd = keys + programs * parameter bytes,
        bwd = keys read twice + dkeys written once + 2 * programs * parameter bytes;
      FLOPs: the forward's, three times for the backward (recompute, two gradient
      products).
    GRU scan (B, T, H) and Dice (N, C): the benchmark cases' floors, the backward being
      forward+backward less forward.
    """
    if op == "target_attention":
        B, T, D, units = shape["B"], shape["T"], shape["D"], tuple(shape["units"])
        keys = B * T * D * _size(dtype)
        params = programs * _ta_parameter_bytes(D, units, dtype)
        flops = _ta_floor(B, T, D, units, dtype)("fwd").flops
        return {"fwd": Floor(bytes=keys + params, flops=flops),
                "bwd": Floor(bytes=3 * keys + 2 * params, flops=3 * flops)}
    if op == "gru_scan":
        floor = _gru_floor(shape["B"], shape["T"], shape["H"], dtype)
    elif op == "dice":
        floor = _dice_floor(shape["N"], shape["C"], dtype)
    else:
        raise ValueError(f"meter_floors: no floor for op {op!r}")
    fwd, full = floor("fwd"), floor("full")
    return {"fwd": fwd, "bwd": Floor(bytes=full.bytes - fwd.bytes, flops=full.flops - fwd.flops)}


ALL_CASES: dict[str, Callable[[str], Iterator[Case]]] = {
    "target_attention": target_attention_cases,
    "gru_scan": gru_scan_cases,
    "dice": dice_cases,
    "mba_update": mba_cases,
}
