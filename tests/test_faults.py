"""A rank that dies mid-training makes every other rank fail with a message, within the timeout.

The ranks are independent processes (`megalite.check.spawn_ranks`: RANK/WORLD_SIZE/MASTER_* set
per process, no torchrun), so nobody but megalite itself ends the survivors.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from megalite import parallel_state as ps
from megalite.check import Layout, ModelSpec, pretrain_argv, spawn_ranks, wait_all
from megalite.distributed import init_distributed
from tests.harness import COLLECTIVE_TIMEOUT_MIN, run_distributed

TIMEOUT_MIN = 0.25  # --distributed-timeout-minutes of the dead-rank run: 15 s
SLACK_S = 30.0  # the bound: every survivor is gone within timeout + 30 s


def _group_timeouts(timeout_minutes: float) -> tuple[int, dict[str, float]]:
    """World size 2: build PP=2 (every kind of group, the TP ones of one rank) after
    init_distributed(timeout) as pretrain does; read back the timeout each group was built with."""
    init_distributed(backend="gloo", timeout_minutes=timeout_minutes)  # group exists: sets it
    try:
        state = ps.initialize_model_parallel(1, 2)
        # ProcessGroupGloo keeps the timeout it was built with in its options (torch >= 2.2)
        return state.rank, {
            kind: group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for kind, group in state.groups.items()
        }
    finally:
        ps.destroy_model_parallel()
        init_distributed(backend="gloo", timeout_minutes=COLLECTIVE_TIMEOUT_MIN)


def test_timeout_reaches_every_group():
    """World size 2: TP, PP, DP, model-parallel and embedding groups all carry the timeout (the
    dead-rank tests below show it acting at TP=2 x PP=2)."""
    for rank, rank_timeouts in run_distributed(2, _group_timeouts, TIMEOUT_MIN):
        # every group parallel_state builds that holds this rank (tp, pp, dp, mp, embedding...,
        # and the expert groups, which refold the same ranks)
        kinds = {k for k, lines in ps.group_ranks(2, 1, 2).items() if any(rank in g for g in lines)}
        assert kinds <= set(rank_timeouts), rank_timeouts
        assert set(rank_timeouts.values()) == {TIMEOUT_MIN * 60}, rank_timeouts


def _metrics_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_dead_rank_fails_every_other_rank_within_the_timeout(sig, tmp_path):
    """World size 4 (TP=2 x PP=2): rank 1 dies (SIGKILL: its sockets close) or hangs (SIGSTOP:
    its sockets stay open, only the collective timeout can tell) after a few iterations; ranks
    0, 2, 3 exit non-zero, each saying what failed, within --distributed-timeout-minutes + 30 s."""
    layout = Layout(tp=2, pp=2)
    metrics = tmp_path / "metrics.jsonl"
    argv = pretrain_argv(layout, ModelSpec(train_iters=100_000), tmp_path)
    argv += [f"--metrics-file={metrics}", f"--distributed-timeout-minutes={TIMEOUT_MIN}"]
    procs = spawn_ranks(layout.world_size, argv, tmp_path / "logs")
    victim = 1
    try:
        deadline = time.monotonic() + 240  # start-up of 4 processes on a busy 2-core box
        while _metrics_lines(metrics) < 3:
            codes = [p.poll() for p in procs]
            assert not any(codes), f"a rank ended before the kill: {codes}"
            assert time.monotonic() < deadline, "training did not reach iteration 3"
            time.sleep(0.1)
        os.kill(procs[victim].pid, sig)
        killed_at = time.monotonic()
        survivors = [p for r, p in enumerate(procs) if r != victim]
        codes = wait_all(survivors, timeout=TIMEOUT_MIN * 60 + SLACK_S, grace=1e9)
        took = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # also ends a stopped process
                p.wait()
    # wait_all kills (-9) whoever outlives the bound: a negative code means a rank hung
    assert all(c > 0 for c in codes), f"survivor exit codes {codes} after {took:.1f} s"
    assert took <= TIMEOUT_MIN * 60 + SLACK_S
    for rank in (0, 2, 3):
        log = (tmp_path / "logs" / f"rank{rank}.log").read_text(errors="replace")
        line = re.search(rf"megalite-pretrain: rank {rank} failed: (.*)", log)
        assert line, f"rank {rank} printed no failure line:\n{log[-3000:]}"
        assert re.search(r"closed|reset|timed out|timeout|refused|broken pipe", line[1], re.I), (
            f"rank {rank}'s message does not name the failure: {line[0]}"
        )
