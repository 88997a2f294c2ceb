"""`megalite-plan`: the training flags plus the machine; prints the plan or searches layouts.

    megalite-plan --num-layers 32 --hidden-size 4096 ... --micro-batch-size 1 \
        --global-batch-size 512 --bf16 --vocab-size 128256 --num-gpus 8 --device h100 [--search]
        [--json]

The training flags are `megalite.training.arguments.build_parser()`'s own; `settings_from_args`
is the single place that turns them into (GPTConfig, Layout, Runtime, global batch) and is the
function to swap when the configuration layer changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Optional

from megalite.planner.devices import DEVICES, Device, get_device
from megalite.planner.layout import DEFAULT_BUCKET_SIZE, Layout, Runtime
from megalite.planner.plan import GIB, format_plan, format_search, plan_for, search


def build_parser() -> argparse.ArgumentParser:
    from megalite.training.arguments import build_parser as training_parser

    p = training_parser()
    p.prog = "megalite-plan"
    p.description = "Predict per-rank memory and step time of a layout, or search layouts."
    for action in p._actions:  # planning needs no schedule, learning rate or data
        if action.dest in ("train_iters", "lr"):
            action.required = False
            action.default = 1 if action.dest == "train_iters" else 1e-4
    g = p.add_argument_group("planner")
    g.add_argument("--num-gpus", type=int, default=None, help="world size (default: TP x PP)")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--device", default="h100", help=f"one of {', '.join(DEVICES)}")
    g.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (overrides)")
    g.add_argument(
        "--reserve-memory",
        type=float,
        default=2.0,
        help="GiB per GPU kept for the CUDA context, NCCL and fragmentation",
    )
    g.add_argument("--mfu", type=float, default=None, help="achievable fraction of peak")
    g.add_argument("--intra-node-bandwidth", type=float, default=None, help="GB/s per GPU")
    g.add_argument("--inter-node-bandwidth", type=float, default=None, help="GB/s per GPU")
    g.add_argument("--search", action="store_true", help="rank every feasible layout")
    g.add_argument("--top", type=int, default=10, help="layouts shown by --search")
    g.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def _deepspeed_stage(args: argparse.Namespace) -> Optional[int]:
    if not getattr(args, "deepspeed", False):
        return None
    if not args.deepspeed_config:
        raise ValueError("--deepspeed needs --deepspeed_config FILE (its ZeRO stage is planned)")
    with open(args.deepspeed_config) as f:
        stage = json.load(f).get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(f"{args.deepspeed_config}: zero_optimization.stage {stage} is not 1/2/3")
    return stage


def settings_from_args(args: argparse.Namespace, num_gpus: int):
    """(GPTConfig, Layout, Runtime, global batch size) from the training flags.

    The one function tied to the training front end: it validates the flags as
    `megalite-pretrain` does (data flags aside: planning reads no data) and builds the model
    config with the trainer's own `model_config`.
    """
    from megalite.training.arguments import validate_args
    from megalite.training.trainer import model_config

    if args.vocab_size is None:
        raise ValueError("megalite-plan needs --vocab-size (the tokenizer's vocabulary)")
    if not args.data_path:
        args.mock_data = True
    validate_args(args, num_gpus)
    config = model_config(args, args.vocab_size)
    layout = Layout(
        tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size,
        dp=args.data_parallel_size,
        vp=args.virtual_pipeline_model_parallel_size or 1,
        sequence_parallel=bool(args.sequence_parallel),
        micro_batch_size=args.micro_batch_size,
        num_microbatches=args.num_microbatches,
        zero_stage=args.zero_stage,
        deepspeed_stage=_deepspeed_stage(args),
        recompute=args.recompute_granularity or "none",
    )
    runtime = Runtime(
        params_dtype=config.params_dtype,
        device_kind="cuda",  # the planner sizes GPU runs (the CPU model is for the harness)
        bucket_size=args.ddp_bucket_size or DEFAULT_BUCKET_SIZE,
        overlap_grad_reduce=bool(args.overlap_grad_reduce),
    )
    return config, layout, runtime, args.global_batch_size


def device_from_args(args: argparse.Namespace) -> tuple[Device, int]:
    """The device (with overrides) and the usable bytes per GPU."""
    device = get_device(args.device).with_overrides(
        peak_tflops=args.peak_tflops,
        memory_gib=args.gpu_memory,
        mfu=args.mfu,
        intra_node_gbps=args.intra_node_bandwidth,
        inter_node_gbps=args.inter_node_bandwidth,
    )
    usable = int((device.memory_gib - args.reserve_memory) * GIB)
    if usable <= 0:
        raise ValueError(
            f"--gpu-memory {device.memory_gib} GiB leaves nothing after --reserve-memory "
            f"{args.reserve_memory} GiB"
        )
    return device, usable


def run(args: argparse.Namespace) -> int:
    num_gpus = args.num_gpus or args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if num_gpus < 1 or args.gpus_per_node < 1:
        raise ValueError(
            f"--num-gpus {num_gpus} and --gpus-per-node {args.gpus_per_node} must be >= 1"
        )
    device, usable = device_from_args(args)
    if args.search:
        args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
        args.num_layers_per_virtual_pipeline_stage = None
        if args.global_batch_size is None:
            raise ValueError("--search needs --global-batch-size (it is kept fixed)")
        gbs = args.global_batch_size
        # Only the model and run settings are kept: validate them as a one-rank run.
        config, _, runtime, _ = settings_from_args(args, 1)
        result = search(config, runtime, device, num_gpus, args.gpus_per_node, gbs, usable)
        if args.json:
            print(json.dumps(result.to_json(args.top), indent=1))
        else:
            print(format_search(result, device, args.top))
        return 0 if result.plans else 1
    config, layout, runtime, _ = settings_from_args(args, num_gpus)
    plan = plan_for(config, layout, runtime, device, args.gpus_per_node, usable)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        print(format_plan(plan, device))
        if not plan.fits:
            print("(try --search for the layouts that fit)")
    return 0 if plan.fits else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    from megalite.training.arguments import ArgumentError

    try:
        return run(args)
    except (ArgumentError, ValueError) as e:
        print(f"megalite-plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
