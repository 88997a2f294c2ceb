#!/usr/bin/env bash
# The megalite quickstart, end to end on one CPU box (a few minutes on 2 cores):
#   1. install .venv on first use
#   2. build a ~6 MB real-text corpus from text already on the machine (no download)
#   3. train a SentencePiece tokenizer on it and preprocess to Megatron .bin/.idx
#   4. train a tiny GPT with TP=2 x PP=2 x DP=2 (ZeRO-1) on 8 gloo processes, save a checkpoint
#   5. resume from it for more iterations, then report the loss against the unigram baseline
# Knobs: QS_DIR (work folder, default runs/quickstart), ITERS (first leg, 200), MORE (second, 100)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH" OMP_NUM_THREADS=1
QS=${QS_DIR:-$ROOT/runs/quickstart}
ITERS=${ITERS:-200}
MORE=${MORE:-100}
mkdir -p "$QS"
step() { echo; echo "== $*"; }

step "corpus"
[ -s "$QS/corpus.jsonl" ] || python tools/make_corpus.py --out "$QS/corpus.jsonl" --target-mb 6
step "tokenizer"
[ -s "$QS/tok.model" ] || python tools/train_tokenizer.py --input "$QS/corpus.jsonl" \
  --output-prefix "$QS/tok" --vocab-size 2000
step "preprocess"
[ -s "$QS/corpus_text_document.idx" ] || python tools/preprocess_data.py \
  --input "$QS/corpus.jsonl" --output-prefix "$QS/corpus" --json-keys text \
  --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$QS/tok.model" --append-eod \
  --workers 2

rm -rf "$QS/ckpt" "$QS/tensorboard" "$QS/metrics.jsonl"
# The model, layout and optimizer are in examples/configs/quickstart.yaml; flags add the paths.
TRAIN=(--config examples/configs/quickstart.yaml --train-iters $((ITERS + MORE))
  --data-path "$QS/corpus_text_document" --data-cache-path "$QS/cache"
  --tokenizer-model "$QS/tok.model" --save "$QS/ckpt" --load "$QS/ckpt"
  --tensorboard-dir "$QS/tensorboard" --metrics-file "$QS/metrics.jsonl")
run() { python -m torch.distributed.run --standalone --nproc-per-node 8 -m megalite.pretrain "$@"; }

step "train iterations 1..$ITERS on 8 ranks (TP=2 x PP=2 x DP=2), save"
run "${TRAIN[@]}" --exit-interval "$ITERS" 2>&1 | grep -v -E '^\*+$|OMP_NUM_THREADS'
step "resume from $QS/ckpt for iterations $((ITERS + 1))..$((ITERS + MORE))"
run "${TRAIN[@]}" 2>&1 | grep -v -E '^\*+$|OMP_NUM_THREADS'

step "report"
python tools/quickstart_report.py --metrics "$QS/metrics.jsonl" \
  --data-prefix "$QS/corpus_text_document"
echo "checkpoint:  $QS/ckpt (latest: iteration $(cat "$QS/ckpt/latest_checkpointed_iteration.txt"))"
echo "tensorboard: $QS/tensorboard   (tensorboard --logdir $QS/tensorboard)"
