"""Reshard a megalite checkpoint to another tensor/pipeline-parallel layout, offline on CPU.

    python tools/checkpoint_reshard.py --load DIR --save DIR2 \\
        --target-tensor-parallel-size T --target-pipeline-model-parallel-size P \\
        [--target-num-layers-per-virtual-pipeline-stage V] [--true-vocab-size N]

Reads the newest checkpoint of DIR one layer at a time and writes the same iteration to DIR2 at
TP=T x PP=P (x V layers per virtual stage): model shards, and the optimizer state (fp32 main
params + Adam moments, ZeRO shards regathered) in the per-parameter form that the trainer
re-splits for whatever DP size and ZeRO stage it runs with. Resume with ``megalite-pretrain
--load DIR2`` and the same flags at the new layout. A layout that cannot hold the model is
refused before anything is written (exit status 2). See megalite/checkpoint/reshard.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalite.checkpoint.cli import reshard_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
