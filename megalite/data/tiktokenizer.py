"""Megatron's TikTokenizer: a tiktoken BPE over a JSON vocabulary, special tokens first.

The vocabulary file (``--tokenizer-model``, a ``.json``) is a list of
``{"rank": i, "token_bytes": <base64>, "token_str": ...}`` with ``rank == i`` and the 256
single bytes first. As in Megatron-LM: ids ``0 .. N-1`` are the special tokens
(``--tiktoken-special-tokens``, default ``<unk> <s> </s>``, then ``<SPECIAL_k>`` fillers up to
``N = --tiktoken-num-special-tokens``, default 1000), the first ``V - N`` ranks follow from id
``N`` on (``V = --vocab-size``, default 2**17), ``eod`` = the id of ``</s>`` and ``tokenize``
encodes special-token text as ordinary text (tiktoken's ``encode_ordinary``).
"""

from __future__ import annotations

import base64
import json
from typing import Optional

from megalite.data.tokenizers import Tokenizer

# Megatron-LM's two split patterns (v1: the Llama-3-style one; v2 also splits case changes).
PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
REQUIRED_SPECIALS = ["<unk>", "<s>", "</s>"]
DEFAULT_VOCAB_SIZE = 2**17


def read_ranks(path: str, limit: int) -> dict[bytes, int]:
    """The first ``limit`` entries of a Megatron tiktoken JSON vocabulary, as bytes -> rank."""
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer-model {path}: not a JSON vocabulary ({e})") from e
    if not isinstance(vocab, list):
        raise ValueError(f"--tokenizer-model {path}: a JSON {type(vocab).__name__}, not a list")
    if len(vocab) < limit:
        raise ValueError(
            f"--tokenizer-model {path}: {len(vocab)} ranks, but --vocab-size minus "
            f"--tiktoken-num-special-tokens needs {limit}"
        )
    ranks: dict[bytes, int] = {}
    for i, entry in enumerate(vocab[:limit]):
        if not isinstance(entry, dict) or entry.get("rank") != i or "token_bytes" not in entry:
            raise ValueError(f"--tokenizer-model {path}: entry {i} is not {{rank: {i}, ...}}")
        token = base64.b64decode(entry["token_bytes"])
        if i < 256 and token != bytes([i]):
            raise ValueError(f"--tokenizer-model {path}: rank {i} must be the byte {i}")
        ranks[token] = i
    if len(ranks) != limit:
        raise ValueError(f"--tokenizer-model {path}: the same token bytes appear twice")
    return ranks


class TikTokenizer(Tokenizer):
    """See the module docstring; the arguments are Megatron's flags of the same names."""

    def __init__(
        self,
        path: str,
        pattern: Optional[str],
        vocab_size: Optional[int] = None,
        num_special_tokens: int = 1000,
        special_tokens: Optional[list[str]] = None,
    ):
        import tiktoken

        if pattern not in PATTERNS:
            raise ValueError(f"TikTokenizer needs --tiktoken-pattern v1 or v2 (got {pattern!r})")
        if not path.endswith(".json"):
            raise ValueError(f"--tokenizer-model {path}: TikTokenizer reads a .json vocabulary")
        self.vocab_size = int(vocab_size or DEFAULT_VOCAB_SIZE)
        special = list(special_tokens or REQUIRED_SPECIALS)
        if len(set(special)) != len(special):
            raise ValueError(f"--tiktoken-special-tokens {special}: a token appears twice")
        if not set(REQUIRED_SPECIALS) <= set(special):
            raise ValueError(f"--tiktoken-special-tokens {special}: must hold <unk>, <s>, </s>")
        if not len(special) <= num_special_tokens < self.vocab_size:
            raise ValueError(
                f"--tiktoken-num-special-tokens {num_special_tokens}: must be at least the "
                f"{len(special)} special tokens and below --vocab-size {self.vocab_size}"
            )
        special += [f"<SPECIAL_{i}>" for i in range(len(special), num_special_tokens)]
        self.special_tokens = {t: i for i, t in enumerate(special)}
        ranks = read_ranks(path, self.vocab_size - num_special_tokens)
        ranks = {t: r + num_special_tokens for t, r in ranks.items()}
        self.enc = tiktoken.Encoding(
            name="megalite-tiktoken",
            pat_str=PATTERNS[pattern],
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self._eod = self.special_tokens["</s>"]
        self.bos, self.unk = self.special_tokens["<s>"], self.special_tokens["<unk>"]

    def tokenize(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=1)

    def detokenize(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])
