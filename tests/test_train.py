"""The training job: checkpoint/resume reproducing the next steps exactly, evaluation and
prediction modes, early stopping, the learning-rate schedule, config files, the CLI."""
import csv
import json
import math
import os

import pytest
import torch

from interest_kernels.train import (
    TrainConfig, Trainer, _parser, auc, build_dataset, evaluate_checkpoint, load_checkpoint_config, lr_factor, main,
    read_config_file, run,
)


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
    settings = {"model": model, "epochs": 2, "batch_size": 32, "max_len": 6, "device": "cpu", **kw}
    return TrainConfig(
        **settings,
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


def _tiny_cli(tmp_path) -> list[str]:
    """Command-line arguments for _tiny's data and model sizes (through a config file)."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        "quiet = true\nmax_len = 6\nbatch_size = 32\n"
        "[data_kwargs]\nnum_users = 40\nnum_items = 50\nnum_cats = 5\ntrain_per_user = 3\ntest_per_user = 2\n"
        "min_len = 1\nmax_len = 6\n"
        "[model_kwargs]\nembedding_dim = 4\natt_hidden_units = [8, 4]\nmlp_hidden_units = [8]\n"
    )
    return ["--config", str(cfg)]


def test_resumed_run_follows_the_new_max_steps_and_epochs(tmp_path, capsys):
    ckpt = str(tmp_path / "c.pt")
    common = _tiny_cli(tmp_path)
    assert main(["--max-steps", "2", "--checkpoint", ckpt, *common]) == 0
    assert main(["--resume", ckpt, "--max-steps", "5", "--checkpoint", ckpt, *common]) == 0
    assert "[din/fused] 5 steps" in capsys.readouterr().out
    # No --max-steps: the new run's --epochs decide (4 steps of 32 per epoch of 120 samples).
    assert main(["--resume", ckpt, "--epochs", "3", *common]) == 0
    assert "[din/fused] 12 steps" in capsys.readouterr().out
    assert main(["--resume", ckpt, "--max-steps", "5", *common]) == 2
    assert "error: nothing to train: the run is at step 5" in capsys.readouterr().err


def test_zero_steps_and_bad_settings_are_one_line_errors(tmp_path, capsys):
    for args, message in [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--max-steps", "0"], "--max-steps must be >= 1"),
        (["--early-stop", "auc"], "--early-stop needs a validation split"),
        (["--data", "amazon:/nonexistent"], "no such data directory: /nonexistent"),
        (["--eval-only", str(tmp_path / "none.pt")], "no such checkpoint"),
        (["--config", str(tmp_path / "none.toml")], "--config: no such file"),
    ]:
        assert main([*_tiny_cli(tmp_path), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {message}"), (args, err)


def test_help_shows_defaults_and_data_layouts(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "(default: 128)" in text and "(default: 0)" in text
    for layout in ("amazon:DIR", "local_train_splitByUser", "taobao:CSV", "movielens:DIR", "u.data", "ratings.csv"):
        assert layout in text
    with pytest.raises(SystemExit):
        main(["--model", "xyz"])
    assert capsys.readouterr().err == "error: argument --model: invalid choice: 'xyz' (choose from 'din', 'dien', 'dmin') (see --help)\n"


def test_lr_schedule():
    c = TrainConfig(warmup_steps=4, lr_decay="linear", min_lr_ratio=0.1)
    assert [lr_factor(c, s, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(c, 4, 14) == 1.0 and lr_factor(c, 13, 14) == pytest.approx(0.1)
    assert lr_factor(c, 9, 14) == pytest.approx(0.1 + 0.9 * 4 / 9)
    cos = TrainConfig(lr_decay="cosine")
    assert lr_factor(cos, 0, 11) == 1.0 and lr_factor(cos, 5, 11) == pytest.approx(0.5) and lr_factor(cos, 10, 11) == 0.0
    assert lr_factor(TrainConfig(), 7, 10) == 1.0


def test_schedule_drives_both_optimisers(tmp_path):
    config = _tiny("din", warmup_steps=2, lr_decay="linear", min_lr_ratio=0.5, max_steps=4)
    seen = []
    original = Trainer.step

    def spy(self, batch):
        seen.append((self.sparse_opt.param_groups[0]["lr"], self.dense_opt.param_groups[0]["lr"]))
        return original(self, batch)

    Trainer.step = spy
    try:
        run(config, dataset=build_dataset(config, str(tmp_path)), quiet=True, log=lambda *_: None)
    finally:
        Trainer.step = original
    factors = [lr_factor(config, s, 4) for s in range(4)]  # max_steps 4 < 2 epochs x 4 batches
    assert factors == [0.5, 1.0, 1.0, 0.5]
    assert seen == [pytest.approx((config.sparse_lr * f, config.dense_lr * f)) for f in factors]


def test_early_stopping_keeps_the_best_model_and_metrics_everywhere(tmp_path):
    config = _tiny("din", epochs=6, valid_fraction=0.25, eval_every=1, early_stop="gauc", patience=2, dense_lr=0.05)
    config.data_kwargs["test_per_user"] = 3  # GAUC needs users with several test samples
    dataset = build_dataset(config, str(tmp_path / "d"))
    best_ckpt, ckpt = str(tmp_path / "best.pt"), str(tmp_path / "last.pt")
    result = run(config, dataset=dataset, checkpoint=ckpt, best_checkpoint=best_ckpt, quiet=True, log=lambda *_: None)
    valid = [e for e in result.evaluations if e["split"] == "valid"]
    assert {e["split"] for e in result.evaluations} == {"valid", "test"}
    assert all(set(e) == {"step", "epoch", "split", "auc", "gauc", "logloss"} for e in result.evaluations)
    best = max(valid, key=lambda e: e["gauc"])
    assert result.best["step"] == best["step"] and result.best["gauc"] == best["gauc"]
    if result.steps < 6 * 3:  # stopped early: the last `patience` evaluations did not improve
        assert [e["step"] for e in valid[-2:]] == [result.steps - 1, result.steps]
        assert all(e["gauc"] <= best["gauc"] for e in valid[-2:]) and valid[-3]["step"] >= best["step"]
    # The kept model is the best one: its checkpoint scores what the run reports.
    assert evaluate_checkpoint(best_ckpt, log=lambda *_: None) == pytest.approx(result.test)
    tests_at_best = [e for e in result.evaluations if e["split"] == "test" and e["step"] == best["step"]]
    assert {k: tests_at_best[-1][k] for k in ("auc", "gauc", "logloss")} == pytest.approx(result.test)
    assert os.path.exists(str(tmp_path / "last.toml")) and os.path.exists(str(tmp_path / "best.toml"))


def test_eval_only_and_predict_from_a_checkpoint(tmp_path, capsys):
    ckpt, scores, out = str(tmp_path / "c.pt"), str(tmp_path / "s.csv"), str(tmp_path / "m.json")
    common = _tiny_cli(tmp_path)
    assert main(["--epochs", "1", "--checkpoint", ckpt, "--json", out, *common]) == 0
    trained = json.load(open(out))["fused"]
    assert set(trained["test"]) == {"auc", "gauc", "logloss"}
    assert trained["epochs"][0]["test_gauc"] == trained["test"]["gauc"]
    assert main(["--eval-only", ckpt, "--json", out, *common]) == 0
    assert json.load(open(out)) == {"checkpoint": ckpt, "split": "test", **trained["test"]}
    assert main(["--predict", ckpt, "--out", scores, *common]) == 0
    with open(scores) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 80 and set(rows[0]) == {"user", "item", "score", "label"}  # 40 users x 2
    assert all(r["user"].startswith("U") and r["item"].startswith("I") and 0 < float(r["score"]) < 1 for r in rows)
    assert {r["label"] for r in rows} == {"0", "1"}
    assert main(["--predict", ckpt, *common]) == 2 and "--predict needs --out" in capsys.readouterr().err


def test_config_file_mirrors_the_flags_and_is_written_beside_the_checkpoint(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "dien"\nmax-steps = 2\nbatch_size = 16\nquiet = true\nmax_len = 6\n'
                   '[model_kwargs]\nembedding_dim = 4\n')
    ckpt = str(tmp_path / "c.pt")
    assert main(["--config", str(cfg), "--batch-size", "8", "--checkpoint", ckpt]) == 0
    saved = load_checkpoint_config(ckpt, {})
    assert (saved.model, saved.max_steps, saved.batch_size, saved.max_len) == ("dien", 2, 8, 6)
    assert saved.model_kwargs == {"embedding_dim": 4}
    written = str(tmp_path / "c.toml")
    argv, tables = read_config_file(written, _parser())
    assert tables["model_kwargs"] == {"embedding_dim": 4}
    again = _parser().parse_args(argv)
    assert (again.model, again.max_steps, again.batch_size, again.lr_decay) == ("dien", 2, 8, "none")
    cfg.write_text("batchsize = 3\n")
    assert main(["--config", str(cfg)]) == 2
    assert "unknown setting 'batchsize'" in capsys.readouterr().err


def test_empty_and_one_sided_data_are_errors(tmp_path):
    from interest_kernels.data.amazon import TEST_FILE, TRAIN_FILE

    d = tmp_path / "a"
    d.mkdir()
    (d / TRAIN_FILE).write_text("")
    (d / TEST_FILE).write_text("1\tu\ti\tc\t\t\n")
    with pytest.raises(ValueError, match="the train split is empty"):
        build_dataset(TrainConfig(data=f"amazon:{d}"))
    (d / TRAIN_FILE).write_text("1\tu\ti\tc\t\t\n0\tu\ti\tc\t\t\n")
    with pytest.raises(ValueError, match="the test split has 1 positive and 0 negative samples"):
        build_dataset(TrainConfig(data=f"amazon:{d}"))


def test_early_stopping_state_survives_a_resume(tmp_path):
    config = _tiny("din", epochs=6, valid_fraction=0.25, eval_every=1, early_stop="logloss", patience=2, dense_lr=0.05)
    dataset = build_dataset(config, str(tmp_path / "d"))
    quiet = dict(quiet=True, log=lambda *_: None)
    full = run(config, dataset=dataset, best_checkpoint=str(tmp_path / "b1.pt"), **quiet)
    ckpt, best = str(tmp_path / "c.pt"), str(tmp_path / "b2.pt")
    run(TrainConfig(**{**config.__dict__, "max_steps": 2}), dataset=dataset, checkpoint=ckpt, best_checkpoint=best, **quiet)
    resumed = run(config, dataset=dataset, resume=ckpt, best_checkpoint=best, **quiet)
    assert resumed.steps == full.steps and resumed.best["step"] == full.best["step"]
    assert resumed.test["auc"] == full.test["auc"] and resumed.test["logloss"] == full.test["logloss"]
