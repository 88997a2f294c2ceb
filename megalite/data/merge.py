"""Merge several .bin/.idx datasets into one, streaming (Megatron's tools/merge_datasets.py).

The .bin files are copied block by block and the index arrays concatenated with shifted
document indices: memory is that of the index arrays, never of the tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from megalite.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    index_file_path,
)


def find_prefixes(directory: str) -> list[str]:
    """Every ``P`` in ``directory`` with both ``P.bin`` and ``P.idx``, sorted."""
    names = sorted(n[: -len(".idx")] for n in os.listdir(directory) if n.endswith(".idx"))
    prefixes = [os.path.join(directory, n) for n in names]
    return [p for p in prefixes if os.path.exists(p + ".bin")]


def merge_datasets(input_prefixes: list[str], output_prefix: str) -> IndexedDataset:
    """Concatenate the datasets in order into ``output_prefix``; returns the merged reader.

    All inputs must share one token dtype. Written to temporary names and renamed at the end.
    """
    if not input_prefixes:
        raise ValueError("nothing to merge: no input datasets")
    first = IndexedDataset(input_prefixes[0])
    dtype = first.dtype
    first.close()
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for prefix in input_prefixes:
            writer.add_index(prefix)
    return IndexedDataset(output_prefix)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Merge .bin/.idx datasets into one.")
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="a directory (merges every P.bin/P.idx pair in it, sorted) or dataset prefixes",
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    args = p.parse_args(argv)
    if len(args.input) == 1 and os.path.isdir(args.input[0]):
        prefixes = find_prefixes(args.input[0])
    else:
        prefixes = args.input
    try:
        merged = merge_datasets(prefixes, args.output_prefix)
    except (IndexedDatasetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"merged {len(prefixes)} datasets: {len(merged)} sequences, {merged.num_documents} "
        f"documents -> {index_file_path(args.output_prefix)}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
