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

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalite.checkpoint.format import CheckpointError  # noqa: E402
from megalite.checkpoint.reshard import reshard  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument(
        "--load", required=True, help="checkpoint root (its tracker names the iteration)"
    )
    p.add_argument("--save", required=True, help="root to write the resharded checkpoint to")
    p.add_argument("--target-tensor-parallel-size", type=int, required=True)
    p.add_argument("--target-pipeline-model-parallel-size", type=int, required=True)
    p.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument(
        "--true-vocab-size",
        type=int,
        default=None,
        help="tokenizer vocabulary, when the padding changes and the tokenizer files are gone",
    )
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        folder = reshard(
            a.load,
            a.save,
            a.target_tensor_parallel_size,
            a.target_pipeline_model_parallel_size,
            a.target_num_layers_per_virtual_pipeline_stage,
            true_vocab=a.true_vocab_size,
            log=print,
        )
    except (CheckpointError, ValueError) as e:
        print(f"checkpoint_reshard: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
