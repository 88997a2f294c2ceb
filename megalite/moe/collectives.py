"""Autograd collectives of the token dispatchers, each over an explicitly passed group.

Rows (tokens) are the first dimension. Counts that differ per rank (uneven splits) are given by
the caller, who learns them from a small exchange of per-expert counts first, so no collective
here needs to guess a size. ``group=None`` or a group of one rank is the identity.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megalite.tensor_parallel.utils import group_rank_and_size

Group = Optional[dist.ProcessGroup]

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def world(group: Group) -> int:
    return group_rank_and_size(group)[1]


def exchange_counts(counts: torch.Tensor, group: Group) -> torch.Tensor:
    """``[world, n]`` counts (row j: what this rank sends to rank j) -> ``[world, n]`` counts
    this rank receives (row j: from rank j). No gradient."""
    if world(group) == 1:
        return counts.clone()
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def all_gather_counts(counts: torch.Tensor, group: Group) -> torch.Tensor:
    """``counts`` of every rank stacked: ``[world, *counts.shape]``. No gradient."""
    n = world(group)
    if n == 1:
        return counts.unsqueeze(0).clone()
    out = torch.empty((n * counts.numel(),), dtype=counts.dtype, device=counts.device)
    _all_gather_single(out, counts.contiguous().view(-1), group=group)
    return out.view(n, *counts.shape)


def _all_to_all(x: torch.Tensor, out_splits: list, in_splits: list, group: Group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows forward; the reverse all-to-all (splits swapped) backward."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list, in_splits: list, group: Group) -> torch.Tensor:
    """Send ``in_splits[j]`` rows of `x` (in order) to rank j; receive ``out_splits[j]`` from j."""
    if world(group) == 1:
        return x
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def _gather_rows(x: torch.Tensor, counts: list, group: Group) -> torch.Tensor:
    """Rows of every rank in rank order; rank j holds ``counts[j]`` (padded to the max)."""
    n, most = len(counts), max(counts)
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = x.new_empty((n * most, *x.shape[1:]))
    _all_gather_single(out, padded, group=group)
    out = out.view(n, most, *x.shape[1:])
    return torch.cat([out[j, : counts[j]] for j in range(n)])


def _reduce_scatter_rows(x: torch.Tensor, counts: list, group: Group) -> torch.Tensor:
    """Sum over ranks of rank j's ``counts[j]`` rows of `x` (laid out rank by rank), to rank j."""
    rank, n = group_rank_and_size(group)
    most = max(counts)
    padded = x.new_zeros((n, most, *x.shape[1:]))
    for j, piece in enumerate(x.split(counts)):
        padded[j, : counts[j]] = piece
    out = x.new_empty((most, *x.shape[1:]))
    _reduce_scatter_single(out, padded.view(n * most, *x.shape[1:]), group=group)
    return out[: counts[rank]]


class _GatherRows(torch.autograd.Function):
    """All-gather rows of uneven counts forward, reduce-scatter them backward."""

    @staticmethod
    def forward(ctx, x, counts, group):
        ctx.counts, ctx.group = counts, group
        return _gather_rows(x, counts, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.counts, ctx.group), None, None


class _ReduceScatterRows(torch.autograd.Function):
    """Reduce-scatter rows of uneven counts forward, all-gather them backward."""

    @staticmethod
    def forward(ctx, x, counts, group):
        ctx.counts, ctx.group = counts, group
        return _reduce_scatter_rows(x, counts, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.counts, ctx.group), None, None


def gather_rows(x: torch.Tensor, counts: list, group: Group) -> torch.Tensor:
    """``[counts[me], ..] -> [sum(counts), ..]``: every rank's rows; reduce-scatter backward
    (each rank's gradient of the gathered rows is a partial sum)."""
    if world(group) == 1:
        return x
    return _GatherRows.apply(x, list(counts), group)


def reduce_scatter_rows(x: torch.Tensor, counts: list, group: Group) -> torch.Tensor:
    """``[sum(counts), ..] -> [counts[me], ..]``: sum over ranks, keep mine; all-gather backward."""
    if world(group) == 1:
        return x
    return _ReduceScatterRows.apply(x, list(counts), group)


class AttachAuxLoss(torch.autograd.Function):
    """Identity on `x` forward; backward also sends ``scale`` into `aux_loss`.

    Lets a loss computed inside a layer (load balancing, z-loss) reach the router's gradients
    on any pipeline stage without travelling to the last stage with the LM loss. `scale` is
    the weight the training loss gives one micro-batch (1 / number of micro-batches).
    """

    @staticmethod
    def forward(ctx, x, aux_loss, scale: float):
        ctx.scale = scale
        ctx.save_for_backward(aux_loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None
