"""The info command and the benchmark harness run and say something true."""
import json
import os

import pytest
import torch

import interest_kernels
from interest_kernels.bench import harness
from interest_kernels.bench.__main__ import main as bench_main
from interest_kernels.bench.cases import ALL_CASES
from interest_kernels.info import report


def test_info_lists_every_op_and_reason():
    text = report()
    assert f"torch {torch.__version__}" in text
    for op in ("target_attention", "gru_scan", "dice", "mba_update", "dien_aux_loss"):
        assert f"{op} on cpu:" in text
    assert "interest_kernels._C" in text


def test_floor_prices_bytes_and_flops():
    m = harness.Machine("cpu", "x", "t", None, None, None, copy_gbps=10.0, matmul_tflops={"float32": 1.0})
    assert harness.floor_ms(harness.Floor(bytes=1e9, flops=0), m, torch.float32) == pytest.approx(100.0)
    assert harness.floor_ms(harness.Floor(bytes=0, flops=1e12), m, torch.float32) == pytest.approx(1000.0)


@pytest.mark.parametrize("op", sorted(ALL_CASES))
def test_run_case_checks_and_times_every_backend(op):
    machine = harness.Machine("cpu", "x", "t", None, None, None, copy_gbps=10.0, matmul_tflops={"float32": 0.1})
    case = next(iter(ALL_CASES[op]("smoke")))
    rows = harness.run_case(case, torch.device("cpu"), machine, compile_baseline=False, budget_s=0.01,
                            log=lambda _: None)
    timed = [r for r in rows if r.p50_ms is not None]
    assert {r.mode for r in timed} == set(case.modes)
    assert any(r.backend == "eager" for r in timed)
    for r in timed:
        assert r.p50_ms > 0 and r.fraction_of_floor is not None
        if r.mode not in ("bwd", "full") and "peer" not in r.note:
            assert r.max_abs_err is not None and r.max_abs_err < 1e-4, r
    assert any(r.backend == "triton" and r.note.startswith("skipped") for r in rows) or op not in (
        "target_attention", "gru_scan", "dice")


def test_bench_main_writes_results(tmp_path):
    out, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    args = ["--ops", "dice", "--shapes", "smoke", "--no-compile", "--budget", "0.01", "--device", "cpu",
            "--out", str(out), "--csv", str(csv_path)]
    assert bench_main(args) == 0
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["rows"]
    assert (tmp_path / "r.md").read_text().startswith("Machine:")
    first = harness.read_csv(str(csv_path))
    assert bench_main(args) == 0  # a second run appends to the CSV
    lines = harness.read_csv(str(csv_path))
    assert len(lines) == 2 * len(first) > 0
    assert {line["mode"] for line in lines} == {"fwd", "bwd", "full"}
    assert all(line["torch"] == torch.__version__ and line["p50_ms"] > 0 for line in lines)


def test_default_paths_follow_the_repository_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert harness.RESULTS_DIR == os.path.join(os.path.dirname(os.path.dirname(interest_kernels.__file__)),
                                               "bench", "results")


def test_spread_note_flags_a_busy_machine():
    assert harness.spread_note(1.0, 1.4) == ""
    assert harness.spread_note(1.0, 2.0).startswith("noisy")
    assert interest_kernels.__version__
