#!/usr/bin/env bash
# Launch UniAlignment training from the repository root (config paths are relative to it):
#   bash train_unialignment.sh CONFIG [--key value ...]
# One node, every local GPU (one CPU process where there is none; the trainer picks the backend):
#   bash train_unialignment.sh configs/stage1_t2i_caption.py --optimizer.lr 1e-5
# Several nodes with torchrun, run on each node with its own NODE_RANK (work_dir on storage every node sees):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash train_unialignment.sh configs/stage2_multitask.py
# Several nodes with the deepspeed launcher, started once, over ssh:
#   HOSTFILE=hostfile bash train_unialignment.sh configs/stage2_multitask.py
# Before launching, `scripts/train.py CONFIG --check` validates the config, the data and the component folders for
# this world size (no weights loaded), so that a mistake is one line and exit status 2, not a failed launch.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    echo "usage: [NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=free NPROC_PER_NODE=#GPUs | HOSTFILE=path]" >&2
    echo "       bash $0 CONFIG [--key value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
if [[ ! -f $CONFIG ]]; then
    echo "error: config file not found: $CONFIG" >&2
    exit 2
fi

NNODES=${NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [[ -z ${MASTER_PORT:-} ]]; then
    if [[ $NNODES == 1 && -z ${HOSTFILE:-} ]]; then
        # Alone on this machine: a free port, so that two runs on one machine do not clash on a fixed one.
        MASTER_PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    else
        MASTER_PORT=29500  # every node must agree on it: set MASTER_PORT on each to choose another
    fi
fi

if [[ -n ${HOSTFILE:-} ]]; then
    WORLD_SIZE=$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) {split($i, a, "="); n += a[2]}} END {print n + 0}' "$HOSTFILE")
    python scripts/train.py "$CONFIG" "$@" --check --world-size "$WORLD_SIZE"
    exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        scripts/train.py "$CONFIG" "$@"
fi

# Count GPUs the way the trainer will see them (CUDA_VISIBLE_DEVICES applies); none means one CPU process.
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
python scripts/train.py "$CONFIG" "$@" --check --world-size $((NNODES * NPROC_PER_NODE))
exec torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" --nproc_per_node "$NPROC_PER_NODE" scripts/train.py "$CONFIG" "$@"
