"""Checkpoints written in the background while training goes on (``--async-save``).

The files and their layout are exactly those of `megalite.checkpoint.format`; only *when*
they are written changes:

1. at the save iteration each rank takes a snapshot of its model / optimizer / RNG state that
   later training cannot change, and the ranks agree that the temporary folder
   ``iter_NNNNNNN.tmp`` exists;
2. a background writer of each rank writes its files there and fsyncs them; training goes on;
3. at a later iteration boundary (`poll`), at the next save, or at exit (`finalize`), the ranks
   agree -- on the main thread, as every collective must be -- that every rank's files are
   durable (or who failed); only then does rank 0 rename the folder and replace the tracker.

The writer is a thread by default (``mode="thread"``). Its first job is the snapshot: it copies
every tensor into host buffers kept from one save to the next (no fresh pages to fault in),
while the training thread already runs the next forward and backward passes; every torch
optimizer's ``step()`` waits until that copy is done (a global step pre-hook), and an optimizer
step is the only place where a training step changes what a checkpoint holds. It then
serializes the files at normal priority (torch.save holds the GIL, and a starved GIL holder
would stall training) and fsyncs them at the lowest priority (``priority="idle"``:
SCHED_IDLE; the kernel's writeback is most of a save's CPU time). A forked process
(``mode="process"``) is the alternative: the fork itself is the snapshot (copy-on-write), but
every page the training process writes afterwards while the writer lives costs a page fault
and a copy, which `tools/bench_async_save.py` measured at several times the thread's cost.

So the crash guarantees of a synchronous save stay: until step 3 the tracker names the previous
checkpoint, and a crash or SIGKILL while the writer writes leaves a ``.tmp`` folder that no
tracker references and that the next save removes. A forked writer dies with its training
process.

One save is in flight at a time: a save requested while the previous one is still being written
first waits for it (the cost shows up as a stall, which `tools/bench_async_save.py` measures).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megalite.checkpoint import format as ckpt


def to_host(obj: Any, staging: Optional[dict] = None) -> Any:
    """A copy of `obj` whose tensors are CPU tensors (same dtypes) and containers new.

    Device tensors go through pinned memory without a per-tensor sync; one sync at the end.
    With `staging` (a dict kept by the caller between calls) each tensor is copied into the
    buffer the previous call used at the same place of the structure (same shape and dtype),
    so a save after the first allocates nothing: no fresh pages to fault in, only
    the copy itself. The caller must not reuse `staging` while a previous result is still read.
    """
    synced = []

    def copy(x: Any, path: tuple) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            pin = x.device.type != "cpu"
            if staging is not None:
                out = staging.get(path)
                if out is None or (out.shape, out.dtype) != (x.shape, x.dtype):
                    out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=pin)
                    staging[path] = out  # contiguous, whatever the source's strides
            elif not pin:
                return x.clone()
            else:
                out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
            out.copy_(x, non_blocking=pin)
            if pin:
                synced.append(x.device)
            return out
        if isinstance(x, dict):
            return type(x)((k, copy(v, (*path, k))) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            items = [copy(v, (*path, i)) for i, v in enumerate(x)]
            return type(x)(items) if not hasattr(x, "_fields") else type(x)(*items)
        return x  # ints, floats, strings, None: immutable

    out = copy(obj, ())
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


PRIORITIES = ("idle", "low", "normal")
_DEFAULT_WRITER = ckpt._save  # the real one (tests replace ckpt._save to inject failures)


def _lower_priority(priority: str) -> None:
    """Make the calling thread (Linux: a thread or a forked writer's only thread) yield the CPU
    to training: "idle" is SCHED_IDLE (runs only on otherwise idle CPU time), "low" nice 19."""
    if priority == "normal":
        return
    if priority == "idle" and hasattr(os, "sched_setscheduler"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:
            pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)  # Linux: the calling thread only
    except (OSError, AttributeError):
        pass


def _guard_optimizer_steps(frozen: threading.Event):
    """Make every torch optimizer's ``step()`` wait until `frozen` is set: the only code of a
    training step that changes what a checkpoint holds (weights, fp32 masters, moments, step
    counters) runs inside an optimizer step, so the snapshot copy can overlap the forward and
    backward passes before it. Returns the hook's handle (removed once the save finishes)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def wait(optimizer, args, kwargs) -> None:
        frozen.wait()

    return register_optimizer_step_pre_hook(wait)


class _Pending:
    """One save being written by this rank's background writer (a thread or a forked process)."""

    def __init__(self, root: Path, iteration: int, tmp: Path):
        self.root, self.iteration, self.tmp = root, iteration, tmp
        self.error: Optional[str] = None
        self.thread: Optional[threading.Thread] = None
        self.pid: Optional[int] = None
        self.pipe: Optional[int] = None  # read end: the child's error message, if any
        self.status: Optional[int] = None
        self.cpu_s: Optional[float] = None  # the writer's CPU seconds (user + system)
        self.frozen: Optional[threading.Event] = None  # set once a thread writer's copy is done
        self.guard = None  # the optimizer step pre-hook that waits for `frozen`

    def start(
        self,
        write: Callable[[], Optional[str]],
        mode: str,
        priority: str,
        freeze: Optional[Callable[[], None]] = None,
    ) -> None:
        """Run `write` in the background; a thread writer first runs `freeze` (the snapshot
        copy, at normal priority: the next optimizer step waits for it) and sets `frozen`."""
        if mode == "thread":
            self.frozen = threading.Event()

            def run() -> None:
                start = time.thread_time()
                try:
                    if freeze is not None:
                        freeze()
                except Exception as e:  # noqa: BLE001 - reported to every rank at finalize
                    self.error = f"copying the state to host memory: {type(e).__name__}: {e}"
                finally:
                    self.frozen.set()
                if self.error is None:
                    self.error = write()
                self.cpu_s = time.thread_time() - start

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
                _lower_priority(priority)
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
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == 0:
                return False
            self._reaped(status, usage)
        return True

    def _reaped(self, status: int, usage) -> None:
        self.status = status
        self.cpu_s = usage.ru_utime + usage.ru_stime

    def kill(self) -> None:
        """Abandon this save (the run failed): end a forked writer; its ``.tmp`` folder is never
        published and the next save removes it. A thread writer is left to finish alone."""
        if self.guard is not None:
            self.guard.remove()
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
            _, status, usage = os.wait4(self.pid, 0)
            self._reaped(status, usage)
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
    pass a slow one to kill a process mid-write. `mode`: "thread" (default) or "process"
    (fork). `priority`: the writer's CPU priority while it fsyncs (a forked writer: all along):
    "idle" (SCHED_IDLE), "low" (nice 19) or "normal".
    """

    def __init__(
        self,
        writer: Optional[Callable[[Any, Path], None]] = None,
        mode: Optional[str] = None,
        priority: str = "idle",
    ):
        self.writer = writer or ckpt._save
        self.mode = mode or "thread"
        if self.mode not in ("process", "thread"):
            raise ValueError(f"mode must be 'process' or 'thread', got {self.mode!r}")
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
        self.priority = priority
        self.pending: Optional[_Pending] = None
        self.last_published: Optional[int] = None
        self.last_writer_cpu_s: Optional[float] = None  # CPU seconds of the last finished write
        self.staging: dict = {}  # the host buffers of a thread writer, reused by every save

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
        live = [
            (name, state())
            for name, state in ckpt.rank_files(
                coords["dp"], model_state, optimizer_state, optimizer_sharded, rng_state,
                expert_state,
            )
        ]  # fmt: skip
        if self.mode == "thread":
            # the copy to host memory runs in the writer thread, during the next forward and
            # backward; the next optimizer step waits for it (see `_guard_optimizer_steps`)
            def files() -> list[tuple[str, Any]]:
                return [(n, to_host(o, self.staging.setdefault(n, {}))) for n, o in live]

        else:  # a forked writer: host tensors frozen by the fork; device tensors copied now
            files = [(name, self.snapshot(obj, name)) for name, obj in live]
        self.save_files(
            root, iteration, coords=coords, files=files, meta=meta, extra_files=extra_files
        )

    def snapshot(self, obj: Any, name: str = "") -> Any:
        """What the writer will write (file `name`), frozen now. A forked writer gets host
        tensors frozen by the fork itself (copy-on-write), so only device tensors are copied; a
        thread writer needs its own copy of everything, into this file's staging buffers."""
        if self.mode == "process" and not _has_device_tensors(obj):
            return obj
        return to_host(obj, self.staging.setdefault(name, {}))

    def save_files(
        self,
        root: str | os.PathLike,
        iteration: int,
        *,
        coords: dict[str, int],
        files: list[tuple[str, Any]] | Callable[[], list[tuple[str, Any]]],
        meta: dict,
        extra_files: Optional[dict[str, str]] = None,
    ) -> None:
        """Write `files` ([(name, object)], already on the host and not changed afterwards)
        into this rank's (TP, PP) shard folder of `iteration`, in the background. Collective.
        A thread writer also takes a function returning that list (the snapshot copy), which
        it runs first while every torch optimizer's ``step()`` waits for it to finish.
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

        frozen: list[list[tuple[str, Any]]] = []
        if callable(files) and self.mode != "thread":
            files = files()
        freeze = (lambda: frozen.append(files())) if callable(files) else None

        def write() -> Optional[str]:
            try:
                shard.mkdir(parents=True, exist_ok=True)
                written = []
                for name, obj in frozen.pop() if freeze else files:
                    if self.writer is _DEFAULT_WRITER:  # fsynced below, at low priority
                        ckpt._write(obj, shard / name)
                        written.append(shard / name)
                    else:
                        self.writer(obj, shard / name)
                # a thread writer serializes at normal priority: it holds the GIL meanwhile,
                # and a starved holder would stall training; fsync does not hold it
                if self.mode == "thread":
                    _lower_priority(self.priority)
                for path in written:
                    ckpt.fsync_file(path)
                if rank == 0:
                    ckpt.write_meta_files(tmp, meta, extra_files)
                ckpt._fsync_dir(shard)
            except Exception as e:  # noqa: BLE001 - reported to every rank at finalize
                return f"{type(e).__name__}: {e}"
            return None

        pending.start(write, self.mode, self.priority, freeze)
        if freeze is not None:
            pending.guard = _guard_optimizer_steps(pending.frozen)
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
        if pending.guard is not None:
            pending.guard.remove()
        self.last_writer_cpu_s = pending.cpu_s
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
