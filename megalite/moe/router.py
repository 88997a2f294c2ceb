"""Top-k router: scores, expert choice, token dropping and the auxiliary losses.

Tokens arrive flattened from ``[s_local, b, h]`` (token t is sequence ``t % b``). A micro-batch's
tokens may be spread over the ranks of `stats_group` (TP with sequence parallelism, and CP):
the load statistics are summed over that group with "all-reduce forward, identity backward", so
each rank's loss has the micro-batch's value and each rank's gradient is exact for its own
tokens. The losses are therefore the same at every TP/SP/CP/DP/EP layout (under dropless
routing; capacity is counted per rank, see docs/moe.md).

Losses (Megatron's definitions, over the T tokens of a micro-batch, E experts, top-k):

- ``aux_loss`` (Switch): ``coeff * E / (k T^2) * sum_e P_e * c_e`` where ``P_e`` is the sum of
  expert e's full score over tokens and ``c_e`` the tokens routed to e;
- ``seq_aux_loss``: the same per sequence (T = s), averaged over the sequences;
- z-loss: ``coeff * mean_t logsumexp(logits_t)^2``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalite.moe.config import MoEConfig
from megalite.tensor_parallel import reduce_from_tensor_model_parallel_region


class Router(nn.Module):
    """``tokens [T, h]`` -> (experts ``[T, k]`` int64, weights ``[T, k]``, keep ``[T, k]`` or
    None, aux loss (scalar, with grad), stats dict (detached))."""

    def __init__(self, moe: MoEConfig, hidden_size: int, init_method, params_dtype, device=None):
        super().__init__()
        self.moe, self.num_experts, self.topk = moe, moe.num_experts, moe.moe_router_topk
        weight = torch.empty(self.num_experts, hidden_size)
        init_method(weight)
        self.weight = nn.Parameter(weight.to(device=device, dtype=params_dtype))
        if moe.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts, device=device))
        else:
            self.expert_bias = None
        # Tokens routed to each expert since the last bias update (training forwards only).
        self.register_buffer(
            "local_tokens_per_expert",
            torch.zeros(self.num_experts, device=device),
            persistent=False,
        )

    def forward(self, tokens: torch.Tensor, batch: int, stats_group=None):
        moe, k = self.moe, self.topk
        dtype = torch.float64 if moe.moe_router_dtype == "fp64" else torch.float32
        logits = F.linear(tokens.to(dtype), self.weight.to(dtype))  # [T, E]
        if moe.moe_router_score_function == "softmax":
            scores = torch.softmax(logits, dim=-1)
        else:
            scores = torch.sigmoid(logits)
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        experts = torch.topk(choice.detach(), k, dim=-1).indices  # [T, k]
        weights = scores.gather(1, experts)
        if moe.moe_router_score_function == "softmax" and not moe.moe_router_pre_softmax:
            weights = torch.softmax(logits.gather(1, experts), dim=-1)
        elif moe.moe_router_score_function == "sigmoid" and k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if moe.moe_router_topk_scaling_factor is not None:
            weights = weights * moe.moe_router_topk_scaling_factor
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, experts, True)
        keep = self._capacity_mask(routing_map, weights, experts, tokens.shape[0])
        counts = routing_map.sum(0).float()  # [E], before any drop
        if self.training and torch.is_grad_enabled() and not recomputing():
            self.local_tokens_per_expert += counts.detach()
        aux, stats = self._losses(logits, scores, routing_map, batch, stats_group)
        stats["tokens_per_expert"] = reduce_from_tensor_model_parallel_region(
            counts.detach(), stats_group
        )
        return experts, weights.to(tokens.dtype), keep, aux.float(), stats

    def _capacity_mask(self, routing_map, weights, experts, num_tokens) -> Optional[torch.Tensor]:
        """``keep [T, k]``: per expert, the first `capacity` tokens routed to it (``position``) or
        the `capacity` with the largest routing probability actually applied, after top-k
        renormalisation and scaling (``probs``; Megatron ranks these, not the pre-top-k scores)."""
        cf = self.moe.moe_expert_capacity_factor
        if cf is None:
            return None
        capacity = math.ceil(num_tokens * self.topk / self.num_experts * cf)
        if self.moe.moe_token_drop_policy == "probs":
            applied = torch.zeros_like(routing_map, dtype=weights.dtype)
            applied.scatter_(1, experts, weights.detach())  # [T, E], 0 where not routed
            ranked = applied.masked_fill(~routing_map, float("-inf"))
            take = min(capacity, num_tokens)
            top = torch.topk(ranked, take, dim=0).indices  # [take, E]
            kept = torch.zeros_like(routing_map).scatter_(0, top, True) & routing_map
        else:  # position: the first `capacity` tokens of each expert
            kept = routing_map & (routing_map.long().cumsum(0) <= capacity)
        return kept.gather(1, experts)

    def _losses(self, logits, scores, routing_map, batch, group):
        moe, e, k = self.moe, self.num_experts, self.topk
        aux = logits.new_zeros(())
        stats = {}
        kind = moe.moe_router_load_balancing_type
        if kind != "none" and moe.moe_aux_loss_coeff > 0:
            probs = scores if moe.moe_router_score_function == "softmax" else (
                scores / (scores.sum(-1, keepdim=True) + 1e-20)
            )  # fmt: skip
            if kind == "aux_loss":
                num = _sum(torch.tensor(float(probs.shape[0])), group)
                p_sum = _sum(probs.sum(0), group)
                c = _sum(routing_map.sum(0).float(), group)
                lb = (p_sum * c).sum() * (e * moe.moe_aux_loss_coeff) / (k * num * num)
            else:  # per sequence: token t is sequence t % batch
                p_seq = _sum(probs.view(-1, batch, e).sum(0), group)  # [b, E]
                c_seq = _sum(routing_map.view(-1, batch, e).sum(0).float(), group)
                s = _sum(torch.tensor(float(probs.shape[0] // batch)), group)
                lb = (p_seq * c_seq).sum() * (e * moe.moe_aux_loss_coeff) / (k * s * s * batch)
            aux = aux + lb
            stats["load_balancing_loss"] = lb.detach()
        if moe.moe_z_loss_coeff:
            num = _sum(torch.tensor(float(logits.shape[0])), group)
            z = _sum(torch.logsumexp(logits, dim=-1).square().sum(), group)
            z = z * (moe.moe_z_loss_coeff / num)
            aux = aux + z
            stats["z_loss"] = z.detach()
        return aux, stats


def recomputing() -> bool:
    """True inside a backward pass: activation recompute re-running a forward (whose counts and
    metrics were already recorded once)."""
    return torch._C._current_graph_task_id() != -1


def _sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the ranks sharing the micro-batch; gradient flows to this rank's own part."""
    return reduce_from_tensor_model_parallel_region(x, group)


@torch.no_grad()
def update_expert_bias(routers: list[Router], group=None) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): after an optimizer step, move each expert's bias
    by ``rate * sign(mean load - load)``, the load summed over every micro-batch of the step and
    every rank of the stage (`group`: TP x CP x DP), then reset the counts."""
    routers = [r for r in routers if r.expert_bias is not None]
    if not routers:
        return
    counts = torch.stack([r.local_tokens_per_expert for r in routers])
    counts = reduce_from_tensor_model_parallel_region(counts, group)
    for router, load in zip(routers, counts):
        rate = router.moe.moe_router_bias_update_rate
        router.expert_bias += rate * torch.sign(load.mean() - load)
        router.local_tokens_per_expert.zero_()
