"""Build-once, load-everywhere cache of index arrays (.npy), keyed by what shapes them.

Index arrays (document order, sample boundaries, shuffles, blend order) are cheap to rebuild
but not free at scale, and every rank must use the very same ones. ``cached_arrays`` names the
files by a hash of a description dict (everything that shapes the arrays), lets one rank per node
build and save them (``is_builder``), waits (``barrier``), then every rank memory-maps them.
Writes go to a temporary name and are renamed, so a reader never sees half a file; two nodes
building the same files on a shared filesystem write identical bytes. Without a writable cache
directory every rank builds the arrays itself (they are deterministic, hence identical).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from typing import Callable, Optional

import numpy as np

log = logging.getLogger("megalite.data")


def description_hash(description: dict) -> str:
    """md5 of the description as sorted JSON: a change in any field names new files."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def fingerprint(array: np.ndarray) -> str:
    """Content hash of an array (e.g. the document lengths a split is built from)."""
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def _save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


def cached_arrays(
    description: dict,
    names: tuple[str, ...],
    build: Callable[[], dict[str, np.ndarray]],
    cache_dir: Optional[str],
    is_builder: Optional[Callable[[], bool]] = None,
    barrier: Optional[Callable[[], None]] = None,
) -> dict[str, np.ndarray]:
    """Arrays ``names`` for ``description``: loaded from ``cache_dir`` or built by ``build()``.

    Files: ``{cache_dir}/{hash}-{name}.npy`` plus ``{hash}-description.json`` for humans.
    ``is_builder()``: whether this rank builds and saves when the files are missing (default:
    yes); ``barrier()``: called once by every rank, always, between building and loading (default:
    no-op).
    """
    is_builder = is_builder or (lambda: True)
    barrier = barrier or (lambda: None)
    key = description_hash(description)
    paths = {n: os.path.join(cache_dir, f"{key}-{n}.npy") for n in names} if cache_dir else {}
    have = bool(paths) and all(os.path.exists(p) for p in paths.values())
    built: Optional[dict[str, np.ndarray]] = None
    if not have and is_builder():
        built = _timed_build(description, build)
        if cache_dir:
            try:
                os.makedirs(cache_dir, exist_ok=True)
                with open(os.path.join(cache_dir, f"{key}-description.json"), "w") as f:
                    json.dump(description, f, indent=2, sort_keys=True, default=str)
                for n in names:
                    _save(paths[n], built[n])
                log.info("saved index cache %s/%s-*.npy", cache_dir, key)
            except OSError as e:
                log.warning(
                    "cannot write index cache in %s (%s): keeping it in memory", cache_dir, e
                )
    # Every rank must call barrier() the same number of times: deciding by `have` would let a
    # rank that arrives after the builder saved the files skip it and deadlock the builder.
    barrier()
    if paths and all(os.path.exists(p) for p in paths.values()):
        if have:
            log.info("loading index cache %s/%s-*.npy", cache_dir, key)
        return {n: np.load(paths[n], mmap_mode="r", allow_pickle=False) for n in names}
    return built if built is not None else _timed_build(description, build)


def _timed_build(description: dict, build: Callable[[], dict[str, np.ndarray]]):
    """Build, telling the user (stderr) what is being built and how long it took."""
    start = time.perf_counter()
    what = description.get("name", "indices")
    print(f"building {what} ...", file=sys.stderr, flush=True)
    arrays = build()
    took = time.perf_counter() - start
    print(f"built {what} in {took:.2f} s", file=sys.stderr, flush=True)
    return arrays


def distributed_hooks(group=None) -> tuple[Callable[[], bool], Callable[[], None]]:
    """(is_builder, barrier) for ranks under torch.distributed: local rank 0 of each node builds
    (LOCAL_RANK from the launcher, else rank % local world size), everyone waits on ``group``
    (default: the whole world, so all ranks of one process group load identical arrays)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return (lambda: True), (lambda: None)
    rank = dist.get_rank()
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        local = rank % max(1, per_node)
    local_rank = int(local)
    return (lambda: local_rank == 0), (lambda: dist.barrier(group=group))
