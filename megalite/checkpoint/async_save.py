"""Checkpoints written in the background while training goes on (``--async-save``).

The files and their layout are exactly those of `megalite.training.checkpointing`; only *when*
they are written changes:

1. at the save iteration, on the main thread, each rank copies its model / optimizer / RNG state
   to host memory (fresh CPU tensors, so the next optimizer step cannot change what is written)
   and the ranks agree that the temporary folder ``iter_NNNNNNN.tmp`` exists;
2. a background thread of each rank writes its files there and fsyncs them; training goes on;
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

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megalite.training import checkpointing as ckpt


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


class _Pending:
    """One save being written by this rank's background thread."""

    def __init__(self, root: Path, iteration: int, tmp: Path):
        self.root, self.iteration, self.tmp = root, iteration, tmp
        self.error: Optional[str] = None
        self.thread: Optional[threading.Thread] = None

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


class AsyncCheckpointSaver:
    """Background checkpoint writer of one rank; every method is collective over all ranks.

    `writer(obj, path)` writes and fsyncs one file (default: the synchronous path's own); tests
    pass a slow one to kill a process mid-write.
    """

    def __init__(self, writer: Optional[Callable[[Any, Path], None]] = None):
        self.writer = writer or ckpt._save
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
    ) -> None:
        """Snapshot this rank's state now and write it in the background (same arguments as
        `checkpointing.save_checkpoint`). A save still in flight is finished first."""
        self.finalize()
        dp = coords["dp"]
        # what this rank writes, copied to host memory before training changes it
        files: list[tuple[str, Any]] = []
        if dp == 0:
            files.append(("model.pt", to_host(model_state())))
        if optimizer_state is not None and (optimizer_sharded or dp == 0):
            files.append((f"optim_dp{dp:03d}.pt", to_host(optimizer_state())))
        files.append((f"rng_dp{dp:03d}.pt", to_host(rng_state)))
        self.save_files(root, iteration, coords=coords, files=files, meta=meta)

    def save_files(
        self,
        root: str | os.PathLike,
        iteration: int,
        *,
        coords: dict[str, int],
        files: list[tuple[str, Any]],
        meta: dict,
    ) -> None:
        """Write `files` ([(name, object)], already on the host and not changed afterwards)
        into this rank's (TP, PP) shard folder of `iteration`, in the background. Collective.
        For engines whose files are not the native optimizer's (DeepSpeed)."""
        self.finalize()
        root = Path(root)
        rank = dist.get_rank() if dist.is_initialized() else 0
        meta = dict(meta, iteration=iteration, format_version=ckpt.FORMAT_VERSION)

        final = ckpt.iteration_dir(root, iteration)
        tmp = final.with_name(final.name + ".tmp")
        error = None
        if rank == 0:
            try:
                root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():  # left over by a crash: never complete, never referenced
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        failures = ckpt.agree_on_errors(error)
        if failures:
            self._raise(root, iteration, failures)
        pending = _Pending(root, iteration, tmp)
        shard = ckpt.shard_dir(tmp, coords["tp"], coords["pp"])

        def write() -> None:
            try:
                shard.mkdir(parents=True, exist_ok=True)
                for name, obj in files:
                    self.writer(obj, shard / name)
                if rank == 0:
                    with open(tmp / "meta.json", "w") as f:
                        json.dump(meta, f, indent=1, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                ckpt._fsync_dir(shard)
            except Exception as e:  # noqa: BLE001 - reported to every rank at finalize
                pending.error = f"{type(e).__name__}: {e}"

        pending.thread = threading.Thread(
            target=write, name=f"megalite-async-save-{iteration}", daemon=True
        )
        pending.thread.start()
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
        pending.thread.join()
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
