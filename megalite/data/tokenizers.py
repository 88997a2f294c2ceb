"""Megatron's tokenizer types; every one reads local files, nothing is fetched.

Common interface (``Tokenizer``): ``vocab_size``, ``eod`` (the id appended after each document),
``tokenize(text) -> list[int]`` and ``tokenize_batch(texts)`` with the semantics of Megatron-LM
today (``megatron/core/tokenizers``, what its ``tools/preprocess_data.py`` writes), checked byte
for byte against its output in ``tests/test_data_megatron_fixture.py``:

| type | BOS | eod | special-token text in a document |
|---|---|---|---|
| SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer | none | ``</s>`` | text |
| HuggingFaceTokenizer | its template's | ``eos_token`` | its added tokens |
| GPT2BPETokenizer | none | ``<|endoftext|>`` | ``<|endoftext|>`` |
| TikTokenizer | none | ``</s>`` | text |

``special_tokens_as_text=True`` (``--special-tokens-as-text``) encodes the text of special tokens
as plain characters for every type (what changes: the byte-level types, whose special added
tokens, ``<|endoftext|>``, then stay text, and the legacy SentencePieceTokenizer; the others
encode such text as characters already; non-special added tokens and SentencePiece's
user-defined pieces are vocabulary, matched as before). ``legacy=True``
(``--tokenizer-sentencepiece-legacy``) gives the SentencePiece types the rules of Megatron's
older wrapper (``megatron/training/tokenizer/tokenizer.py``), which megalite followed before:
SentencePieceTokenizer adds ``<CLS> <SEP> <EOD> <MASK>``... after the model's pieces (eod
``<EOD>``, their text becomes those tokens), Llama2Tokenizer puts BOS in front of every
document. ``detokenize(ids) -> str``. Preprocessing writes ``prefix + body + suffix + [eod]``
per document: ``prefix`` is a HF template's tokens (or the legacy Llama2 BOS), else empty;
``tokenize_body_batch`` gives the body.

``exact_splitter()`` returns, when the tokenizer's own rules allow it, an ``ExactSplitter``
(chunking.py): a way to cut a document into chunks whose encodings concatenate to the
document's body. Preprocessing memoises chunk encodings through it, which is where its speed
comes from; tokenizers whose configuration breaks the exactness argument get ``None``.
The legacy special-token ids follow Megatron-LM's ``megatron/training/tokenizer/tokenizer.py``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from megalite.data.chunking import ExactSplitter, byte_level_splitter
from megalite.data.chunking_sp import sentencepiece_model_type, sentencepiece_splitter

TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "TikTokenizer",
    "NullTokenizer",
)


class Tokenizer:
    """Base class; see the module docstring for the interface."""

    vocab_size: int
    _eod: Optional[int] = None
    prefix: list[int] = []  # ids put in front of every document (Llama2Tokenizer: [bos])
    suffix: list[int] = []  # ids put after every document's own (before eod)
    special_pattern = None  # a compiled regex of special-token text that tokenize() splits at
    special_tokens_as_text = False  # --special-tokens-as-text: such text stays characters
    legacy = False  # --tokenizer-sentencepiece-legacy: the older Megatron wrapper's rules

    @property
    def eod(self) -> int:
        if self._eod is None:
            raise ValueError(f"{type(self).__name__}: no end-of-document token in this vocabulary")
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def tokenize_body_batch(self, texts: list[str]) -> list[list[int]]:
        """``tokenize_batch`` without ``prefix`` and ``suffix``."""
        return self.tokenize_batch(texts)

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


class GPTSentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file, as Megatron's GPTSentencePieceTokenizer: plain encode,
    ``eod`` = its ``</s>`` (eos) id, ``vocab_size`` = the model's piece count."""

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


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Megatron's Llama2Tokenizer: today the same as GPTSentencePieceTokenizer (no BOS,
    ``eod`` = eos, ``vocab_size`` = the piece count). ``legacy``: as Megatron's older wrapper,
    BOS in front of every document (an empty one then becomes ``[bos, eod]``)."""

    def __init__(self, model_file: str, legacy: bool = False):
        super().__init__(model_file)
        self.legacy = legacy
        if legacy:
            if self.sp.bos_id() < 0:
                raise ValueError(
                    f"Llama2Tokenizer --tokenizer-sentencepiece-legacy: --tokenizer-model "
                    f"{model_file} has no BOS piece"
                )
            self.prefix = [self.sp.bos_id()]

    def tokenize(self, text: str) -> list[int]:
        return self.prefix + self.sp.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.prefix + ids for ids in self.sp.encode(texts)]

    def tokenize_body_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)


class SentencePieceTokenizer(GPTSentencePieceTokenizer):
    """Megatron-LM's SentencePieceTokenizer today (``megatron/core/tokenizers``, not legacy):
    the model's own pieces, plain encode (``<s>`` in a document is three characters, as in
    ``sentencepiece``), ``eod`` = its ``</s>``, ``vocab_size`` = the piece count; the same as
    GPTSentencePieceTokenizer. ``LegacySentencePieceTokenizer`` keeps the older rules."""


class LegacySentencePieceTokenizer(SentencePieceTokenizer):
    """``--tokenizer-sentencepiece-legacy``: SentencePieceTokenizer as Megatron's older wrapper
    (``_SentencePieceTokenizer`` of ``megatron/training/tokenizer/tokenizer.py``) and megalite
    before this rule changed: the model's pieces, then the special tokens
    ``<CLS> <SEP> <EOD> <MASK>``, the pad / bos / eos pieces (``<PAD> <BOS> <EOS>`` when the
    model has none) and ``<extra_id_0..N-1>`` for ``vocab_extra_ids``, each given the next id
    unless the model already has that piece. ``eod`` = ``<EOD>``; ``vocab_size`` counts them all.
    The text of a special token inside a document becomes that token, unless
    ``special_tokens_as_text``. Read data preprocessed this way, and checkpoints trained on it.
    """

    legacy = True

    def __init__(
        self, model_file: str, vocab_extra_ids: int = 0, special_tokens_as_text: bool = False
    ):
        super().__init__(model_file)
        self.special_tokens_as_text = special_tokens_as_text
        sp = self.sp
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        self.special_tokens: dict[str, int] = {}

        def add(piece: str) -> None:
            vocab.setdefault(piece, len(vocab))
            self.special_tokens[piece] = vocab[piece]

        for piece in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
            add(piece)
        for piece_id, fallback in ((sp.pad_id(), "<PAD>"), (sp.bos_id(), "<BOS>")):
            add(sp.id_to_piece(piece_id) if 0 <= piece_id < sp.get_piece_size() else fallback)
        eos = sp.eos_id()
        add(sp.id_to_piece(eos) if 0 <= eos < sp.get_piece_size() else "<EOS>")
        for i in range(vocab_extra_ids):
            add(f"<extra_id_{i}>")
        self.vocab_size = len(vocab)
        self._eod = self.special_tokens["<EOD>"]
        self._inv_special = {i: t for t, i in self.special_tokens.items()}
        # leftmost occurrence first; at one position the earliest-added token (Megatron's rule)
        if not special_tokens_as_text:
            self.special_pattern = re.compile("|".join(map(re.escape, self.special_tokens)))

    def tokenize(self, text: str) -> list[int]:
        if self.special_pattern is None:
            return self.sp.encode(text)
        ids, at = [], 0
        for m in self.special_pattern.finditer(text):
            ids += self.sp.encode(text[at : m.start()])
            ids.append(self.special_tokens[m.group()])
            at = m.end()
        return ids + self.sp.encode(text[at:])

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        if self.special_pattern is None:
            return self.sp.encode(texts)
        search = self.special_pattern.search
        plain = [i for i, t in enumerate(texts) if not search(t)]
        out = [None] * len(texts)
        for i, ids in zip(plain, self.sp.encode([texts[i] for i in plain])):
            out[i] = ids
        for i, ids in enumerate(out):
            if ids is None:
                out[i] = self.tokenize(texts[i])
        return out

    def detokenize(self, ids) -> str:
        """Megatron's: special tokens written out with a space on each side."""
        text, run = "", []
        for i in map(int, ids):
            if i in self._inv_special:
                text += self.sp.decode(run) + " " + self._inv_special[i] + " "
                run = []
            else:
                run.append(i)
        return text + self.sp.decode(run)

    def exact_splitter(self) -> Optional[ExactSplitter]:
        """The SentencePiece word splitter; documents holding a special token's text are
        encoded whole (by ``tokenize``)."""
        inner = sentencepiece_splitter(self)
        if inner is None or self.special_pattern is None:
            return inner
        search, split = self.special_pattern.search, inner.split

        def guarded(text: str):
            return None if search(text) else split(text)

        return ExactSplitter(guarded, inner.encode, inner.refine)


class HuggingFaceTokenizer(Tokenizer):
    """A local ``tokenizer.json`` (or a folder holding one), read with the ``tokenizers`` library.

    ``eod``: the ``eos_token`` of a ``tokenizer_config.json`` next to it, else the first of
    ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>`` in the vocabulary. As Megatron
    calls the tokenizer with its template, a post-processor's tokens (a Llama-3 tokenizer.json's
    BOS) frame every document: ``prefix`` / ``suffix``, found by encoding a probe text. As
    Megatron's (``transformers``), the text of an added token in a document becomes that token;
    ``special_tokens_as_text``: the text of a *special* added token is encoded as characters
    (the library's ``encode_special_tokens``; non-special added tokens are vocabulary words).
    """

    def __init__(self, path: str, _tokenizer=None, special_tokens_as_text: bool = False):
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
        self.special_tokens_as_text = special_tokens_as_text
        self.tok.encode_special_tokens = special_tokens_as_text
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._eod = self._find_eod(path)
        self.prefix, self.suffix = self._template()

    def _template(self) -> tuple[list[int], list[int]]:
        body = self.tok.encode("a b", add_special_tokens=False).ids
        full = self.tok.encode("a b", add_special_tokens=True).ids
        for at in range(len(full) - len(body) + 1):
            if full[at : at + len(body)] == body:
                return full[:at], full[at + len(body) :]
        raise ValueError(f"{self.path}: its post-processor changes the text's own tokens")

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
        return self.prefix + self.tok.encode(text, add_special_tokens=False).ids + self.suffix

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.prefix + ids + self.suffix for ids in self.tokenize_body_batch(texts)]

    def tokenize_body_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def exact_splitter(self) -> Optional[ExactSplitter]:
        """Pre-token chunks for GPT-2-style byte-level BPE (see chunking.byte_level_splitter)."""
        return byte_level_splitter(self)


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; ``eod`` = ``<|endoftext|>``.

    Built as a ``tokenizers`` byte-level BPE with ``<|endoftext|>`` as its special token (the
    vocabulary's id, else the next one). As Megatron-LM today (``transformers``' GPT-2 tokenizer
    from the two files), the text ``<|endoftext|>`` inside a document becomes the eod token,
    unless ``special_tokens_as_text``.
    """

    def __init__(self, vocab_file: str, merge_file: str, special_tokens_as_text: bool = False):
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

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
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
        super().__init__(None, _tokenizer=tok, special_tokens_as_text=special_tokens_as_text)
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
    tiktoken_pattern: Optional[str] = None,
    tiktoken_num_special_tokens: int = 1000,
    tiktoken_special_tokens: Optional[list[str]] = None,
    vocab_extra_ids: int = 0,
    tokenizer_sentencepiece_legacy: bool = False,
    special_tokens_as_text: bool = False,
) -> Tokenizer:
    """Build a tokenizer from Megatron's flags (``--tokenizer-type``, ``--tokenizer-model``,
    ``--vocab-file``, ``--merge-file``, ``--vocab-size``, ``--tiktoken-pattern``,
    ``--tiktoken-num-special-tokens``, ``--tiktoken-special-tokens``, ``--vocab-extra-ids``,
    ``--tokenizer-sentencepiece-legacy``) and ``--special-tokens-as-text``.
    A missing file raises ``FileNotFoundError`` naming the flag and the path; an unknown type
    or a bad setting, ``ValueError``."""
    as_text = bool(special_tokens_as_text)
    if vocab_extra_ids and tokenizer_type == "SentencePieceTokenizer":
        if not tokenizer_sentencepiece_legacy:
            raise ValueError(
                f"--vocab-extra-ids {vocab_extra_ids}: SentencePieceTokenizer adds "
                "<extra_id_N> tokens only with --tokenizer-sentencepiece-legacy (Megatron-LM's "
                "SentencePieceTokenizer today adds none)"
            )
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        _need_file(tokenizer_model, "--tokenizer-model", tokenizer_type)
        if tokenizer_type == "SentencePieceTokenizer":
            if tokenizer_sentencepiece_legacy:
                return LegacySentencePieceTokenizer(tokenizer_model, vocab_extra_ids, as_text)
            return SentencePieceTokenizer(tokenizer_model)
        if tokenizer_type == "Llama2Tokenizer":
            return Llama2Tokenizer(tokenizer_model, legacy=bool(tokenizer_sentencepiece_legacy))
        return GPTSentencePieceTokenizer(tokenizer_model)
    if tokenizer_sentencepiece_legacy:
        raise ValueError(
            f"--tokenizer-sentencepiece-legacy applies to SentencePieceTokenizer and "
            f"Llama2Tokenizer, not --tokenizer-type {tokenizer_type}"
        )
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(
            _need_file(tokenizer_model, "--tokenizer-model", tokenizer_type),
            special_tokens_as_text=as_text,
        )
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file, special_tokens_as_text=as_text)
    if tokenizer_type == "TikTokenizer":
        from megalite.data.tiktokenizer import TikTokenizer

        return TikTokenizer(
            _need_file(tokenizer_model, "--tokenizer-model", tokenizer_type),
            tiktoken_pattern,
            vocab_size,
            tiktoken_num_special_tokens,
            tiktoken_special_tokens,
        )
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ValueError(
        f"unknown --tokenizer-type {tokenizer_type!r}; known: {', '.join(TOKENIZER_TYPES)}"
    )
