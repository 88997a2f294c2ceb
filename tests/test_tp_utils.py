"""Size checks, Megatron's vocab padding rule and strided sharding (single process)."""

import pytest
import torch

from megalite.tensor_parallel import divide, shard_tensor, vocab_size_with_padding
from megalite.tensor_parallel.utils import shard_slices


def test_divide_names_the_sizes():
    assert divide(12, 4) == 3
    with pytest.raises(
        ValueError, match="^hidden size 10 is not divisible by tensor-model-parallel"
    ):
        divide(10, 4, "hidden size", "tensor-model-parallel size")
    with pytest.raises(ValueError, match="^7 is not divisible by 2$"):
        divide(7, 2)
    with pytest.raises(ValueError, match="is not divisible by 0"):
        divide(7, 0)


def _megatron_padding(vocab, divisible_by, tp):
    # Megatron-LM's _vocab_size_with_padding, written as its loop.
    multiple = divisible_by * tp
    after = vocab
    while after % multiple != 0:
        after += 1
    return after


def test_vocab_padding_like_megatron():
    assert vocab_size_with_padding(50257, 128, 1) == 50304
    assert vocab_size_with_padding(50257, 128, 2) == 50432
    assert vocab_size_with_padding(50257, 128, 4) == 50688
    assert vocab_size_with_padding(32000, 128, 8) == 32768
    for vocab in (1, 5, 127, 128, 129, 1000, 4097):
        for divisible_by in (1, 8, 128):
            for tp in (1, 2, 3, 4, 8):
                padded = vocab_size_with_padding(vocab, divisible_by, tp)
                assert padded == _megatron_padding(vocab, divisible_by, tp)
                assert padded % tp == 0 and (padded // tp) % divisible_by == 0
    with pytest.raises(ValueError, match="vocab size must be >= 1, got 0"):
        vocab_size_with_padding(0, 128, 1)


def test_strided_shards_are_pieces_of_each_block():
    full = torch.arange(16).view(16, 1)
    # stride 2, tp 4: blocks [0..7] and [8..15]; rank 1 owns rows 2-3 of each.
    assert shard_tensor(full, 0, 4, 1, stride=2).flatten().tolist() == [2, 3, 10, 11]
    assert shard_tensor(full, 0, 4, 1).flatten().tolist() == [4, 5, 6, 7]
    # The shards of all ranks cover every row exactly once.
    rows = sorted(i for r in range(4) for s in shard_slices(16, 4, r, 2) for i in range(16)[s])
    assert rows == list(range(16))
    # A shard is a copy: it never keeps the full tensor's storage alive.
    assert shard_tensor(full, 0, 4, 1).untyped_storage().nbytes() == 4 * 8
    with pytest.raises(ValueError, match="size 12 is not divisible by .* 4 x partition stride 2"):
        shard_slices(12, 4, 0, stride=2)
