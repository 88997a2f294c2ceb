#!/usr/bin/env bash
# Pretraining under MPI (mpiexec/mpirun): rank and size come from the MPI environment and the
# rendezvous address is broadcast over mpi4py (pip install 'megalite[mpi]').
#   bash examples/pretrain_mpiexec.sh                      # 4 ranks, TP=2 PP=2
#   NP=8 TP=2 PP=2 bash examples/pretrain_mpiexec.sh --train-iters 50
# Knobs: NP (ranks), TP, PP, MPIEXEC (default: the venv's mpiexec), PYTHON; extra flags appended.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
MPIEXEC=${MPIEXEC:-$(dirname "$PYTHON")/mpiexec}
NP=${NP:-4}
TP=${TP:-2}
PP=${PP:-2}
exec "$MPIEXEC" -n "$NP" -env OMP_NUM_THREADS 1 "$PYTHON" -m megalite.pretrain \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 \
  --micro-batch-size 2 --global-batch-size 8 --train-iters 20 --lr 1e-3 \
  --mock-data --vocab-size 512 --log-interval 5 --eval-iters 0 "$@"
