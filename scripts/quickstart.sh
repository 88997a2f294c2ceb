#!/usr/bin/env bash
# The megalite quickstart: installs .venv on first use, then runs the main job.
# Today: brings up TP=2 x PP=2 x DP=2 on 8 gloo processes with torchrun and prints the layout.
# (Later stages extend this script: corpus -> tokenizer -> preprocess -> train -> resume.)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH" OMP_NUM_THREADS=1
python -m torch.distributed.run --standalone --nproc-per-node 8 examples/show_layout.py \
  --tp 2 --pp 2 --backend gloo
