"""Repeated `pretrain()` runs in one process leave no process group and no thread behind.

The test harness keeps its gloo workers for the whole session, and users run `pretrain()` in
notebooks and sweeps: a run that leaves its groups alive costs every later run three gloo
threads per group (the suite once reached 1,100 threads per worker). This runs `pretrain()`
20 times in each worker of a world-2 pool, over layouts that touch every kind of group
megalite builds (TP, PP, DP with ZeRO, CP, MoE with EP, DeepSpeed ZeRO-1 and ZeRO-2) and the
background pieces (async save, the exit-signal watch), and checks after each run that the
worker's thread count and torch's live-group count are back to where they started.
World size: 2.
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import pytest

from tests.harness import run_distributed

pytestmark = pytest.mark.slow

# DeepSpeed ZeRO-3 still leaks one model per run (not found yet; see the issue note): not listed.
LAYOUTS = ["tp2", "pp2", "dp2z1", "dp2z2", "cp2", "dp2ep2", "dp2ds1", "dp2ds2"]


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _live_groups() -> int:
    from torch.distributed import distributed_c10d as c10d

    return len(c10d._world.pg_map)


def _repeated_runs(runs: int) -> list[tuple[str, int, int]]:
    from megalite.check import ModelSpec, parse_layout, pretrain_argv
    from megalite.pretrain import pretrain

    spec = ModelSpec(train_iters=2)
    counts = [("start", _threads(), _live_groups())]
    for i in range(runs):
        name = LAYOUTS[i % len(LAYOUTS)]
        with tempfile.TemporaryDirectory() as work:
            argv = pretrain_argv(parse_layout(name), spec, Path(work))
            argv += ["--exit-signal-handler"]
            if i % 3 == 0 and "ds" not in name:  # the async saver's thread and staging buffers
                argv += ["--save", f"{work}/ckpt", "--save-interval", "1", "--async-save"]
            status = pretrain(argv)
        assert status == 0, f"run {i} ({name}) exited {status}"
        gc.collect()
        counts.append((name, _threads(), _live_groups()))
    return counts


def test_twenty_pretrain_runs_leave_no_groups_or_threads():
    for rank, counts in enumerate(run_distributed(2, _repeated_runs, 20, timeout=600)):
        _, threads0, groups0 = counts[0]
        grown = [(n, t, g) for n, t, g in counts[1:] if t > threads0 or g > groups0]
        assert not grown, (
            f"rank {rank}: started with {threads0} threads and {groups0} live groups; after "
            f"these runs (layout, threads, groups) more were alive: {grown}"
        )
