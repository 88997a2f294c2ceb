"""The gigatoken fast path: used only behind its self-check, which falls back when it differs."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megalite.data.chunking import ragged
from megalite.data.fastpath import PROBES, choose_fast_encoder, exact_only_pattern
from megalite.data.preprocess import preprocess
from megalite.data.tokenizers import build_tokenizer
from tests.test_data_common import (
    EDGE_CASES,
    stdlib_text,
    train_byte_level_bpe,
    train_sentencepiece,
    write_jsonl,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast")
    bpe = train_byte_level_bpe(str(d / "bpe"))
    docs = stdlib_text(80_000)
    return {
        "hf": {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": bpe["tokenizer_json"]},
        "gpt2": {
            "tokenizer_type": "GPT2BPETokenizer",
            "vocab_file": bpe["vocab"],
            "merge_file": bpe["merges"],
        },
        "sp": {
            "tokenizer_type": "GPTSentencePieceTokenizer",
            "tokenizer_model": train_sentencepiece(str(d / "sp.model")),
        },
        "docs": docs,
        "jsonl": write_jsonl(str(d / "c.jsonl"), docs + EDGE_CASES),
    }


def exact_build(tokenizer):
    """A stand-in fast path that is exact: the tokenizer's own body encode."""
    return lambda texts: ragged(tokenizer.tokenize_body_batch(texts))


def wrong_on_ideographic_space(tokenizer):
    """Deliberately wrong on one probe only (U+3000), right on the corpus sample."""

    def encode(texts):
        tokens, lengths = ragged(tokenizer.tokenize_body_batch(texts))
        hit = np.repeat(["\u3000" in t for t in texts], lengths)
        return np.where(hit, 0, tokens), lengths

    return encode


def wrong_everywhere(tokenizer):
    def encode(texts):
        tokens, lengths = ragged(tokenizer.tokenize_body_batch(texts))
        return (tokens + 1) % tokenizer.vocab_size, lengths

    return encode


def _bytes(prefix):
    return [open(f"{prefix}_text_document{e}", "rb").read() for e in (".bin", ".idx")]


@pytest.mark.parametrize("build", [wrong_on_ideographic_space, wrong_everywhere])
def test_mismatching_fast_path_falls_back_and_says_so(setup, tmp_path, capsys, build):
    tok = build_tokenizer(**setup["hf"])
    lines = []
    assert choose_fast_encoder(tok, setup["docs"], lines.append, build=build) is None
    assert "NOT exact" in lines[0] and "falling back to megalite's exact encoder" in lines[0]
    common = dict(tokenizer_args=setup["hf"], append_eod=True, workers=2)
    preprocess([setup["jsonl"]], str(tmp_path / "bad"), _fast_build=build, **common)
    assert "NOT exact" in capsys.readouterr().err
    preprocess([setup["jsonl"]], str(tmp_path / "ref"), fast_tokenizer="exact", **common)
    assert _bytes(tmp_path / "bad") == _bytes(tmp_path / "ref")


def wrong_after_the_sample(tokenizer):
    """Right on the start-up sample and the probes, wrong on the corpus' later documents."""

    def encode(texts):
        tokens, lengths = ragged(tokenizer.tokenize_body_batch(texts))
        late = np.repeat(["Error" in t for t in texts], lengths)
        return np.where(late, 0, tokens), lengths

    return encode


def test_spot_check_stops_a_run_the_sample_missed(setup, tmp_path, monkeypatch):
    import megalite.data.readers

    monkeypatch.setattr(megalite.data.readers, "BLOCK_BYTES", 4096)
    plain = "the first documents are plain prose " * 8
    docs = [plain] * 3000 + ["class Error(Exception): pass"] * 400  # the sample: plain only
    src = write_jsonl(str(tmp_path / "late.jsonl"), docs)
    common = dict(tokenizer_args=setup["hf"], append_eod=True, workers=1)
    with pytest.raises(ValueError, match="rerun with --fast-tokenizer exact"):
        preprocess([src], str(tmp_path / "o"), _fast_build=wrong_after_the_sample, **common)
    assert os.listdir(tmp_path) == ["late.jsonl"]  # nothing written


def test_spot_check_stops_the_threaded_gigatoken_path(setup, tmp_path, monkeypatch):
    """The same on the gigatoken path proper (threads in the main process, 4 MB blocks): the
    mismatch raised in a thread stops the run and nothing is written."""
    import megalite.data.fastpath
    import megalite.data.preprocess

    monkeypatch.setattr(megalite.data.preprocess, "FAST_BLOCK_BYTES", 4096)
    monkeypatch.setattr(
        megalite.data.fastpath,
        "gigatoken_encoder_for",
        lambda tok: (wrong_after_the_sample(tok), ""),
    )
    plain = "the first documents are plain prose " * 8
    docs = [plain] * 3000 + ["class Error(Exception): pass"] * 400
    src = write_jsonl(str(tmp_path / "late.jsonl"), docs)
    common = dict(tokenizer_args=setup["hf"], append_eod=True, workers=2)
    with pytest.raises(ValueError, match="rerun with --fast-tokenizer exact"):
        preprocess([src], str(tmp_path / "o"), **common)
    assert os.listdir(tmp_path) == ["late.jsonl"]


def test_exact_stand_in_runs_in_the_workers(setup, tmp_path, capsys):
    """A fast path that passes is what the workers use: same bytes as the exact run."""
    common = dict(tokenizer_args=setup["sp"], append_eod=True, workers=2)
    preprocess([setup["jsonl"]], str(tmp_path / "fast"), _fast_build=exact_build, **common)
    assert "fast path: gigatoken, exact on the" in capsys.readouterr().err
    preprocess([setup["jsonl"]], str(tmp_path / "ref"), fast_tokenizer="exact", **common)
    assert _bytes(tmp_path / "fast") == _bytes(tmp_path / "ref")


@pytest.mark.parametrize("kind", ["hf", "gpt2", "sp"])
def test_gigatoken_is_used_only_where_exact(setup, tmp_path, kind):
    pytest.importorskip("gigatoken")
    tok = build_tokenizer(**setup[kind])
    lines = []
    encoder = choose_fast_encoder(tok, setup["docs"], lines.append)
    assert encoder is not None, lines
    if kind == "sp":
        # gigatoken reads "</s>" in text as the control token: such documents are kept from it
        text = ["a </s> b"]
        assert encoder(text)[0].tolist() != tok.tokenize_body_batch(text)[0]
        assert exact_only_pattern(tok).search(text[0])
    docs = [d for d in setup["docs"] + PROBES if not (kind == "sp" and "<" in d)]
    tokens, _ = encoder(docs)
    assert tokens.tolist() == ragged(tok.tokenize_body_batch(docs))[0].tolist()
    common = dict(tokenizer_args=setup[kind], append_eod=True, workers=2)
    preprocess([setup["jsonl"]], str(tmp_path / "auto"), **common)  # EDGE_CASES hold "</s>"
    preprocess([setup["jsonl"]], str(tmp_path / "ref"), fast_tokenizer="exact", **common)
    assert _bytes(tmp_path / "auto") == _bytes(tmp_path / "ref")


def test_gigatoken_refusing_a_model_falls_back(tmp_path):
    pytest.importorskip("gigatoken")
    model = train_sentencepiece(str(tmp_path / "uni.model"), model_type="unigram")
    tok = build_tokenizer("GPTSentencePieceTokenizer", model)
    lines = []
    assert choose_fast_encoder(tok, ["some text"], lines.append) is None
    assert "gigatoken cannot load it" in lines[0] and "using megalite's exact encoder" in lines[0]


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer"])
def test_bpe_without_byte_fallback_through_gigatoken(setup, tmp_path, capsys, kind):
    """A BPE model without byte fallback goes to gigatoken with byte pieces added; runs of
    unknown characters (here the rarest characters: 98% character coverage) come back as
    one <unk> each, as sentencepiece gives them: the same bytes as the exact path.
    (SentencePieceTokenizer: its --tokenizer-sentencepiece-legacy rules, whose special-token
    documents the fast path leaves to the tokenizer; without the flag it is the other type.)"""
    legacy = {"tokenizer_sentencepiece_legacy": kind == "SentencePieceTokenizer"}
    pytest.importorskip("gigatoken")
    model = train_sentencepiece(
        str(tmp_path / "nbf.model"), byte_fallback=False, character_coverage=0.98
    )
    tok = build_tokenizer(kind, model, **legacy)
    odd = ["東京は日本の首都です 😀😀 x😀y", "😀", "a\u3000b ŋŋ ŋ", "ŋ", "ŋ😀 ŋ"]
    unk = tok.sp.unk_id()
    assert sum(ids.count(unk) for ids in tok.tokenize_body_batch(odd)) >= 6
    lines = []
    encoder = choose_fast_encoder(tok, setup["docs"] + odd, lines.append)
    assert encoder is not None, lines
    texts = odd + setup["docs"][:50] + odd[::-1]  # unknown runs at document edges
    tokens, lengths = encoder(texts)
    want, want_lengths = ragged(tok.tokenize_body_batch(texts))
    assert tokens.tolist() == want.tolist() and lengths.tolist() == want_lengths.tolist()
    src = write_jsonl(str(tmp_path / "odd.jsonl"), texts + EDGE_CASES + setup["docs"])
    common = dict(tokenizer_args={"tokenizer_type": kind, "tokenizer_model": model, **legacy})
    common.update(append_eod=True, workers=2)
    preprocess([src], str(tmp_path / "auto"), **common)
    assert "fast path: gigatoken, exact on the" in capsys.readouterr().err
    preprocess([src], str(tmp_path / "ref"), fast_tokenizer="exact", **common)
    assert _bytes(tmp_path / "auto") == _bytes(tmp_path / "ref")
