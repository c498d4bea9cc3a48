#!/usr/bin/env bash
# Launch UniAlignment training from the repository root (config paths are relative to it):
#   bash train_unialignment.sh CONFIG [--key value ...]
# One node, every local GPU (one CPU process where there is none; the trainer picks the backend):
#   bash train_unialignment.sh configs/stage1_t2i_caption.py --optimizer.lr 1e-5
# Several nodes with torchrun, run on each node with its own NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash train_unialignment.sh configs/stage2_multitask.py
# Several nodes with the deepspeed launcher, started once, over ssh:
#   HOSTFILE=hostfile bash train_unialignment.sh configs/stage2_multitask.py
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    echo "usage: [NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=#GPUs | HOSTFILE=path]" >&2
    echo "       bash $0 CONFIG [--key value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
if [[ ! -f $CONFIG ]]; then
    echo "error: config file not found: $CONFIG" >&2
    exit 2
fi

MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

if [[ -n ${HOSTFILE:-} ]]; then
    exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        scripts/train.py "$CONFIG" "$@"
fi

# Count GPUs the way the trainer will see them (CUDA_VISIBLE_DEVICES applies); none means one CPU process.
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" --nproc_per_node "$NPROC_PER_NODE" scripts/train.py "$CONFIG" "$@"
