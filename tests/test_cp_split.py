"""The load-balanced CP split in one process: chunk layout, positions, inverse, refusals."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from megalite.config import ConfigError
from megalite.config.parallel import ParallelConfig
from megalite.context_parallel import (
    check_seq_length,
    chunk_ids,
    position_ids,
    split,
    split_batch,
    unsplit,
)
from megalite.context_parallel.ring import block_plan
from megalite.context_parallel.split import reorder_index


def test_rank_r_holds_chunks_r_and_its_mirror():
    x = torch.arange(16).view(1, 16)
    assert [split(x, 2, r).tolist() for r in range(2)] == [
        [[0, 1, 2, 3, 12, 13, 14, 15]],
        [[4, 5, 6, 7, 8, 9, 10, 11]],
    ]
    assert [chunk_ids(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert split(x, 4, 3).tolist() == [[6, 7, 8, 9]]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_positions_split_and_unsplit_agree(cp):
    s = 24 if cp < 4 else 32
    tokens = torch.randint(0, 100, (3, s))
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": tokens % 2, "extra": None}
    parts = [split_batch(batch, cp, r) for r in range(cp)]
    for r, part in enumerate(parts):
        pos = position_ids(s, cp, r)
        # Every entry is cut the same way: the tokens at the rank's global positions.
        assert_close(part["tokens"], tokens[:, pos])
        assert_close(part["labels"], tokens[:, pos] + 1)
        assert_close(part["loss_mask"], tokens[:, pos] % 2)
        assert part["extra"] is None
    assert_close(unsplit([p["tokens"] for p in parts]), tokens)
    assert sorted(reorder_index(s, cp).tolist()) == list(range(s))
    act = torch.randn(s, 2, 5)  # activations [s, b, h] split along dim 0
    assert_close(unsplit([split(act, cp, r, seq_dim=0) for r in range(cp)], seq_dim=0), act)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_every_rank_does_the_same_attention_work(cp):
    # Work of a block = selected query rows x key columns, halved when causally masked; the
    # load-balanced plan gives every rank the same total (a contiguous split would not).
    def work(rank):
        total = 0.0
        for src in range(cp):
            rows, cols, causal = block_plan(cp, rank, src)
            area = (rows.stop - rows.start) * (cols.stop - cols.start)
            total += area / 2 if causal else area
        return total

    assert len({work(r) for r in range(cp)}) == 1


def test_refusals_name_the_numbers():
    with pytest.raises(ValueError, match=r"seq_length \(30\) must be divisible by 2 x context-"
                       r"parallel size \(4\) = 8"):  # fmt: skip
        check_seq_length(30, 4)
    with pytest.raises(ValueError, match=r"\(24\) .* size \(2\) x tensor-model-parallel size "
                       r"\(4, sequence parallel\) = 16"):  # fmt: skip
        check_seq_length(24, 2, 4)
    with pytest.raises(ValueError, match=r"seq_length \(10\)"):
        split(torch.zeros(1, 10), 4, 0)
    with pytest.raises(ValueError, match=r"CP rank 2 is outside context-parallel size 2"):
        chunk_ids(2, 2)
    with pytest.raises(ValueError, match=r"batch entry 'mask' of shape \(4,\) has no dim 1"):
        split_batch({"mask": torch.zeros(4)}, 2, 0)
    with pytest.raises(ConfigError, match=r"--context-parallel-size must be >= 1, got 0"):
        ParallelConfig(context_parallel_size=0)
    with pytest.raises(ConfigError, match=r"--cp-comm-type must be p2p or a2a, got 'x'"):
        ParallelConfig(cp_comm_type="x")
    with pytest.raises(ConfigError, match=r"--deepspeed with --context-parallel-size 2: "):
        ParallelConfig(context_parallel_size=2, deepspeed=True, deepspeed_config="ds.json")
