"""Byte for byte what Megatron-LM writes: ``tools/preprocess_data.py --append-eod`` on the
documents of ``shared/fixtures/megatron_preprocess`` (70 documents: real text and the text of
special tokens, an empty one, ...; its README says how Megatron-LM made the reference files),
for every tokenizer type the fixture covers and every encoding path (gigatoken behind its
self-check, the chunk memo, the tokenizer's own batched encode). And
``--special-tokens-as-text``: the only documents it changes are those holding the text of a
special token of a byte-level type, which it encodes as the BPE encodes plain characters.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megalite.data.indexed_dataset import IndexedDataset
from megalite.data.preprocess import main, preprocess
from megalite.data.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "megatron_preprocess"
TOK = FIXTURE / "tokenizers"
pytestmark = pytest.mark.skipif(
    not FIXTURE.is_dir(), reason=f"no Megatron-LM reference outputs at {FIXTURE}"
)

# the fixture's NAME -> our flags (its README's table)
TYPES = {
    "sp": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "sp32k.model"],
    "gptsp": ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", "sp32k.model"],
    "llama2": ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "sp32k.model"],
    "hf": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "hf_bpe32k"],
    "gpt2": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "hf_bpe32k/vocab.json"]
    + ["--merge-file", "hf_bpe32k/merges.txt"],
}
# how each path is asked for: preprocess() keyword arguments
PATHS = {
    "gigatoken": {},
    "chunk-memo": {"fast_tokenizer": "exact"},
    "whole-documents": {"fast_tokenizer": "exact", "fast": False},
}


def _flags(name: str) -> list[str]:
    flags = TYPES[name]
    return [str(TOK / f) if f.startswith(("sp32k", "hf_bpe")) else f for f in flags]


def _tokenizer_args(name: str) -> dict:
    flags = _flags(name)
    return {f[2:].replace("-", "_"): v for f, v in zip(flags[0::2], flags[1::2])}


def _documents() -> list[str]:
    with open(FIXTURE / "documents.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _differing_files(ours: str, name: str) -> list[str]:
    """The file extensions whose bytes differ from Megatron's."""
    theirs = FIXTURE / "megatron" / f"{name}_text_document"
    return [
        ext
        for ext in (".bin", ".idx")
        if Path(ours + ext).read_bytes() != Path(str(theirs) + ext).read_bytes()
    ]


@pytest.mark.parametrize("name", list(TYPES))
def test_every_path_writes_megatrons_bytes(tmp_path, name):
    for path, kwargs in PATHS.items():
        log = io.StringIO()
        prefix = str(tmp_path / f"{name}_{path}")
        preprocess(
            [str(FIXTURE / "documents.jsonl")],
            prefix,
            _tokenizer_args(name),
            append_eod=True,
            progress=False,
            log=log,
            **kwargs,
        )
        if path == "gigatoken" and importlib.util.find_spec("gigatoken") is not None:
            assert "fast path: gigatoken, exact" in log.getvalue(), log.getvalue()
        differ = _differing_files(prefix + "_text_document", name)
        assert not differ, f"{name} through {path}: {differ} differ from Megatron-LM's"


def _plain_byte_level():
    """The reference for special-token text as characters: the byte-level BPE of the same
    vocabulary and merges with no added tokens at all (nothing is cut out of the text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bpe = models.BPE.from_file(str(TOK / "hf_bpe32k/vocab.json"), str(TOK / "hf_bpe32k/merges.txt"))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.mark.parametrize("name", list(TYPES))
def test_special_tokens_as_text(tmp_path, name):
    """``--special-tokens-as-text``: the SentencePiece types write Megatron's bytes still (they
    encode such text as characters already); the byte-level types differ from Megatron on
    exactly the documents holding ``<|endoftext|>``, whose tokens are the plain BPE's."""
    out = str(tmp_path / name)
    argv = ["--input", str(FIXTURE / "documents.jsonl"), "--output-prefix", out]
    argv += ["--append-eod", "--workers", "1", "--special-tokens-as-text"] + _flags(name)
    assert main(argv) == 0
    if name in ("sp", "gptsp", "llama2"):
        assert not _differing_files(out + "_text_document", name)
        return
    docs = _documents()
    ours = IndexedDataset(out + "_text_document")
    theirs = IndexedDataset(str(FIXTURE / "megatron" / f"{name}_text_document"))
    assert len(ours.document_indices) == len(theirs.document_indices) == len(docs) + 1
    plain = _plain_byte_level()
    eod = build_tokenizer(**_tokenizer_args(name)).eod
    sequences = iter(range(len(ours)))
    changed = []
    for d, doc in enumerate(docs):
        if not doc:
            continue
        i = next(sequences)
        if ours[i].tolist() != theirs[i].tolist():
            changed.append(d)
            assert ours[i].tolist() == plain.encode(doc).ids + [eod]
            assert eod not in ours[i].tolist()[:-1] and eod in theirs[i].tolist()[:-1]
    holding = [d for d, doc in enumerate(docs) if "<|endoftext|>" in doc]
    assert changed == holding and len(holding) > 0
    # every encoding path gives those bytes (gigatoken's JSON does not carry the setting: the
    # documents holding such text go to the tokenizer itself)
    args = dict(_tokenizer_args(name), special_tokens_as_text=True)
    for path, kwargs in PATHS.items():
        log, prefix = io.StringIO(), str(tmp_path / f"{name}_{path}")
        docs = [str(FIXTURE / "documents.jsonl")]
        preprocess(docs, prefix, args, append_eod=True, progress=False, log=log, **kwargs)
        if path == "gigatoken" and importlib.util.find_spec("gigatoken") is not None:
            assert "fast path: gigatoken, exact" in log.getvalue(), log.getvalue()
        for ext in (".bin", ".idx"):
            want = Path(out + "_text_document" + ext).read_bytes()
            assert Path(prefix + "_text_document" + ext).read_bytes() == want, (path, ext)


def test_tools_script_has_the_flag(tmp_path):
    """tools/preprocess_data.py takes --special-tokens-as-text and documents it."""
    script = ROOT / "tools" / "preprocess_data.py"
    help_text = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(help_text.split())
    assert "--special-tokens-as-text" in flat and "<|endoftext|>" in flat
    assert "--tokenizer-sentencepiece-legacy" in flat
