"""Public functional op ``target_attention``: validation, normalisation, dispatch.

Backends ("reference", "cpu", "triton") receive the public keyword arguments in a
normalised form and return ``(out, scores_or_None)``:

* query (B, D) or (B, E, D) (a (B, 1, D) query is squeezed);
* out_weight (H_L,) or (E, H_L) per head; out_bias None, 0-d, or (E,) per head;
* mask bool or None, lengths int64 or None (never both), key_index int64 or None;
* weights / biases lists (bias entries may be None); prelu_weights a list of (H_l,)
  (or (E, H_l) per head) slopes, a shared slope expanded; dice_params a list or None.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..._backend import define_op, triton_unavailable_reason
from ..._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_choice,
    check_float,
    check_in_range,
    check_same_dtype,
    check_shape,
    check_tensor,
    check_valid_positions,
)
from ..dice.reference import DiceParams
from .cpu import target_attention_cpu, unavailable_reason as cpu_unavailable_reason
from .reference import target_attention_reference

ACTIVATIONS = ("sigmoid", "relu", "prelu", "dice", "identity")
NORMALIZATIONS = ("softmax", "none")
MAX_LAYERS = 3

OP = define_op(
    "target_attention",
    preference={"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")},
)


@OP.register("reference")
def _reference(**kw):
    kw.pop("save_pre_activations", None)  # a choice of the cpu backend only
    res = target_attention_reference(**kw)
    return res if kw["return_scores"] else (res, None)


@OP.register(
    "cpu",
    why_not=lambda device, **_: cpu_unavailable_reason()
    if device.type == "cpu"
    else "the cpu backend takes CPU tensors only",
)
def _cpu(**kw):
    return target_attention_cpu(**kw)


def _triton_why_not(device: torch.device, **facts) -> Optional[str]:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        return reason
    from .triton import unsupported_reason  # imports triton, which is present by now

    return unsupported_reason(device=device, **facts)


@OP.register(
    "triton",
    why_not=_triton_why_not,
    limits="float32/float16/bfloat16 inputs, 1 to 3 hidden layers of at most 128 units, D <= "
    "128, at most 16384 weight-matrix elements with every width padded to a power of two "
    "(32768 in bfloat16): the weights stay on chip (triton/config.py)",
)
def _triton(**kw):
    from .triton import target_attention_triton  # lazy: triton is imported only when used

    kw.pop("save_pre_activations", None)  # a choice of the cpu backend only
    return target_attention_triton(**kw)


def _param_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    # Parameters may stay float32 while activations run in half precision (autocast).
    return (dtype,) if dtype == torch.float32 else (dtype, torch.float32)


def _check_per_head_shape(name: str, t: torch.Tensor, heads: Optional[int], shape: tuple) -> None:
    check_shape(name, t, ((heads,) if heads is not None else ()) + shape)


def target_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Optional[Sequence[Optional[torch.Tensor]]],
    out_weight: torch.Tensor,
    out_bias: Optional[torch.Tensor] = None,
    *,
    activation: str = "sigmoid",
    normalization: str = "softmax",
    lengths: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    key_index: Optional[torch.Tensor] = None,
    prelu_weights: Optional[Sequence[torch.Tensor]] = None,
    dice_params: Optional[Sequence[DiceParams]] = None,
    return_scores: bool = False,
    save_pre_activations: Optional[bool] = None,
):
    """DIN target attention: an MLP scores each behaviour against the query; pool.

    For query ``q`` (candidate item) and behaviours ``k_t``, the MLP on
    ``[q, k_t, q - k_t, q * k_t]`` gives a score ``s_t`` per position, normalised over
    the valid positions (``softmax``) or used as is (``none``, the DIN paper), and the
    output is ``sum_t a_t k_t`` (SPEC section 1).

    Args:
        query: (B, D) float; (B, 1, D) accepted; (B, E, D) one query per head in the
            multi-head form.
        keys: (B, T, D); (U, T, D) with ``key_index`` (shared history); (B, E, T, D)
            multi-head (or (U, E, T, D) with ``key_index``). Same dtype as ``query``.
        weights: L = 1..3 hidden-layer weights in ``nn.Linear`` layout: (H_1, 4D), then
            (H_l, H_{l-1}); with a leading E dim for one MLP per head.
        biases: L biases (H_l,) (per head (E, H_l)); entries may be None; None for all.
        out_weight: score layer weight (1, H_L) or (H_L,); per head (E, 1, H_L) or (E, H_L).
        out_bias: score bias (1,) or 0-d; per head (E, 1) or (E,); or None.
        activation: "sigmoid", "relu", "prelu", "dice" or "identity".
        normalization: "softmax" or "none".
        lengths: (B,) (or (U,) with ``key_index``) ints in [0, T]; first ``lengths[b]``
            positions valid.
        mask: (B, T) (or (U, T)) bool or 0/1: valid positions. Not with ``lengths``.
        key_index: (B,) ints in [0, U): the history row of each query.
        prelu_weights: "prelu": L slopes, (H_l,) per unit or (1,) shared (per head
            (E, H_l) or (E, 1)).
        dice_params: "dice": L :class:`DiceParams` with (H_l,) tensors (per head
            (E, H_l)); running statistics are updated in place when training.
        return_scores: also return the attention weights.
        save_pre_activations: cpu backend, with gradients: keep each layer's
            pre-activation (B, T, H_l) for the backward (True) or let the backward
            recompute the valid rows (False: less memory, as fast or faster); None takes
            ``ops.target_attention.cpu.SAVE_PRE_ACTIVATIONS`` (False).
            Dice with batch statistics always keeps them. Results are identical.

    Returns:
        ``out`` (B, D) or (B, E, D) in the dtype of ``query``; with ``return_scores``
        ``(out, scores)``, scores (B, T) or (B, E, T), zero at masked positions. A row
        with no valid position gives zeros.

    Parameters may be float32 while ``query``/``keys`` are float16/bfloat16; the math
    runs in float32 (float64 for float64 inputs).
    """
    check_tensor("query", query, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    device = query.device
    check_tensor("keys", keys, ndim=(3, 4), dtypes=FLOAT_DTYPES, device=device)
    dtype = check_same_dtype([("query", query), ("keys", keys)])
    pdtypes = _param_dtypes(dtype)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("normalization", normalization, NORMALIZATIONS)

    multi_head = keys.dim() == 4
    batch, dim = query.shape[0], query.shape[-1]
    seq_len = keys.shape[-2]
    heads = keys.shape[1] if multi_head else None
    if keys.shape[-1] != dim:
        raise ValueError(
            f"keys must have the embedding width D = {dim} of query in their last "
            f"dimension, got keys of shape {tuple(keys.shape)}"
        )
    if query.dim() == 3:
        if query.shape[1] == 1:
            query = query.squeeze(1)
        elif not multi_head or query.shape[1] != heads:
            want = f"(B, {heads}, D) or " if multi_head else ""
            raise ValueError(
                f"query must have shape (B, D), {want}(B, 1, D), got {tuple(query.shape)}"
            )

    if key_index is not None:
        check_tensor("key_index", key_index, ndim=1, dtypes=INDEX_DTYPES, device=device)
        check_shape("key_index", key_index, (batch,), "one history row per query")
        rows = keys.shape[0]
        check_in_range("key_index", key_index, 0, rows, "the history rows of keys",
                       high_inclusive=False)
        key_index = key_index.long()
    else:
        rows = batch
        if keys.shape[0] != batch:
            raise ValueError(
                f"keys must have the batch size B = {batch} of query in dimension 0 "
                f"(or pass key_index for a shared history), got keys of shape {tuple(keys.shape)}"
            )
    lengths, mask = check_valid_positions(lengths, mask, rows, seq_len, device)
    if lengths is not None:
        lengths = lengths.long()

    # --- the MLP ---------------------------------------------------------------------
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError("weights must be a list or tuple of tensors (one per hidden layer)")
    num_layers = len(weights)
    if not 1 <= num_layers <= MAX_LAYERS:
        raise ValueError(f"weights must hold 1 to {MAX_LAYERS} hidden-layer weights, got {num_layers}")
    per_head = isinstance(weights[0], torch.Tensor) and weights[0].dim() == 3
    if per_head and not multi_head:
        raise ValueError(
            "weights[0] has a leading head dimension (per-head MLP) but keys are not in "
            "the multi-head form (B, E, T, D)"
        )
    lead = heads if per_head else None
    wrank = 3 if per_head else 2
    units: list[int] = []
    in_width = 4 * dim
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w, ndim=wrank, dtypes=pdtypes, device=device)
        h = w.shape[-2]
        what = "nn.Linear layout (units, 4*D)" if i == 0 else f"nn.Linear layout (units, {in_width})"
        check_shape(f"weights[{i}]", w, ((lead,) if per_head else ()) + (h, in_width), what)
        units.append(h)
        in_width = h

    if biases is None:
        biases = [None] * num_layers
    if isinstance(biases, torch.Tensor) or len(biases) != num_layers:
        raise ValueError(f"biases must be a sequence of {num_layers} entries (tensor or None), one per weight")
    biases = list(biases)
    for i, c in enumerate(biases):
        if c is not None:
            check_tensor(f"biases[{i}]", c, dtypes=pdtypes, device=device)
            _check_per_head_shape(f"biases[{i}]", c, lead, (units[i],))

    check_tensor("out_weight", out_weight, dtypes=pdtypes, device=device)
    hid = units[-1]
    if per_head:
        if tuple(out_weight.shape) not in ((heads, 1, hid), (heads, hid)):
            raise ValueError(
                f"out_weight must have shape ({heads}, 1, {hid}) or ({heads}, {hid}) for "
                f"per-head MLPs, got {tuple(out_weight.shape)}"
            )
        out_weight = out_weight.reshape(heads, hid)
    else:
        if tuple(out_weight.shape) not in ((1, hid), (hid,)):
            raise ValueError(
                f"out_weight must have shape (1, {hid}) or ({hid},) (H_L = {hid}), "
                f"got {tuple(out_weight.shape)}"
            )
        out_weight = out_weight.reshape(hid)
    if out_bias is not None:
        check_tensor("out_bias", out_bias, dtypes=pdtypes, device=device)
        allowed = ((heads, 1), (heads,)) if per_head else ((1,), ())
        if tuple(out_bias.shape) not in allowed:
            raise ValueError(
                f"out_bias must have shape {' or '.join(map(str, allowed))}, got {tuple(out_bias.shape)}"
            )
        out_bias = out_bias.reshape(heads) if per_head else out_bias.reshape(())

    # --- activation parameters ------------------------------------------------------
    if activation == "prelu":
        if prelu_weights is None:
            raise ValueError('activation "prelu" needs prelu_weights (one slope tensor per layer)')
        if len(prelu_weights) != num_layers:
            raise ValueError(f"prelu_weights must hold {num_layers} tensors, got {len(prelu_weights)}")
        slopes = []
        for i, a in enumerate(prelu_weights):
            check_tensor(f"prelu_weights[{i}]", a, dtypes=pdtypes, device=device)
            shape = ((heads,) if per_head else ()) + (units[i],)
            one = ((heads,) if per_head else ()) + (1,)
            if tuple(a.shape) not in (shape, one):
                raise ValueError(
                    f"prelu_weights[{i}] must have shape {shape} (per unit) or {one} (shared), "
                    f"got {tuple(a.shape)}"
                )
            slopes.append(a.expand(shape))
        prelu_weights = slopes
    elif prelu_weights is not None:
        raise ValueError(f'prelu_weights are only used with activation "prelu", not {activation!r}')

    if activation == "dice":
        if dice_params is None:
            raise ValueError('activation "dice" needs dice_params (one DiceParams per layer)')
        if len(dice_params) != num_layers:
            raise ValueError(f"dice_params must hold {num_layers} DiceParams, got {len(dice_params)}")
        for i, p in enumerate(dice_params):
            if not isinstance(p, DiceParams):
                raise TypeError(f"dice_params[{i}] must be a DiceParams, got {type(p).__name__}")
            shape = ((heads,) if per_head else ()) + (units[i],)
            for field in ("alpha", "running_mean", "running_var", "weight", "bias"):
                t = getattr(p, field)
                if t is None:
                    if field == "alpha":
                        raise ValueError(f"dice_params[{i}].alpha is required")
                    if field.startswith("running") and not p.training:
                        raise ValueError(
                            f"dice_params[{i}].{field} is required: Dice in eval mode "
                            "(training=False) uses the running statistics"
                        )
                    continue
                check_tensor(f"dice_params[{i}].{field}", t, dtypes=FLOAT_DTYPES, device=device)
                check_shape(f"dice_params[{i}].{field}", t, shape)
            check_float(f"dice_params[{i}].eps", p.eps, low=0.0, low_open=True)
            check_float(f"dice_params[{i}].momentum", p.momentum, low=0.0, high=1.0)
        dice_params = list(dice_params)
    elif dice_params is not None:
        raise ValueError(f'dice_params are only used with activation "dice", not {activation!r}')

    impl = OP.select(
        device,
        dtype=dtype,
        activation=activation,
        normalization=normalization,
        num_layers=num_layers,
        hidden_units=tuple(units),
        dim=dim,
        multi_head=multi_head,
        per_head=per_head,
        shared_history=key_index is not None,
        dice_training=activation == "dice" and dice_params[0].training,
        return_scores=bool(return_scores),
    )
    out, scores = impl.fn(
        query=query,
        keys=keys,
        weights=list(weights),
        biases=biases,
        out_weight=out_weight,
        out_bias=out_bias,
        activation=activation,
        normalization=normalization,
        lengths=lengths,
        mask=mask,
        key_index=key_index,
        prelu_weights=prelu_weights,
        dice_params=dice_params,
        return_scores=bool(return_scores),
        save_pre_activations=save_pre_activations,
    )
    return (out, scores) if return_scores else out
