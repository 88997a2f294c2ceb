"""Context parallelism (CP): one sequence split over the ranks of a CP group.

* `split`: the load-balanced split (2 x CP chunks, rank r holds chunks r and 2CP-1-r) of tokens,
  labels, loss mask, position ids and activations, and its inverse;
* `ring`: ring attention (``p2p``), K/V blocks round the CP ring, log-sum-exp merge;
* `ulysses`: all-to-all attention (``a2a``), heads traded for sequence and back;
* `comm`: the ring send/recv and the autograd all-to-all they use.

`context_parallel_attention` is what a model's core attention calls when CP > 1. The settings
are ``--context-parallel-size`` and ``--cp-comm-type`` (`megalite.config.parallel.ParallelConfig`),
copied into the model's `GPTConfig` like the rest of the split.
"""

from __future__ import annotations

from typing import Optional

import torch

from megalite.context_parallel.comm import group_size
from megalite.context_parallel.ring import ring_attention
from megalite.context_parallel.split import (
    check_seq_length,
    chunk_ids,
    gather,
    position_ids,
    split,
    split_batch,
    unsplit,
)
from megalite.context_parallel.ulysses import check_heads, ulysses_attention

COMM_TYPES = ("p2p", "a2a")


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group,
    comm_type: str = "p2p",
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Causal attention of load-balanced local sequences over the CP `group`.

    ``q [b, n, s/cp, d]``, ``k, v [b, g, s/cp, d]`` -> ``[b, n, s/cp, d]``: equal to full causal
    attention on the whole sequence, then `split`.
    """
    if comm_type == "p2p":
        return ring_attention(q, k, v, group, scale, dropout_p)
    if comm_type == "a2a":
        return ulysses_attention(q, k, v, group, dropout_p, scale)
    raise ValueError(f"cp_comm_type must be one of {COMM_TYPES}, got {comm_type!r}")


__all__ = [
    "COMM_TYPES",
    "check_heads",
    "check_seq_length",
    "chunk_ids",
    "context_parallel_attention",
    "gather",
    "group_size",
    "position_ids",
    "ring_attention",
    "split",
    "split_batch",
    "ulysses_attention",
    "unsplit",
]
