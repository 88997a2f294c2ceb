"""Import a local Hugging Face LlamaForCausalLM / GPT2LMHeadModel folder as a megalite checkpoint.

    python tools/import_hf.py --hf DIR --save DIR2 --tensor-model-parallel-size T \\
        --pipeline-model-parallel-size P [--num-layers-per-virtual-pipeline-stage V] \\
        [--make-vocab-size-divisible-by 128]

Writes iteration 0 of DIR2 at TP=T x PP=P, weights only (no optimizer state), one layer at a
time. Train from it with ``megalite-pretrain --load DIR2 --finetune`` (or ``--no-load-optim``)
and the model flags this tool prints. Nothing is downloaded: DIR is a local folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalite.checkpoint.cli import import_hf_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
