"""Tokenizers: factory errors, round trips, and the exactness of the chunk-memoised fast path."""

from __future__ import annotations

import random

import numpy as np
import pytest

from megalite.data.encode import ChunkCache
from megalite.data.tokenizers import (
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    LegacySentencePieceTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    sentencepiece_model_type,
)
from tests.test_data_common import (
    EDGE_CASES,
    stdlib_text,
    train_byte_level_bpe,
    train_sentencepiece,
)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    bpe = train_byte_level_bpe(str(d / "bpe"))
    sp_bpe = train_sentencepiece(str(d / "bpe.model"), "bpe")
    return {
        "sp_bpe": SentencePieceTokenizer(sp_bpe),
        "sp_legacy": LegacySentencePieceTokenizer(sp_bpe),
        "sp_legacy_as_text": LegacySentencePieceTokenizer(sp_bpe, special_tokens_as_text=True),
        "sp_unigram": SentencePieceTokenizer(train_sentencepiece(str(d / "u.model"), "unigram")),
        "hf": HuggingFaceTokenizer(bpe["tokenizer_json"]),
        "hf_folder": HuggingFaceTokenizer(str(d / "bpe")),
        "gpt2": GPT2BPETokenizer(bpe["vocab"], bpe["merges"]),
        "hf_as_text": HuggingFaceTokenizer(bpe["tokenizer_json"], special_tokens_as_text=True),
        "gpt2_as_text": GPT2BPETokenizer(bpe["vocab"], bpe["merges"], special_tokens_as_text=True),
    }


def test_factory_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown --tokenizer-type 'Nope'"):
        build_tokenizer("Nope")
    with pytest.raises(ValueError, match="SentencePieceTokenizer needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match=f"--tokenizer-model {missing}: no such file"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=missing)
    with pytest.raises(FileNotFoundError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=__file__, merge_file=missing)
    with pytest.raises(FileNotFoundError, match="--tokenizer-model .*no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(junk))
    with pytest.raises(ValueError, match="NullTokenizer needs --vocab-size"):
        build_tokenizer("NullTokenizer")


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert isinstance(tok, NullTokenizer)
    assert (tok.vocab_size, tok.eod) == (101, 100)  # Megatron: eod = V, vocab_size = V + 1
    assert tok.tokenize(" 3 1  4\n99") == [3, 1, 4, 99]
    assert tok.detokenize([3, 1, 4]) == "3 1 4"
    with pytest.raises(ValueError, match="token id 100 outside"):
        tok.tokenize("1 100")


def test_interface_and_round_trip(toks):
    text = "def f(x):\n    return x  # naïve café 東京 😀"
    for name in ("hf", "hf_folder", "gpt2"):  # byte-level BPE is lossless
        tok = toks[name]
        assert tok.detokenize(tok.tokenize(text)) == text
        assert tok.tokenize_batch([text, "a b"]) == [tok.tokenize(text), tok.tokenize("a b")]
        assert tok.eod == tok.tok.token_to_id("<|endoftext|>")
    assert toks["hf"].tokenize(text) == toks["gpt2"].tokenize(text)
    sp = toks["sp_bpe"]
    assert sp.detokenize(sp.tokenize("hello world")) == "hello world"
    # Megatron-LM's SentencePieceTokenizer today: the 800 pieces, eod </s>, "<s>" is text
    assert (sp.eod, sp.vocab_size) == (sp.sp.eos_id(), 800) == (2, 800)
    assert sp.tokenize("C<s> and </s>") == sp.sp.encode("C<s> and </s>")
    # --tokenizer-sentencepiece-legacy: <CLS> <SEP> <EOD> <MASK> <PAD> after the 800 pieces
    legacy = toks["sp_legacy"]
    assert (legacy.eod, legacy.vocab_size) == (802, 805)
    assert legacy.tokenize("a<EOD>") == sp.sp.encode("a") + [802]
    as_text = toks["sp_legacy_as_text"]
    assert (as_text.eod, as_text.vocab_size) == (802, 805)
    assert as_text.tokenize("a<EOD>") == sp.sp.encode("a<EOD>")
    # the byte-level types: <|endoftext|> in a document is the eod token, or text with the flag
    for name in ("hf", "gpt2"):
        eod, plain = toks[name].eod, toks[name + "_as_text"]
        assert toks[name].tokenize("a<|endoftext|>b") == plain.tokenize("a") + [
            eod
        ] + plain.tokenize("b")
        assert eod not in plain.tokenize("a<|endoftext|>b")
        assert plain.detokenize(plain.tokenize("a<|endoftext|>b")) == "a<|endoftext|>b"
    assert sentencepiece_model_type(sp.sp.serialized_model_proto()) == "bpe"
    assert toks["sp_unigram"].model_type == "unigram"


def test_fast_path_availability(toks):
    assert toks["sp_bpe"].exact_splitter() is not None
    assert toks["hf"].exact_splitter() is not None
    assert toks["gpt2"].exact_splitter() is not None
    # Unigram Viterbi ties depend on float rounding of everything before a word: not exact.
    assert toks["sp_unigram"].exact_splitter() is None
    assert NullTokenizer(10).exact_splitter() is None


def _documents() -> list[str]:
    """Edge cases alone, glued together, and shuffled mixes of their words and real text."""
    rng = random.Random(0)
    words = [w for t in EDGE_CASES for w in t.split(" ")] + stdlib_text(20_000)[:40]
    seps = [" ", "  ", "\n", "\n\n    ", "\t", "\xa0", "\u3000", " \n ", ""]
    mixes = [
        "".join(rng.choice(words) + rng.choice(seps) for _ in range(rng.randint(1, 40)))
        for _ in range(300)
    ]
    return EDGE_CASES + ["".join(EDGE_CASES), " ".join(EDGE_CASES)] + mixes


def _assert_cache_matches(tok, docs, append_eod=True, max_chunks=500):
    """ChunkCache over blocks of 37 documents (the cache warming up across them; a small
    ``max_chunks`` also exercises its reset) equals ``tokenize`` on every document."""
    cache = ChunkCache(tok, max_chunks=max_chunks)
    got_all = []
    for start in range(0, len(docs), 37):
        tokens, lengths = cache.encode(docs[start : start + 37], append_eod)
        got_all += np.split(tokens, np.cumsum(lengths)[:-1])
    for doc, got in zip(docs, got_all):
        want = tok.tokenize(doc)
        if append_eod and want:
            want = want + [tok.eod]
        assert got.tolist() == want, repr(doc[:80])


@pytest.mark.parametrize(
    "name", ["sp_bpe", "sp_legacy", "sp_legacy_as_text", "hf", "gpt2", "hf_as_text", "gpt2_as_text"]
)
@pytest.mark.parametrize("append_eod", [False, True])
def test_fast_path_is_token_identical(toks, name, append_eod):
    _assert_cache_matches(toks[name], _documents(), append_eod)


@pytest.fixture(scope="module")
def sp_variants(tmp_path_factory):
    """SentencePiece BPE models that switch the fast path's levels on and off."""
    d = tmp_path_factory.mktemp("spv")
    across_symbol = d / "across_symbol.tsv"
    across_symbol.write_text("61 2E 62\t78\n")  # "a.b" -> "x": a rule over a letter/symbol cut
    across_space = d / "across_space.tsv"
    across_space.write_text("61 20 62\t79\n")  # "a b" -> "y": a rule over a word boundary
    train = lambda name, **kw: SentencePieceTokenizer(  # noqa: E731
        train_sentencepiece(str(d / f"{name}.model"), "bpe", 600, **kw)
    )
    return {
        "default": train("default"),
        "no_byte_fallback": train("nbf", byte_fallback=False, character_coverage=0.995),
        "crossing": train("crossing", split_by_unicode_script=False),
        "symbols": train("symbols", user_defined_symbols=["<|endoftext|>", "x.y", "foo"]),
        "rule_symbol": train("rule_symbol", normalization_rule_tsv=str(across_symbol)),
        "rule_space": train("rule_space", normalization_rule_tsv=str(across_space)),
    }


def test_sentencepiece_levels_switch_on_only_where_exact(sp_variants):
    def levels(name):
        splitter = sp_variants[name].exact_splitter()
        return None if splitter is None else splitter.refine is not None

    assert levels("default") is True  # words, then letter / symbol runs of new words
    assert levels("no_byte_fallback") is True
    assert levels("symbols") is True  # words holding "x.y" or "<|endoftext|>" stay whole
    assert levels("crossing") is False  # pieces join letters to symbols: words only
    assert levels("rule_symbol") is False  # "a.b" normalises as one: words only
    assert levels("rule_space") is None  # "a b" normalises as one: no exact split at all


@pytest.mark.parametrize(
    "name", ["default", "no_byte_fallback", "crossing", "symbols", "rule_symbol", "rule_space"]
)
def test_sentencepiece_variants_are_token_identical(sp_variants, name):
    tok = sp_variants[name]
    extra = [
        "a.b a b a.bc xa.b x.y x.yz wx.y foo foo.bar (foo) <|endoftext|>x.y.z",
        "é.b a.é x!!y !!!! ?!?x ¿que? naïve.attr done.",
        "Q! xZ$ ^J| aK~b Q!Z?W@ 3Q 9~ <B>",  # unknown letters next to unknown symbols
    ]
    docs = _documents() + extra + [" ".join(extra)] + stdlib_text(60_000)
    if tok.exact_splitter() is None:  # "a b" normalised as one: nothing to check but that
        assert tok.tokenize("a b") == tok.tokenize("y")
        return
    _assert_cache_matches(tok, docs)  # a small memo: resets between blocks
    _assert_cache_matches(tok, docs, append_eod=False, max_chunks=1 << 20)
