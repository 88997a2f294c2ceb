"""torch.save files written one layer at a time, and read without loading them whole.

Writing a shard file with plain ``torch.save`` needs every tensor of it in memory at once. Here a
file is written in two passes instead:

1. `write_skeleton`: ``torch.save`` of the final structure under
   ``torch.serialization.skip_data()``: the pickle and the zip records are written, the storage
   bytes are left as holes (a sparse file). The skeleton's tensors are ``torch.empty`` and never
   touched, so they cost address space, not memory.
2. `filling`: the file is mapped shared (``MAP_SHARED``) with ``torch.load(mmap=True)``; copying
   into a tensor writes its bytes in place. Each fill maps, writes one layer, and unmaps, so the
   resident set stays about one layer.

The result is an ordinary ``torch.save`` file that ``torch.load(weights_only=True)`` reads.
`read_lazy` maps a source file privately: tensors are read from disk only when touched.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.serialization import set_default_mmap_options, skip_data

from megalite.checkpoint.format import CheckpointError, fsync_file  # noqa: F401 (re-exported)


def write_skeleton(tree: Any, path: Path) -> None:
    """Write `tree` (dicts of ``torch.empty`` tensors and plain values) without tensor bytes."""
    with skip_data(), open(path, "wb") as f:
        torch.save(tree, f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def filling(path: Path) -> Iterator[Any]:
    """The structure of skeleton `path`, its tensors mapped onto the file: ``copy_`` writes."""
    with set_default_mmap_options(mmap.MAP_SHARED):
        tree = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    try:
        yield tree
    finally:
        del tree  # unmaps: the written pages leave this process (they stay in the page cache)


def read_lazy(path: Path) -> Any:
    """``torch.load(mmap=True, weights_only=True)``: structure now, tensor bytes when touched."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # never fall back to full unpickling
        raise CheckpointError(
            f"refusing to load {path}: not plain tensors/values or not a zip-format torch file "
            f"(torch.load said: {str(e).splitlines()[0]})"
        ) from None


def empty_like_shape(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A placeholder for `write_skeleton`: allocated lazily by the OS, never written."""
    return torch.empty(shape, dtype=dtype)
