"""Small helpers shared by the tensor-parallel code: checked division, vocab padding, sharding.

Every size check here raises a `ValueError` that names the sizes which disagree, so a bad layout
fails at construction with a readable message instead of deep inside a collective.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist


def ensure_divisibility(numerator: int, denominator: int, what: str = "", by: str = "") -> None:
    """Raise `ValueError` unless `denominator` divides `numerator`.

    `what` and `by` name the two quantities in the message, e.g. ``"output_size 10 is not
    divisible by tensor-model-parallel size 4"``.
    """
    if denominator <= 0 or numerator % denominator != 0:
        left = f"{what} {numerator}" if what else str(numerator)
        right = f"{by} {denominator}" if by else str(denominator)
        raise ValueError(f"{left} is not divisible by {right}")


def divide(numerator: int, denominator: int, what: str = "", by: str = "") -> int:
    """`numerator // denominator`, raising a `ValueError` naming both sizes if it is not exact.

    >>> divide(12, 4)
    3
    >>> divide(10, 4, "hidden size", "tensor-model-parallel size")  # doctest: +SKIP
    ValueError: hidden size 10 is not divisible by tensor-model-parallel size 4
    """
    ensure_divisibility(numerator, denominator, what, by)
    return numerator // denominator


def vocab_size_with_padding(
    vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> int:
    """Pad the vocabulary as Megatron's ``--make-vocab-size-divisible-by`` does.

    The padded size is the smallest multiple of ``make_vocab_size_divisible_by * tp`` that is
    >= `vocab_size`, so every TP rank holds the same number of rows and each shard stays a
    multiple of the alignment (with 128: 50257 -> 50304 at TP=1, 50432 at TP=2, 50688 at TP=4).
    """
    if vocab_size < 1:
        raise ValueError(f"vocab size must be >= 1, got {vocab_size}")
    if make_vocab_size_divisible_by < 1 or tensor_model_parallel_size < 1:
        raise ValueError(
            f"make_vocab_size_divisible_by ({make_vocab_size_divisible_by}) and "
            f"tensor-model-parallel size ({tensor_model_parallel_size}) must be >= 1"
        )
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def vocab_range(partition_vocab_size: int, rank: int) -> tuple[int, int]:
    """``[first, last)`` vocabulary ids owned by TP `rank` when each rank holds the same count."""
    first = rank * partition_vocab_size
    return first, first + partition_vocab_size


class PlanningGroup(NamedTuple):
    """A stand-in TP group that only answers rank and size: the planner (`megalite.planner`)
    builds a rank's real modules on the meta device with it to count their parameters, without
    any process group. Running a collective on it fails (it is not a ProcessGroup)."""

    rank: int
    size: int


def group_rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """This rank's index in `group` and the group's size.

    ``group=None`` means *no tensor parallelism* (rank 0 of 1), not torch's default WORLD group:
    a layer built without a group is a plain serial layer, usable without torch.distributed.
    """
    if group is None:
        return 0, 1
    if isinstance(group, PlanningGroup):
        return group.rank, group.size
    return dist.get_rank(group), dist.get_world_size(group)


def shard_slices(size: int, world_size: int, rank: int, stride: int = 1) -> list[slice]:
    """The slices of a dimension of length `size` that TP `rank` owns, in order.

    With ``stride == 1`` that is one contiguous block ``size / tp``. With ``stride > 1`` the
    dimension is `stride` equal blocks (e.g. SwiGLU's fused ``[gate; up]``) and the rank owns
    its ``1/tp`` piece of each block, so each block is split as a TP-sharded tensor would be.
    """
    if size % (world_size * stride) != 0:
        raise ValueError(
            f"partitioned size {size} is not divisible by tensor-model-parallel size "
            f"{world_size} x partition stride {stride} = {world_size * stride}"
        )
    per_piece = size // (world_size * stride)
    return [
        slice((block * world_size + rank) * per_piece, (block * world_size + rank + 1) * per_piece)
        for block in range(stride)
    ]


def shard_tensor(
    full: torch.Tensor, dim: int, world_size: int, rank: int, stride: int = 1
) -> torch.Tensor:
    """TP `rank`'s shard of `full` along `dim` (see `shard_slices`), as a new contiguous tensor."""
    pieces = [
        full.narrow(dim, s.start, s.stop - s.start)
        for s in shard_slices(full.shape[dim], world_size, rank, stride)
    ]
    # cat (or clone) always copies: the shard must not keep the full tensor's storage alive.
    return torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0].clone()
