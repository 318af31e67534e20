#!/usr/bin/env bash
# Create ./.venv with flux-dist, Ray and the test tools (idempotent; re-run after pyproject.toml changes).
# On the CPU machines torch 2.14.1 + torchvision 0.29.1 install from local files; on a GPU cluster
# use your own environment instead: `pip install -e .` next to your torch (2.9 .. 2.14).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.flux-dist-installed
want=$(cat pyproject.toml launch/env.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,ray]"
  echo "$want" > "$stamp"
fi
