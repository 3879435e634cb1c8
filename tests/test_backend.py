"""Backend selection: preference order, forcing, and errors that explain themselves."""
import pytest
import torch

from interest_kernels import BackendUnavailableError, use_backend
from interest_kernels._backend import ENV_VAR, Op, forced_backend, triton_unavailable_reason


def _op():
    op = Op("toy", preference={"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")})
    op.register("reference")(lambda: "reference")
    op.register("cpu", why_not=lambda device, **_: None if device.type == "cpu" else "CPU tensors only")(
        lambda: "cpu"
    )
    op.register("triton", why_not=lambda device, **_: "no triton in this toy")(lambda: "triton")
    return op


def test_preference_order_by_device():
    op = _op()
    assert op.select(torch.device("cpu")).name == "cpu"
    assert op.select(torch.device("cuda")).name == "reference"


def test_use_backend_forces_and_restores():
    op = _op()
    with use_backend("reference"):
        assert forced_backend() == "reference"
        assert op.select(torch.device("cpu")).name == "reference"
        with use_backend(None):
            assert op.select(torch.device("cpu")).name == "cpu"
    assert op.select(torch.device("cpu")).name == "cpu"


def test_forced_backend_that_cannot_run_says_why():
    op = _op()
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="no triton in this toy"):
        op.select(torch.device("cpu"))
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="no cuda implementation"):
        op.select(torch.device("cpu"))


def test_no_backend_lists_every_reason():
    op = Op("toy", preference={"cpu": ("triton", "cpu")})
    op.register("triton", why_not=lambda **_: "reason one")(lambda: None)
    op.register("cpu", why_not=lambda **_: "reason two")(lambda: None)
    with pytest.raises(BackendUnavailableError) as err:
        op.select(torch.device("cpu"))
    assert "reason one" in str(err.value) and "reason two" in str(err.value)


def test_environment_variable(monkeypatch):
    op = _op()
    monkeypatch.setenv(ENV_VAR, "reference")
    assert op.select(torch.device("cpu")).name == "reference"
    with use_backend("cpu"):
        assert op.select(torch.device("cpu")).name == "cpu"
    monkeypatch.setenv(ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        forced_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("gpu"):
            pass


def test_triton_reason_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in triton_unavailable_reason(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_unavailable_reason(torch.device("cpu")) is None


def test_selection_traces_under_torch_compile():
    op = _op()

    def f(x):
        return x * 2 if op.select(x.device).name == "reference" else x * 3

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    with use_backend("reference"):
        assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 2.0))
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2)), torch.full((2,), 3.0))
