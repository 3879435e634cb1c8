"""Importing the package stays cheap: no triton, no torch._dynamo, every subpackage reachable."""
import subprocess
import sys

import torch

from interest_kernels import _backend


def test_import_loads_neither_triton_nor_dynamo_and_exposes_subpackages():
    code = (
        "import sys, interest_kernels as ik\n"
        "assert ik.models.DIN and ik.data.load_movielens and ik.metrics.gauc and ik.nn and ik.optim\n"
        # A DIEN forward and backward on the CPU (target attention, GRU scans, aux loss, Dice);
        # not an optimiser step: torch.optim itself imports torch._dynamo.
        "from interest_kernels.train import TrainConfig, build_dataset, build_model\n"
        "c = TrainConfig(model='dien', max_len=4, device='cpu', data_kwargs=dict(num_users=8, num_items=20,\n"
        "    num_cats=4, train_per_user=2, test_per_user=2, min_len=1, max_len=4), model_kwargs=dict(embedding_dim=4))\n"
        "ds = build_dataset(c)\n"
        "import torch; build_model(c, ds).loss(ds.train.batch(torch.arange(8)))[0].backward()\n"
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
