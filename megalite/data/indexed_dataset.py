"""Megatron-compatible tokenized datasets: a ``.bin`` of tokens and an ``.idx`` that indexes it.

A dataset with prefix ``P`` is two files. ``P.bin`` holds the tokens of every sequence back to
back, nothing else. ``P.idx`` (all integers little-endian) is laid out as:

    offset        size   content
    0             9      magic b"MMIDIDX\\x00\\x00"
    9             8      version, uint64 = 1
    17            1      dtype code of the tokens in .bin, uint8 (see DTYPE_CODES)
    18            8      S = sequence count, uint64
    26            8      D = document-index count, uint64 (number of documents + 1)
    34            4*S    sequence lengths in tokens, int32
    34+4S         8*S    byte offset of each sequence in .bin, int64
    34+12S        8*D    document indices, int64: the sequence where each document starts,
                         beginning with 0 and ending with S

A document is one or more consecutive sequences (Megatron splits documents into sentences when
asked; megalite's preprocess writes one sequence per document). Files written here load in
Megatron-LM and the other way round.
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
from typing import Union

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype code + 8 sequence count + 8 document count
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that cannot be read; the message names the file and what is wrong."""


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def best_dtype(vocab_size: int) -> type:
    """uint16 when every token id fits with room to spare (< 65500, as Megatron), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dtype_code(dtype) -> int:
    try:
        return _CODE_OF[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no .idx code") from None


def write_index(
    path: str, dtype, sequence_lengths: np.ndarray, document_indices: np.ndarray
) -> None:
    """Write an .idx file for sequences stored back to back in the matching .bin.

    ``sequence_lengths``: [S] token counts; ``document_indices``: [D] with D >= 1, starting at 0
    and ending at S. The byte offsets are derived here from the lengths and the dtype size.
    """
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    docs = np.asarray(document_indices, dtype=np.int64)
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths):
        raise ValueError(
            f"document indices must start at 0 and end at the sequence count {len(lengths)}"
        )
    itemsize = np.dtype(dtype).itemsize
    offsets = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=offsets[1:])
    offsets *= itemsize
    with open(path, "wb") as f:
        f.write(MAGIC)  # 9 bytes of magic
        f.write(struct.pack("<Q", VERSION))  # uint64 version
        f.write(struct.pack("<B", dtype_code(dtype)))  # uint8 dtype code
        f.write(struct.pack("<Q", len(lengths)))  # uint64 sequence count S
        f.write(struct.pack("<Q", len(docs)))  # uint64 document-index count D
        f.write(lengths.astype("<i4", copy=False).tobytes())  # int32[S] lengths
        f.write(offsets.astype("<i8", copy=False).tobytes())  # int64[S] byte offsets
        f.write(docs.astype("<i8", copy=False).tobytes())  # int64[D] document indices


class _Growable:
    """An append-only numpy buffer that doubles its capacity (amortised O(1) appends)."""

    def __init__(self, dtype, capacity: int = 1024):
        self._buf = np.empty(capacity, dtype=dtype)
        self._n = 0

    def extend(self, values: np.ndarray) -> None:
        need = self._n + len(values)
        if need > len(self._buf):
            grown = np.empty(max(need, 2 * len(self._buf)), dtype=self._buf.dtype)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = values
        self._n = need

    def __len__(self) -> int:
        return self._n

    def view(self) -> np.ndarray:
        return self._buf[: self._n]


class IndexedDatasetWriter:
    """Streams tokens into ``prefix.bin`` and writes ``prefix.idx`` on ``finalize()``.

    Both files are written under temporary names and renamed only by ``finalize()``: an
    exception (or ``abort()``) leaves nothing at the final paths, so a reader never meets an
    .idx next to a partial .bin. Use as a context manager to get that on errors automatically.
    Memory: 4 bytes per sequence + 8 per document; tokens go straight to disk.
    """

    def __init__(self, prefix: str, dtype=np.uint16):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # refuse a dtype the format cannot name before writing anything
        tag = f".tmp{os.getpid()}"
        self._bin_tmp = data_file_path(prefix) + tag
        self._idx_tmp = index_file_path(prefix) + tag
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = _Growable(np.int32)
        self._docs = _Growable(np.int64)
        self._docs.extend(np.zeros(1, dtype=np.int64))
        self.num_tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append len(lengths) documents of one sequence each; tokens: [sum(lengths)] flat."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens given")
        tokens.tofile(self._bin)
        first = len(self._lengths)
        self._lengths.extend(lengths)
        self._docs.extend(np.arange(first + 1, first + 1 + len(lengths), dtype=np.int64))
        self.num_tokens += len(tokens)

    def add_sequences(self, tokens: np.ndarray, lengths: np.ndarray, per_doc: np.ndarray) -> None:
        """Append len(per_doc) documents, document i made of the next ``per_doc[i]`` sequences
        of ``lengths``; a document of 0 sequences is an index entry with none (Megatron writes
        an empty document so). tokens: [sum(lengths)] flat."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        per_doc = np.asarray(per_doc, dtype=np.int64)
        if int(lengths.sum()) != len(tokens) or int(per_doc.sum()) != len(lengths):
            raise ValueError(
                f"{len(tokens)} tokens, {len(lengths)} sequences summing to {int(lengths.sum())}"
                f" and {int(per_doc.sum())} sequences counted by documents do not agree"
            )
        tokens.tofile(self._bin)
        first = len(self._lengths)
        self._lengths.extend(lengths)
        self._docs.extend(first + np.cumsum(per_doc))
        self.num_tokens += len(tokens)

    def add_document(self, tokens: np.ndarray, lengths: list[int] | None = None) -> None:
        """Append one document made of sequences of ``lengths`` (default: one sequence)."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray([len(tokens)] if lengths is None else lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens given")
        tokens.tofile(self._bin)
        self._lengths.extend(lengths)
        self._docs.extend(np.array([len(self._lengths)], dtype=np.int64))
        self.num_tokens += len(tokens)

    def add_index(self, prefix: str) -> None:
        """Append every document of the dataset at ``prefix``, copying its .bin in blocks."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{index_file_path(prefix)}: tokens are {other.dtype}, this output is {self.dtype}"
            )
        base = len(self._lengths)
        self._lengths.extend(other.sequence_lengths)
        self._docs.extend(other.document_indices[1:] + base)
        self.num_tokens += int(other.sequence_lengths.sum(dtype=np.int64))
        other.close()
        with open(data_file_path(prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, 16 << 20)

    def finalize(self) -> None:
        """Write the .idx and move both files to their final names."""
        self._bin.close()
        write_index(self._idx_tmp, self.dtype, self._lengths.view(), self._docs.view())
        # .bin first: if we die between the renames, the old .idx (if any) is the one missing.
        os.replace(self._bin_tmp, data_file_path(self.prefix))
        os.replace(self._idx_tmp, index_file_path(self.prefix))

    def abort(self) -> None:
        """Drop everything written so far; the final paths are left untouched."""
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def _map(path: str) -> mmap.mmap | None:
    """Read-only mmap of ``path`` (None for an empty file, which mmap refuses)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class IndexedDataset:
    """Memory-mapped reader of ``prefix.bin`` / ``prefix.idx``.

    ``ds[i]`` is sequence i as a read-only numpy view into the mmap (no copy); ``ds.get(i,
    offset, length)`` a part of it. ``sequence_lengths`` [S] int32, ``sequence_pointers`` [S]
    int64 byte offsets and ``document_indices`` [D] int64 are views of the .idx. Every size and
    header field is checked on open; a bad pair raises ``IndexedDatasetError`` naming the file.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.exists(path):
                raise IndexedDatasetError(f"{path}: no such file")
        idx_size = os.path.getsize(idx_path)
        if idx_size < HEADER_SIZE:
            raise IndexedDatasetError(
                f"{idx_path}: truncated: {idx_size} bytes, the header alone is {HEADER_SIZE}"
            )
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        # Step by step through the fixed 34-byte header.
        magic = header[0:9]
        if magic != MAGIC:
            raise IndexedDatasetError(
                f"{idx_path}: not a Megatron .idx file (magic {magic!r}, expected {MAGIC!r})"
            )
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path}: version {version}, only {VERSION} is known")
        (code,) = struct.unpack("<B", header[17:18])
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        (n_seq,) = struct.unpack("<Q", header[18:26])
        (n_doc,) = struct.unpack("<Q", header[26:34])
        expected = HEADER_SIZE + 12 * n_seq + 8 * n_doc
        if idx_size != expected:
            what = "truncated" if idx_size < expected else "has trailing bytes"
            raise IndexedDatasetError(
                f"{idx_path}: {what}: {idx_size} bytes, but {n_seq} sequences and {n_doc} "
                f"document indices need {expected}"
            )
        self._idx = _map(idx_path)
        buf = self._idx
        # The three arrays follow the header back to back: int32[S], int64[S], int64[D].
        self.sequence_lengths = np.frombuffer(buf, "<i4", n_seq, HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(buf, "<i8", n_seq, HEADER_SIZE + 4 * n_seq)
        self.document_indices = np.frombuffer(buf, "<i8", n_doc, HEADER_SIZE + 12 * n_seq)
        if n_doc == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            raise IndexedDatasetError(
                f"{idx_path}: document indices must run from 0 to the sequence count {n_seq}"
            )
        need = 0
        if n_seq:
            need = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * (
                self.dtype.itemsize
            )
        bin_size = os.path.getsize(bin_path)
        if bin_size != need:
            raise IndexedDatasetError(
                f"{bin_path}: {bin_size} bytes, but {idx_path} describes {need} bytes of "
                f"{self.dtype} tokens (files from different runs, or a partial copy?)"
            )
        self._bin = _map(bin_path)

    def __reduce__(self):
        # mmaps do not pickle: a DataLoader worker started with "spawn" reopens the files.
        return (IndexedDataset, (self.prefix,))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end if no length)."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) of a sequence of {size}")
        if length == 0:
            return np.empty(0, dtype=self.dtype)
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    def __getitem__(self, idx: Union[int, slice]) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} of {len(self)}")
        return self.get(idx)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def close(self) -> None:
        """Drop the numpy views, then unmap (views must be released before the mmap closes)."""
        self.sequence_lengths = self.sequence_pointers = self.document_indices = None
        for m in (self._idx, self._bin):
            if m is not None:
                try:
                    m.close()
                except BufferError:  # a caller still holds a token view; let GC unmap it
                    pass
        self._idx = self._bin = None


def exists(prefix: str) -> bool:
    return os.path.exists(index_file_path(prefix)) and os.path.exists(data_file_path(prefix))
