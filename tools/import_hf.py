"""Import a local Hugging Face LlamaForCausalLM / GPT2LMHeadModel folder as a megalite checkpoint.

    python tools/import_hf.py --hf DIR --save DIR2 --tensor-model-parallel-size T \\
        --pipeline-model-parallel-size P [--num-layers-per-virtual-pipeline-stage V] \\
        [--make-vocab-size-divisible-by 128]

Writes iteration 0 of DIR2 at TP=T x PP=P, weights only (no optimizer state), one layer at a
time. Train from it with ``megalite-pretrain --load DIR2 --finetune`` (or ``--no-load-optim``)
and the model flags this tool prints. Nothing is downloaded: DIR is a local folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalite.checkpoint.format import CheckpointError  # noqa: E402
from megalite.checkpoint.hf_io import import_hf, pretrain_flags  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--hf", required=True, help="local Hugging Face model folder")
    p.add_argument("--save", required=True, help="megalite checkpoint root to write")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    a = p.parse_args(argv)
    try:
        folder = import_hf(
            a.hf,
            a.save,
            a.tensor_model_parallel_size,
            a.pipeline_model_parallel_size,
            a.num_layers_per_virtual_pipeline_stage,
            divisible=a.make_vocab_size_divisible_by,
            log=print,
        )
    except (CheckpointError, ValueError, OSError) as e:
        print(f"import_hf: error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((folder / "meta.json").read_text())
    print(f"wrote {folder} (weights only)")
    print(f"train with: megalite-pretrain --load {a.save} --finetune {pretrain_flags(meta)} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
