"""Load layer modules of the peer libraries (DeepCTR-Torch, FuxiCTR) for comparisons.

Neither package's ``__init__`` is run: DeepCTR-Torch's starts a network version check
and FuxiCTR's pulls ray. Each package (and each subpackage on the way) is registered as
an empty namespace pointing at the installed files: DeepCTR-Torch's root only (its
subpackages' ``__init__`` files are light and needed), every FuxiCTR package, so only
the layer files asked for (and what they import) are executed. Tests call these through ``pytest.importorskip``-like skips.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import pytest


def _stub_root(root: str) -> str:
    """Register ``root`` as an empty package over its installed folder; return the folder."""
    if root not in sys.modules:
        spec = importlib.util.find_spec(root)
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"peer library {root} is not installed")
        pkg = types.ModuleType(root)
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules[root] = pkg
    return sys.modules[root].__path__[0]


def load_deepctr(module: str) -> types.ModuleType:
    """E.g. ``load_deepctr("deepctr_torch.layers.sequence")``; skips if not installed."""
    _stub_root("deepctr_torch")
    return importlib.import_module(module)


def load_fuxictr(module: str) -> types.ModuleType:
    """E.g. ``load_fuxictr("fuxictr.pytorch.layers.attentions.target_attention")``."""
    base = _stub_root("fuxictr")
    for folder, _, files in os.walk(base):
        if "__init__.py" not in files or folder == base:
            continue
        name = "fuxictr." + os.path.relpath(folder, base).replace(os.sep, ".")
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [folder]
            sys.modules[name] = pkg
    return importlib.import_module(module)
