"""Gradient reductions a split model needs on top of data parallelism.

* Sequence parallelism: replicated parameters inside the SP region (norms, row-parallel biases)
  see only this rank's ``s/tp`` tokens, so their gradients are partial sums over TP ranks.
* Tied embeddings across stages: the word embedding (first stage) and its output-layer copy
  (last stage) each get part of the gradient of the one tied weight; both need the sum.

Both read ``p.main_grad`` when the parameter has one (DDP's fp32 buffers), else ``p.grad``, and
work on plain model chunks or on wrappers around them (anything with ``.parameters()``). Call
them after the last backward and before the data-parallel average (all are sums: they commute).
`megalite.data_parallel.finalize.finalize_model_grads` does the same on DDP's deferred buckets.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from megalite.distributed import allreduce_coalesced


def _grad(p: nn.Parameter) -> torch.Tensor:
    """The gradient to reduce; a parameter without one gets zeros (peers still all-reduce)."""
    if getattr(p, "main_grad", None) is not None:
        return p.main_grad
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def _marked(model_chunks: Iterable[nn.Module], attr: str) -> list[nn.Parameter]:
    seen, out = set(), []
    for chunk in model_chunks:
        for p in chunk.parameters():
            if p.requires_grad and getattr(p, attr, False) and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def allreduce_sequence_parallel_grads(model_chunks: Iterable[nn.Module], tp_group) -> None:
    """Sum the gradients of ``sequence_parallel`` parameters over the TP group."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return
    params = _marked(model_chunks, "sequence_parallel")
    allreduce_coalesced([_grad(p) for p in params], tp_group)


def allreduce_embedding_grads(model_chunks: Iterable[nn.Module], embedding_group) -> None:
    """Sum the gradients of ``shared_embedding`` parameters over the embedding group.

    A rank holding no such parameter (a middle stage, untied or single-stage models) does
    nothing and may pass ``embedding_group=None``; first and last stages hold one each.
    """
    params = _marked(model_chunks, "shared_embedding")
    if not params:
        return
    if embedding_group is None:
        raise ValueError("this rank holds a shared_embedding parameter but got no embedding group")
    if dist.get_world_size(embedding_group) > 1:
        allreduce_coalesced([_grad(p) for p in params], embedding_group)
