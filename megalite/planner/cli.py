"""`megalite-plan`: the training flags (or --config files) plus the machine; prints the plan
of the layout, or searches layouts.

    megalite-plan --config examples/configs/llama3_8b.yaml --num-gpus 8 --device h100 [--search]
        [--json]

Settings are read exactly as `megalite-pretrain` reads them (`megalite.training.arguments`:
the same flags, the same --config files, flags winning); `settings_from_run_config` is the
single place that turns the resolved `RunConfig` into the planner's (GPTConfig, Layout,
Runtime, global batch).
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

PLANNER_FLAGS = (
    "num_gpus", "gpus_per_node", "device", "gpu_memory", "reserve_memory", "mfu",
    "intra_node_bandwidth", "inter_node_bandwidth", "search", "top", "json",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from megalite.training.arguments import build_parser as training_parser

    p = training_parser(prog="megalite-plan")
    p.description = "Predict per-rank memory and step time of a layout, or search layouts."
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


def load_settings(argv: Sequence[str]) -> tuple[dict, argparse.Namespace]:
    """(the run's flat settings as megalite-pretrain merges them, the planner's options)."""
    from megalite.training.arguments import read_config_file

    given = vars(build_parser().parse_args([str(a) for a in argv]))
    options = argparse.Namespace(**{k: given.pop(k) for k in PLANNER_FLAGS})
    options.peak_tflops = given.get("peak_tflops")  # --peak-tflops: the device's peak too
    settings: dict = {}
    for path in given.pop("config", []):
        settings.update(read_config_file(path))
    given.pop("dry_run", None)
    settings.update(given)  # flags win
    # Planning reads no data and runs no schedule: fill what training alone requires.
    settings.setdefault("lr", 1e-4)
    if settings.get("train_iters") is None and settings.get("train_samples") is None:
        settings["train_iters"] = 1
    if not settings.get("data_path"):
        settings["mock_data"] = True
    return settings, options


def settings_from_run_config(cfg, num_gpus: int):
    """(GPTConfig, Layout, Runtime, global batch size, MoEConfig or None) of a `RunConfig` at
    `num_gpus` ranks."""
    cfg.resolve(num_gpus)
    vocab = cfg.data.vocab_size
    if vocab is None:
        raise ValueError("the memory plan needs the vocabulary size: give --vocab-size")
    model = cfg.model_config(vocab)
    t, p, dp = cfg.training, cfg.parallel, cfg.data_parallel_size
    layout = Layout(
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        dp=dp,
        vp=model.virtual_pipeline_size,
        sequence_parallel=model.sequence_parallel,
        micro_batch_size=t.micro_batch_size,
        num_microbatches=t.global_batch_size // (t.micro_batch_size * dp),
        zero_stage=cfg.optimizer.zero_stage,
        deepspeed_stage=_deepspeed_stage(p),
        recompute=model.recompute_granularity,
        cp=p.context_parallel_size,
        cp_comm_type=p.cp_comm_type,
        ep=cfg.moe.expert_model_parallel_size if cfg.moe.enabled else 1,
        etp=cfg.moe.expert_tensor_parallel_size if cfg.moe.enabled else None,
    )
    runtime = Runtime(
        params_dtype=model.params_dtype,
        device_kind="cuda",  # the planner sizes GPU runs (the CPU model is for the harness)
        bucket_size=p.ddp_bucket_size or DEFAULT_BUCKET_SIZE,
        overlap_grad_reduce=p.overlap_grad_reduce,
    )
    moe = cfg.moe if cfg.moe.enabled else None
    return model, layout, runtime, t.global_batch_size, moe


def _deepspeed_stage(parallel) -> Optional[int]:
    if not parallel.deepspeed:
        return None
    with open(parallel.deepspeed_config) as f:
        stage = json.load(f).get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(
            f"{parallel.deepspeed_config}: zero_optimization.stage {stage} is not 1, 2 or 3"
        )
    return stage


def plan_text_for_run(cfg, world_size: int) -> str:
    """The memory plan of a resolved training config: what `megalite-pretrain --dry-run`
    prints. The device is this machine's GPU when it is in the table, else an H100."""
    import dataclasses

    device, note = get_device("h100"), " (no known GPU here: sized for an H100)"
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name().lower()
            for key in DEVICES:
                if key in name.replace("-", "").replace(" ", ""):
                    device, note = get_device(key), ""
                    total = torch.cuda.get_device_properties(0).total_memory / GIB
                    device = dataclasses.replace(device, memory_gib=total)
    except (ImportError, RuntimeError):
        pass
    model, layout, runtime, _, moe = settings_from_run_config(cfg, world_size)
    usable = int((device.memory_gib - 2) * GIB)
    plan = plan_for(model, layout, runtime, device, memory_bytes=usable, moe=moe)
    return f"# megalite-plan{note}\n" + format_plan(plan, device)


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


def run(settings: dict, args: argparse.Namespace) -> int:
    from megalite.training.arguments import config_from_settings

    tp = settings.get("tensor_model_parallel_size", 1)
    num_gpus = args.num_gpus or (
        tp
        * settings.get("pipeline_model_parallel_size", 1)
        * settings.get("context_parallel_size", 1)
    )
    if num_gpus < 1 or args.gpus_per_node < 1:
        raise ValueError(
            f"--num-gpus {num_gpus} and --gpus-per-node {args.gpus_per_node} must be >= 1"
        )
    device, usable = device_from_args(args)
    if args.search:
        gbs = settings.get("global_batch_size")
        if gbs is None:
            raise ValueError("--search needs --global-batch-size (it is kept fixed)")
        # The layout is searched: keep the model and run settings, checked as a one-rank run.
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                    "num_layers_per_virtual_pipeline_stage", "sequence_parallel",
                    "context_parallel_size", "cp_comm_type", "expert_model_parallel_size",
                    "expert_tensor_parallel_size"):  # fmt: skip
            settings.pop(key, None)
        settings["global_batch_size"] = settings["micro_batch_size"]
        config, _, runtime, _, moe = settings_from_run_config(config_from_settings(settings), 1)
        result = search(config, runtime, device, num_gpus, args.gpus_per_node, gbs, usable, moe=moe)
        if args.json:
            print(json.dumps(result.to_json(args.top), indent=1))
        else:
            print(format_search(result, device, args.top))
        return 0 if result.plans else 1
    cfg = config_from_settings(settings)
    config, layout, runtime, _, moe = settings_from_run_config(cfg, num_gpus)
    plan = plan_for(config, layout, runtime, device, args.gpus_per_node, usable, moe=moe)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        print(format_plan(plan, device))
        if not plan.fits:
            print("(try --search for the layouts that fit)")
    return 0 if plan.fits else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megalite.errors import UserError

    try:
        settings, options = load_settings(sys.argv[1:] if argv is None else list(argv))
        return run(settings, options)
    except (UserError, ValueError) as e:
        print(f"megalite-plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
