"""The documentation that ships with the project: docs/ holds the op contract (the same
text as the team's SPEC.md), every link in the README and docs/ resolves, and every
public function, module, optimizer and model states the shapes it takes."""
from __future__ import annotations

import inspect
import os
import re

import pytest

import interest_kernels as ik
import interest_kernels.models as models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
# A shape as the docstrings write it: "(B, T, D)", "(B,)", "(3H, I)", "(N, ...)".
SHAPE = re.compile(r"\((?:\d*[A-Z]\w*|\d+|\.\.\.)(?:, ?(?:\d*[A-Z]\w*|\d+|\.\.\.))*,?\)")
# Public names that take or return no tensor, so have no shape to state.
NO_SHAPES = {"BackendUnavailableError", "BackendFallbackWarning", "use_backend", "value_checks", "BACKENDS", "MODELS", "__version__",
             "nn", "optim", "make_optimizers", "train_step", "models", "data"}


def _public():
    for module, names in ((ik, ik.__all__), (ik.nn, ik.nn.__all__), (ik.optim, ik.optim.__all__),
                          (models, models.__all__)):
        for name in names:
            if name not in NO_SHAPES:
                yield pytest.param(getattr(module, name), id=f"{module.__name__}.{name}")


@pytest.mark.parametrize("obj", list(_public()))
def test_public_docstring_states_shapes(obj):
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):  # a class may state its shapes in the class or forward docstring
        doc += "\n" + (inspect.getdoc(getattr(obj, "forward", None)) or "")
    assert doc.strip(), f"{obj!r} has no docstring"
    assert SHAPE.search(doc), f"the docstring of {obj!r} states no shape such as (B, T, D)"


def test_shape_pattern_is_strict():
    assert SHAPE.search("keys: (B, T, D) float")
    assert SHAPE.search("weight_ih: (3H, I)") and SHAPE.search("lengths (B,)")
    assert not SHAPE.search("the backend (see info) and a float (default 1)")


def test_contract_ships_with_the_project():
    spec = os.path.join(DOCS, "SPEC.md")
    assert os.path.isfile(spec)
    team_copy = os.path.join(ROOT, "..", "shared", "SPEC.md")
    if not os.path.isfile(team_copy):
        pytest.skip("no ../shared/SPEC.md beside this checkout to compare with")
    with open(spec) as ours, open(team_copy) as theirs:
        assert ours.read() == theirs.read(), "docs/SPEC.md differs from the team's SPEC.md: copy it over"


def _markdown_files():
    yield os.path.join(ROOT, "README.md")
    for name in sorted(os.listdir(DOCS)):
        if name.endswith(".md"):
            yield os.path.join(DOCS, name)
    yield os.path.join(ROOT, "bench", "results", "README.md")


@pytest.mark.parametrize("path", list(_markdown_files()), ids=os.path.basename)
def test_relative_links_resolve(path):
    with open(path) as f:
        text = f.read()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        assert resolved.startswith(ROOT + os.sep), f"{path} links outside the repository: {target}"
        assert os.path.exists(resolved), f"{path} links to a missing file: {target}"
