"""What a trainer does for MoE around each step, and the checks it runs on the settings.

check_moe_setup(moe, world_size=..., tensor_model_parallel_size=..., deepspeed=...)
chunks = [DistributedDataParallel(c, dp_group, ...,
          expert_data_parallel_group=ps.get_expert_data_parallel_group()) for c in ...]
each step:  before_step(chunks, num_microbatches, optimizer.get_loss_scale())
            ... forward/backward schedule, optimizer.step() ...
            metrics.update(after_step(chunks, ps.get_tensor_context_and_data_parallel_group()))
"""

from __future__ import annotations

from typing import Optional

from megalite.config import ConfigError
from megalite.moe.config import MoEConfig
from megalite.moe.layer import expert_bias_routers, moe_layers, moe_metrics, set_aux_loss_scale
from megalite.moe.router import update_expert_bias


def check_moe_setup(
    moe: MoEConfig,
    *,
    world_size: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    deepspeed: bool = False,
    sequence_parallel: bool = False,
    seq_length: Optional[int] = None,
    num_layers: Optional[int] = None,
    ffn_hidden_size: Optional[int] = None,
) -> None:
    """Refuse MoE settings the run cannot honour, naming the flags and numbers: everything the
    MoE layers check when they are built or first run is checked here, before any of it."""
    if not moe.enabled:
        for name in ("expert_model_parallel_size", "expert_tensor_parallel_size"):
            if getattr(moe, name) not in (None, 1):
                raise ConfigError(f"--{name.replace('_', '-')} needs --num-experts")
        return
    if deepspeed:
        raise ConfigError(
            "--num-experts (MoE) is not supported with --deepspeed: use megalite's own ZeRO "
            "(--zero-stage 1 or 2 with --use-distributed-optimizer), which shards expert "
            "parameters over the expert-data-parallel group"
        )
    from megalite.parallel_state import LayoutError, validate_expert_layout

    tp = tensor_model_parallel_size
    try:
        validate_expert_layout(
            world_size, tp, pipeline_model_parallel_size, context_parallel_size,
            moe.expert_model_parallel_size, moe.expert_tensor_parallel(tp), moe.num_experts,
        )  # fmt: skip
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    cp = context_parallel_size
    if tp > 1 and not sequence_parallel and seq_length is not None and (seq_length // cp) % tp:
        # The layer splits the tokens it is given, [s / cp, b, h], along the sequence over TP.
        if cp == 1:
            raise ConfigError(
                f"MoE at --tensor-model-parallel-size {tp} without --sequence-parallel splits "
                f"the sequence over TP: --seq-length ({seq_length}) must be divisible by {tp}"
            )
        raise ConfigError(
            f"MoE at --tensor-model-parallel-size {tp} without --sequence-parallel splits each "
            f"context-parallel rank's --seq-length ({seq_length}) / --context-parallel-size "
            f"({cp}) = {seq_length // cp} tokens over TP: they must be divisible by {tp} "
            f"(--seq-length a multiple of {cp} x {tp} = {cp * tp})"
        )
    etp = moe.expert_tensor_parallel(tp)
    width = moe.moe_ffn_hidden_size or ffn_hidden_size
    if width is not None and width % etp:
        what = "--moe-ffn-hidden-size" if moe.moe_ffn_hidden_size else "--ffn-hidden-size"
        raise ConfigError(
            f"{what} ({width}) of each expert is not divisible by the expert-tensor-parallel "
            f"size ({etp}, --expert-tensor-parallel-size or else --tensor-model-parallel-size)"
        )
    shared = moe.moe_shared_expert_intermediate_size
    if shared is not None and shared % tp:
        raise ConfigError(
            f"--moe-shared-expert-intermediate-size ({shared}) is not divisible by "
            f"--tensor-model-parallel-size ({tp}): the shared expert is split over TP"
        )
    if num_layers is not None:
        moe.is_moe_layer(0, num_layers)  # a --moe-layer-freq list must have one entry per layer


def before_step(
    chunks, num_microbatches: int, loss_scale: float = 1.0, context_parallel_size: int = 1
) -> None:
    """Aux losses weigh like one micro-batch of the LM loss (fp16: times the loss scale).

    Under context parallelism each CP rank's aux-loss gradient reaches only its own tokens: the
    CP ranks' gradients add up to the whole one, and DDP then averages over DP x CP, so each
    rank's weight is multiplied by the CP size (the LM loss needs no such factor: each CP rank
    averages over its own s / CP tokens)."""
    set_aux_loss_scale(chunks, loss_scale * context_parallel_size / num_microbatches)


def after_step(
    chunks, stage_group=None, update_bias: bool = True, dp_group=None
) -> dict[str, float]:
    """After the optimizer step: the expert-bias update (over the stage's TP x CP x DP ranks;
    a skipped step only forgets its counts) and this step's per-layer MoE metrics (aux loss,
    z-loss, load max / mean)."""
    routers = expert_bias_routers(chunks)
    if update_bias:
        update_expert_bias(routers, stage_group)
    else:
        for router in routers:
            router.local_tokens_per_expert.zero_()
    return moe_metrics(chunks, group=dp_group)


def reset_metrics(chunks) -> None:
    """Forget what forwards since the last step recorded (e.g. evaluation batches)."""
    for layer in moe_layers(chunks):
        layer.reset_metrics()
