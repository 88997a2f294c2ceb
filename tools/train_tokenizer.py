"""Train a SentencePiece tokenizer on a JSONL corpus (for the quickstart and small experiments).

    python tools/train_tokenizer.py --input corpus.jsonl --output-prefix tok --vocab-size 4000

writes ``tok.model`` (and ``tok.vocab``) for ``--tokenizer-type SentencePieceTokenizer
--tokenizer-model tok.model``. Reads at most ``--max-sentences`` lines of text, sampled evenly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator


def _texts(path: str, key: str, limit_chars: int) -> Iterator[str]:
    seen = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                text = json.loads(line)[key]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{n}: cannot read key {key!r}: {e}") from None
            for piece in text.splitlines():
                if piece.strip():
                    yield piece
                    seen += len(piece)
            if seen >= limit_chars:
                return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="JSONL file")
    p.add_argument("--json-key", default="text")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--max-chars", type=int, default=20_000_000, help="text read for training")
    p.add_argument("--max-sentences", type=int, default=200_000)
    args = p.parse_args(argv)
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=_texts(args.input, args.json_key, args.max_chars),
        model_prefix=args.output_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        input_sentence_size=args.max_sentences,
        shuffle_input_sentence=True,
        character_coverage=0.9995,
        byte_fallback=True,
        num_threads=2,
        minloglevel=2,
    )
    print(f"wrote {args.output_prefix}.model (vocab {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
