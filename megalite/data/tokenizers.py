"""Tokenizers for preprocessing and training; every one reads local files, nothing is fetched.

Common interface (``Tokenizer``): ``vocab_size``, ``eod`` (the id appended after each document),
``tokenize(text) -> list[int]``, ``tokenize_batch(texts) -> list[list[int]]``,
``detokenize(ids) -> str``. ``tokenize`` never adds BOS/EOS or other template tokens: documents
are separated by ``eod`` at preprocessing time.

``exact_splitter()`` returns, when the tokenizer's own rules allow it, an ``ExactSplitter``
(chunking.py): a way to cut a document into chunks whose encodings concatenate to the document's.
Preprocessing memoises chunk encodings through it, which is where its speed comes from;
tokenizers whose configuration breaks the exactness argument get ``None`` and are encoded whole.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megalite.data.chunking import ExactSplitter, byte_level_splitter
from megalite.data.chunking_sp import sentencepiece_model_type, sentencepiece_splitter

TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
)


class Tokenizer:
    """Base class; see the module docstring for the interface."""

    vocab_size: int
    _eod: Optional[int] = None

    @property
    def eod(self) -> int:
        if self._eod is None:
            raise ValueError(f"{type(self).__name__}: no end-of-document token in this vocabulary")
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids) -> str:
        raise NotImplementedError

    def exact_splitter(self) -> Optional[ExactSplitter]:
        return None


def _need_file(path: Optional[str], flag: str, owner: str) -> str:
    if path is None:
        raise ValueError(f"{owner} needs {flag}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    return path


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file; ``eod`` is its ``</s>`` (eos) id."""

    def __init__(self, model_file: str):
        import sentencepiece

        _need_file(model_file, "--tokenizer-model", type(self).__name__)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as e:
            raise ValueError(
                f"--tokenizer-model {model_file}: not a SentencePiece model ({e})"
            ) from e
        self.model_file = model_file
        self.vocab_size = self.sp.get_piece_size()
        self._eod = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.model_type = sentencepiece_model_type(self.sp.serialized_model_proto())

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def detokenize(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def exact_splitter(self) -> Optional[ExactSplitter]:
        """Words for BPE / word / char models (see chunking_sp.sentencepiece_splitter)."""
        return sentencepiece_splitter(self)


class HuggingFaceTokenizer(Tokenizer):
    """A local ``tokenizer.json`` (or a folder holding one), read with the ``tokenizers`` library.

    ``eod``: the ``eos_token`` of a ``tokenizer_config.json`` next to it, else the first of
    ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>`` in the vocabulary.
    """

    def __init__(self, path: str, _tokenizer=None):
        from tokenizers import Tokenizer as HFTokenizer

        if _tokenizer is None:
            _need_file(path, "--tokenizer-model", type(self).__name__)
            file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
            if not os.path.exists(file):
                raise FileNotFoundError(f"--tokenizer-model {path}: no tokenizer.json in it")
            try:
                _tokenizer = HFTokenizer.from_file(file)
            except Exception as e:  # the Rust side raises a bare Exception
                raise ValueError(f"--tokenizer-model {file}: not a tokenizer.json ({e})") from e
        self.path = path
        self.tok = _tokenizer
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._eod = self._find_eod(path)

    def _find_eod(self, path: Optional[str]) -> Optional[int]:
        folder = path if path and os.path.isdir(path) else os.path.dirname(path or "")
        config = os.path.join(folder, "tokenizer_config.json")
        names = ["<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"]
        if path and os.path.exists(config):
            with open(config) as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if eos:
                names.insert(0, eos)
        for name in names:
            i = self.tok.token_to_id(name)
            if i is not None:
                return i
        return None

    def tokenize(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def exact_splitter(self) -> Optional[ExactSplitter]:
        """Pre-token chunks for GPT-2-style byte-level BPE (see chunking.byte_level_splitter)."""
        return byte_level_splitter(self)


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; ``eod`` = ``<|endoftext|>``.

    Built as a ``tokenizers`` byte-level BPE. As in Megatron's GPT-2 tokenizer, the text
    ``<|endoftext|>`` inside a document is encoded as plain characters, not as the eod token.
    """

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        _need_file(vocab_file, "--vocab-file", type(self).__name__)
        _need_file(merge_file, "--merge-file", type(self).__name__)
        try:
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as e:
            raise ValueError(
                f"--vocab-file {vocab_file} / --merge-file {merge_file}: not a GPT-2 BPE ({e})"
            ) from e
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        super().__init__(None, _tokenizer=tok)
        self.vocab_file, self.merge_file = vocab_file, merge_file
        self._eod = tok.token_to_id("<|endoftext|>")


class NullTokenizer(Tokenizer):
    """Text is space-separated token ids. As in Megatron, ids run 0..V-1, ``eod`` = V and
    ``vocab_size`` = V + 1 for ``--vocab-size V``."""

    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) <= 0:
            raise ValueError("NullTokenizer needs --vocab-size (a positive integer)")
        self._eod = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1

    def tokenize(self, text: str) -> list[int]:
        ids = [int(x) for x in text.split()]
        bad = [i for i in ids if not 0 <= i < self._eod]
        if bad:
            raise ValueError(f"NullTokenizer: token id {bad[0]} outside [0, {self._eod})")
        return ids

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    vocab_size: Optional[int] = None,
) -> Tokenizer:
    """Build a tokenizer from Megatron's flags (``--tokenizer-type``, ``--tokenizer-model``,
    ``--vocab-file``, ``--merge-file``, ``--vocab-size``). A missing file raises
    ``FileNotFoundError`` naming the flag and the path; an unknown type, ``ValueError``."""
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        return SentencePieceTokenizer(
            _need_file(tokenizer_model, "--tokenizer-model", tokenizer_type)
        )
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(
            _need_file(tokenizer_model, "--tokenizer-model", tokenizer_type)
        )
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ValueError(
        f"unknown --tokenizer-type {tokenizer_type!r}; known: {', '.join(TOKENIZER_TYPES)}"
    )
