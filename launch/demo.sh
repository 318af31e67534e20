#!/usr/bin/env bash
# Quickstart: install, then generate one image with the tiny FLUX.2 preset on 2 CPU ranks (Ulysses 2).
# Writes out/flux-tiny.png and out/flux-tiny.json. Extra arguments go to `flux-dist generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/env.sh
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
.venv/bin/torchrun --nproc-per-node 2 -m flux_dist generate --config configs/tiny.yaml "$@"
