#!/usr/bin/env bash
# Configure, build and run the C++ unit tests of the MBA operators and the serving
# end-to-end test (CMakeLists.txt).
# Usage: scripts/ctest.sh [build-dir]   (PYTHON selects the interpreter whose torch is used)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
BUILD="${1:-build/cmake}"
TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
IK_PYTHON="$("$PYTHON" -c 'import sys; print(sys.executable)')"  # for the serving end-to-end test
cmake -S . -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DIK_PYTHON="$IK_PYTHON"
cmake --build "$BUILD" -j "${JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure
