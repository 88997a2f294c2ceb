#!/usr/bin/env bash
# Run the whole megalite test suite (ruff + pytest), installing .venv on first use.
#   bash scripts/test.sh                 everything, slow multi-process tests included
#   bash scripts/test.sh -m "not slow"   the quick subset
# Extra arguments go to pytest. The suite's wall time is printed at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
START=$(date +%s)
source scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
rc=0
echo "== ruff"
ruff check . || rc=1
ruff format --check . || rc=1
echo "== pytest"
python -m pytest "$@" || rc=$?
echo "== test suite wall time: $(( $(date +%s) - START )) s (exit $rc)"
exit $rc
