#!/usr/bin/env bash
# Install, then run the whole test suite (CPU, gloo, float32). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/env.sh
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
.venv/bin/ruff check flux_dist tests launch bench
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
