"""finalize_model_grads: everything between the last backward and ``optimizer.step()``.

Order matters for ZeRO. Tied-embedding and sequence-parallel gradients need a sum over the
embedding group / the TP group on top of the DP average. Those parameters sit in DDP's deferred
buckets, which no backward hook reduces, so here they still hold this rank's local (unreduced)
gradient: summing them first over TP / embedding group and then reducing over DP is exact for
ZeRO 0, 1 and 2 (both are sums, so they commute), whereas after a ZeRO reduce-scatter a rank no
longer holds the whole gradient to sum.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megalite.data_parallel.ddp import DistributedDataParallel
from megalite.distributed import allreduce_coalesced
from megalite.parallel_state import ModelParallelGroups


def _deferred_grads(chunks: list[DistributedDataParallel], attr: str) -> list[torch.Tensor]:
    grads = []
    for chunk in chunks:
        for bucket in chunk.buckets:
            if not bucket.deferred:
                continue
            bucket.materialize()  # ZeRO-2 may have released it if no grad arrived this step
            grads.extend(p.main_grad for p in bucket.params if getattr(p, attr, False))
    return grads


def allreduce_sequence_parallel_grads(chunks: list[DistributedDataParallel], tp_group) -> None:
    """Sum the partial grads of ``sequence_parallel`` params (norms, row biases) over TP."""
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        allreduce_coalesced(_deferred_grads(chunks, "sequence_parallel"), tp_group)


def allreduce_embedding_grads(chunks: list[DistributedDataParallel], embedding_group) -> None:
    """Sum the word-embedding (first stage) and output-weight (last stage) grads when tied."""
    if embedding_group is None or dist.get_world_size(embedding_group) < 2:
        return
    grads = _deferred_grads(chunks, "shared_embedding")
    if len(grads) > 1:
        raise RuntimeError(
            f"expected at most one shared_embedding parameter per rank, found {len(grads)}"
        )
    allreduce_coalesced(grads, embedding_group)


def finalize_model_grads(
    model_chunks: list[DistributedDataParallel],
    num_tokens: Optional[torch.Tensor] = None,
    *,
    groups: Optional[ModelParallelGroups] = None,
) -> None:
    """Make every chunk's ``main_grad`` the full, DP-averaged gradient (its shard under ZeRO).

    The schedules' ``finalize_model_grads_func`` (bind `groups` with functools.partial).
    `groups` (default: an unsplit model) gives the TP group for sequence-parallel grads and the
    embedding group for tied embeddings. `num_tokens` is accepted for schedule compatibility
    and ignored: the loss is already averaged per micro-batch.
    """
    groups = groups or ModelParallelGroups()
    tp_group, embedding_group = groups.tp_group, groups.embedding_group
    allreduce_sequence_parallel_grads(model_chunks, tp_group)
    if embedding_group is not None:
        allreduce_embedding_grads(model_chunks, embedding_group)
    for chunk in model_chunks:
        chunk.finish_grad_sync()
