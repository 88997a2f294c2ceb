"""The MoE layer: router, token dispatcher, experts, optional shared experts.

``[s_local, b, h] -> [s_local, b, h]`` in the dense layer's layout (``s_local = s/tp`` under
sequence parallelism). Inside the layer every rank of a pipeline stage works on distinct tokens:
under SP they already are; with TP > 1 and no SP each TP rank takes its ``s/tp`` slice first
(split forward / all-gather backward) and the outputs are all-gathered after (all-gather forward
/ split backward), so no token is routed twice. The router's weight therefore gets a partial
gradient per TP rank and is tagged ``sequence_parallel`` (summed over TP by finalize).

The auxiliary losses are attached to the output with `AttachAuxLoss`, scaled by
`aux_loss_scale` (1 / micro-batches, set by the trainer), so they reach the router from any
pipeline stage. `metrics` accumulates their values and the expert load for logging.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalite.moe.collectives import AttachAuxLoss
from megalite.moe.config import MoEConfig
from megalite.moe.dispatcher import build_dispatcher
from megalite.moe.experts import Experts
from megalite.moe.router import Router, recomputing
from megalite.tensor_parallel import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megalite.tensor_parallel.utils import group_rank_and_size


@dataclass
class MoEGroups:
    """The process groups an MoE layer uses (None everywhere: one process)."""

    tp: Any = None  # dense TP: the layer's input layout
    ep: Any = None  # experts split across
    etp: Any = None  # one expert's weight shards
    etp_ep: Any = None  # the all-gather dispatcher's group
    tp_cp: Any = None  # ranks sharing one micro-batch's tokens (load statistics)
    tp_cp_dp: Any = None  # one pipeline stage (expert-bias token counts)

    @classmethod
    def from_parallel_state(cls) -> MoEGroups:
        from megalite import parallel_state as ps

        return cls(
            tp=ps.get_tensor_model_parallel_group(),
            ep=ps.get_expert_model_parallel_group(),
            etp=ps.get_expert_tensor_parallel_group(),
            etp_ep=ps.get_expert_tensor_and_model_parallel_group(),
            tp_cp=ps.get_tensor_and_context_parallel_group(),
            tp_cp_dp=ps.get_tensor_context_and_data_parallel_group(),
        )


class MoELayer(nn.Module):
    """Mixture-of-experts MLP; `config` is the model's GPTConfig, `moe` its MoEConfig."""

    def __init__(self, config, moe: MoEConfig, prefix: str, init, groups: MoEGroups, device=None):
        super().__init__()
        c = config
        self.moe, self.groups = moe, groups
        self.layer_name = prefix.rstrip(".")
        self.tp_size = group_rank_and_size(groups.tp)[1]
        self.split_tokens = self.tp_size > 1 and not c.sequence_parallel
        local = c.seq_length // c.context_parallel_size  # the tokens this layer is given
        if self.split_tokens and local % self.tp_size != 0:
            raise ValueError(
                f"an MoE layer at tensor-model-parallel size {self.tp_size} without sequence "
                f"parallelism splits the local sequence: seq_length ({c.seq_length}) / "
                f"context-parallel size ({c.context_parallel_size}) must be divisible by it"
            )
        ep_rank, ep = group_rank_and_size(groups.ep)
        etp_rank, etp = group_rank_and_size(groups.etp)
        e = moe.num_experts
        if e % ep != 0:
            raise ValueError(
                f"num_experts ({e}) is not divisible by expert-model-parallel size ({ep})"
            )
        self.router = Router(
            moe, c.hidden_size, init.normal(prefix + "router.weight"), c.params_dtype, device
        )
        # Every rank of the layer holds distinct tokens when TP > 1: sum the router grad over TP.
        self.router.weight.sequence_parallel = self.tp_size > 1
        self.experts = Experts(
            c.hidden_size, moe.moe_ffn_hidden_size or c.ffn_hidden_size,
            swiglu=c.activation == "swiglu", num_local=e // ep, first=ep_rank * (e // ep),
            etp_rank=etp_rank, etp_size=etp, init=init, prefix=prefix + "experts.",
            grouped_gemm=moe.moe_grouped_gemm, params_dtype=c.params_dtype, device=device,
        )  # fmt: skip
        self.shared_experts = None
        if moe.moe_shared_expert_intermediate_size:
            from megalite.model.transformer import MLP

            shared = dataclasses.replace(c, ffn_hidden_size=moe.moe_shared_expert_intermediate_size)
            self.shared_experts = MLP(shared, prefix + "shared_experts.", init, groups.tp, device)
            if moe.moe_shared_expert_gate:  # Megatron's SharedExpertMLP.gate_weight [1, h]
                gate = torch.empty(1, c.hidden_size)
                init.normal(prefix + "shared_experts.gate_weight")(gate)
                weight = nn.Parameter(gate.to(device=device, dtype=c.params_dtype))
                # Under SP each TP rank gates its own tokens: sum the gradient over TP.
                weight.sequence_parallel = c.sequence_parallel and self.tp_size > 1
                self.shared_experts.gate_weight = weight
        self.dispatcher = build_dispatcher(moe.moe_token_dispatcher_type, e, groups)
        self.aux_loss_scale = 1.0
        self.metrics: dict[str, Any] = {}
        self.reset_metrics()

    def reset_metrics(self) -> None:
        self.metrics = {"calls": 0, "tokens_per_expert": torch.zeros(self.moe.num_experts)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        if shared is not None and self.moe.moe_shared_expert_gate:
            shared = shared * torch.sigmoid(F.linear(x, self.shared_experts.gate_weight))
        local = scatter_to_sequence_parallel_region(x, self.groups.tp) if self.split_tokens else x
        s, b, h = local.shape
        tokens = local.reshape(s * b, h)
        experts, weights, keep, aux, stats = self.router(tokens, b, self.groups.tp_cp)
        out = self.dispatcher(tokens, experts, weights, keep, self.experts)
        if aux.requires_grad:
            out = AttachAuxLoss.apply(out, aux, self.aux_loss_scale)
        if not recomputing():
            self._record(stats)
        out = out.view(s, b, h)
        if self.split_tokens:
            out = gather_from_sequence_parallel_region(out, self.groups.tp, False)
        return out if shared is None else out + shared

    @torch.no_grad()
    def _record(self, stats: dict) -> None:
        m = self.metrics
        m["calls"] += 1
        m["tokens_per_expert"] += stats["tokens_per_expert"].cpu()
        for name in ("load_balancing_loss", "z_loss"):
            if name in stats:
                m[name] = m.get(name, 0.0) + float(stats[name])
        self.last_stats = stats


def moe_layers(modules) -> list[MoELayer]:
    """Every MoE layer inside `modules` (model chunks, possibly DDP-wrapped)."""
    return [m for module in modules for m in module.modules() if isinstance(m, MoELayer)]


def moe_metrics(modules, reset: bool = True, group=None) -> dict[str, float]:
    """Per-layer means since the last reset, keyed ``moe_<metric>_layer<i>``: the aux losses,
    and the expert load max / mean (tokens per expert, summed over the ranks sharing a
    micro-batch). With `group` (the DP group) every DP rank's micro-batches count, so the
    values are the whole global batch's at any layout (collective over `group`)."""
    layers = moe_layers(modules)
    rows = []
    for layer in layers:
        m = layer.metrics
        head = [m.get("load_balancing_loss", 0.0), m.get("z_loss", 0.0), float(m["calls"])]
        rows.append(torch.cat([torch.tensor(head), m["tokens_per_expert"].float()]))
        if reset:
            layer.reset_metrics()
    if not rows:
        return {}
    table = torch.stack(rows).double()
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        from megalite.data_parallel.clip_grads import comm_device

        table = table.to(comm_device(group))
        dist.all_reduce(table, group=group)
        table = table.cpu()
    out: dict[str, float] = {}
    for layer, row in zip(layers, table):
        calls = row[2].item()
        if calls == 0:
            continue
        tag = layer.layer_name.split(".")[2] if layer.layer_name.count(".") >= 2 else "0"
        if layer.moe.moe_router_load_balancing_type != "none" and layer.moe.moe_aux_loss_coeff:
            out[f"moe_load_balancing_loss_layer{tag}"] = row[0].item() / calls
        if layer.moe.moe_z_loss_coeff:
            out[f"moe_z_loss_layer{tag}"] = row[1].item() / calls
        load = row[3:]
        out[f"moe_load_max_over_mean_layer{tag}"] = float(load.max() / load.mean().clamp_min(1e-9))
    return out


def summarize_metrics(per_layer: dict[str, float], per_layer_keys: bool = True) -> dict:
    """Add ``moe_load_balancing_loss`` and ``moe_z_loss`` (means over the MoE layers) and
    ``moe_load_max_over_mean`` (the worst layer) to `per_layer` (kept unless not wanted)."""
    out = dict(per_layer) if per_layer_keys else {}
    for key, reduce in (("load_balancing_loss", "mean"), ("z_loss", "mean"),
                        ("load_max_over_mean", "max")):  # fmt: skip
        values = [v for k, v in per_layer.items() if k.startswith(f"moe_{key}_layer")]
        if values:
            out[f"moe_{key}"] = max(values) if reduce == "max" else sum(values) / len(values)
    return out


def set_aux_loss_scale(modules, scale: float) -> None:
    """The weight of one micro-batch in the training loss (1 / micro-batches)."""
    for layer in moe_layers(modules):
        layer.aux_loss_scale = scale


def expert_bias_routers(modules) -> list[Router]:
    return [layer.router for layer in moe_layers(modules)]
