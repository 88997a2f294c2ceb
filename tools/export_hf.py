"""Export a megalite checkpoint as a Hugging Face folder (LlamaForCausalLM or GPT2LMHeadModel).

    python tools/export_hf.py --load DIR --output OUT [--true-vocab-size N] [--max-shard-size-mb M]

Writes OUT/config.json, OUT/model.safetensors (numbered shards + index past M MB) and the
tokenizer files of the run (Hugging Face tokenizer.json, SentencePiece .model, GPT-2
vocab/merges), reading the checkpoint one layer at a time at any TP/PP. Load it with
``transformers.AutoModelForCausalLM.from_pretrained(OUT)``. A model neither class can represent
is refused (exit status 2) with what does not fit. See megalite/checkpoint/hf.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalite.checkpoint.cli import export_hf_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
