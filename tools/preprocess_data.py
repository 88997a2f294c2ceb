"""Tokenize a corpus into Megatron .bin/.idx datasets (same as the ``megalite-preprocess`` script).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --json-keys text --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \
        --append-eod --workers 2

Inputs: .jsonl / .json, their .gz / .zst, .parquet, folders of shards and globs (sorted).
See megalite/data/preprocess.py for the flags and guarantees, docs/data.md
for the tokenizer types and the gigatoken fast path.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalite.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
