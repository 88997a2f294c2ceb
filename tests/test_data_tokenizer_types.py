"""Every Megatron tokenizer type equals its reference, with Megatron's special-token ids.

References are the libraries themselves (sentencepiece, tokenizers, tiktoken) driven the way
Megatron-LM drives them today (``megatron/core/tokenizers``; the ``legacy`` SentencePiece rules
the way its older ``megatron/training/tokenizer/tokenizer.py`` did); tokenizers are trained
here on text of this machine. Text: tests.test_data_tokenizers._documents (code, URLs,
non-Latin scripts, emoji, whitespace runs, special-token look-alikes).
"""

from __future__ import annotations

import base64
import json

import pytest

from megalite.data.indexed_dataset import IndexedDataset
from megalite.data.preprocess import main
from megalite.data.tokenizers import TOKENIZER_TYPES, build_tokenizer
from tests.test_data_common import train_byte_level_bpe, train_sentencepiece, write_jsonl
from tests.test_data_tokenizers import _documents

# Megatron-LM's PATTERN_TIKTOKEN (v1), written out here as the reference.
V1 = r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
# and PATTERN_TIKTOKEN_V2
V2 = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL = 10


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte, inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("types")
    bpe = train_byte_level_bpe(str(d / "bpe"), vocab_size=1200)
    # a tiktoken vocabulary: the 256 bytes, then the BPE's merges in order (Megatron's JSON)
    dec = _gpt2_byte_decoder()
    ranks = [bytes([i]) for i in range(256)]
    seen = set(ranks)
    for line in open(bpe["merges"], encoding="utf-8").read().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        a, b = line.split(" ")
        merged = bytes(dec[c] for c in a + b)
        if merged not in seen:
            ranks.append(merged)
            seen.add(merged)
    vocab = [
        {"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin1")}
        for i, t in enumerate(ranks)
    ]
    (d / "tiktoken.json").write_text(json.dumps(vocab))
    # a Llama-3-style tokenizer.json: the same BPE, with a template that puts <|bos|> first
    from tokenizers import Tokenizer, processors

    hf = Tokenizer.from_file(bpe["tokenizer_json"])
    hf.add_special_tokens(["<|bos|>"])
    hf.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", hf.token_to_id("<|bos|>"))]
    )
    (d / "templ").mkdir()
    hf.save(str(d / "templ" / "tokenizer.json"))
    return {
        "sp": train_sentencepiece(str(d / "sp.model"), vocab_size=700),
        "bpe": bpe,
        "tiktoken": str(d / "tiktoken.json"),
        "ranks": ranks,
        "templ": str(d / "templ"),
        "dir": d,
    }


def _megatron_sp_tokenize(sp, specials: dict[str, int], text: str) -> list[int]:
    """Megatron's SentencePieceTokenizer.tokenize: cut at the leftmost special token (the
    earliest-added one on a tie), encode the pieces between with sentencepiece."""
    ids, at = [], 0
    while True:
        found = {t: text.find(t, at) for t in specials if text.find(t, at) >= 0}
        if not found:
            return ids + sp.encode(text[at:])
        token = min(found, key=found.get)
        ids += sp.encode(text[at : found[token]]) + [specials[token]]
        at = found[token] + len(token)


def test_type_names_are_megatrons():
    assert set(TOKENIZER_TYPES) == {
        "SentencePieceTokenizer",
        "GPTSentencePieceTokenizer",
        "Llama2Tokenizer",
        "HuggingFaceTokenizer",
        "GPT2BPETokenizer",
        "TikTokenizer",
        "NullTokenizer",
    }


def test_sentencepiece_types_ids_and_tokens(files):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=files["sp"])
    docs = _documents() + ["a<EOD>b <CLS><SEP> x</s><s> <MASK><PAD>", "<extra_id_0> <EO"]

    # Megatron-LM today: the three types are sentencepiece itself, eod </s>, no BOS
    for kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        tok = build_tokenizer(kind, files["sp"])
        assert (tok.eod, tok.vocab_size, tok.prefix) == (sp.eos_id(), 700, []), kind
        assert [tok.tokenize(d) for d in docs] == sp.encode(docs), kind
        assert tok.tokenize_batch(docs) == sp.encode(docs), kind
    with pytest.raises(ValueError, match="--vocab-extra-ids 2: .*--tokenizer-sentencepiece-legacy"):
        build_tokenizer("SentencePieceTokenizer", files["sp"], vocab_extra_ids=2)

    # --tokenizer-sentencepiece-legacy: the older wrapper's rules
    legacy = dict(tokenizer_sentencepiece_legacy=True)
    tok = build_tokenizer("SentencePieceTokenizer", files["sp"], **legacy)
    # 700 pieces, then <CLS> <SEP> <EOD> <MASK>, <PAD> (the model has no pad); <s> </s> exist
    want = {"<CLS>": 700, "<SEP>": 701, "<EOD>": 702, "<MASK>": 703, "<PAD>": 704}
    want.update({"<s>": sp.bos_id(), "</s>": sp.eos_id()})
    assert tok.special_tokens == want and (tok.eod, tok.vocab_size) == (702, 705)
    for doc in docs:
        assert tok.tokenize(doc) == _megatron_sp_tokenize(sp, want, doc), repr(doc[:60])
    assert tok.tokenize_batch(docs) == [tok.tokenize(d) for d in docs]
    extra = build_tokenizer("SentencePieceTokenizer", files["sp"], vocab_extra_ids=2, **legacy)
    assert extra.vocab_size == 707 and extra.tokenize("<extra_id_1>") == [706]
    as_text = build_tokenizer(
        "SentencePieceTokenizer", files["sp"], special_tokens_as_text=True, **legacy
    )
    assert (as_text.eod, as_text.vocab_size) == (702, 705)
    assert as_text.tokenize_batch(docs) == sp.encode(docs)
    llama = build_tokenizer("Llama2Tokenizer", files["sp"], **legacy)
    assert (llama.eod, llama.vocab_size) == (sp.eos_id(), 700)
    assert [llama.tokenize(d) for d in docs] == [[sp.bos_id()] + ids for ids in sp.encode(docs)]
    with pytest.raises(ValueError, match="--tokenizer-sentencepiece-legacy applies to"):
        build_tokenizer("GPT2BPETokenizer", **legacy)


def test_tiktokenizer_matches_tiktoken(files):
    import tiktoken

    inner = len(files["ranks"])
    specials = ["<unk>", "<s>", "</s>"] + [f"<SPECIAL_{i}>" for i in range(3, NUM_SPECIAL)]
    ranks = {t: i + NUM_SPECIAL for i, t in enumerate(files["ranks"])}
    special = {t: i for i, t in enumerate(specials)}
    ref = tiktoken.Encoding(name="v1", pat_str=V1, mergeable_ranks=ranks, special_tokens=special)
    ref2 = tiktoken.Encoding(name="v2", pat_str=V2, mergeable_ranks=ranks, special_tokens=special)
    kw = dict(vocab_size=inner + NUM_SPECIAL, tiktoken_num_special_tokens=NUM_SPECIAL)
    tok = build_tokenizer("TikTokenizer", files["tiktoken"], tiktoken_pattern="v1", **kw)
    assert (tok.eod, tok.bos, tok.unk, tok.vocab_size) == (2, 1, 0, inner + NUM_SPECIAL)
    docs = _documents()
    assert tok.tokenize_batch(docs) == [ref.encode_ordinary(d) for d in docs]
    assert all(tok.detokenize(tok.tokenize(d)) == d for d in docs)
    v2 = build_tokenizer("TikTokenizer", files["tiktoken"], tiktoken_pattern="v2", **kw)
    assert v2.tokenize_batch(docs) == [ref2.encode_ordinary(d) for d in docs]
    assert v2.tokenize_batch(docs) != tok.tokenize_batch(docs)  # v2 cuts case changes
    custom = build_tokenizer(
        "TikTokenizer",
        files["tiktoken"],
        tiktoken_pattern="v1",
        tiktoken_special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        **kw,
    )
    assert custom.eod == 3
    with pytest.raises(ValueError, match="--tiktoken-pattern v1 or v2"):
        build_tokenizer("TikTokenizer", files["tiktoken"], **kw)
    with pytest.raises(ValueError, match=r"ranks, but --vocab-size minus"):
        build_tokenizer("TikTokenizer", files["tiktoken"], tiktoken_pattern="v1")
    with pytest.raises(ValueError, match="must hold <unk>, <s>, </s>"):
        build_tokenizer(
            "TikTokenizer", files["tiktoken"], tiktoken_pattern="v1",
            tiktoken_special_tokens=["<s>"], **kw,
        )  # fmt: skip


def test_huggingface_template_tokens_frame_each_document(files):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(files["templ"] + "/tokenizer.json")
    tok = build_tokenizer("HuggingFaceTokenizer", files["templ"])
    assert tok.prefix == [ref.token_to_id("<|bos|>")] and tok.suffix == []
    docs = _documents()
    assert tok.tokenize_batch(docs) == [e.ids for e in ref.encode_batch(docs)]


@pytest.mark.parametrize(
    "kind",
    [
        "SentencePieceTokenizer",
        "Llama2Tokenizer",
        "HF-template",
        "TikTokenizer",
        "GPT2BPETokenizer",
    ],
)
def test_preprocess_writes_the_reference_tokens(files, tmp_path, kind):
    """preprocess (2 workers, every fast path allowed) == tokenize(doc) + [eod] per document,
    a document without tokens has no sequence (Llama2 included: no BOS, as in Megatron)."""
    flags = {
        "SentencePieceTokenizer": ["--tokenizer-model", files["sp"]],
        "Llama2Tokenizer": ["--tokenizer-model", files["sp"]],
        "HF-template": ["--tokenizer-model", files["templ"]],
        "GPT2BPETokenizer": ["--vocab-file", files["bpe"]["vocab"]]
        + ["--merge-file", files["bpe"]["merges"]],
        "TikTokenizer": ["--tokenizer-model", files["tiktoken"], "--tiktoken-pattern", "v2"]
        + ["--vocab-size", str(len(files["ranks"]) + NUM_SPECIAL)]
        + ["--tiktoken-num-special-tokens", str(NUM_SPECIAL)],
    }[kind]
    kind_flag = "HuggingFaceTokenizer" if kind == "HF-template" else kind
    flags = ["--tokenizer-type", kind_flag] + flags
    docs = _documents() + ["x <EOD> y", "<s>"]
    src = write_jsonl(str(tmp_path / "in.jsonl"), docs)
    out = str(tmp_path / "o")
    assert (
        main(["--input", src, "--output-prefix", out, "--append-eod", "--workers", "2"] + flags)
        == 0
    )
    args = dict(zip([f[2:].replace("-", "_") for f in flags[0::2]], flags[1::2]))
    args["tiktoken_num_special_tokens"] = int(args.get("tiktoken_num_special_tokens", 1000))
    tok = build_tokenizer(**{k: v for k, v in args.items() if v is not None})
    want = [tok.tokenize(d) + [tok.eod] for d in docs if tok.tokenize(d)]
    assert [s.tolist() for s in IndexedDataset(out + "_text_document")] == want
    # every input line is a document; those without tokens have no sequence
    assert len(IndexedDataset(out + "_text_document").document_indices) == len(docs) + 1
    if kind == "Llama2Tokenizer":
        assert "" in docs and tok.tokenize("") == []  # no BOS: the empty document stays empty
