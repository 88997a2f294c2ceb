"""ParallelConfig: how the world is split (TP, PP, chunks, CP, DP), and how DP reduces.

The data-parallel size is not a setting: it is what the world size leaves after TP x CP x PP
(`megalite.parallel_state.validate_layout`). The model's own copy of the split (the fields of
`GPTConfig` that are not flags) is filled from here by `model_split()`, and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megalite.config.fields import ConfigError, option


@dataclass
class ParallelConfig:
    """The parallel layout and the data-parallel machinery (megalite's DDP or DeepSpeed)."""

    tensor_model_parallel_size: int = option(1, "TP: ranks each weight matrix is split across")
    pipeline_model_parallel_size: int = option(1, "PP: pipeline stages")
    num_layers_per_virtual_pipeline_stage: Optional[int] = option(
        None, "layers per model chunk; enables the interleaved 1F1B schedule"
    )
    sequence_parallel: bool = option(False, "split norms/dropout along the sequence over TP")
    context_parallel_size: int = option(1, "CP: ranks one sequence is split across")
    cp_comm_type: str = option(
        "p2p", "CP attention: p2p (ring, any head count) or a2a (all-to-all, Ulysses)",
        choices=("p2p", "a2a"),
    )  # fmt: skip
    ddp_bucket_size: Optional[int] = option(None, "elements per gradient bucket")
    overlap_grad_reduce: bool = option(False, "reduce gradient buckets during the backward")
    overlap_param_gather: bool = option(
        False, "accepted; megalite gathers ZeRO params after the step (same result)"
    )
    grad_reduce_in_bf16: bool = option(False, "communicate gradients in bf16 (accumulate fp32)")
    deepspeed: bool = option(False, "train through the DeepSpeed engine")
    deepspeed_config: Optional[str] = option(
        None, "DeepSpeed JSON config", aliases=("--deepspeed_config",)
    )
    distributed_backend: Optional[str] = option(
        None, "default nccl with CUDA, else gloo", choices=("nccl", "gloo")
    )
    distributed_timeout_minutes: float = option(10.0, "timeout of every collective")
    local_rank: Optional[int] = option(None, "==SUPPRESS==", aliases=("--local_rank",))

    def __post_init__(self) -> None:
        for name in (
            "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value!r}")
        if self.cp_comm_type not in ("p2p", "a2a"):
            raise ConfigError(f"--cp-comm-type must be p2p or a2a, got {self.cp_comm_type!r}")
        if self.deepspeed and self.context_parallel_size > 1:
            raise ConfigError(
                f"--deepspeed with --context-parallel-size {self.context_parallel_size}: the "
                "DeepSpeed engine path does not split sequences; use megalite's ZeRO "
                "(--use-distributed-optimizer / --zero-stage 1|2) with context parallelism"
            )
        if self.num_layers_per_virtual_pipeline_stage is not None:
            if self.pipeline_model_parallel_size < 2:
                raise ConfigError(
                    "--num-layers-per-virtual-pipeline-stage needs "
                    "--pipeline-model-parallel-size > 1"
                )
            if self.num_layers_per_virtual_pipeline_stage < 1:
                raise ConfigError(
                    "--num-layers-per-virtual-pipeline-stage must be >= 1, got "
                    f"{self.num_layers_per_virtual_pipeline_stage}"
                )
        if self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # nothing to split (Megatron does the same)
        if self.deepspeed and self.deepspeed_config is None:
            raise ConfigError("--deepspeed needs --deepspeed_config FILE")
        if self.distributed_timeout_minutes <= 0:
            raise ConfigError(
                f"--distributed-timeout-minutes must be > 0, got {self.distributed_timeout_minutes}"
            )

    def model_split(self) -> dict:
        """The fields of `GPTConfig` that describe the split the model is built for."""
        return {
            "tensor_model_parallel_size": self.tensor_model_parallel_size,
            "pipeline_model_parallel_size": self.pipeline_model_parallel_size,
            "num_layers_per_virtual_pipeline_stage": self.num_layers_per_virtual_pipeline_stage,
            "sequence_parallel": self.sequence_parallel,
            "context_parallel_size": self.context_parallel_size,
            "cp_comm_type": self.cp_comm_type,
        }
