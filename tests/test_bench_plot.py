"""The plot command turns a long-form CSV into one PNG per op, device and dtype, with the
speedups it should show."""
from __future__ import annotations

import pytest

from interest_kernels.bench import harness, plot


def _rows(times: dict[tuple[str, int], float]) -> list[harness.Row]:
    rows = []
    for (backend, T), ms in times.items():
        for mode in ("fwd", "full"):
            rows.append(harness.Row("target_attention", f"T{T}", {"B": 256, "T": T, "D": 36}, "torch.float32",
                                    backend, mode, ms, ms, ms))
    return rows


def test_speedups_and_pngs(tmp_path):
    machine = harness.Machine("cpu", "test cpu", "2.x", None, None, "abc", copy_gbps=1.0, when="2026-01-01T00:00:00Z")
    times = {("eager", 50): 10.0, ("eager", 100): 20.0, ("cpu", 50): 2.0, ("cpu", 100): 2.5,
             ("deepctr", 50): 30.0, ("deepctr", 100): 60.0}
    csv_path = str(tmp_path / "r.csv")
    harness.append_csv(csv_path, machine, _rows(times))
    lines = plot.newest(harness.read_csv(csv_path))
    series = plot.speedup_series(lines, "T", "eager")
    assert series[("cpu", "fwd")] == [(50, pytest.approx(5.0)), (100, pytest.approx(8.0))]
    assert plot.speedup_series(lines, "T", "deepctr")[("cpu", "full")] == [(50, 15.0), (100, 24.0)]
    assert plot.speedup_series(lines, "B", "eager") == {}  # B never varies here
    pytest.importorskip("matplotlib")
    written = plot.plot(csv_path, str(tmp_path / "plots"))
    assert [p.rsplit("/", 1)[1] for p in written] == ["target_attention_cpu_float32.png"]
    with open(written[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
