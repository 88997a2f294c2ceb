"""Checkpoints written in the background while training goes on (``--async-save``).

The files and their layout are exactly those of `megalite.checkpoint.format`; only *when*
they are written changes:

1. at the save iteration, on the main thread, each rank freezes its model / optimizer / RNG
   state (device tensors are copied to host memory; host tensors are frozen by the fork of the
   writer, or copied for a thread writer), so the next optimizer step cannot change what is
   written, and the ranks agree that the temporary folder ``iter_NNNNNNN.tmp`` exists;
2. a background writer of each rank writes its files there and fsyncs them; training goes on.
   The writer is a forked process by default (``mode="process"``): it shares the snapshot
   copy-on-write and takes neither the GIL nor the training thread's time; a thread
   (``mode="thread"``) is the fallback where fork is unavailable. A forked writer dies with
   its training process;
3. at a later iteration boundary (`poll`), at the next save, or at exit (`finalize`), the ranks
   agree -- on the main thread, as every collective must be -- that every rank's files are
   durable (or who failed); only then does rank 0 rename the folder and replace the tracker.

So the crash guarantees of a synchronous save stay: until step 3 the tracker names the previous
checkpoint, and a crash or SIGKILL while the thread writes leaves a ``.tmp`` folder that no
tracker references and that the next save removes.

One save is in flight at a time: a save requested while the previous one is still being written
first waits for it (the cost shows up as a stall, which `tools/bench_async_save.py` measures).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megalite.checkpoint import format as ckpt


def to_host(obj: Any) -> Any:
    """A copy of `obj` whose tensors are fresh CPU tensors (same dtypes) and containers new.

    Device tensors go through pinned memory without a per-tensor sync; one sync at the end.
    """
    synced = []

    def copy(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            if x.device.type == "cpu":
                return x.clone()
            out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
            out.copy_(x, non_blocking=True)
            synced.append(x.device)
            return out
        if isinstance(x, dict):
            return type(x)((k, copy(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            items = [copy(v) for v in x]
            return type(x)(items) if not hasattr(x, "_fields") else type(x)(*items)
        return x  # ints, floats, strings, None: immutable

    out = copy(obj)
    if synced and torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def _has_device_tensors(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.device.type != "cpu"
    if isinstance(obj, dict):
        return any(_has_device_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_device_tensors(v) for v in obj)
    return False


def _die_with_parent() -> None:
    """Linux: this (forked writer) process gets SIGKILL when the training process dies, so a
    killed run leaves no writer behind (its half-written ``.tmp`` folder is never published)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class _Pending:
    """One save being written by this rank's background writer (a thread or a forked process)."""

    def __init__(self, root: Path, iteration: int, tmp: Path):
        self.root, self.iteration, self.tmp = root, iteration, tmp
        self.error: Optional[str] = None
        self.thread: Optional[threading.Thread] = None
        self.pid: Optional[int] = None
        self.pipe: Optional[int] = None  # read end: the child's error message, if any
        self.status: Optional[int] = None

    def start(self, write: Callable[[], Optional[str]], mode: str) -> None:
        if mode == "thread":

            def run() -> None:
                self.error = write()

            self.thread = threading.Thread(target=run, name="megalite-async-save", daemon=True)
            self.thread.start()
            return
        read, send = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: write, report, leave without running any parent cleanup
            code = 1
            try:
                os.close(read)
                _die_with_parent()
                error = write()
                if error:
                    os.write(send, error.encode()[:60000])
                code = 0 if error is None else 1
            finally:
                os._exit(code)
        os.close(send)
        self.pid, self.pipe = pid, read

    def done(self) -> bool:
        if self.pid is None:
            return self.thread is None or not self.thread.is_alive()
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                return False
            self.status = status
        return True

    def kill(self) -> None:
        """Abandon this save (the run failed): end a forked writer; its ``.tmp`` folder is never
        published and the next save removes it. A thread writer is left to finish alone."""
        if self.pid is not None and self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, self.status = os.waitpid(self.pid, 0)
            os.close(self.pipe)

    def wait(self) -> None:
        if self.pid is None:
            if self.thread is not None:
                self.thread.join()
            return
        if self.status is None:
            _, self.status = os.waitpid(self.pid, 0)
        message = b""
        while chunk := os.read(self.pipe, 65536):
            message += chunk
        os.close(self.pipe)
        if os.WIFSIGNALED(self.status):
            self.error = f"writer process killed by signal {os.WTERMSIG(self.status)}"
        elif os.WEXITSTATUS(self.status) != 0:
            self.error = message.decode(errors="replace") or "writer process failed"


class AsyncCheckpointSaver:
    """Background checkpoint writer of one rank; every method is collective over all ranks.

    `writer(obj, path)` writes and fsyncs one file (default: the synchronous path's own); tests
    pass a slow one to kill a process mid-write. `mode`: "process" (fork; default where the
    OS has it) or "thread".
    """

    def __init__(
        self, writer: Optional[Callable[[Any, Path], None]] = None, mode: Optional[str] = None
    ):
        self.writer = writer or ckpt._save
        self.mode = mode or ("process" if hasattr(os, "fork") else "thread")
        if self.mode not in ("process", "thread"):
            raise ValueError(f"mode must be 'process' or 'thread', got {self.mode!r}")
        self.pending: Optional[_Pending] = None
        self.last_published: Optional[int] = None

    # --- start a save ---------------------------------------------------------------------------
    def save(
        self,
        root: str | os.PathLike,
        iteration: int,
        *,
        coords: dict[str, int],
        model_state: Callable[[], dict],
        optimizer_state: Optional[Callable[[], dict]],
        optimizer_sharded: bool,
        rng_state: dict,
        meta: dict,
        extra_files: Optional[dict[str, str]] = None,
        expert_state: Optional[Callable[[], dict]] = None,
    ) -> None:
        """Snapshot this rank's state now and write it in the background (same arguments as
        `checkpointing.save_checkpoint`). A save still in flight is finished first."""
        self.finalize()
        dp = coords["dp"]
        # what this rank writes, copied to host memory before training changes it
        files = [
            (name, self.snapshot(state()))
            for name, state in ckpt.rank_files(
                dp, model_state, optimizer_state, optimizer_sharded, rng_state, expert_state
            )
        ]
        self.save_files(
            root, iteration, coords=coords, files=files, meta=meta, extra_files=extra_files
        )

    def snapshot(self, obj: Any) -> Any:
        """What the writer will write, frozen now. A forked writer gets host tensors frozen by
        the fork itself (copy-on-write), so only device tensors are copied; a thread writer
        needs its own copy of everything."""
        if self.mode == "process" and not _has_device_tensors(obj):
            return obj
        return to_host(obj)

    def save_files(
        self,
        root: str | os.PathLike,
        iteration: int,
        *,
        coords: dict[str, int],
        files: list[tuple[str, Any]],
        meta: dict,
        extra_files: Optional[dict[str, str]] = None,
    ) -> None:
        """Write `files` ([(name, object)], already on the host and not changed afterwards)
        into this rank's (TP, PP) shard folder of `iteration`, in the background. Collective.
        Global rank 0 also writes meta.json and `extra_files` ({name: text}) next to the shards.
        For engines whose files are not the native optimizer's (DeepSpeed)."""
        self.finalize()
        root = Path(root)
        rank = dist.get_rank() if dist.is_initialized() else 0
        meta = dict(meta, iteration=iteration, format_version=ckpt.FORMAT_VERSION)

        tmp, error = ckpt.prepare_tmp(root, iteration, rank)
        failures = ckpt.agree_on_errors(error)
        if failures:
            self._raise(root, iteration, failures)
        pending = _Pending(root, iteration, tmp)
        shard = ckpt.shard_dir(tmp, coords["tp"], coords["pp"])

        def write() -> Optional[str]:
            try:
                shard.mkdir(parents=True, exist_ok=True)
                for name, obj in files:
                    self.writer(obj, shard / name)
                if rank == 0:
                    ckpt.write_meta_files(tmp, meta, extra_files)
                ckpt._fsync_dir(shard)
            except Exception as e:  # noqa: BLE001 - reported to every rank at finalize
                return f"{type(e).__name__}: {e}"
            return None

        pending.start(write, self.mode)
        self.pending = pending

    # --- finish a save ------------------------------------------------------------------------
    def poll(self) -> Optional[int]:
        """At an iteration boundary: publish the save in flight if every rank has finished
        writing it (never waits for the writers). Returns the published iteration, if any.

        Collective (one tiny all-reduce) while a save is in flight; free otherwise. Every rank
        must call it at the same iterations.
        """
        if self.pending is None:
            return None
        done = torch.tensor([1 if self.pending.done() else 0], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if not done.item():
            return None
        return self.finalize()

    def finalize(self) -> Optional[int]:
        """Wait for this rank's writer, agree with every rank that all files are durable, then
        publish (rank 0 renames the folder and replaces the tracker). Raises `CheckpointError`
        naming the ranks that failed, the previous checkpoint left intact."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        pending.wait()
        failures = ckpt.agree_on_errors(pending.error)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if failures:
            if rank == 0:
                shutil.rmtree(pending.tmp, ignore_errors=True)
            self._raise(pending.root, pending.iteration, failures)
        if rank == 0:
            ckpt.publish_iteration(pending.root, pending.iteration, pending.tmp)
        if dist.is_initialized():
            dist.barrier()
        self.last_published = pending.iteration
        return pending.iteration

    @staticmethod
    def _raise(root: Path, iteration: int, failures: list[tuple[int, str]]) -> None:
        previous = ckpt.read_tracker(root) if root.exists() else None
        who = "; ".join(f"rank {r}: {e}" for r, e in failures)
        kept = f"iteration {previous} is intact" if previous is not None else "no earlier one"
        raise ckpt.CheckpointError(
            f"saving iteration {iteration} to {root} in the background failed ({who}); {kept}"
        )
