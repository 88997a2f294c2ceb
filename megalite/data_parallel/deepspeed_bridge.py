"""The DeepSpeed path (``--deepspeed --deepspeed_config ds.json``): ZeRO-1/2/3 over megalite's DP.

The model is built with megalite's TP layers as usual; `megalite.parallel_state` is handed to
``deepspeed.initialize(mpu=...)``, so DeepSpeed partitions over megalite's DP group (not the
world), reduces its gradient norm and overflow checks over megalite's model-parallel group, and
counts TP-replicated parameters once (it reads the same ``tensor_model_parallel`` attribute).
The optimizer is megalite's AdamW setup (``torch.optim.AdamW`` on the same weight-decay groups)
unless the JSON has its own ``"optimizer"`` section.

Supported layouts: pipeline-model-parallel size 1 with any TP x DP, ZeRO stages 0-3 (and
DeepSpeed's CPU offload where its ops are available). PP > 1 is refused: DeepSpeed drives
pipelines only through its own ``PipelineModule``/``PipelineEngine`` (not megalite's stages and
schedules), and that engine does not support ZeRO-2/3 at all; for PP > 1 use megalite's own
distributed optimizer (``--zero-stage 1|2`` / ``--use-distributed-optimizer``).

On CPU run with ``DS_ACCELERATOR=cpu`` (DeepSpeed then talks gloo through torch.distributed,
which megalite has already initialized); there DeepSpeed trains in fp32 or bf16, and fp16 is
refused up front with the alternatives. DeepSpeed 0.19's CPU backend JIT-compiles a
shared-memory all-reduce op (about a minute of C++ build on a fresh machine) that only its
*inference* all-reduce uses; training never calls it, so the bridge marks that op unavailable
before DeepSpeed's communication backend starts (``MEGALITE_DS_SHM_COMM=1`` keeps it).

Use::

    engine = initialize_deepspeed(model, "ds.json", OptimizerConfig(lr=..., ...))
    for micro_batch in ...:                  # gradient_accumulation_steps of them
        loss = engine(*micro_batch)
        engine.backward(loss)                # divides by gradient_accumulation_steps
        engine.step()                        # updates at the accumulation boundary only
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from megalite import parallel_state
from megalite.data_parallel.optimizer import (
    DECOUPLED_LR_PARAMS,
    OptimizerConfig,
    get_param_groups,
)
from megalite.errors import UserError

SUPPORTED_LAYOUTS = "pipeline-model-parallel size 1 with any tensor x data parallel layout"


class DeepSpeedLayoutError(UserError, ValueError):
    """A layout or config that the DeepSpeed path cannot run."""


def load_deepspeed_config(config: Union[str, os.PathLike, dict]) -> dict:
    """A DeepSpeed config as a dict (read from JSON when given a path); validated."""
    if isinstance(config, dict):
        cfg = dict(config)
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"--deepspeed_config {path} does not exist")
        cfg = json.loads(path.read_text())
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedLayoutError(f"zero_optimization.stage must be 0-3, got {stage!r}")
    return cfg


def check_deepspeed_layout(pipeline_model_parallel_size: int, zero_stage: int = 0) -> None:
    """Refuse layouts the DeepSpeed path does not support, naming the alternative."""
    if pipeline_model_parallel_size > 1:
        raise DeepSpeedLayoutError(
            f"--deepspeed supports {SUPPORTED_LAYOUTS}; got pipeline-model-parallel size "
            f"{pipeline_model_parallel_size} (ZeRO stage {zero_stage}). DeepSpeed pipelines only "
            f"its own PipelineModule and has no ZeRO-2/3 with pipelining: for PP > 1 drop "
            f"--deepspeed and use megalite's --zero-stage 1|2 (or --use-distributed-optimizer)."
        )


def deepspeed_config_for(
    ds_config: dict,
    micro_batch_size: int,
    global_batch_size: int,
    optimizer_config: Optional[OptimizerConfig] = None,
) -> dict:
    """Fill the batch sizes, clipping and precision DeepSpeed needs from megalite's settings.

    Values already in `ds_config` win only when they agree; a contradiction is an error rather
    than a silent override. DP size comes from parallel_state.
    """
    cfg = dict(ds_config)
    dp = parallel_state.get_data_parallel_world_size()
    if global_batch_size % (micro_batch_size * dp):
        raise DeepSpeedLayoutError(
            f"global batch size {global_batch_size} is not divisible by micro batch size "
            f"{micro_batch_size} x data-parallel size {dp}"
        )
    wanted: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": global_batch_size // (micro_batch_size * dp),
        "train_batch_size": global_batch_size,
    }
    if optimizer_config is not None:
        wanted["gradient_clipping"] = optimizer_config.clip_grad
    for key, value in wanted.items():
        if key in cfg and cfg[key] not in ("auto", value):
            raise DeepSpeedLayoutError(
                f"{key} is {cfg[key]} in the DeepSpeed config but megalite's flags give {value}"
            )
        cfg[key] = value
    if optimizer_config is not None:
        if optimizer_config.bf16:
            cfg.setdefault("bf16", {"enabled": True})
        if optimizer_config.fp16:
            fp16 = {"enabled": True, "loss_scale": optimizer_config.loss_scale or 0}
            fp16.update(
                initial_scale_power=int(optimizer_config.initial_loss_scale).bit_length() - 1,
                loss_scale_window=optimizer_config.loss_scale_window,
                hysteresis=optimizer_config.hysteresis,
                min_loss_scale=optimizer_config.min_loss_scale,
            )
            cfg.setdefault("fp16", fp16)
    return cfg


def deepspeed_param_groups(
    model: torch.nn.Module, weight_decay: float, decoupled_lr: bool = False
) -> list[dict]:
    """megalite's weight-decay groups; with `decoupled_lr` the input embedding and the output
    layer (Megatron's --decoupled-lr parameters) in groups of their own marked
    ``"decoupled_lr": True``, whose lr the trainer sets to the decoupled schedule each step."""
    groups = get_param_groups([model], weight_decay)
    if not decoupled_lr:
        return groups
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in groups:
        for flag in (False, True):
            params = [
                p for p in group["params"] if names[id(p)].startswith(DECOUPLED_LR_PARAMS) == flag
            ]
            if params:
                out.append({**group, "params": params, "decoupled_lr": flag})
    return out


def _skip_cpu_inference_shm_op() -> None:
    """Keep DeepSpeed (CPU accelerator) from building its inference-only shm all-reduce op."""
    if os.environ.get("MEGALITE_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _check_precision(cfg: dict) -> None:
    """fp16 on an accelerator without it (DeepSpeed's CPU one): say what works instead."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if cfg.get("fp16", {}).get("enabled") and not acc.is_fp16_supported():
        raise DeepSpeedLayoutError(
            f"DeepSpeed's {acc.device_name()} accelerator does not support fp16: use --bf16 "
            f"with --deepspeed, or --fp16 without --deepspeed (megalite's own loss scaling)"
        )


def initialize_deepspeed(
    model: torch.nn.Module,
    ds_config: Union[str, os.PathLike, dict],
    optimizer_config: Optional[OptimizerConfig] = None,
    lr_scheduler=None,
):
    """Wrap `model` in a DeepSpeed engine sharded over megalite's DP group; returns the engine.

    ``parallel_state.initialize_model_parallel`` must have run. Without an ``"optimizer"``
    section in the config, `optimizer_config` (default ``OptimizerConfig()``) builds
    ``torch.optim.AdamW`` over megalite's weight-decay groups; its ``zero_stage`` is ignored
    (the JSON's ``zero_optimization.stage`` decides).
    """
    import deepspeed

    cfg = load_deepspeed_config(ds_config)
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    check_deepspeed_layout(parallel_state.get_pipeline_model_parallel_world_size(), stage)
    _skip_cpu_inference_shm_op()
    _check_precision(cfg)
    optimizer, groups = None, None
    oc = optimizer_config or OptimizerConfig()
    decoupled = oc.decoupled_lr is not None
    if "optimizer" in cfg:
        wd = cfg["optimizer"].get("params", {}).get("weight_decay", 0.0)
        groups = deepspeed_param_groups(model, wd, decoupled)
    else:
        optimizer = torch.optim.AdamW(
            deepspeed_param_groups(model, oc.weight_decay, decoupled),
            lr=oc.lr,
            betas=(oc.adam_beta1, oc.adam_beta2),
            eps=oc.adam_eps,
        )
        # torch's AdamW is not on DeepSpeed's list of ZeRO-tested optimizers; it is exact here.
        cfg.setdefault("zero_allow_untested_optimizer", True)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=groups,
        lr_scheduler=lr_scheduler,
        config=cfg,
        mpu=parallel_state,
        dist_init_required=False,
    )
    return engine
