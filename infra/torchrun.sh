#!/usr/bin/env bash
# Launch MicroDiT training on one 8xH100 node (default) or several, with torchrun.
#
#   infra/torchrun.sh --recipe paper --data /data/latents/sa1b /data/latents/cc12m --out runs/paper
#   infra/torchrun.sh --config runs/paper/train/stage1-<hash>/config.json        # one stage from its config
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 infra/torchrun.sh --recipe paper ...  # on node 0 of 2
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 infra/torchrun.sh --recipe paper ...  # on node 1 of 2
#
# Every argument goes to `python -m microdit.training` (see its --help). Re-running the same command after
# a crash resumes each stage from its last checkpoint; finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC_PER_NODE="${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}"   # GPUs on this node (8 on 8xH100)
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python

if [ "${NPROC_PER_NODE}" -lt 1 ]; then
  echo "no GPU found (nvidia-smi -L); set NPROC_PER_NODE to run on CPU processes" >&2
  exit 1
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"       # per process: 8 processes x 8 threads on a 192-core node
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

if [ "$NNODES" = "1" ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" -m microdit.training "$@"
else
  exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --nproc_per_node="$NPROC_PER_NODE" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv_id="${RDZV_ID:-micro-budget}" -m microdit.training "$@"
fi
