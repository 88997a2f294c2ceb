"""Multi-process test harness on gloo.

    from tests.harness import run_distributed

    def _check(tp):                       # module-level: it is pickled by reference
        ...                               # runs on every rank, torch.distributed is up
        return something_picklable

    def test_x():
        results = run_distributed(4, _check, tp=2)   # one result per rank, rank order

Processes are spawned once per world size and reused by every test of the session (a test costs
a queue round trip, not four torch imports). Each task runs with `torch.distributed` initialized
on gloo; `parallel_state.destroy_model_parallel()` runs after it. A task that raises on any rank
fails the test with every failing rank's traceback. A task that does not finish within `timeout`
seconds fails the test with the Python stacks of the ranks that were stuck (dumped through
faulthandler), and the pool is torn down so the next test starts clean: nothing hangs CI.
"""

from __future__ import annotations

import atexit
import faulthandler
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

DEFAULT_TIMEOUT = float(os.environ.get("MEGALITE_TEST_TIMEOUT", "180"))
# gloo's own collective timeout inside the workers: a rank stuck in a collective errors out
# on its own too, well after the harness has given up on it.
COLLECTIVE_TIMEOUT_MIN = 5.0


class DistributedTestError(AssertionError):
    """One or more ranks raised, or the task timed out."""


def _worker(rank: int, world_size: int, port: int, tasks, results, stack_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    stack_file = open(Path(stack_dir) / f"rank{rank}.txt", "w")  # noqa: SIM115 (kept open)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

    from megalite import parallel_state
    from megalite.distributed import init_distributed

    init_distributed(backend="gloo", timeout_minutes=COLLECTIVE_TIMEOUT_MIN)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
        finally:
            parallel_state.destroy_model_parallel()
    # Leave without tearing the process group down: its destructor can block on peers that
    # already left, and the pool is going away anyway.
    os._exit(0)


class Pool:
    """`world_size` live worker processes with torch.distributed initialized among them."""

    def __init__(self, world_size: int):
        from megalite.distributed import free_port

        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.stack_dir = tempfile.mkdtemp(prefix=f"megalite-ws{world_size}-")
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, self.tasks[r], self.results, self.stack_dir),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn: Callable, args: tuple, kwargs: dict, timeout: float) -> list[Any]:
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(out) + len(errors) < self.world_size:
            # After a failure the others are often stuck in a collective: give them a moment.
            wait = deadline - time.monotonic() if not errors else 5.0
            try:
                rank, ok, value = self.results.get(timeout=max(wait, 0.01))
            except queue.Empty:
                break
            (out if ok else errors)[rank] = value
            if not self.alive() and len(out) + len(errors) < self.world_size:
                break
        missing = [r for r in range(self.world_size) if r not in out and r not in errors]
        if not errors and not missing:
            return [out[r] for r in range(self.world_size)]
        msg = [f"{fn.__module__}.{fn.__name__} on {self.world_size} ranks failed"]
        for r, tb in sorted(errors.items()):
            msg.append(f"--- rank {r} raised:\n{tb}")
        if missing:
            msg.append(f"--- ranks {missing} did not finish (timeout {timeout:.0f}s or crash)")
            msg.extend(self._stacks(missing))
        self.close(force=True)
        raise DistributedTestError("\n".join(msg))

    def _stacks(self, ranks: list[int]) -> list[str]:
        for r in ranks:
            if self.procs[r].is_alive():
                os.kill(self.procs[r].pid, signal.SIGUSR1)
            else:
                self.procs[r].join(0.1)
        time.sleep(1.0)
        out = []
        for r in ranks:
            text = (Path(self.stack_dir) / f"rank{r}.txt").read_text()[-6000:]
            code = self.procs[r].exitcode
            out.append(f"--- rank {r} (exit code {code}) stacks:\n{text or '(none dumped)'}")
        return out

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self.tasks:
                q.put(None)
            deadline = time.monotonic() + 10
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)


_POOLS: dict[int, Pool] = {}


def run_distributed(
    world_size: int, fn: Callable, *args: Any, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the per-rank results."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close(force=True)
        pool = _POOLS[world_size] = Pool(world_size)
    try:
        return pool.run(fn, args, kwargs, timeout)
    except DistributedTestError:
        _POOLS.pop(world_size, None)
        raise


def shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


atexit.register(shutdown_pools)
