#!/usr/bin/env bash
# The MoE demo of issue #14, end to end on one CPU box (8 gloo processes):
#   1. the quickstart data (scripts/quickstart.sh's corpus, tokenizer and .bin/.idx; reused)
#   2. a 4-layer MoE (8 experts, top-2; examples/configs/moe_demo.yaml) trains 2N iterations
#      straight at TP2 x PP2 x EP2, then again as N + save + resume + N
#   3. the checkpoint is resharded to TP1 x PP1 x EP1 and exported as a MixtralForCausalLM
#   4. examples/moe_demo_check.py: the two runs' losses and grad norms are bit-identical, and
#      transformers' logits equal megalite's
# Knobs: QS_DIR (quickstart data, default runs/quickstart), DEMO_DIR (runs/moe_demo), N (20),
# PYTHON (an interpreter with megalite installed; default: the project's .venv, made on first use)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  source scripts/setup_env.sh
  PYTHON="$ROOT/.venv/bin/python"
fi
export OMP_NUM_THREADS=1
QS=${QS_DIR:-$ROOT/runs/quickstart}
DEMO=${DEMO_DIR:-$ROOT/runs/moe_demo}
N=${N:-20}
mkdir -p "$QS"
step() { echo; echo "== $*"; }

step "quickstart data in $QS"
[ -s "$QS/corpus.jsonl" ] || "$PYTHON" tools/make_corpus.py --out "$QS/corpus.jsonl" --target-mb 6
[ -s "$QS/tok.model" ] || "$PYTHON" tools/train_tokenizer.py --input "$QS/corpus.jsonl" \
  --output-prefix "$QS/tok" --vocab-size 2000
[ -s "$QS/corpus_text_document.idx" ] || "$PYTHON" tools/preprocess_data.py \
  --input "$QS/corpus.jsonl" --output-prefix "$QS/corpus" --json-keys text \
  --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$QS/tok.model" --append-eod \
  --workers 2

rm -rf "$DEMO"
mkdir -p "$DEMO"
TRAIN=(--config examples/configs/moe_demo.yaml --train-iters $((2 * N))
  --data-path "$QS/corpus_text_document" --data-cache-path "$QS/cache"
  --tokenizer-model "$QS/tok.model")
run() {
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 8 -m megalite.pretrain "$@" \
    2>&1 | grep -v -E '^\*+$|OMP_NUM_THREADS'
}

step "iterations 1..$((2 * N)) straight at TP2 x PP2 x EP2"
run "${TRAIN[@]}" --metrics-file "$DEMO/straight.jsonl"
step "iterations 1..$N, save"
CK=(--save "$DEMO/ckpt" --load "$DEMO/ckpt" --metrics-file "$DEMO/resumed.jsonl")
run "${TRAIN[@]}" "${CK[@]}" --exit-interval "$N"
step "resume for iterations $((N + 1))..$((2 * N))"
run "${TRAIN[@]}" "${CK[@]}"

step "reshard to TP1 x PP1 x EP1"
"$PYTHON" tools/checkpoint_reshard.py --load "$DEMO/ckpt" --save "$DEMO/ep1" \
  --target-tensor-parallel-size 1 --target-pipeline-model-parallel-size 1 \
  --target-expert-model-parallel-size 1
step "export to Hugging Face"
"$PYTHON" tools/export_hf.py --load "$DEMO/ep1" --output "$DEMO/hf"
step "check"
"$PYTHON" examples/moe_demo_check.py --demo "$DEMO"
