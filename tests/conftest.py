"""Test setup: the Triton interpreter on CPU-only machines, poisoned allocations, seeds.

TRITON_INTERPRET must be set before triton is first imported, so it is set here at
collection time, before any test module imports the package's Triton kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from interest_kernels.testing import poison_empty  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Fresh, reproducible random inputs per test; every library allocation starts NaN."""
    torch.manual_seed(0x1D1)
    with poison_empty():
        yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models: on a shared machine more
    threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def pytest_configure(config):
    config.addinivalue_line("markers", "peers: compares against DeepCTR-Torch / FuxiCTR")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
