"""Preprocessing: round trips, Megatron flags, bad input, and fast path == plain encode."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from megalite.data.indexed_dataset import IndexedDataset
from megalite.data.preprocess import main, preprocess
from megalite.data.tokenizers import build_tokenizer
from tests.test_data_common import (
    EDGE_CASES,
    stdlib_text,
    train_byte_level_bpe,
    train_sentencepiece,
    write_jsonl,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    bpe = train_byte_level_bpe(str(d / "bpe"))
    docs = stdlib_text(150_000)
    return {
        "dir": d,
        "docs": docs,
        "jsonl": write_jsonl(str(d / "corpus.jsonl"), docs),
        "hf": [
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            bpe["tokenizer_json"],
        ],
        "gpt2": [
            "--tokenizer-type",
            "GPT2BPETokenizer",
            "--vocab-file",
            bpe["vocab"],
            "--merge-file",
            bpe["merges"],
        ],
        "sp": [
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            train_sentencepiece(str(d / "sp.model")),
        ],
        "sp_unigram": [
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            train_sentencepiece(str(d / "u.model"), "unigram"),
        ],
    }


def _tokenizer(flags):
    args = dict(zip([f[2:].replace("-", "_") for f in flags[0::2]], flags[1::2]))
    return build_tokenizer(**args)


def test_round_trip_byte_level(files, tmp_path):
    """preprocess -> read back -> detokenize: the input documents, each followed by eod."""
    out = str(tmp_path / "out")
    assert (
        main(
            ["--input", files["jsonl"], "--output-prefix", out, "--append-eod", "--workers", "2"]
            + files["hf"]
        )
        == 0
    )
    ds = IndexedDataset(out + "_text_document")
    tok = _tokenizer(files["hf"])
    assert len(ds) == len(files["docs"]) == ds.num_documents
    assert ds.dtype == np.uint16
    for doc, seq in zip(files["docs"], ds):
        assert seq[-1] == tok.eod
        assert tok.detokenize(seq[:-1]) == doc


def test_round_trip_sentencepiece_and_gz_glob(files, tmp_path):
    docs = ["hello world", "a second document, with punctuation!", "x"]
    for i in range(2):
        with gzip.open(tmp_path / f"part{i}.jsonl.gz", "wt") as f:
            for t in docs:
                f.write(json.dumps({"text": t, "title": t.upper()}) + "\n")
    out = str(tmp_path / "o")
    assert (
        main(
            [
                "--input",
                str(tmp_path / "part*.jsonl.gz"),
                "--output-prefix",
                out,
                "--json-keys",
                "text",
                "title",
            ]
            + files["sp"]
        )
        == 0
    )
    tok = _tokenizer(files["sp"])
    text, title = IndexedDataset(out + "_text_document"), IndexedDataset(out + "_title_document")
    assert [tok.detokenize(s) for s in text] == docs * 2
    assert [tok.detokenize(s) for s in title] == [d.upper() for d in docs] * 2


@pytest.mark.parametrize("kind", ["sp", "hf", "gpt2", "sp_unigram"])
def test_fast_path_matches_plain_encode(files, tmp_path, kind):
    """Same bytes out with the chunk cache and with whole-document encode (2 workers each)."""
    texts = EDGE_CASES + files["docs"][:300] + ["".join(EDGE_CASES)]
    src = write_jsonl(str(tmp_path / "edge.jsonl"), texts)
    common = ["--input", src, "--append-eod", "--workers", "2"] + files[kind]
    assert main(common + ["--output-prefix", str(tmp_path / "fast")]) == 0
    assert main(common + ["--output-prefix", str(tmp_path / "plain"), "--no-chunk-cache"]) == 0
    for ext in (".bin", ".idx"):
        fast = (tmp_path / f"fast_text_document{ext}").read_bytes()
        assert fast == (tmp_path / f"plain_text_document{ext}").read_bytes()
    tok = _tokenizer(files[kind])
    want = [tok.tokenize(t) + [tok.eod] for t in texts if tok.tokenize(t)]
    got = [s.tolist() for s in IndexedDataset(str(tmp_path / "fast_text_document"))]
    assert got == want  # a document without tokens has no sequence, as in Megatron


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": "broken'], r"bad\.jsonl:2: malformed JSON"),
        (['{"text": "ok"}', '{"body": "no text"}'], r"bad\.jsonl:2: key 'text' is missing"),
        (['{"text": 5}'], r"bad\.jsonl:1: key 'text' is of type int, not a string"),
        (['["a list"]'], r"bad\.jsonl:1: a JSON list"),
        ([], r"no documents with any text in .*bad\.jsonl"),
        (["", "   "], r"no documents with any text"),
    ],
)
def test_bad_input_is_refused_and_nothing_written(files, tmp_path, capsys, lines, message):
    src = tmp_path / "bad.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out" / "p"
    out.parent.mkdir()
    assert (
        main(["--input", str(src), "--output-prefix", str(out), "--workers", "2"] + files["hf"])
        == 1
    )
    assert capsys.readouterr().err.count("error:") == 1
    with pytest.raises(ValueError, match=message):
        preprocess(
            [str(src)],
            str(out),
            dict(zip(["tokenizer_type", "tokenizer_model"], files["hf"][1::2])),
            workers=1,
        )
    assert os.listdir(out.parent) == []  # no .bin, no .idx, no temporary file


def test_bad_line_deep_in_a_big_file_names_its_line(files, tmp_path):
    lines = [json.dumps({"text": f"line {i}"}) for i in range(40000)]
    lines[31234] = '{"text": "oops"'
    src = tmp_path / "big.jsonl"
    src.write_text("\n".join(lines) + "\n")
    tok = dict(zip(["tokenizer_type", "tokenizer_model"], files["hf"][1::2]))
    with pytest.raises(ValueError, match=r"big\.jsonl:31235: malformed JSON"):
        preprocess([str(src)], str(tmp_path / "o"), tok, workers=2)
    assert sorted(os.listdir(tmp_path)) == ["big.jsonl"]
    stats = preprocess([str(src)], str(tmp_path / "o"), tok, workers=2, skip_bad_lines=True)
    assert (stats.docs, stats.bad_lines) == (39999, 1)
    assert len(IndexedDataset(str(tmp_path / "o_text_document"))) == 39999


def test_missing_inputs_and_tokenizer_files(files, tmp_path, capsys):
    out = ["--output-prefix", str(tmp_path / "o")]
    assert main(["--input", str(tmp_path / "nope*.jsonl")] + out + files["hf"]) == 1
    assert "--input" in capsys.readouterr().err
    missing = str(tmp_path / "missing.model")
    assert (
        main(
            [
                "--input",
                files["jsonl"],
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                missing,
            ]
            + out
        )
        == 1
    )
    assert f"--tokenizer-model {missing}: no such file" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_null_tokenizer_pretokenized(tmp_path):
    src = write_jsonl(str(tmp_path / "ids.jsonl"), ["1 2 3", "4 5", "70000 1"])
    out = str(tmp_path / "o")
    assert (
        main(
            [
                "--input",
                src,
                "--output-prefix",
                out,
                "--tokenizer-type",
                "NullTokenizer",
                "--vocab-size",
                "100000",
                "--append-eod",
            ]
        )
        == 0
    )
    ds = IndexedDataset(out + "_text_document")
    assert ds.dtype == np.int32  # vocabulary >= 65500
    assert [s.tolist() for s in ds] == [[1, 2, 3, 100000], [4, 5, 100000], [70000, 1, 100000]]
