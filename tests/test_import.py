"""Importing the package stays cheap: no triton, no torch._dynamo, every subpackage reachable."""
import subprocess
import sys

import torch

from interest_kernels import _backend


def test_import_loads_neither_triton_nor_dynamo_and_exposes_subpackages():
    # Import and attribute access only: the first call of a ``torch.library.custom_op`` (the
    # MBA lookup, say) imports torch._dynamo inside torch, and so does building an optimiser.
    code = (
        "import sys, interest_kernels as ik\n"
        "assert ik.models.DIN and ik.data.load_movielens and ik.metrics.gauc and ik.nn and ik.optim\n"
        "import interest_kernels.train\n"
        "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_backend_marks_selection_constant_as_torch_compiler_does():
    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe and {k: getattr(probe, k) for k in vars(probe)} == {
        k: getattr(_backend._select_name, k) for k in vars(_backend._select_name)
    }
