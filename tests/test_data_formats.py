"""Corpus formats and Megatron's ordering flags: every input form gives the JSONL run's bytes."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from megalite.data.indexed_dataset import IndexedDataset
from megalite.data.preprocess import main, preprocess
from megalite.data.readers import expand_inputs
from megalite.data.tokenizers import build_tokenizer
from tests.test_data_common import EDGE_CASES, stdlib_text, train_sentencepiece


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    docs = EDGE_CASES + stdlib_text(60_000)
    titles = [f"title {i} {t[:10]}" for i, t in enumerate(docs)]
    model = train_sentencepiece(str(d / "sp.model"), vocab_size=500)
    flags = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model]
    plain = str(d / "plain.jsonl")
    with open(plain, "w", encoding="utf-8") as f:
        for t, title in zip(docs, titles):
            f.write(json.dumps({"text": t, "title": title}) + "\n")
    ref = str(d / "ref")
    argv = ["--input", plain, "--output-prefix", ref, "--append-eod", "--json-keys", "text"]
    assert main(argv + ["title"] + flags) == 0
    return {"dir": d, "docs": docs, "titles": titles, "flags": flags, "ref": ref, "plain": plain}


def _lines(corpus, lo, hi) -> bytes:
    rows = zip(corpus["docs"][lo:hi], corpus["titles"][lo:hi])
    return "".join(json.dumps({"text": t, "title": ti}) + "\n" for t, ti in rows).encode()


def _write(corpus, path, lo, hi) -> str:
    """Documents lo..hi as ``path``, in the format its suffix names."""
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"title": corpus["titles"][lo:hi], "text": corpus["docs"][lo:hi]})
        pq.write_table(table, path, row_group_size=7)  # many row groups
    elif path.endswith(".zst"):
        import zstandard

        data, mid = _lines(corpus, lo, hi), (lo + hi) // 2
        # two frames, as `cat a.zst b.zst` makes
        first = zstandard.ZstdCompressor().compress(_lines(corpus, lo, mid))
        second = zstandard.ZstdCompressor().compress(_lines(corpus, mid, hi))
        assert len(data) == len(_lines(corpus, lo, mid)) + len(_lines(corpus, mid, hi))
        with open(path, "wb") as f:
            f.write(first + second)
    elif path.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(_lines(corpus, lo, hi))
    else:
        with open(path, "wb") as f:
            f.write(_lines(corpus, lo, hi))
    return path


def _assert_same_as_reference(corpus, out, keys=("text", "title")):
    for key in keys:
        for ext in (".bin", ".idx"):
            got = open(f"{out}_{key}_document{ext}", "rb").read()
            assert got == open(f"{corpus['ref']}_{key}_document{ext}", "rb").read(), (key, ext)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".parquet"])
def test_each_format_gives_the_jsonl_bytes(corpus, tmp_path, suffix):
    src = _write(corpus, str(tmp_path / f"all{suffix}"), 0, len(corpus["docs"]))
    out = str(tmp_path / "out")
    argv = ["--input", src, "--output-prefix", out, "--append-eod", "--workers", "2"]
    assert main(argv + ["--json-keys", "text", "title"] + corpus["flags"]) == 0
    _assert_same_as_reference(corpus, out)


def test_shard_folder_and_glob_in_sorted_order(corpus, tmp_path):
    """Shards of mixed formats in a folder (and a sub-folder) read in path order."""
    n = len(corpus["docs"])
    cuts = [0, 5, 40, 41, 90, n]
    names = ["a/00.jsonl", "a/01.jsonl.gz", "a/02.parquet", "a/sub/03.jsonl.zst", "a/sub/04.json"]
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for name, lo, hi in reversed(list(zip(names, cuts, cuts[1:]))):  # written out of order
        _write(corpus, str(tmp_path / name), lo, hi)
    (tmp_path / "a" / "README.txt").write_text("not a shard")
    assert expand_inputs([str(tmp_path / "a")]) == [str(tmp_path / n) for n in names]
    common = ["--append-eod", "--json-keys", "text", "title"] + corpus["flags"]
    assert (
        main(["--input", str(tmp_path / "a"), "--output-prefix", str(tmp_path / "d")] + common) == 0
    )
    _assert_same_as_reference(corpus, str(tmp_path / "d"))
    glob = [str(tmp_path / "a" / "0*"), str(tmp_path / "a" / "sub" / "*")]
    assert main(["--input", *glob, "--output-prefix", str(tmp_path / "g")] + common) == 0
    _assert_same_as_reference(corpus, str(tmp_path / "g"))


def test_parquet_bad_column_and_null(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "null.parquet")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nokey.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    tok = dict(zip(["tokenizer_type", "tokenizer_model"], corpus["flags"][1::2]))
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match=r"null\.parquet:2: column 'text' is null"):
        preprocess([str(tmp_path / "null.parquet")], out, tok)
    stats = preprocess([str(tmp_path / "null.parquet")], out, tok, skip_bad_lines=True)
    assert (stats.docs, stats.bad_lines) == (2, 1)
    with pytest.raises(ValueError, match=r"nokey\.parquet: no column 'text' .*columns: body"):
        preprocess([str(tmp_path / "nokey.parquet")], out, tok)
    with pytest.raises(ValueError, match=r"ints\.parquet: column 'text' holds int64"):
        preprocess([str(tmp_path / "ints.parquet")], out, tok)
    with pytest.raises(ValueError, match=r"--input .*empty: a folder with no \.jsonl"):
        (tmp_path / "empty").mkdir()
        preprocess([str(tmp_path / "empty")], out, tok)


def test_partitions_follow_megatron_order(corpus, tmp_path):
    """--partitions 3: document i goes to partition i % 3, partitions concatenated (Megatron);
    with --keep-sequential-samples the input order is kept: the plain run's bytes."""
    common = ["--input", corpus["plain"], "--append-eod", "--workers", "2"]
    common += ["--json-keys", "text", "title"] + corpus["flags"]
    out = str(tmp_path / "seq")
    assert (
        main(common + ["--output-prefix", out, "--partitions", "3", "--keep-sequential-samples"])
        == 0
    )
    _assert_same_as_reference(corpus, out)
    out = str(tmp_path / "rr")
    assert main(common + ["--output-prefix", out, "--partitions", "3"]) == 0
    tok = build_tokenizer(**dict(zip(["tokenizer_type", "tokenizer_model"], corpus["flags"][1::2])))
    # an empty document has no sequence but still takes its turn (and keeps its index entry)
    full = [tok.tokenize(d) + [tok.eod] if tok.tokenize(d) else None for d in corpus["docs"]]
    assert None in full
    want = [full[i] for p in range(3) for i in range(p, len(full), 3) if full[i] is not None]
    ds = IndexedDataset(out + "_text_document")
    assert [s.tolist() for s in ds] == want
    order = [full[i] for p in range(3) for i in range(p, len(full), 3)]
    assert np.diff(ds.document_indices).tolist() == [int(f is not None) for f in order]
    assert not [n for n in os.listdir(tmp_path) if "partition" in n]  # temporaries removed


def test_log_interval_and_refused_flags(corpus, tmp_path, capsys):
    out = str(tmp_path / "o")
    argv = ["--input", corpus["plain"], "--output-prefix", out] + corpus["flags"]
    assert main(argv + ["--log-interval", "50", "--keep-newlines"]) == 0
    err = capsys.readouterr().err
    # one line per block that crosses a multiple of the interval (here one 1 MB block)
    assert f"Processed {len(corpus['docs'])} documents (" in err
    with pytest.raises(SystemExit):
        main(argv + ["--partitions", "0"])
    assert np.dtype(IndexedDataset(out + "_text_document").dtype) == np.uint16
