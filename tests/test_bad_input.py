"""Bad input is refused before anything runs: an error that names the argument, and
nothing written (tables, optimiser state, running statistics, counts).

Covers every public function, module and optimiser: mixed devices, mixed or integer
dtypes, wrong ranks, out-of-range values, non-finite hyperparameters (one float check
everywhere), non-0/1 masks, float counts, non-finite gradients into the MBA update.
"""
from __future__ import annotations

import math

import pytest
import torch

import interest_kernels as ik
from interest_kernels import nn as iknn
from interest_kernels import optim as ikoptim
from interest_kernels._validation import check_float

import target_attention_cases as ta_cases

META = torch.device("meta")  # a second device on a CPU-only machine


# --- the one float check ------------------------------------------------------------------


@pytest.mark.parametrize("value,error", [(math.inf, ValueError), (-math.inf, ValueError),
                                         (math.nan, ValueError), (True, TypeError),
                                         ("0.1", TypeError), (None, TypeError)])
def test_float_check_refuses_non_finite_and_non_numbers(value, error):
    with pytest.raises(error, match="lr"):
        check_float("lr", value)


def test_float_check_bounds():
    assert check_float("x", 1, low=0.0) == 1.0
    with pytest.raises(ValueError, match=r"x must lie in \(0, 1\]"):
        check_float("x", 0.0, low=0.0, high=1.0, low_open=True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        check_float("x", 1.0, low=0.0, high=1.0, high_open=True)


# --- target attention --------------------------------------------------------------------


def _ta(**change):
    inp = ta_cases.make_case(**change.pop("case", {}))
    kw = {k: v for k, v in inp.items() if not k.startswith("dice_")}
    kw.update(change)
    return kw


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(query=torch.randn(3)), ValueError, "query must have 2 or 3 dimensions"),
        (dict(query=torch.randint(0, 3, (3, 3))), TypeError, "query must have dtype"),
        (dict(keys=torch.randn(3, 4, 3, dtype=torch.float64)), TypeError, "keys has dtype"),
        (dict(keys=torch.randn(3, 4, 3, device=META)), ValueError, "keys is on meta"),
        (dict(weights=[torch.randn(5, 12, device=META), torch.randn(4, 5)]), ValueError, r"weights\[0\] is on meta"),
        (dict(weights=[torch.randn(5, 12).half(), torch.randn(4, 5)]), TypeError, r"weights\[0\] must have dtype"),
        (dict(lengths=torch.tensor([0, 5, 1])), ValueError, "lengths must lie in"),
        (dict(lengths=torch.tensor([0.0, 1.0, 1.0])), TypeError, "lengths must have dtype"),
        (dict(lengths=None, mask=torch.full((3, 4), 0.5)), ValueError, "mask must hold bool or exactly 0/1"),
        (dict(lengths=None, mask=torch.tensor([[0, 1, 2, 1]] * 3)), ValueError, "mask must hold"),
        (dict(lengths=None, mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "mask must have shape"),
        (dict(key_index=torch.tensor([0, 3, 1])), ValueError, "key_index must lie in"),
        (dict(activation="gelu"), ValueError, "activation must be one of"),
    ],
)
def test_target_attention_refuses(change, error, match):
    kw = _ta()
    kw.update(change)
    with pytest.raises(error, match=match):
        ik.target_attention(**kw)


@pytest.mark.parametrize("field,value", [("eps", math.inf), ("eps", 0.0), ("momentum", math.nan),
                                         ("momentum", 1.5)])
def test_target_attention_dice_hyperparameters(field, value):
    module = iknn.TargetAttention(3, (5, 4), activation="dice")
    setattr(module.dice[0], field, value)
    before = module.dice[0].running_mean.clone()
    with pytest.raises(ValueError, match=rf"dice_params\[0\]\.{field}"):
        module(torch.randn(3, 3), torch.randn(3, 4, 3))
    assert torch.equal(module.dice[0].running_mean, before), "running statistics were written"


def test_target_attention_bad_mask_writes_no_running_statistics():
    module = iknn.TargetAttention(3, (5, 4), activation="dice").train()
    before = [d.running_var.clone() for d in module.dice]
    with pytest.raises(ValueError, match="mask"):
        module(torch.randn(3, 3), torch.randn(3, 4, 3), mask=torch.full((3, 4), 0.5))
    assert all(torch.equal(d.running_var, b) for d, b in zip(module.dice, before))


@pytest.mark.parametrize("return_scores", [False, True])
def test_target_attention_module_empty_batch(return_scores):
    module = iknn.TargetAttention(4, (6, 3), return_scores=return_scores)
    res = module(torch.randn(0, 4), torch.randn(0, 5, 4), lengths=torch.zeros(0, dtype=torch.long))
    out = res[0] if return_scores else res
    assert out.shape == (0, 4)
    if return_scores:
        assert res[1].shape == (0, 5)


# --- GRU scans -------------------------------------------------------------------------


def _gru(**change):
    kw = dict(x=torch.randn(3, 4, 2), weight_ih=torch.randn(9, 2), weight_hh=torch.randn(9, 3),
              bias_ih=torch.randn(9), bias_hh=torch.randn(9), att=torch.rand(3, 4), mode="augru",
              h0=torch.randn(3, 3))
    kw.update(change)
    return kw


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(x=torch.randn(3, 4)), ValueError, "x must have 3 dimensions"),
        (dict(x=torch.randint(0, 2, (3, 4, 2))), TypeError, "x must have dtype"),
        (dict(weight_hh=torch.randn(9, 3, device=META)), ValueError, "weight_hh is on meta"),
        (dict(att=torch.rand(3, 4, dtype=torch.float64)), TypeError, "att has dtype"),
        (dict(att=torch.rand(3, 5)), ValueError, "att must have shape"),
        (dict(h0=torch.randn(3, 3).half()), TypeError, "h0 has dtype"),
        (dict(bias_ih=torch.randn(9, dtype=torch.float64)), TypeError, "has dtype"),
        (dict(lengths=torch.tensor([1, 5, 0])), ValueError, "lengths must lie in"),
        (dict(lengths=torch.tensor([1, -1, 0])), ValueError, "lengths must lie in"),
        (dict(mask=torch.full((3, 4), 0.5)), ValueError, "mask must hold bool or exactly 0/1"),
        (dict(mask=torch.full((3, 4), math.nan)), ValueError, "mask must hold"),
        (dict(mode="lstm"), ValueError, "mode must be one of"),
    ],
)
def test_gru_scan_refuses(change, error, match):
    with pytest.raises(error, match=match):
        ik.gru_scan(**_gru(**change))


def test_gru_module_refuses_float_mask():
    with pytest.raises(ValueError, match="mask"):
        iknn.GRU(2, 3)(torch.randn(3, 4, 2), mask=torch.full((3, 4), 0.5))


# --- Dice --------------------------------------------------------------------------------


def _dice(**change):
    kw = dict(x=torch.randn(6, 4), alpha=torch.rand(4), running_mean=torch.zeros(4),
              running_var=torch.ones(4), training=True)
    kw.update(change)
    return kw


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(x=torch.randn(6)), ValueError, "x must have 2 or 3 dimensions"),
        (dict(x=torch.randint(0, 3, (6, 4))), TypeError, "x must have dtype"),
        (dict(alpha=torch.rand(4, device=META)), ValueError, "alpha is on meta"),
        (dict(alpha=torch.rand(5)), ValueError, "alpha must have shape"),
        (dict(momentum=math.inf), ValueError, "momentum must be finite"),
        (dict(momentum=-0.1), ValueError, "momentum must lie in"),
        (dict(momentum=True), TypeError, "momentum must be a float"),
        (dict(eps=math.nan), ValueError, "eps must be finite"),
        (dict(eps=0.0), ValueError, "eps must be > 0"),
        (dict(x=torch.randn(1, 4)), ValueError, "at least 2 positions"),
    ],
)
def test_dice_refuses_and_writes_no_statistics(change, error, match):
    kw = _dice(**change)
    mean, var = kw["running_mean"].clone(), kw["running_var"].clone()
    with pytest.raises(error, match=match):
        ik.dice(**kw)
    assert torch.equal(kw["running_mean"], mean) and torch.equal(kw["running_var"], var)


@pytest.mark.parametrize("kw,match", [(dict(eps=math.inf), "eps"), (dict(momentum=math.nan), "momentum")])
def test_dice_module_refuses_non_finite_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        iknn.Dice(4, **kw)


# --- DIEN auxiliary loss ------------------------------------------------------------------


def test_aux_loss_refuses_integer_states_and_fractional_mask():
    kw = dict(states=torch.randn(2, 3, 4), pos=torch.randn(2, 3, 2), neg=torch.randn(2, 3, 2),
              weights=[torch.randn(5, 6)], biases=[None], out_weight=torch.randn(5))
    with pytest.raises(TypeError, match="states must have dtype"):
        ik.dien_aux_loss(**dict(kw, states=torch.ones(2, 3, 4, dtype=torch.int64)))
    with pytest.raises(ValueError, match="mask must hold"):
        ik.dien_aux_loss(**kw, mask=torch.full((2, 3), 0.5))


# --- MBA ops -----------------------------------------------------------------------------


def _mba(kind="sgd", **change):
    kw = dict(weight=torch.randn(10, 3), ids=torch.tensor([1, 4, 4, 9]), grad_rows=torch.randn(4, 3),
              counts=torch.ones(10, dtype=torch.int64), lr=0.1)
    if kind == "adagrad":
        kw.update(state_sum=torch.zeros(10, 3), step=1)
    if kind == "adam":
        kw.update(exp_avg=torch.zeros(10, 3), exp_avg_sq=torch.zeros(10, 3), step=1)
    kw.update(change)
    return kw


UPDATES = {"sgd": ik.mba_sgd_update, "adagrad": ik.mba_adagrad_update, "adam": ik.mba_adam_update}


@pytest.mark.parametrize("kind", list(UPDATES))
@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(lr=math.inf), ValueError, "lr must be finite"),
        (dict(lr=math.nan), ValueError, "lr must be finite"),
        (dict(lr=-1.0), ValueError, "lr must be >= 0"),
        (dict(weight_decay=math.inf), ValueError, "weight_decay must be finite"),
        (dict(counts=torch.ones(10)), TypeError, "counts must have dtype"),
        (dict(counts=torch.ones(10, dtype=torch.int64, device=META)), ValueError, "counts is on meta"),
        (dict(ids=torch.tensor([1.0, 4.0, 4.0, 9.0])), TypeError, "ids must have dtype"),
        (dict(ids=torch.tensor([1, 4, 10, 9])), ValueError, "id 10"),
        (dict(ids=torch.tensor([1, -2, 4, 9])), ValueError, "id -2"),
        (dict(weight=torch.ones(10, 3, dtype=torch.int64)), TypeError, "weight must have dtype"),
        (dict(weight=torch.randn(10)), ValueError, "weight must have 2 dimensions"),
        (dict(grad_rows=torch.randn(4, 3).double()), TypeError, "grad_rows has dtype"),
        (dict(grad_rows=torch.tensor([[0.0] * 3, [math.nan] * 3, [0.0] * 3, [0.0] * 3])),
         ValueError, "id 4 .* NaN or Inf"),
        (dict(grad_rows=torch.tensor([[0.0] * 3] * 3 + [[0.0, math.inf, 0.0]])), ValueError, "id 9"),
    ],
)
def test_mba_updates_refuse_and_write_nothing(kind, change, error, match):
    kw = _mba(kind, **change)
    written = ("weight", "counts", "state_sum", "exp_avg", "exp_avg_sq")
    before = {k: kw[k].clone() for k in written if k in kw and kw[k].device.type != "meta"}
    with pytest.raises(error, match=match):
        UPDATES[kind](**kw)
    for name, old in before.items():
        assert torch.equal(kw[name], old), f"{name} was written"


@pytest.mark.parametrize("kind,change,match", [
    ("adagrad", dict(eps=math.inf), "eps must be finite"),
    ("adagrad", dict(lr_decay=math.nan), "lr_decay must be finite"),
    ("adam", dict(betas=(1.0, 0.9)), r"betas\[0\] must lie in"),
    ("adam", dict(betas=(0.9, math.nan)), r"betas\[1\] must be finite"),
    ("adam", dict(eps=-1.0), "eps must be >= 0"),
])
def test_mba_optimizer_hyperparameters_of_the_ops(kind, change, match):
    with pytest.raises(ValueError, match=match):
        UPDATES[kind](**_mba(kind, **change))


def test_count_ids_and_dedup_refuse():
    with pytest.raises(TypeError, match="counts must have dtype"):
        ik.count_ids(torch.tensor([1, 2]), torch.zeros(5))
    counts = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match="id 5"):
        ik.count_ids(torch.tensor([1, 5]), counts)
    assert not counts.any()
    with pytest.raises(TypeError, match="ids must have dtype"):
        ik.dedup_rows(torch.tensor([1.0]), torch.randn(1, 2), 3)
    with pytest.raises(ValueError, match="id 3"):
        ik.dedup_rows(torch.tensor([3]), torch.randn(1, 2), 3)


# --- MBA optimisers and embedding ----------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda p: ikoptim.MBASGD([p], lr=math.inf), "lr must be finite"),
    (lambda p: ikoptim.MBASGD([p], lr=0.1, weight_decay=math.nan), "weight_decay must be finite"),
    (lambda p: ikoptim.MBAAdagrad([p], eps=math.inf), "eps must be finite"),
    (lambda p: ikoptim.MBAAdam([p], betas=(0.9, 1.0)), r"betas\[1\] must lie in"),
    (lambda p: ikoptim.MBAAdam([p], betas=(math.nan, 0.9)), r"betas\[0\] must be finite"),
    (lambda p: ikoptim.MBASGD([{"params": [p], "lr": math.inf}], lr=0.1), "lr must be finite"),
])
def test_optimizers_refuse_non_finite_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make(torch.nn.Parameter(torch.randn(5, 2)))


def test_mba_update_accepts_finite_rows_whose_sum_overflows():
    # The finiteness check proves the common case by one sum; rows whose sum overflows
    # must still pass when each value is finite.
    kw = _mba(ids=torch.tensor([1, 4, 5, 9]), grad_rows=torch.full((4, 3), 3e38), lr=1e-30)
    before = kw["weight"].clone()
    ik.mba_sgd_update(**kw)
    assert torch.isfinite(kw["weight"]).all() and not torch.equal(kw["weight"], before)


def test_optimizer_refuses_float_counts():
    with pytest.raises(TypeError, match="counts must be int64/int32"):
        ikoptim.MBASGD([torch.nn.Parameter(torch.randn(5, 2))], lr=0.1, counts=torch.ones(5))


@pytest.mark.parametrize("opt", [ikoptim.MBASGD, ikoptim.MBAAdagrad, ikoptim.MBAAdam])
def test_optimizer_step_with_nan_gradient_writes_nothing(opt):
    emb = iknn.MBAEmbedding(6, 3)
    optimizer = opt(emb.parameters(), lr=0.1)
    emb(torch.tensor([[1, 2], [2, 3]])).sum().backward()
    optimizer.step()
    snapshot = {k: v.clone() for k, v in optimizer.state[emb.weight].items() if isinstance(v, torch.Tensor)}
    weight = emb.weight.detach().clone()
    (emb(torch.tensor([[1, 4]])) * torch.tensor([[[1.0, math.nan, 0.0]]])).sum().backward()
    with pytest.raises(ValueError, match="id 1 .*NaN or Inf"):
        optimizer.step()
    assert torch.equal(emb.weight.detach(), weight)
    for name, old in snapshot.items():
        assert torch.equal(optimizer.state[emb.weight][name], old), f"state {name} was written"


def test_mba_embedding_out_of_range_id_is_named():
    emb = iknn.MBAEmbedding(5, 2)
    with pytest.raises(ValueError, match="id 7"):
        emb(torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="id -1"):
        with torch.no_grad():
            emb(torch.tensor([-1]))
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        emb(torch.tensor([1.0]))


# --- modules pass bad input to the ops' checks ---------------------------------------------


@pytest.mark.parametrize("call,error,match", [
    (lambda: iknn.AttentionalGRU(2, 3)(torch.randn(3, 4, 2), torch.rand(3, 4, device=META)),
     ValueError, "att is on meta"),
    (lambda: iknn.AttentionalGRU(2, 3)(torch.randn(3, 4, 2), torch.rand(3, 5)), ValueError, "att must have shape"),
    (lambda: iknn.AttentionalGRU(2, 3).double()(torch.randn(3, 4, 2).half(), torch.rand(3, 4).half()),
     TypeError, "weight_ih has dtype"),
    (lambda: iknn.GRU(2, 3)(torch.randn(3, 4, 2), lengths=torch.tensor([1, 2, 9])), ValueError, "lengths must lie in"),
    (lambda: iknn.GRU(2, 3)(torch.randn(4, 2)), ValueError, "x must have 3 dimensions"),
    (lambda: iknn.InterestEvolving(3, gru_type="AUGRU")(torch.randn(2, 3), torch.randn(2, 4, 3),
                                                         torch.tensor([1, 7])), ValueError, "lengths must lie in"),
    (lambda: iknn.AuxiliaryLoss(3, 2)(torch.randn(2, 4, 3), torch.randn(2, 4, 2), torch.randn(2, 4, 2),
                                      mask=torch.full((2, 4), 0.5)), ValueError, "mask must hold"),
    (lambda: iknn.Dice(4)(torch.randint(0, 3, (5, 4))), TypeError, "x must have dtype"),
    (lambda: iknn.Dice(4)(torch.randn(5, 3)), ValueError, "must have shape"),
    (lambda: iknn.TargetAttention(3, (4,))(torch.randn(2, 3), torch.randn(2, 5, 3), mask=torch.full((2, 5), 2)),
     ValueError, "mask must hold"),
    (lambda: iknn.TargetAttention(3, (4,))(torch.randn(2, 3), torch.randn(2, 5, 3, device=META)),
     ValueError, "keys is on meta"),
    (lambda: iknn.TargetAttention(3, (4,)).double()(torch.randn(2, 3).half(), torch.randn(2, 5, 3).half()),
     TypeError, r"weights\[0\] must have dtype"),
])
def test_modules_refuse(call, error, match):
    with pytest.raises(error, match=match):
        call()
