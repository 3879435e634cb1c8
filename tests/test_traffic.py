"""The traffic meter counts what an interpreted kernel loads, stores and multiplies."""
import json
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the traffic meter runs kernels under the Triton interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from interest_kernels.bench import traffic  # noqa: E402
from interest_kernels.bench.meter import TrafficMeter  # noqa: E402


@triton.jit
def _known_traffic_kernel(x_ptr, a_ptr, b_ptr, y_ptr, c_ptr, n, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    active = lanes < n
    # one float per 32-byte sector, read twice; masked-off lanes must not count
    x = tl.load(x_ptr + lanes * 8, mask=active, other=0.0)
    x += tl.load(x_ptr + lanes * 8, mask=active, other=0.0)
    tl.store(y_ptr + lanes, x, mask=active)
    rows = tl.arange(0, 16)
    ks = tl.arange(0, 32)
    a = tl.load(a_ptr + rows[:, None] * 32 + ks[None, :])
    b = tl.load(b_ptr + ks[:, None] * 16 + rows[None, :])
    tl.store(c_ptr + rows[:, None] * 16 + rows[None, :], tl.dot(a, b, input_precision="ieee"))


def test_meter_counts_a_hand_written_kernel():
    n, block = 10, 16
    x = torch.randn(block * 8)
    a, b = torch.randn(16, 32), torch.randn(32, 16)
    y, c = torch.zeros(block), torch.zeros(16, 16)
    with TrafficMeter() as meter, meter.phase("only"):
        _known_traffic_kernel[(2,)](x, a, b, y, c, n, BLOCK=block)
    (rec,) = meter.records
    assert (rec.kernel, rec.phase, rec.launches, rec.grids) == ("_known_traffic_kernel", "only", 1, [(2,)])
    assert rec.options["BLOCK"] == block
    per_program_loaded = 2 * n * 4 + (16 * 32 + 32 * 16) * 4
    per_program_stored = n * 4 + 16 * 16 * 4
    assert rec.bytes_loaded == 2 * per_program_loaded
    assert rec.bytes_stored == 2 * per_program_stored
    # both programs touch the same addresses: sectors are counted once per kernel
    sectors = lambda nbytes: -(-nbytes // 32)  # noqa: E731  (tensors are 64-byte aligned)
    assert rec.sectors_loaded == n + sectors(a.nbytes) + sectors(b.nbytes)
    assert rec.sectors_stored == sectors(n * 4) + sectors(c.nbytes)
    assert rec.by_argument["x_ptr"] == [2 * 2 * n * 4, 0]
    assert rec.by_argument["c_ptr"] == [0, 2 * c.nbytes]
    assert dict(rec.dot_shapes) == {(16, 16, 32, "fp32/ieee"): 2}
    assert rec.dot_flops["fp32/ieee"] == 2 * 2 * 16 * 16 * 32
    torch.testing.assert_close(c, a @ b)
    assert torch.equal(y[:n], 2 * x[::8][:n]) and not y[n:].any()


def test_meter_on_the_gru_scan_reads_gi_once_and_writes_states_once(tmp_path):
    B, T, H = 3, 4, 8
    case = traffic.gru_scan_case(B, T, H, "augru", torch.float32)
    records = {(r.phase, r.kernel): r for r in traffic.meter_case(case)}
    fwd = records["fwd", "_gru_scan_fwd_kernel"]
    assert fwd.by_argument["gi_ptr"][0] == B * T * 3 * H * 4
    assert fwd.by_argument["states_ptr"] == [0, B * T * H * 4]
    assert fwd.by_argument["att_ptr"][0] == B * T * 4
    assert sum(fwd.dot_flops.values()) > 0
    assert ("bwd", "_gru_scan_bwd_kernel") in records
    summary = traffic.summarize(case, list(records.values()), 10e12, 0.0)
    assert summary["phases"]["fwd"]["floor_bytes"] == case.floors["fwd"].bytes > 0


def test_cli_writes_json_and_markdown(tmp_path):
    out = tmp_path / "t.json"
    assert traffic.main(["--ops", "dice", "--dtypes", "float32", "--dice", "64x8", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (res,) = doc["results"]
    assert {k["phase"] for k in res["kernels"]} == {"fwd", "bwd"}
    assert res["phases"]["fwd"]["bytes"] >= 2 * 64 * 8 * 4  # x read and y written at least once
    assert "| dice N64_C8 | float32 | fwd |" in (tmp_path / "t.md").read_text()
