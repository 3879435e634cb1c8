"""Training across processes (gloo, 2 CPU processes).

Two processes on the halves of each global batch train the same model as one process on
the whole batch: the same losses (1e-5 over 50 steps, an odd-sized last batch included)
and the same tables, for DIN (Dice statistics synchronised) and DIEN (auxiliary-loss
negatives and pair counts of the global batch), with MBAEmbedding and
nn.Embedding(sparse=True) tables; both replicas hold bit-identical state. A checkpoint
of the 2-process run resumes in one process, and the CLI, in torchrun's environment,
keeps its contract (``--batch-size`` per process, the global batch's loss in ``--json``).
Early stopping gets the same metrics on both ranks and stops where one process does.
"""
import dataclasses
import json
import os

import pytest
import torch

from interest_kernels.data.common import BatchIterator
from interest_kernels.distributed import ShardedBatches, exchange_rows, init_from_env
from interest_kernels.distributed.trainer import DistributedTrainer, resume_config
from interest_kernels.train import Trainer, TrainConfig, build_dataset, main, run

from distributed_runs import spawn_two, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
STEPS = 50
PER_PROCESS = 8
RESUME_AT = 20
CASES = [("din", "mba", "adam"), ("din", "torch", "adagrad"), ("dien", "mba", "sgd"), ("dien", "torch", "adam")]
QUIET = dict(quiet=True, log=lambda *_: None)


def _config(data: str, model: str, embedding: str, sparse: str, batch_size: int, steps: int = STEPS) -> TrainConfig:
    model_kwargs = dict(embedding_dim=4, att_hidden_units=(8, 4), mlp_hidden_units=(8,))
    # nn.Embedding(sparse=True) tables count frequencies from the sparse gradient, which
    # autograd coalesces in part, per process: their n_j (so a lambda > 0) differ by world size.
    mba_lambda = 0.05 if embedding == "mba" else 0.0
    return TrainConfig(
        model=model, data=data, embedding=embedding, sparse_optim=sparse, batch_size=batch_size,
        epochs=100, max_steps=steps, max_len=6, device="cpu", mba_lambda=mba_lambda, sparse_lr=0.05,
        dense_lr=0.01, model_kwargs=model_kwargs,
    )


def _state(trainer: Trainer) -> dict:
    return {"model": trainer.model.state_dict(), "sparse_opt": trainer.sparse_opt.state_dict()["state"]}


def _cli_args(data: str) -> list[str]:
    return ["--model", "din", "--data", data, "--max-steps", "4", "--max-len", "6", "--quiet", "--seed", "3",
            "--threads", "1"]


def _early_stop_config(data: str, batch_size: int) -> TrainConfig:
    return dataclasses.replace(_config(data, "din", "mba", "adam", batch_size, steps=40), valid_fraction=0.2,
                               eval_every=2, early_stop="gauc", patience=2)


def _stop_record(result) -> dict:
    return {"steps": result.steps, "best": result.best, "test": result.test,
            "evaluations": result.evaluations}


def _worker(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    context = init_from_env("cpu")
    dataset = build_dataset(_config(data, "din", "mba", "sgd", PER_PROCESS))
    for model, embedding, sparse in CASES:
        trainer = DistributedTrainer(_config(data, model, embedding, sparse, PER_PROCESS), dataset, context)
        losses = train_steps(trainer, STEPS)
        torch.save({"losses": losses, **_state(trainer)}, os.path.join(out, f"{model}_{embedding}_{rank}.pt"))
        del trainer  # no DDP wrapper may outlive the process group (see DistContext.close)
    config = _config(data, "dien", "mba", "adam", PER_PROCESS, steps=RESUME_AT)
    result = run(config, dataset=dataset, checkpoint=os.path.join(out, "resume.pt"), dist_context=context, **QUIET)
    torch.save([dataclasses.asdict(e) for e in result.epochs], os.path.join(out, f"epochs_{rank}.pt"))
    stopped = run(_early_stop_config(data, PER_PROCESS), best_checkpoint=os.path.join(out, "best.pt"),
                  dist_context=context, **QUIET)
    torch.save(_stop_record(stopped), os.path.join(out, f"early_stop_{rank}.pt"))
    # Last: the CLI as torchrun starts it (same environment); it leaves the process group.
    assert main(["--batch-size", str(PER_PROCESS), "--json", os.path.join(out, f"cli_{rank}.json"), *_cli_args(data)]) == 0


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The 2-process runs of every case (and a checkpoint after RESUME_AT steps)."""
    return spawn_two(_worker, tmp_path_factory.mktemp("dist"))


# DIEN's evolving attention normalises its scores with a softmax: its score bias has a zero
# gradient in exact arithmetic and its layers tiny ones, which Adam's normalisation turns
# from rounding noise into full-size steps, so these drift apart without moving the loss.
ROUNDING_NOISE = ("evolving.attention.",)


def _assert_close_state(one: dict, other: dict, atol: float) -> None:
    assert one.keys() == other.keys()
    for key, value in one.items():
        if isinstance(value, dict):
            _assert_close_state(value, other[key], atol)
        elif isinstance(value, torch.Tensor):
            assert value.dtype == other[key].dtype, key
            if value.dtype.is_floating_point:
                tol = 1e-2 if atol and str(key).startswith(ROUNDING_NOISE) else atol
                torch.testing.assert_close(value, other[key], atol=tol, rtol=0, msg=lambda m: f"{key}: {m}")
            else:
                assert torch.equal(value, other[key]), key
        else:
            assert value == other[key], key


@pytest.mark.parametrize("model, embedding, sparse", CASES)
def test_two_processes_train_the_model_of_one_process_on_the_global_batch(two_process_run, model, embedding, sparse):
    data, out = two_process_run
    single = Trainer(_config(data, model, embedding, sparse, PER_PROCESS * WORLD), build_dataset(_config(data, model, embedding, sparse, 1)))
    losses = train_steps(single, STEPS)
    ranks = [torch.load(out / f"{model}_{embedding}_{r}.pt", weights_only=True) for r in range(WORLD)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every rank reports the global loss
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(losses), atol=1e-5, rtol=0)
    _assert_close_state(ranks[0], ranks[1], atol=0)  # replicas bit for bit, counts included
    expected, got = _state(single), {k: ranks[0][k] for k in ("model", "sparse_opt")}
    if embedding == "torch":  # frequency counts from sparse gradients depend on the world size (see _config)
        for state in (expected, got):
            for table in state["sparse_opt"].values():
                del table["counts"]
    _assert_close_state(got, expected, atol=1e-5)


def test_a_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path):
    data, out = two_process_run
    config = _config(data, "dien", "mba", "adam", PER_PROCESS * WORLD)
    dataset = build_dataset(config)
    full = run(config, dataset=dataset, **QUIET)
    # The ranks shared the evaluation of the run that wrote the checkpoint: all got its metrics.
    epochs = [torch.load(out / f"epochs_{r}.pt", weights_only=True) for r in range(WORLD)]
    first = run(dataclasses.replace(config, max_steps=RESUME_AT), dataset=dataset, **QUIET)
    same = [[{k: v for k, v in e.items() if k != "samples_per_s"} for e in rank] for rank in epochs]
    assert json.dumps(same[0]) == json.dumps(same[1]) and len(epochs[0]) == len(first.epochs) == RESUME_AT * 16 // 117
    for got, want in zip(epochs[0], first.epochs):
        assert got["test_auc"] == pytest.approx(want.test_auc, abs=1e-4)
        assert got["test_logloss"] == pytest.approx(want.test_logloss, abs=1e-5)
    resumed_config = resume_config(str(out / "resume.pt"), {"max_steps": STEPS}, world_size=1)
    assert resumed_config.batch_size == PER_PROCESS * WORLD
    resumed = run(resumed_config, dataset=dataset, resume=str(out / "resume.pt"), **QUIET)
    assert len(resumed.losses) == STEPS - RESUME_AT
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[RESUME_AT:]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        resume_config(str(out / "resume.pt"), {}, world_size=3)
    with pytest.raises(ValueError, match="takes --batch-size 8"):
        resume_config(str(out / "resume.pt"), {"batch_size": 4}, world_size=2)


def test_cli_batch_size_is_per_process_and_json_has_the_global_loss(two_process_run, tmp_path):
    data, out = two_process_run
    assert not (out / "cli_1.json").exists()  # rank 0 alone writes results
    one = tmp_path / "one.json"
    assert main(["--batch-size", str(PER_PROCESS * WORLD), "--json", str(one), *_cli_args(data)]) == 0
    two_losses = json.load(open(out / "cli_0.json"))["fused"]["losses"]
    one_losses = json.load(open(one))["fused"]["losses"]
    assert len(two_losses) == 4
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), atol=1e-5, rtol=0)


def test_two_process_early_stopping_decides_as_one_process(two_process_run):
    data, out = two_process_run
    ranks = [torch.load(out / f"early_stop_{r}.pt", weights_only=True) for r in range(WORLD)]
    assert json.dumps(ranks[0]) == json.dumps(ranks[1])  # the same metrics (NaN included) on every rank
    one = _stop_record(run(_early_stop_config(data, PER_PROCESS * WORLD), **QUIET))
    assert ranks[0]["steps"] == one["steps"] < 40 and ranks[0]["best"]["step"] == one["best"]["step"]
    assert len(ranks[0]["evaluations"]) == len(one["evaluations"])
    for got, want in zip(ranks[0]["evaluations"] + [ranks[0]["test"]], one["evaluations"] + [one["test"]]):
        assert got.keys() == want.keys()
        for key in ("auc", "gauc", "logloss"):
            assert got[key] == pytest.approx(want[key], abs=1e-4, nan_ok=True), key
    assert (out / "best.pt").exists()  # rank 0 wrote it; every rank restored the best model from it


def test_sharded_batches_split_each_global_batch_in_rank_order(two_process_run):
    data, _ = two_process_run
    samples = build_dataset(_config(data, "din", "mba", "sgd", 1)).train  # 117 samples
    whole = list(BatchIterator(samples, 16, seed=3).epoch_batches())
    ranks = [ShardedBatches(samples, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    slices = [list(r.epoch_batches()) for r in ranks]
    assert len(whole) == len(slices[0]) == len(slices[1]) == 8
    for full, first, second in zip(whole, *slices):
        assert (first.size, second.size) == ((8, 8) if full.size == 16 else (3, 2))
        for name, a, b, c in zip(full._fields, full, first, second):
            assert torch.equal(a, torch.cat([b, c])), name  # same rows, same history width T
    assert ranks[0].state_dict() == {"epoch": 1, "position": 0, "seed": 3, "batch_size": 16}
    with pytest.raises(ValueError, match="rank must lie in"):
        ShardedBatches(samples, 8, rank=2, world_size=2)


def test_init_from_env_checks_the_launch(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert init_from_env("cpu") is None  # one process: no group
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK is not"):
        init_from_env("cpu")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="--device meta"):
        init_from_env("meta")


@pytest.mark.parametrize("flags", [["--compare"], ["--eval-only", "run.pt"], ["--predict", "run.pt", "--out", "x.csv"]])
def test_cli_modes_of_one_process_are_refused_under_torchrun(monkeypatch, capsys, flags):
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before the process group is joined
    assert main(flags) == 2
    flag = flags[0]
    assert capsys.readouterr().err.startswith(f"error: {flag} runs in one process; launch it without torchrun")


@pytest.fixture
def one_rank_group():
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=torch.distributed.HashStore())
    yield
    torch.distributed.destroy_process_group()


def test_exchange_rows_keeps_each_lookups_ids_rows_and_padding(one_rank_group):
    from interest_kernels.nn import MBAEmbedding
    from interest_kernels.optim._rows import take_rows

    tables = [MBAEmbedding(10, 3, padding_idx=0) for _ in range(2)]
    ids = [torch.tensor([1, 2]), torch.tensor([[3, 0], [3, 4]])]
    for table in tables:
        sum(table(i).sum() * (k + 1) for k, i in enumerate(ids)).backward()
    exchange_rows([tables[0].weight])  # one rank: every lookup comes back as it was
    got, want = take_rows(tables[0].weight), take_rows(tables[1].weight)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert torch.equal(g.ids, w.ids) and torch.equal(g.grad_rows, w.grad_rows) and g.padding_idx == w.padding_idx == 0

    dense = torch.nn.Parameter(torch.zeros(10, 3))
    dense.grad = torch.ones(10, 3)
    with pytest.raises(TypeError, match="dense gradient"):
        exchange_rows([dense])
