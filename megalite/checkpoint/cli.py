"""Console scripts of the offline checkpoint tools: `megalite-reshard`, `megalite-export-hf`,
`megalite-import-hf` (tools/checkpoint_reshard.py, export_hf.py, import_hf.py call these).

Each reads the checkpoint's saved config (meta.json) and rebuilds the model from it; bad input is
exit status 2 with one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from megalite.checkpoint.format import CheckpointError
from megalite.checkpoint.hf_io import export_hf, import_hf, pretrain_flags
from megalite.checkpoint.reshard import reshard

_RESHARD_DOC = (
    "Reshard a megalite checkpoint to another tensor/pipeline(/expert)-parallel layout, offline "
    "on CPU."
)


def reshard_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=_RESHARD_DOC, allow_abbrev=False)
    p.add_argument(
        "--load", required=True, help="checkpoint root (its tracker names the iteration)"
    )
    p.add_argument("--save", required=True, help="root to write the resharded checkpoint to")
    p.add_argument("--target-tensor-parallel-size", type=int, required=True)
    p.add_argument("--target-pipeline-model-parallel-size", type=int, required=True)
    p.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument(
        "--target-expert-model-parallel-size",
        type=int,
        default=None,
        help="MoE: ranks the experts are split across (default: the checkpoint's EP)",
    )
    p.add_argument(
        "--target-expert-tensor-parallel-size",
        type=int,
        default=None,
        help="MoE: ranks each expert is split across (default: the target TP where the "
        "checkpoint's ETP was its TP, else the checkpoint's ETP)",
    )
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
            ep=a.target_expert_model_parallel_size,
            etp=a.target_expert_tensor_parallel_size,
            log=print,
        )
    except (CheckpointError, ValueError) as e:
        print(f"checkpoint_reshard: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder} in {time.perf_counter() - start:.1f} s")
    return 0


_EXPORT_HF_DOC = (
    "Export a megalite checkpoint as a Hugging Face folder (LlamaForCausalLM, GPT2LMHeadModel, "
    "MixtralForCausalLM or Qwen2MoeForCausalLM)."
)


def export_hf_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=_EXPORT_HF_DOC, allow_abbrev=False)
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


_IMPORT_HF_DOC = (
    "Import a local Hugging Face LlamaForCausalLM / GPT2LMHeadModel / MixtralForCausalLM / "
    "Qwen2MoeForCausalLM folder as a megalite checkpoint."
)


def import_hf_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=_IMPORT_HF_DOC, allow_abbrev=False)
    p.add_argument("--hf", required=True, help="local Hugging Face model folder")
    p.add_argument("--save", required=True, help="megalite checkpoint root to write")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument(
        "--expert-model-parallel-size", type=int, default=1, help="MoE: EP of the checkpoint"
    )
    a = p.parse_args(argv)
    try:
        folder = import_hf(
            a.hf,
            a.save,
            a.tensor_model_parallel_size,
            a.pipeline_model_parallel_size,
            a.num_layers_per_virtual_pipeline_stage,
            divisible=a.make_vocab_size_divisible_by,
            ep=a.expert_model_parallel_size,
            log=print,
        )
    except (CheckpointError, ValueError, OSError) as e:
        print(f"import_hf: error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((folder / "meta.json").read_text())
    print(f"wrote {folder} (weights only)")
    print(f"train with: megalite-pretrain --load {a.save} --finetune {pretrain_flags(meta)} ...")
    return 0


def reshard_main_exit() -> None:
    sys.exit(reshard_main())


def export_hf_main_exit() -> None:
    sys.exit(export_hf_main())


def import_hf_main_exit() -> None:
    sys.exit(import_hf_main())
