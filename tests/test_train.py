"""The training job: AUC, checkpoint/resume reproducing the next steps exactly, the CLI."""
import json
import math

import pytest
import torch

from interest_kernels.train import TrainConfig, auc, build_dataset, load_checkpoint_config, main, run


pytestmark = pytest.mark.usefixtures("one_thread")


def test_auc_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (500,), generator=gen)
    scores = torch.randint(0, 20, (500,), generator=gen).float()  # many ties
    assert auc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    scores = torch.randn(500, generator=gen)
    assert auc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)


def test_auc_edge_cases():
    labels = torch.tensor([0, 0, 1, 1])
    assert auc(labels, torch.tensor([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(labels, torch.tensor([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert auc(labels, torch.zeros(4)) == 0.5
    assert math.isnan(auc(torch.ones(3), torch.rand(3)))
    with pytest.raises(ValueError, match="differ in shape"):
        auc(labels, torch.rand(3))


def _tiny(model, **kw):
    return TrainConfig(
        model=model, epochs=2, batch_size=32, max_len=6, device="cpu", **kw,
        data_kwargs=dict(num_users=40, num_items=50, num_cats=5, train_per_user=3, test_per_user=1,
                         min_len=1, max_len=6),
        model_kwargs=dict(embedding_dim=4, att_hidden_units=(8, 4), mlp_hidden_units=(8,)),
    )


@pytest.mark.parametrize("model, sparse", [("din", "adam"), ("dien", "adagrad"), ("dmin", "sgd")])
@pytest.mark.parametrize("stop_at", [3, 4])  # mid-epoch; at the end of epoch 1 (4 batches of 32 of 120)
def test_resume_reproduces_the_next_losses(tmp_path, model, sparse, stop_at):
    config = _tiny(model, sparse_optim=sparse)
    dataset = build_dataset(config, str(tmp_path / "data"))
    quiet = dict(quiet=True, log=lambda *_: None)
    full = run(config, dataset=dataset, **quiet)
    assert full.steps == 8 and len(full.epochs) == 2

    ckpt = str(tmp_path / "ckpt.pt")
    first = run(TrainConfig(**{**config.__dict__, "max_steps": stop_at}), dataset=dataset, checkpoint=ckpt, **quiet)
    assert first.losses == full.losses[:stop_at]
    resumed = run(config, dataset=dataset, resume=ckpt, **quiet)
    assert resumed.losses == full.losses[stop_at:]  # bit for bit
    assert resumed.epochs[-1].test_auc == full.epochs[-1].test_auc
    assert resumed.epochs[-1].test_logloss == full.epochs[-1].test_logloss


def test_resume_rejects_a_different_run(tmp_path):
    config = _tiny("din", max_steps=1)
    ckpt = str(tmp_path / "ckpt.pt")
    run(config, dataset=build_dataset(config, str(tmp_path / "d")), checkpoint=ckpt, quiet=True, log=lambda *_: None)
    assert load_checkpoint_config(ckpt, {"epochs": 5}).epochs == 5
    with pytest.raises(ValueError, match="model='dien' differs from the checkpoint's 'din'"):
        load_checkpoint_config(ckpt, {"model": "dien"})


def test_cli_checkpoint_resume_and_json(tmp_path, capsys):
    ckpt, out = str(tmp_path / "c.pt"), str(tmp_path / "r.json")
    common = ["--quiet", "--max-len", "8"]
    assert main(["--model", "dien", "--max-steps", "2", "--checkpoint", ckpt, *common]) == 0
    assert main(["--resume", ckpt, "--max-steps", "3", "--json", out, *common]) == 0
    text = capsys.readouterr().out
    assert "[dien/fused] 2 steps" in text and "[dien/fused] 3 steps" in text
    saved = json.load(open(out))["fused"]
    assert saved["steps"] == 3 and len(saved["losses"]) == 1 and saved["config"]["model"] == "dien"
    assert main(["--resume", ckpt, "--model", "din", *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --resume: model='din' differs from the checkpoint's")
    with pytest.raises(ValueError, match="differs from the checkpoint"):
        main(["--resume", ckpt, "--model", "din", "--debug", *common])


def test_cli_compare_prints_both_backends(capsys):
    assert main(["--model", "din", "--compare", "--epochs", "1", "--max-len", "8", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "[din/fused] epoch 1" in text and "[din/reference] epoch 1" in text
    assert "fused" in text and "reference" in text and "samples/s" in text
    diff = float(text.split("largest step-loss difference: ")[1].split()[0])
    assert diff < 1e-3  # same seed, same batches: the backends differ by rounding only


def test_bad_data_source():
    with pytest.raises(ValueError, match="--data must be"):
        build_dataset(TrainConfig(data="criteo:/x"))
    with pytest.raises(FileNotFoundError, match="no such data directory"):
        build_dataset(TrainConfig(data="amazon:/nonexistent/dir"))
