"""Autograd collectives for tensor and sequence parallelism (the Megatron paper's f and g).

Each is a small named `torch.autograd.Function` whose forward and backward are conjugate
collectives over an explicitly passed TP group. A column-parallel linear starts with ``f``
(`copy_to_tensor_model_parallel_region`: identity forward, all-reduce backward) and a
row-parallel linear ends with ``g`` (`reduce_from_tensor_model_parallel_region`: all-reduce
forward, identity backward). Under sequence parallelism the pair becomes all-gather along the
sequence dimension before the column linear and reduce-scatter after the row linear, so the
activations between the TP blocks are ``[s/tp, b, h]``.

``group=None`` means no tensor parallelism: every function is then the identity, and so is any
group of size 1 (no communication is issued).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from megalite.tensor_parallel.utils import group_rank_and_size

Group = Optional[dist.ProcessGroup]

# torch >= 2.10 renamed the single-tensor collectives; the old names still work but warn.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _world(group: Group) -> int:
    return group_rank_and_size(group)[1]


def _identity_when_alone(fn):
    """A group of one rank (or None) needs no collective and no autograd node: return `x`.

    Skipping the Function call matters at TP=1, where every linear would otherwise pay for two
    no-op autograd nodes per step (measured by tools/bench_overhead.py).
    """

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, group: Group, *args):
        return x if _world(group) == 1 else fn(x, group, *args)

    return wrapper


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if _world(group) == 1:
        return x
    x = x.contiguous().clone()  # never modify a tensor autograd may still need
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    rank, world = group_rank_and_size(group)
    if world == 1:
        return x
    if x.shape[-1] % world != 0:
        raise ValueError(
            f"last dimension {x.shape[-1]} is not divisible by tensor-model-parallel size {world}"
        )
    return x.chunk(world, dim=-1)[rank].contiguous()


def _gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    # Gather the flat tensors into one buffer (gloo only takes the concatenated form), then
    # put each rank's piece side by side along the last dim.
    out = torch.empty(world * x.numel(), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous().view(-1), group=group)
    return torch.cat(out.view(world, *x.shape).unbind(0), dim=-1)


def _split_first(x: torch.Tensor, group: Group) -> torch.Tensor:
    rank, world = group_rank_and_size(group)
    if world == 1:
        return x
    if x.shape[0] % world != 0:
        raise ValueError(
            f"sequence length {x.shape[0]} (dim 0) is not divisible by tensor-model-parallel "
            f"size {world} (needed by sequence parallelism)"
        )
    return x.chunk(world, dim=0)[rank].contiguous()


def _gather_first(x: torch.Tensor, group: Group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_first(x: torch.Tensor, group: Group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    if x.shape[0] % world != 0:
        raise ValueError(
            f"sequence length {x.shape[0]} (dim 0) is not divisible by tensor-model-parallel "
            f"size {world} (needed by sequence parallelism)"
        )
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x.contiguous(), group=group)
    return out


class _CopyToModelParallelRegion(torch.autograd.Function):
    """f: identity forward, all-reduce backward. ``[.., h] -> [.., h]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """g: all-reduce (sum) forward, identity backward. ``[.., h] -> [.., h]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        out = _all_reduce(x, group)
        return out if out is not x else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    """Split the last dim forward (keep this rank's chunk), all-gather it backward.

    ``[.., h] -> [.., h/tp]``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_last(grad, ctx.group), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    """All-gather the last dim forward, split it backward. ``[.., h/tp] -> [.., h]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _split_last(grad, ctx.group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """Split the first (sequence) dim forward, all-gather it backward. ``[s, ..] -> [s/tp, ..]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _split_first(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_first(grad, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """All-gather the sequence dim forward. ``[s/tp, ..] -> [s, ..]``.

    Backward: reduce-scatter when the consumer is tensor-parallel (each rank's gradient of the
    full sequence is a partial sum, e.g. the input of a column-parallel linear), else split
    (each rank already holds the full gradient, e.g. before a replicated computation).
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, group: Group, tensor_parallel_output_grad: bool
    ) -> torch.Tensor:
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_first(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_first(grad, ctx.group), None, None
        return _split_first(grad, ctx.group), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Reduce-scatter (sum) along the sequence dim forward, all-gather backward.

    ``[s, ..] -> [s/tp, ..]``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_first(grad, ctx.group), None


@_identity_when_alone
def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Identity forward, all-reduce backward (input of a column-parallel linear)."""
    return _CopyToModelParallelRegion.apply(x, group)


@_identity_when_alone
def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-reduce forward, identity backward (output of a row-parallel linear)."""
    return _ReduceFromModelParallelRegion.apply(x, group)


@_identity_when_alone
def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """``[.., h] -> [.., h/tp]``: this rank's chunk of the last dim; all-gather backward."""
    return _ScatterToModelParallelRegion.apply(x, group)


@_identity_when_alone
def gather_from_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """``[.., h/tp] -> [.., h]``: all-gather the last dim; split backward."""
    return _GatherFromModelParallelRegion.apply(x, group)


@_identity_when_alone
def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """``[s, ..] -> [s/tp, ..]``: this rank's chunk of the sequence; all-gather backward."""
    return _ScatterToSequenceParallelRegion.apply(x, group)


@_identity_when_alone
def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: Group, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """``[s/tp, ..] -> [s, ..]``: all-gather the sequence; reduce-scatter (or split) backward."""
    return _GatherFromSequenceParallelRegion.apply(x, group, tensor_parallel_output_grad)


@_identity_when_alone
def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """``[s, ..] -> [s/tp, ..]``: sum over TP ranks, keep this rank's chunk; all-gather backward."""
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)
