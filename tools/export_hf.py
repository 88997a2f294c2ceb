"""Export a megalite checkpoint as a Hugging Face folder (LlamaForCausalLM or GPT2LMHeadModel).

    python tools/export_hf.py --load DIR --output OUT [--true-vocab-size N] [--max-shard-size-mb M]

Writes OUT/config.json, OUT/model.safetensors (numbered shards + index past M MB) and the
tokenizer files of the run (Hugging Face tokenizer.json, SentencePiece .model, GPT-2
vocab/merges), reading the checkpoint one layer at a time at any TP/PP. Load it with
``transformers.AutoModelForCausalLM.from_pretrained(OUT)``. A model neither class can represent
is refused (exit status 2) with what does not fit. See megalite/checkpoint/hf.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalite.checkpoint.format import CheckpointError  # noqa: E402
from megalite.checkpoint.hf_io import export_hf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="megalite checkpoint root")
    p.add_argument("--output", required=True, help="folder to write (must be new or empty)")
    p.add_argument(
        "--true-vocab-size",
        type=int,
        default=None,
        help="tokenizer vocabulary (padding rows are dropped); default: from the run's flags",
    )
    p.add_argument("--max-shard-size-mb", type=int, default=2048)
    a = p.parse_args(argv)
    try:
        config = export_hf(
            a.load,
            a.output,
            true_vocab=a.true_vocab_size,
            max_shard_bytes=a.max_shard_size_mb * 1024**2,
            log=print,
        )
    except (CheckpointError, ValueError) as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {config['architectures'][0]} to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
