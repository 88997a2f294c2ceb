#!/usr/bin/env bash
# Create (or refresh) the project-local virtual environment .venv and install megalite into it.
# Sourced by scripts/quickstart.sh and scripts/test.sh; safe to run by hand.
#
# Knobs (environment):
#   MEGALITE_VENV=.venv          where the venv lives
#   MEGALITE_PYTHON=python3      interpreter used to create it
#   MEGALITE_EXTRAS=dev,mpi,deepspeed   extras to install
#
# torch: on a machine without CUDA we pin torch==2.13.0 (the CPU build; an unpinned torch would
# pull a multi-GB CUDA build). If the creating interpreter already has a CUDA-enabled torch, the
# venv is made with --system-site-packages and that torch is kept as it is.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MEGALITE_VENV:-$ROOT/.venv}
PY=${MEGALITE_PYTHON:-python3}
EXTRAS=${MEGALITE_EXTRAS:-dev,mpi,deepspeed}
TORCH_PIN="torch==2.13.0"

stamp_of() { cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16; echo "$EXTRAS"; }
WANT=$(stamp_of)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.megalite-stamp" 2>/dev/null)" = "$WANT" ]; then
  return 0 2>/dev/null || exit 0
fi

say() { echo "[setup_env] $*" >&2; }
have_cuda_torch=0
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  have_cuda_torch=1
fi
if [ ! -x "$VENV/bin/python" ]; then
  if [ $have_cuda_torch = 1 ]; then
    say "creating $VENV (keeping the system's CUDA torch via --system-site-packages)"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    say "creating $VENV"
    "$PY" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip >/dev/null
if [ $have_cuda_torch = 0 ]; then
  say "installing $TORCH_PIN (CPU build)"
  "${PIP[@]}" "$TORCH_PIN"
  # constraints keep every later resolver step (deepspeed, transformers, ...) on this torch
  CONSTRAINT=("-c" "/dev/stdin")
  echo "$TORCH_PIN" | "${PIP[@]}" "${CONSTRAINT[@]}" -e "$ROOT[$EXTRAS]"
else
  "${PIP[@]}" -e "$ROOT[$EXTRAS]"
fi
echo "$WANT" > "$VENV/.megalite-stamp"
say "ready: $VENV"
