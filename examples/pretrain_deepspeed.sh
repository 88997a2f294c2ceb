#!/usr/bin/env bash
# Pretraining through the DeepSpeed engine, started by the `deepspeed` launcher.
#   ZERO=2 bash examples/pretrain_deepspeed.sh             # 2 ranks, DP=2, ZeRO stage 2
#   NPROC=4 TP=2 ZERO=1 bash examples/pretrain_deepspeed.sh
# Knobs: ZERO (1|2|3: examples/ds_zero$ZERO.json), NPROC, TP, PYTHON; extra flags appended.
# On a CPU-only machine DS_ACCELERATOR=cpu is set and DeepSpeed uses gloo.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
DEEPSPEED=${DEEPSPEED:-$(dirname "$PYTHON")/deepspeed}
ZERO=${ZERO:-1}
NPROC=${NPROC:-2}
TP=${TP:-1}
if ! "$PYTHON" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$DEEPSPEED" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29533}" \
  --module megalite.pretrain --deepspeed --deepspeed_config "$ROOT/examples/ds_zero$ZERO.json" \
  --tensor-model-parallel-size "$TP" \
  --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 \
  --micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 1e-3 \
  --mock-data --vocab-size 512 --log-interval 2 --eval-iters 0 "$@"
