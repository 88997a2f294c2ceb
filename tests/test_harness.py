"""The gloo harness itself: failures and hangs end the test with tracebacks, never hang."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.harness import DistributedTestError, run_distributed


def _rank_and_sum():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _raise_on_rank1():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 1 never arrives: the others are stuck here
    return True


def _sleep_forever_in_named_function():
    time.sleep(600)


def test_results_come_back_in_rank_order():
    assert run_distributed(2, _rank_and_sum) == [(0, 1.0), (1, 1.0)]


def test_a_raising_rank_fails_with_its_traceback_and_the_stuck_ranks_stacks():
    with pytest.raises(DistributedTestError) as e:
        run_distributed(2, _raise_on_rank1, timeout=60)
    text = str(e.value)
    assert "rank 1 raised" in text and "boom on purpose" in text
    assert "ranks [0] did not finish" in text and "_raise_on_rank1" in text
    # the pool was replaced: the next task works
    assert run_distributed(2, _rank_and_sum) == [(0, 1.0), (1, 1.0)]


def test_a_hang_times_out_with_stacks():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as e:
        run_distributed(2, _sleep_forever_in_named_function, timeout=3)
    assert time.monotonic() - start < 30
    assert "_sleep_forever_in_named_function" in str(e.value)
