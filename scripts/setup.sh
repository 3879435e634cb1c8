#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install everything the
# project needs into it: torch (only if none is importable), triton, the build and test
# tools, the peer libraries the tests compare against, and the package itself with its
# compiled extension. Re-running is cheap: a stamp skips what is already done.
#
# A torch already installed for the system python (say a CUDA build on a GPU box) is
# reused through --system-site-packages; otherwise torch==2.13.0 is installed (on the
# project's CPU machines that is a local CPU wheel: never let pip pick a torch itself).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3 python3.11 python; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: no python3 found" >&2; exit 1; }

VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: reusing the torch of $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --disable-pip-version-check -q)

stamp="$( { cat requirements-test.txt requirements-distributed.txt setup.py; if [ -d csrc ]; then find csrc -type f | sort | xargs -r cat; fi; } | sha256sum | cut -d' ' -f1 )"
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$stamp" ] \
   && "$VPY" -c "import interest_kernels, torch" >/dev/null 2>&1; then
  exit 0
fi

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0"
  "${PIP[@]}" "torch==2.13.0"
fi
if ! "$VPY" -c "import triton" >/dev/null 2>&1; then
  echo "setup: installing triton"
  "${PIP[@]}" "triton==3.9.0"
fi
echo "setup: installing build and test tools"
"${PIP[@]}" setuptools wheel
"${PIP[@]}" -r requirements-test.txt
# Peer libraries, compared against in tests only. --no-deps: their pinned extras would
# pull another torch (DeepCTR-Torch) or ray (FuxiCTR); tests load only their layer files.
"${PIP[@]}" --no-deps "deepctr-torch==0.3.0" "fuxictr==2.3.10"
# torchrec for sharded tables (--tables sharded). --no-deps: torchrec would pull the CUDA
# fbgemm-gpu and tensordict an unpinned torch; the file pins the CPU build and each need.
"${PIP[@]}" --no-deps -r requirements-distributed.txt
echo "setup: building interest_kernels (and its extension)"
"${PIP[@]}" --no-build-isolation --no-deps -e .
echo "$stamp" > "$VENV/.setup-stamp"
