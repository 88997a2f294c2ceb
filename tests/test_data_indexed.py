"""The .bin/.idx format, byte for byte (DESIGN.md), its reader's checks, and merging."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from megalite.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    best_dtype,
)
from megalite.data.merge import main as merge_main
from megalite.data.merge import merge_datasets

DOCS = [[1, 2, 3], [40000, 5], [6], [7, 8, 9, 10]]


def _write(prefix, docs=DOCS, dtype=np.uint16):
    with IndexedDatasetWriter(str(prefix), dtype) as w:
        for d in docs:
            w.add_document(np.array(d))
    return str(prefix)


def test_idx_layout_field_by_field(tmp_path):
    prefix = _write(tmp_path / "ds")
    raw = (tmp_path / "ds.idx").read_bytes()
    s, d = len(DOCS), len(DOCS) + 1
    assert raw[0:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17]) == (1,)  # version
    assert raw[17] == 8  # dtype code of uint16
    assert struct.unpack("<Q", raw[18:26]) == (s,)
    assert struct.unpack("<Q", raw[26:34]) == (d,)
    assert list(struct.unpack(f"<{s}i", raw[34 : 34 + 4 * s])) == [3, 2, 1, 4]
    offsets = struct.unpack(f"<{s}q", raw[34 + 4 * s : 34 + 12 * s])
    assert list(offsets) == [0, 6, 10, 12]  # byte offsets: cumulative lengths * 2 bytes
    docs = struct.unpack(f"<{d}q", raw[34 + 12 * s : 34 + 12 * s + 8 * d])
    assert list(docs) == [0, 1, 2, 3, 4]
    assert len(raw) == 34 + 12 * s + 8 * d
    tokens = np.frombuffer((tmp_path / "ds.bin").read_bytes(), dtype="<u2")
    assert tokens.tolist() == [t for doc in DOCS for t in doc]
    assert IndexedDataset(prefix)[1].tolist() == [40000, 5]


def test_reader_on_hand_built_file(tmp_path):
    """A file written byte by byte from the spec: int32 tokens, a 2-sequence document."""
    lengths, docs = [2, 3, 1], [0, 2, 3]  # documents: sequences {0, 1} and {2}
    tokens = [70000, 1, 2, 3, 4, -5]
    with open(tmp_path / "h.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + bytes([4]))
        f.write(struct.pack("<QQ", len(lengths), len(docs)))
        f.write(struct.pack("<3i", *lengths))
        f.write(struct.pack("<3q", 0, 8, 20))
        f.write(struct.pack("<3q", *docs))
    (tmp_path / "h.bin").write_bytes(struct.pack("<6i", *tokens))
    ds = IndexedDataset(str(tmp_path / "h"))
    assert ds.dtype == np.int32 and len(ds) == 3 and ds.num_documents == 2
    assert [x.tolist() for x in ds[0:3]] == [[70000, 1], [2, 3, 4], [-5]]
    assert ds.get(1, 1, 2).tolist() == [3, 4] and ds.get(1, 2).tolist() == [4]
    assert ds.document_indices.tolist() == docs
    assert ds.sequence_lengths.tolist() == lengths
    view = ds[1]
    assert not view.flags.writeable and not view.flags.owndata  # a view of the mmap, no copy
    with pytest.raises(IndexError):
        ds.get(0, 1, 5)


def test_dtype_choice():
    assert best_dtype(32000) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(128256) == np.int32


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda idx, b: idx.write_bytes(idx.read_bytes()[:20]), "truncated: 20 bytes"),
        (lambda idx, b: idx.write_bytes(idx.read_bytes()[:-3]), "truncated"),
        (lambda idx, b: idx.write_bytes(idx.read_bytes() + b"x"), "trailing bytes"),
        (lambda idx, b: idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:]), "magic"),
        (
            lambda idx, b: idx.write_bytes(
                idx.read_bytes()[:9] + struct.pack("<Q", 2) + idx.read_bytes()[17:]
            ),
            "version 2",
        ),
        (
            lambda idx, b: idx.write_bytes(idx.read_bytes()[:17] + b"\x63" + idx.read_bytes()[18:]),
            "unknown dtype code 99",
        ),
        (lambda idx, b: b.write_bytes(b.read_bytes()[:-2]), "ds.bin: 18 bytes, but"),
        (lambda idx, b: b.write_bytes(b.read_bytes() + b"\0\0"), "ds.bin: 22 bytes"),
        (lambda idx, b: os.remove(b), "ds.bin: no such file"),
    ],
)
def test_reader_refuses_damaged_files(tmp_path, damage, message):
    prefix = _write(tmp_path / "ds")
    damage(tmp_path / "ds.idx", tmp_path / "ds.bin")
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(prefix)


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(tmp_path / "ds"), np.uint16) as w:
            w.add_document(np.arange(10))
            raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path) == []


def test_bulk_add_matches_per_document(tmp_path):
    a = _write(tmp_path / "a")
    with IndexedDatasetWriter(str(tmp_path / "b"), np.uint16) as w:
        w.add_documents(np.concatenate([np.array(d) for d in DOCS]), [len(d) for d in DOCS])
    assert (tmp_path / "a.idx").read_bytes() == (tmp_path / "b.idx").read_bytes()
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert len(IndexedDataset(a)) == 4


def test_merge(tmp_path):
    a = _write(tmp_path / "a")
    b = _write(tmp_path / "b", [[11, 12], [13]])
    merged = merge_datasets([a, b], str(tmp_path / "m"))
    assert [x.tolist() for x in merged[0:6]] == DOCS + [[11, 12], [13]]
    assert merged.document_indices.tolist() == [0, 1, 2, 3, 4, 5, 6]
    os.makedirs(tmp_path / "shards")
    for name in ("a", "b"):
        for ext in (".bin", ".idx"):
            os.rename(tmp_path / f"{name}{ext}", tmp_path / "shards" / f"{name}{ext}")
    assert (
        merge_main(["--input", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "m2")])
        == 0
    )
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "m2.bin").read_bytes()
    assert (tmp_path / "m.idx").read_bytes() == (tmp_path / "m2.idx").read_bytes()
    _write(tmp_path / "c", [[1]], dtype=np.int32)
    with pytest.raises(IndexedDatasetError, match="int32, this output is uint16"):
        merge_datasets([str(tmp_path / "m"), str(tmp_path / "c")], str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad.idx") and not os.path.exists(tmp_path / "bad.bin")
