#!/usr/bin/env bash
# torchrun for flux-dist, one node or many. Arguments go to `flux-dist generate` (--config ... etc.).
#
# One node, 8 GPUs:
#   NPROC_PER_NODE=8 bash launch/torchrun.sh --config configs/dev-8gpu.yaml --model /models/FLUX.2-dev
# Two nodes x 8 GPUs: run the same line on every node, HEAD = a host name or address of node 0:
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=HEAD:29500 bash launch/torchrun.sh --config configs/dev-8gpu.yaml
# which is exactly:
#   torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 --rdzv-id flux-dist \
#       -m flux_dist generate --config ...
#
# Variables: NPROC_PER_NODE (default: the GPUs nvidia-smi lists, else 1), NNODES (default 1),
# RDZV_ENDPOINT (HOST:PORT of the c10d rendezvous, needed when NNODES > 1), RDZV_ID (default
# flux-dist; one id per job), NODE_RANK (optional; c10d assigns ranks itself), PYTHON (default python),
# COMMAND (default generate: the flux-dist subcommand).
# Site network variables (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, GLOO_SOCKET_IFNAME, ...) are read from
# the environment as set; nothing is hard-coded here.
set -euo pipefail
PY=${PYTHON:-python}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=HOST:PORT (node 0) when NNODES > 1}"
  rdzv=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-flux-dist}")
  [ -z "${NODE_RANK:-}" ] || rdzv+=(--node-rank "$NODE_RANK")
elif [ -n "${RDZV_ENDPOINT:-}" ]; then
  rdzv=(--nnodes 1 --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-flux-dist}")
else
  rdzv=(--standalone)
fi
# --max-restarts 0: a failed rank ends the run (torchrun stops the other ranks) instead of restarting it.
# launch/torchrun.py is torchrun itself (same arguments) that keeps flux-dist's exit codes (2 bad input, 3 some
# batch lines failed, 1 internal error, 128+N killed by signal N) and prints one line per failed rank instead of
# torchrun's ChildFailedError traceback. COMMAND (default generate) picks the subcommand, e.g. COMMAND=serve.
exec "$PY" "$(dirname "$0")/torchrun.py" "${rdzv[@]}" --nproc-per-node "$NPROC_PER_NODE" --max-restarts 0 \
  -m flux_dist "${COMMAND:-generate}" "$@"
