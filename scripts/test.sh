#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup.sh), run the Python test suite (Triton
# kernels run on CPU through the interpreter when no GPU is present; the benchmark cases
# run once each as smoke tests), then the C++ unit tests under ctest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k gru -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m interest_kernels.info
.venv/bin/python -m pytest tests bench -q -ra --benchmark-disable -p no:cacheprovider "$@"
if [ $# -eq 0 ] && [ -f scripts/ctest.sh ]; then
  bash scripts/ctest.sh
fi
