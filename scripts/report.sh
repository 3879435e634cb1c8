#!/usr/bin/env bash
# The main job: set up .venv (scripts/setup.sh), say what this machine offers, then run
# the validation and benchmark report (every backend checked against the eager reference
# on the benchmark inputs, then timed against eager and torch.compile of the reference).
# Extra arguments go to the report, e.g. `bash scripts/report.sh --ops gru_scan --compile on`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m interest_kernels.info
.venv/bin/python -m interest_kernels.bench "$@"
