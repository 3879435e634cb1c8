"""Tables sharded over 2 processes by torchrec (gloo, CPU), trained by exact MBA steps.

Two processes on the halves of each global batch, each holding only its rows of every
table, train the same model as one process on the whole batch: the same losses (1e-5
over 50 steps, odd-sized last batches included) and the same tables and MBA optimiser
state (counts n_j exactly), for DIN and DIEN with the SGD and the Adam form. A sharded
run's checkpoint holds the whole tables: it resumes sharded (same losses as the run
that went on) and in one process. The evaluation's shares differ in batch count by
rank. A last global batch of 1 row on 2 ranks (one rank gets none) trains in both
table modes. The CLI under torchrun (default widths: 18, stored 20 wide) with MBA Adagrad
writes the checkpoint of one process. A NaN gradient row sent from one rank refuses the
step on every rank before any count or row changes.
"""
import dataclasses
import os

import pytest
import torch

from interest_kernels.distributed.sharded import torchrec_unavailable_reason
from interest_kernels.train import Trainer, TrainConfig, build_dataset, main, run

from distributed_runs import spawn_two, train_steps

_REASON = torchrec_unavailable_reason()
pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
STEPS = 50
RESUME_AT = 40
PER_PROCESS = 8
CASES = [("din", "sgd"), ("din", "adam"), ("dien", "sgd"), ("dien", "adam")]
# 117 training samples: a global batch of 58 leaves 1 row (rank 1 gets none).
ONE_ROW_PER_PROCESS = 29
ONE_ROW_STEPS = 3  # the third is the 1-row batch
EVAL_BATCH = 19  # the 39 test samples split 20 / 19: rank 0 scores 2 batches, rank 1 one


def _config(data: str, model: str, sparse: str, batch_size: int, tables: str = "replicated",
            steps: int = STEPS) -> TrainConfig:
    return TrainConfig(
        model=model, data=data, sparse_optim=sparse, batch_size=batch_size, epochs=100, max_steps=steps,
        max_len=6, device="cpu", mba_lambda=0.05, sparse_lr=0.05, dense_lr=0.01, tables=tables,
        eval_batch_size=EVAL_BATCH,
        model_kwargs=dict(embedding_dim=5, att_hidden_units=(8, 4), mlp_hidden_units=(8,)),  # stored 8 wide
    )


def _cli_args(data: str) -> list[str]:
    return ["--model", "din", "--data", data, "--max-len", "6", "--quiet", "--threads", "1", "--sparse-optim", "adagrad",
            "--mba-lambda", "0.05"]


def _worker(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from interest_kernels.distributed import init_from_env
    from interest_kernels.distributed.trainer import DistributedTrainer

    context = init_from_env("cpu")
    dataset = build_dataset(_config(data, "din", "sgd", PER_PROCESS))

    def save(name: str, record: dict) -> None:
        if rank == 0:
            torch.save(record, os.path.join(out, name))

    for model, sparse in CASES:
        config = _config(data, model, sparse, PER_PROCESS, "sharded")
        trainer = DistributedTrainer(config, dataset, context)
        checkpoint = os.path.join(out, f"{model}_{sparse}.ckpt")
        losses = train_steps(trainer, STEPS, lambda step: step == RESUME_AT and trainer.save(checkpoint))
        state = trainer.state_dict()  # gathered whole: a collective
        rows = trainer.sharded.tables["item_embedding"].local.shape[0]
        save(f"{model}_{sparse}.pt", {"losses": losses, "model": state["model"], "sparse": state["sparse_opt"],
                                      "test": trainer.evaluate(dataset.test), "item_rows_here": rows})
        if (model, sparse) == ("din", "adam"):
            resumed = DistributedTrainer(config, dataset, context)
            resumed.load_state_dict(torch.load(checkpoint, weights_only=True))
            save("resumed.pt", {"losses": train_steps(resumed, STEPS - RESUME_AT)})
            del resumed
        del trainer  # no DDP wrapper may outlive the process group
    for tables in ("replicated", "sharded"):
        config = _config(data, "dien", "adam", ONE_ROW_PER_PROCESS, tables, steps=ONE_ROW_STEPS)
        trainer = DistributedTrainer(config, dataset, context)
        save(f"one_row_{tables}.pt", {"losses": train_steps(trainer, ONE_ROW_STEPS)})
        del trainer
    torch.save(_refused_step(rank, data, dataset, context), os.path.join(out, f"refused_{rank}.pt"))
    # Last: the CLI as torchrun starts it (it leaves the process group).
    assert main([*_cli_args(data), "--batch-size", str(PER_PROCESS), "--tables", "sharded", "--max-steps", "2",
                 "--checkpoint", os.path.join(out, "cli.ckpt")]) == 0


def _refused_step(rank: int, data: str, dataset, context) -> dict:
    """One good step, then a step whose gradient rows rank 1 poisons with a NaN before
    they go to their owners: every rank must refuse it before writing a count or a row."""
    from interest_kernels.distributed.trainer import DistributedTrainer

    trainer = DistributedTrainer(_config(data, "din", "sgd", PER_PROCESS, "sharded"), dataset, context)
    batches = trainer.batches.epoch_batches()
    trainer.step(next(batches))
    tables = {name: table.local.clone() for name, table in trainer.sharded.tables.items()}
    counts = [trainer.sparse_opt.state[w]["counts"].clone() for w in trainer.tables]
    if rank == 1:
        take = trainer.sharded._step_rows

        def poisoned(table):
            ids, rows, counted = take(table)
            return ids, torch.full_like(rows, float("nan")), counted

        trainer.sharded._step_rows = poisoned
    try:
        trainer.step(next(batches))
        error = None
    except ValueError as e:
        error = str(e)
    record = {"error": error,
              "tables_unchanged": all(torch.equal(t.local, tables[n]) for n, t in trainer.sharded.tables.items()),
              "counts_unchanged": all(torch.equal(trainer.sparse_opt.state[w]["counts"], c)
                                      for w, c in zip(trainer.tables, counts))}
    del trainer
    return record


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    if _REASON is not None:
        pytest.skip(str(_REASON))
    return spawn_two(_worker, tmp_path_factory.mktemp("sharded"))


def _single(data: str, model: str, sparse: str, batch_size: int, steps: int = STEPS) -> Trainer:
    return Trainer(_config(data, model, sparse, batch_size, steps=steps), build_dataset(_config(data, model, sparse, 1)))


# DIEN's evolving attention normalises its scores with a softmax: its score bias has a zero
# gradient in exact arithmetic, which the dense Adam turns from rounding noise into steps.
ROUNDING_NOISE = ("evolving.attention.",)


@pytest.mark.parametrize("model, sparse", CASES)
def test_sharded_tables_train_the_model_of_one_process(sharded_run, model, sparse):
    data, out = sharded_run
    single = _single(data, model, sparse, PER_PROCESS * WORLD)
    losses = train_steps(single, STEPS)
    got = torch.load(out / f"{model}_{sparse}.pt", weights_only=True)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), atol=1e-5, rtol=0)
    assert got["item_rows_here"] < single.model.item_embedding.weight.shape[0]  # rank 0 holds a part

    expected = single.model.state_dict()
    assert got["model"].keys() == expected.keys()
    for key, value in expected.items():
        if value.dtype.is_floating_point:
            atol = 1e-2 if key.startswith(ROUNDING_NOISE) else 1e-5
            torch.testing.assert_close(got["model"][key], value, atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(got["model"][key], value), key

    state = single.sparse_opt.state_dict()
    assert got["sparse"]["param_groups"] == state["param_groups"]
    assert got["sparse"]["state"].keys() == state["state"].keys()
    for index, entry in state["state"].items():
        assert got["sparse"]["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            mine = got["sparse"]["state"][index][key]
            if key == "counts":
                assert torch.equal(mine, value)  # n_j of the global batches, exactly
            elif isinstance(value, torch.Tensor):
                torch.testing.assert_close(mine, value, atol=1e-5, rtol=0)
            else:
                assert mine == value, key

    expected_test = single.evaluate(single.dataset.test)  # GAUC is NaN here (one-class users) on both
    torch.testing.assert_close(torch.tensor([got["test"][k] for k in expected_test]),
                               torch.tensor(list(expected_test.values())), atol=1e-5, rtol=0, equal_nan=True)


def test_sharded_checkpoint_resumes_sharded_and_in_one_process(sharded_run):
    data, out = sharded_run
    full = torch.load(out / "din_adam.pt", weights_only=True)["losses"]
    resumed = torch.load(out / "resumed.pt", weights_only=True)["losses"]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[RESUME_AT:]), atol=1e-6, rtol=0)

    state = torch.load(out / "din_adam.ckpt", weights_only=True)
    one = _single(data, "din", "adam", PER_PROCESS * WORLD)
    assert state["model"]["item_embedding.weight"].shape == one.model.item_embedding.weight.shape  # whole
    one.load_state_dict(state)
    torch.testing.assert_close(torch.tensor(train_steps(one, STEPS - RESUME_AT)), torch.tensor(full[RESUME_AT:]),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("tables", ["replicated", "sharded"])
def test_last_global_batch_of_one_row_on_two_ranks(sharded_run, tables):
    data, out = sharded_run
    single = _single(data, "dien", "adam", ONE_ROW_PER_PROCESS * WORLD, steps=ONE_ROW_STEPS)
    assert len(single.batches) == 3  # 58, 58 and 1 rows
    losses = train_steps(single, ONE_ROW_STEPS)
    got = torch.load(out / f"one_row_{tables}.pt", weights_only=True)["losses"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(losses), atol=1e-5, rtol=0)


def test_cli_trains_sharded_and_its_checkpoint_resumes_in_one_process(sharded_run, tmp_path):
    """The CLI's defaults (tables 18 wide, stored 20 wide) with MBA Adagrad: the sharded
    run's checkpoint equals one process's, then resumes in one process."""
    data, out = sharded_run
    assert main([*_cli_args(data), "--max-steps", "2", "--batch-size", str(PER_PROCESS * WORLD),
                 "--checkpoint", str(tmp_path / "single.ckpt")]) == 0
    sharded = torch.load(out / "cli.ckpt", weights_only=True)
    single = torch.load(tmp_path / "single.ckpt", weights_only=True)
    for key, value in single["model"].items():
        torch.testing.assert_close(sharded["model"][key], value, atol=1e-5, rtol=0, msg=lambda m: f"{key}: {m}")
    for index, entry in single["sparse_opt"]["state"].items():
        for key, value in entry.items():
            mine = sharded["sparse_opt"]["state"][index][key]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(mine, value, atol=1e-5, rtol=0, msg=lambda m: f"{index} {key}: {m}")
            else:
                assert mine == value, (index, key)
    assert main([*_cli_args(data), "--max-steps", "4", "--batch-size", str(PER_PROCESS * WORLD),
                 "--resume", str(out / "cli.ckpt"), "--checkpoint", str(tmp_path / "one.ckpt")]) == 0
    assert torch.load(tmp_path / "one.ckpt", weights_only=True)["steps"] == 4


def test_sharded_tables_need_torchrun(tmp_path):
    config = dataclasses.replace(_config("generated", "din", "sgd", 4, "sharded"), max_steps=1)
    with pytest.raises(ValueError, match="--tables sharded: .* torchrun"):
        run(config, quiet=True, log=lambda *_: None)


def test_a_non_finite_row_refuses_the_step_on_every_rank(sharded_run):
    """Rank 1's gradient rows hold NaN: both ranks raise before any count or row changes
    (the owner of a poisoned row names its id), as one process refuses such a step."""
    _, out = sharded_run
    for rank in range(WORLD):
        record = torch.load(out / f"refused_{rank}.pt", weights_only=True)
        assert record["error"] and ("NaN" in record["error"] or "not finite" in record["error"]), (rank, record)
        assert record["tables_unchanged"] and record["counts_unchanged"], (rank, record)
