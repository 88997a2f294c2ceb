"""Mixture of experts with expert parallelism: router, experts, token dispatchers, the layer.

See docs/moe.md. The expert process groups come from `megalite.parallel_state`
(`expert_group_ranks`); layers take them explicitly through `MoEGroups`.
"""

from megalite.moe.config import MoEConfig
from megalite.moe.layer import (
    MoEGroups,
    MoELayer,
    expert_bias_routers,
    moe_layers,
    moe_metrics,
    set_aux_loss_scale,
)
from megalite.moe.router import Router, update_expert_bias

__all__ = [
    "MoEConfig",
    "MoEGroups",
    "MoELayer",
    "Router",
    "expert_bias_routers",
    "moe_layers",
    "moe_metrics",
    "set_aux_loss_scale",
    "update_expert_bias",
]
