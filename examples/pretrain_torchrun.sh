#!/usr/bin/env bash
# Single-node pretraining with torchrun.
#   bash examples/pretrain_torchrun.sh                       # 8 processes, TP=2 PP=2 DP=2, mock data
#   NPROC=4 TP=2 PP=1 bash examples/pretrain_torchrun.sh --train-iters 50
# Knobs: NPROC (processes; default 8 or the GPU count), TP, PP, PYTHON; extra flags are appended
# to megalite-pretrain's (later flags win).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
NPROC=${NPROC:-8}
TP=${TP:-2}
PP=${PP:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  -m megalite.pretrain \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 \
  --micro-batch-size 2 --global-batch-size 16 --train-iters 20 --lr 1e-3 \
  --mock-data --vocab-size 512 --log-interval 5 --eval-iters 0 "$@"
