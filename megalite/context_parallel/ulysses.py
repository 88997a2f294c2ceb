"""All-to-all attention (``--cp-comm-type a2a``, DeepSpeed-Ulysses).

Before attention, an all-to-all trades heads for sequence: every CP rank goes from all of its
(TP-local) heads over its part of the sequence, ``[b, n, s/cp, d]``, to ``n/cp`` heads over the
whole sequence, ``[b, n/cp, s, d]``; attention is then the ordinary full causal attention; a
second all-to-all trades back. Communication is four all-to-alls of activation size per layer
(q, k, v, out), independent of CP, against the ring's CP - 1 key/value transfers; but the heads
must divide: ``n/tp`` query heads and ``g/tp`` key/value heads by CP.

The sequence gathered from the ranks comes in the load-balanced order (rank 0's two chunks,
rank 1's, ...); it is permuted to natural order for the causal mask and back afterwards.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.context_parallel.comm import AllToAll
from megalite.context_parallel.split import reorder_index


def check_heads(num_heads: int, num_kv_heads: int, cp_size: int, tp_size: int = 1) -> None:
    """Raise `ValueError` naming the numbers unless CP divides the TP-local heads."""
    for what, count in (("num_attention_heads", num_heads), ("num_query_groups", num_kv_heads)):
        if count % (tp_size * cp_size) != 0:
            raise ValueError(
                f"cp_comm_type 'a2a' needs {what} ({count}) divisible by tensor-model-parallel "
                f"size ({tp_size}) x context-parallel size ({cp_size}) = {tp_size * cp_size}; "
                f"use cp_comm_type 'p2p'"
            )


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Exact causal attention of the load-balanced local sequences over the CP `group`.

    ``q [b, n, s/cp, d]``, ``k, v [b, g, s/cp, d]`` -> ``[b, n, s/cp, d]``. `dropout_p` is
    applied by SDPA with the caller's RNG state (each rank holds different heads).
    """
    cp = dist.get_world_size(group)
    check_heads(q.shape[1], k.shape[1], cp)
    s = q.shape[2] * cp
    idx = reorder_index(s, cp, q.device)  # gathered position i holds global position idx[i]
    order = torch.argsort(idx)

    def to_heads(t: torch.Tensor) -> torch.Tensor:  # [b, x, s/cp, d] -> [b, x/cp, s, d]
        return AllToAll.apply(t, group, 1, 2).index_select(2, order)

    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    return AllToAll.apply(out.index_select(2, idx), group, 2, 1)  # [b, n, s/cp, d]
