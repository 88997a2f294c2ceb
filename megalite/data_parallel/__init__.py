"""Data parallelism: bucketed DDP, mixed-precision / ZeRO-1/2 optimizer, loss scaling, clipping.

The trainer's entry points: `DistributedDataParallel`, `OptimizerConfig` + `build_optimizer`,
`finalize_model_grads`; the DeepSpeed path lives in `megalite.data_parallel.deepspeed_bridge`
(imported on demand: deepspeed is an optional dependency).
"""

from megalite.data_parallel.ddp import DistributedDataParallel
from megalite.data_parallel.finalize import finalize_model_grads
from megalite.data_parallel.optimizer import (
    DistributedOptimizer,
    MixedPrecisionOptimizer,
    OptimizerConfig,
    build_optimizer,
    get_param_groups,
)

__all__ = [
    "DistributedDataParallel",
    "DistributedOptimizer",
    "MixedPrecisionOptimizer",
    "OptimizerConfig",
    "build_optimizer",
    "finalize_model_grads",
    "get_param_groups",
]
