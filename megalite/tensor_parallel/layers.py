"""Tensor-parallel layers: column- and row-parallel linears and the vocab-parallel embedding.

Shapes use Megatron's layout ``[s, b, h]``; under sequence parallelism the activations outside
the TP block are ``[s/tp, b, h]``. Each layer takes its TP `group` explicitly (``None``: no
tensor parallelism, a plain serial layer).

Initialization is layout-invariant (docs/CONTRACTS.md): `init_method(full)` fills the *full*
weight in place on CPU in fp32, the layer keeps a contiguous copy of its shard in `params_dtype`
on `device` and drops the full tensor, so at most one full weight exists at a time and the shards
at TP=k are exactly the slices of the TP=1 weight. Biases start at zero, as in Megatron.

Parameter attributes follow the contract: split parameters carry ``tensor_model_parallel=True``,
``partition_dim`` and ``partition_stride`` (at TP=1 too, so a reshard tool knows how to split);
the replicated bias of a row-parallel linear under sequence parallelism carries
``sequence_parallel=True`` (its gradient is a per-rank partial sum that the data-parallel code
must all-reduce over TP).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalite.tensor_parallel.mappings import (
    _gather_first,
    _reduce_scatter_first,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megalite.tensor_parallel.utils import (
    divide,
    group_rank_and_size,
    shard_tensor,
    vocab_range,
)

InitMethod = Callable[[torch.Tensor], object]
Device = Optional[Union[str, torch.device]]
_TP = "tensor-model-parallel size"


def set_tensor_model_parallel_attributes(
    param: torch.Tensor, is_parallel: bool, dim: int = 0, stride: int = 1
) -> None:
    """Mark `param` as split (or not) across TP ranks, as docs/CONTRACTS.md specifies."""
    param.tensor_model_parallel = is_parallel
    param.partition_dim = dim
    param.partition_stride = stride


def _sharded_parameter(
    full_shape: tuple[int, ...],
    partition_dim: int,
    stride: int,
    init_method: InitMethod,
    group: Optional[dist.ProcessGroup],
    params_dtype: torch.dtype,
    device: Device,
) -> nn.Parameter:
    """Build the full weight on CPU, let `init_method` fill it, keep this rank's shard."""
    rank, world = group_rank_and_size(group)
    # fp32 on CPU whatever the final dtype/device: the same seed gives the same numbers at any
    # layout and precision, and only one full tensor is ever alive.
    full = torch.empty(full_shape, dtype=torch.float32)
    init_method(full)
    shard = shard_tensor(full, partition_dim, world, rank, stride)
    del full
    param = nn.Parameter(shard.to(device=device, dtype=params_dtype))
    # Marked as split even at TP=1 (as Megatron does): resharding a TP=1 checkpoint to TP=k
    # needs to know which dimension to split.
    set_tensor_model_parallel_attributes(param, True, partition_dim, stride)
    return param


def _zero_bias(
    size: int, params_dtype: torch.dtype, device: Device, is_parallel: bool, stride: int = 1
) -> nn.Parameter:
    bias = nn.Parameter(torch.zeros(size, dtype=params_dtype, device=device))
    set_tensor_model_parallel_attributes(bias, is_parallel, 0, stride)
    return bias


class _SequenceParallelLinear(torch.autograd.Function):
    """``[s/tp, b, in]`` -> all-gather the sequence -> ``F.linear`` -> ``[s, b, out/tp]``.

    Forward keeps only the local shard of the input (and the weight), not the gathered
    ``[s, b, in]``: backward all-gathers the input again for the weight gradient and
    reduce-scatters the input gradient, as Megatron's linear with sequence parallelism does.
    One more all-gather per backward buys 1/tp of the linear's saved input.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(_gather_first(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = _reduce_scatter_first(grad.matmul(weight), ctx.group)
        grad_weight = grad_bias = None
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            total = _gather_first(x, ctx.group)
            grad_weight = rows.t().matmul(total.reshape(-1, total.shape[-1]))
            del total
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias, None


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split along its output dim: ``[s, b, in] -> [s, b, out/tp]``.

    Weight shard ``[out/tp, in]`` (partition_dim 0), bias shard ``[out/tp]``. With
    `gather_output` the output is all-gathered to ``[s, b, out]``. With `sequence_parallel` the
    input is ``[s/tp, b, in]`` and is all-gathered along the sequence first (its gradient is
    reduce-scattered back); only the local shard is kept for backward, which gathers it again.
    `partition_stride` k: the full weight is k equal blocks along the output dim (e.g. SwiGLU's
    ``[gate; up]``) and each rank holds its piece of every block, so its output is
    ``[gate_shard, up_shard]``.

    `skip_weight_param_allocation`: no weight parameter; `forward(x, weight)` must pass one of
    shape ``[out/tp, in]`` (tied output layer using the word embedding's shard).
    Returns ``(output, bias)``: bias is None unless `skip_bias_add` (then it is not added).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        group: Optional[dist.ProcessGroup],
        init_method: Optional[InitMethod],
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        sequence_parallel: bool = False,
        partition_stride: int = 1,
        skip_weight_param_allocation: bool = False,
        params_dtype: torch.dtype = torch.float32,
        device: Device = None,
    ) -> None:
        super().__init__()
        rank, world = group_rank_and_size(group)
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output=True with sequence_parallel")
        self.output_size_per_partition = divide(
            output_size, world, "ColumnParallelLinear: output_size", _TP
        )
        if output_size % (world * partition_stride) != 0:
            raise ValueError(
                f"ColumnParallelLinear: output_size {output_size} is not divisible by {_TP} "
                f"{world} x partition_stride {partition_stride}"
            )
        self.input_size, self.output_size = input_size, output_size
        self.group, self.tp_rank, self.tp_size = group, rank, world
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.sequence_parallel = sequence_parallel and world > 1
        self.partition_stride = partition_stride
        if skip_weight_param_allocation:
            self.register_parameter("weight", None)
        else:
            if init_method is None:
                raise ValueError("ColumnParallelLinear needs an init_method for its weight")
            self.weight = _sharded_parameter(
                (output_size, input_size), 0, partition_stride, init_method, group,
                params_dtype, device,
            )  # fmt: skip
        if bias:
            self.bias = _zero_bias(
                self.output_size_per_partition, params_dtype, device, True, partition_stride
            )
        else:
            self.register_parameter("bias", None)

    def forward(
        self, x: torch.Tensor, weight: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``[s, b, in]`` (``[s/tp, b, in]`` if sequence parallel) -> ``[s, b, out/tp]``."""
        if weight is None:
            if self.weight is None:
                raise ValueError("ColumnParallelLinear has no weight: pass forward(x, weight=)")
            weight = self.weight
        expected = (self.output_size_per_partition, self.input_size)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"ColumnParallelLinear: weight shape {tuple(weight.shape)} != expected {expected}"
            )
        bias = self.bias if not self.skip_bias_add else None
        if self.sequence_parallel:
            out = _SequenceParallelLinear.apply(x, weight, bias, self.group)
        else:
            out = F.linear(copy_to_tensor_model_parallel_region(x, self.group), weight, bias)
        if self.gather_output:
            out = gather_from_tensor_model_parallel_region(out, self.group)
        return out, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, tp={self.tp_size}, "
            f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}, "
            f"stride={self.partition_stride}"
        )


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split along its input dim: ``[s, b, in/tp] -> [s, b, out]``.

    Weight shard ``[out, in/tp]`` (partition_dim 1); the bias ``[out]`` is replicated and added
    once, after the partial products are summed. With `sequence_parallel` the sum is a
    reduce-scatter and the output is ``[s/tp, b, out]`` (the bias is then marked
    ``sequence_parallel``). `input_is_parallel=False` takes a full ``[s, b, in]`` input and
    keeps this rank's chunk of its last dim. Returns ``(output, bias)`` like ColumnParallelLinear.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        group: Optional[dist.ProcessGroup],
        init_method: InitMethod,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        sequence_parallel: bool = False,
        params_dtype: torch.dtype = torch.float32,
        device: Device = None,
    ) -> None:
        super().__init__()
        rank, world = group_rank_and_size(group)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(
            input_size, world, "RowParallelLinear: input_size", _TP
        )
        self.group, self.tp_rank, self.tp_size = group, rank, world
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.sequence_parallel = sequence_parallel and world > 1
        self.weight = _sharded_parameter(
            (output_size, input_size), 1, 1, init_method, group, params_dtype, device
        )
        if bias:
            self.bias = _zero_bias(output_size, params_dtype, device, False)
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``[s, b, in/tp]`` -> ``[s, b, out]`` (``[s/tp, b, out]`` if sequence parallel)."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.group)
        out = F.linear(x, self.weight)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(out, self.group)
        else:
            out = reduce_from_tensor_model_parallel_region(out, self.group)
        if self.bias is None or self.skip_bias_add:
            return out, self.bias
        return out + self.bias, None

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, tp={self.tp_size}, "
            f"input_is_parallel={self.input_is_parallel}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary: ``[s, b]`` ids -> ``[s, b, h]``.

    Each rank holds rows ``[rank * V/tp, (rank + 1) * V/tp)`` (partition_dim 0). Ids outside
    the rank's range look up row 0 and are zeroed, then the partial embeddings are summed over
    TP. With `reduce_scatter_embeddings` (sequence parallelism) the sum is a reduce-scatter along
    dim 0 instead: ``[s, b]`` -> ``[s/tp, b, h]``. `num_embeddings` must already be padded
    (`vocab_size_with_padding`) to a multiple of TP.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        group: Optional[dist.ProcessGroup],
        init_method: InitMethod,
        reduce_scatter_embeddings: bool = False,
        params_dtype: torch.dtype = torch.float32,
        device: Device = None,
    ) -> None:
        super().__init__()
        rank, world = group_rank_and_size(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = divide(
            num_embeddings, world, "VocabParallelEmbedding num_embeddings (vocab size)", _TP
        )
        self.vocab_start_index, self.vocab_end_index = vocab_range(
            self.num_embeddings_per_partition, rank
        )
        self.group, self.tp_rank, self.tp_size = group, rank, world
        self.reduce_scatter_embeddings = reduce_scatter_embeddings and world > 1
        self.weight = _sharded_parameter(
            (num_embeddings, embedding_dim), 0, 1, init_method, group, params_dtype, device
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``[s, b]`` -> ``[s, b, h]`` (``[s/tp, b, h]`` with reduce_scatter_embeddings)."""
        if self.tp_size > 1:
            outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
            local = (ids - self.vocab_start_index).masked_fill(outside, 0)
        else:
            local = ids
        out = F.embedding(local, self.weight)
        if self.tp_size > 1:
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_parallel_region(out, self.group)
        return reduce_from_tensor_model_parallel_region(out, self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp_size}, "
            f"reduce_scatter_embeddings={self.reduce_scatter_embeddings}"
        )
