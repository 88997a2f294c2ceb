"""Token dispatchers: bring each (token, expert) pair to the rank holding the expert, run the
experts, bring the outputs back and combine them with the routing weights.

Both take the same inputs on every rank (its own distinct tokens) and give the same result:

- `AllGatherDispatcher` (group: ETP x EP of the stage): every rank gathers all tokens of the
  group (equal counts), computes the pairs routed to its own experts with its ETP shard, scatters
  the weighted outputs into the gathered token order, and a reduce-scatter sums the partial
  results of every expert and every ETP shard back to the token's rank.
- `AllToAllDispatcher`: tokens are sorted by expert, an all-to-all over EP (uneven splits, learnt
  from an all-to-all of per-expert counts) sends each to the EP rank of its expert, an all-gather
  over ETP gives every shard of that expert the same rows; backwards on the way out
  (reduce-scatter over ETP, the reverse all-to-all), then the weighted combine on the token's
  rank. Bytes over EP per rank: ``(pairs sent + pairs received) x h x element size``, per
  direction of each pass.

Pairs dropped by the capacity limit (``keep`` False) are not sent; dropless routing keeps all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megalite.moe import collectives as C
from megalite.tensor_parallel import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megalite.tensor_parallel.utils import group_rank_and_size


@dataclass
class Pairs:
    """(token, expert, weight) pairs of this rank sorted by expert; `counts` per expert [E]."""

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor


def sort_pairs(experts, weights, keep, num_experts: int) -> Pairs:
    """Flatten ``[T, k]`` routing into pairs, drop the unkept ones, stable-sort by expert."""
    t, k = experts.shape
    token = torch.arange(t, device=experts.device).repeat_interleave(k)
    expert, weight = experts.reshape(-1), weights.reshape(-1)
    if keep is not None:
        mask = keep.reshape(-1)
        token, expert, weight = token[mask], expert[mask], weight[mask]
    order = torch.sort(expert, stable=True).indices
    counts = torch.bincount(expert, minlength=num_experts)
    return Pairs(token[order], expert[order], weight[order], counts)


def combine(out_rows: torch.Tensor, pairs: Pairs, num_tokens: int) -> torch.Tensor:
    """``sum_k weight * expert output`` per token: ``[pairs, h] -> [num_tokens, h]``."""
    weighted = out_rows * pairs.weight.unsqueeze(-1).to(out_rows.dtype)
    out = out_rows.new_zeros((num_tokens, out_rows.shape[-1]))
    return out.index_add(0, pairs.token, weighted)


class AllGatherDispatcher:
    def __init__(self, num_experts: int, ep_group, etp_ep_group):
        self.num_experts = num_experts
        self.ep_rank, self.ep = group_rank_and_size(ep_group)
        self.group = etp_ep_group
        self.num_local = num_experts // self.ep

    def __call__(self, tokens, experts, weights, keep, expert_fn) -> torch.Tensor:
        g = self.group
        all_tokens = gather_from_sequence_parallel_region(tokens, g, True)
        all_weights = gather_from_sequence_parallel_region(weights, g, True)
        all_experts = _gather_plain(experts, g)
        all_keep = _gather_plain(keep, g) if keep is not None else None
        first = self.ep_rank * self.num_local
        local = (all_experts >= first) & (all_experts < first + self.num_local)
        mine = local if all_keep is None else local & all_keep
        pairs = sort_pairs(all_experts - first, all_weights, mine, self.num_local)
        rows = all_tokens[pairs.token]
        out_rows = expert_fn(rows, pairs.counts.tolist())
        out = combine(out_rows, pairs, all_tokens.shape[0])
        return reduce_scatter_to_sequence_parallel_region(out, g)


def _gather_plain(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather rows (equal counts) of a tensor without gradient."""
    if C.world(group) == 1:
        return x
    return C._gather_rows(x, [x.shape[0]] * C.world(group), group)


class AllToAllDispatcher:
    def __init__(self, num_experts: int, ep_group, etp_group):
        self.num_experts = num_experts
        self.ep_group, self.etp_group = ep_group, etp_group
        self.ep = C.world(ep_group)
        self.num_local = num_experts // self.ep

    def __call__(self, tokens, experts, weights, keep, expert_fn) -> torch.Tensor:
        pairs = sort_pairs(experts, weights, keep, self.num_experts)
        rows = tokens[pairs.token]
        send = pairs.counts.view(self.ep, self.num_local)  # to EP rank j, per local expert
        recv = C.exchange_counts(send, self.ep_group)  # from EP rank j, per my local expert
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        rows = C.all_to_all(rows, recv_splits, send_splits, self.ep_group)
        # Every ETP shard of my experts needs the rows the other ETP ranks received.
        recv_all = C.all_gather_counts(recv, self.etp_group)  # [etp, ep, E_local]
        rows = C.gather_rows(rows, recv_all.sum((1, 2)).tolist(), self.etp_group)
        # Rows are ordered (etp source, ep source, local expert): group them by local expert.
        chunk_expert = torch.arange(self.num_local, device=rows.device).repeat(
            recv_all.shape[0] * recv_all.shape[1]
        )
        row_expert = chunk_expert.repeat_interleave(recv_all.reshape(-1))
        order = torch.sort(row_expert, stable=True).indices
        out_rows = expert_fn(rows[order], recv_all.sum((0, 1)).tolist())
        out_rows = out_rows[torch.argsort(order)]
        out_rows = C.reduce_scatter_rows(out_rows, recv_all.sum((1, 2)).tolist(), self.etp_group)
        out_rows = C.all_to_all(out_rows, send_splits, recv_splits, self.ep_group)
        return combine(out_rows, pairs, tokens.shape[0])


def build_dispatcher(kind: str, num_experts: int, groups) -> Optional[object]:
    if kind == "allgather":
        return AllGatherDispatcher(num_experts, groups.ep, groups.etp_ep)
    if kind == "alltoall":
        return AllToAllDispatcher(num_experts, groups.ep, groups.etp)
    raise ValueError(f"--moe-token-dispatcher-type must be allgather or alltoall, got {kind!r}")
