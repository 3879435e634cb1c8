"""The peer libraries' layer files for the comparison tests: ``interest_kernels.bench.peers``
loaders that skip the test, rather than fail, when a library is not installed."""
from __future__ import annotations

import types

import pytest

from interest_kernels.bench import peers


def load_deepctr(module: str) -> types.ModuleType:
    """E.g. ``load_deepctr("deepctr_torch.layers.sequence")``; skips if not installed."""
    try:
        return peers.load_deepctr(module)
    except ImportError as exc:
        pytest.skip(str(exc))


def load_fuxictr(module: str) -> types.ModuleType:
    """E.g. ``load_fuxictr("fuxictr.pytorch.layers.attentions.target_attention")``."""
    try:
        return peers.load_fuxictr(module)
    except ImportError as exc:
        pytest.skip(str(exc))
