"""Corpus readers for preprocessing: JSON lines (plain, gzip, zstd), parquet, shard folders.

Every reader streams: JSON lines are read in blocks of whole lines (``BLOCK_BYTES``), parquet
files one record batch at a time (``PARQUET_ROWS`` rows, read row group by row group), so memory
never depends on a file's size. The order of documents is fixed: inputs in the order given, the
files of a folder or glob sorted by path, the lines / rows of a file in file order.

A block is a tuple ``(path, first_line, payload)``: for JSON lines ``payload`` is the bytes of
whole lines (``first_line`` numbers the first, from 1); for parquet it is a dict
``{key: list of values}`` of the ``--json-keys`` columns (``first_line`` numbers the first row).
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Iterator
from typing import Optional

BLOCK_BYTES = 1 << 20
PARQUET_ROWS = 1024
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
SUFFIXES = JSONL_SUFFIXES + (".parquet",)


class InputError(ValueError):
    """An input that cannot be read; the message names the flag or file."""


def is_parquet(path: str) -> bool:
    return path.endswith(".parquet")


def _shards(directory: str) -> list[str]:
    """Files under ``directory`` (recursively) with a known corpus suffix, sorted by path."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        found += [os.path.join(root, n) for n in names if n.endswith(SUFFIXES)]
    return sorted(found)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Each ``--input`` is a file, a folder of shards or a glob (``**`` allowed), expanded in a
    stable order: folders and globs sorted by path. A pattern matching nothing is an error."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = []
            for p in sorted(glob.glob(pattern, recursive=True)):
                found += _shards(p) if os.path.isdir(p) else [p]
        elif os.path.isdir(pattern):
            found = _shards(pattern)
            if not found:
                raise InputError(f"--input {pattern}: a folder with no {', '.join(SUFFIXES)} file")
        else:
            found = [pattern]
        found = [p for p in found if os.path.isfile(p)]
        if not found:
            raise InputError(f"--input {pattern}: no such file")
        paths.extend(found)
    return paths


def open_binary(path: str):
    """A binary file object over the decompressed bytes of ``path`` (by its suffix)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise InputError(f"{path}: reading .zst needs the zstandard package") from e
        raw = open(path, "rb")
        # read_across_frames: shards made by concatenating .zst files are several frames
        return zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=True
        )
    return open(path, "rb")


def _jsonl_blocks(path: str, block_bytes: int) -> Iterator[tuple]:
    with open_binary(path) as f:
        line, rest = 1, b""
        while True:
            data = f.read(block_bytes)
            if not data:
                break
            data = rest + data if rest else data
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                rest = data
                continue
            blob, rest = data[:cut], data[cut:]
            yield path, line, blob
            line += blob.count(b"\n")
        if rest:
            yield path, line, rest


def _parquet_blocks(path: str, keys: list[str], rows: int) -> Iterator[tuple]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InputError(f"{path}: reading .parquet needs the pyarrow package") from e
    try:
        # no pre-buffering and a bounded read buffer: memory stays that of one batch's column
        # chunks (with the defaults it grew with the file: 151 -> 200 MB from a 20 to an 80 MB
        # file; 151 MB both ways like this)
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError
        raise InputError(f"{path}: not a parquet file ({e})") from e
    names = pf.schema_arrow.names
    missing = [k for k in keys if k not in names]
    if missing:
        raise InputError(
            f"{path}: no column {missing[0]!r} for --json-keys (columns: {', '.join(names)})"
        )
    for k in keys:
        kind = pf.schema_arrow.field(k).type
        if str(kind) not in ("string", "large_string", "string_view"):
            raise InputError(f"{path}: column {k!r} holds {kind}, not strings")
    first = 1
    for batch in pf.iter_batches(batch_size=rows, columns=keys, use_threads=False):
        yield path, first, {k: batch.column(k).to_pylist() for k in keys}
        first += batch.num_rows


def read_blocks(
    paths: list[str],
    json_keys: list[str],
    block_bytes: Optional[int] = None,
    parquet_rows: Optional[int] = None,
) -> Iterator[tuple]:
    """Yield the blocks of every input in order (see the module docstring)."""
    block_bytes, parquet_rows = block_bytes or BLOCK_BYTES, parquet_rows or PARQUET_ROWS
    for path in paths:
        if is_parquet(path):
            yield from _parquet_blocks(path, json_keys, parquet_rows)
        else:
            yield from _jsonl_blocks(path, block_bytes)


def known_size(paths: list[str]) -> bool:
    """True when the file sizes are the byte counts the blocks add up to (no compression)."""
    return not any(p.endswith((".gz", ".zst", ".parquet")) for p in paths)
