"""Exact chunking of documents for memoised encoding (the preprocessing fast path).

An ``ExactSplitter`` cuts a document into chunks whose encodings, concatenated, are exactly the
document's encoding; ``ChunkCache`` (encode.py) then encodes each distinct chunk once. The two
splitters here state why they are exact for the tokenizers they accept, and refuse (``None``)
configurations where the argument breaks. Also the numpy helpers that move ragged token lists
around without per-token Python.
"""

from __future__ import annotations

import json
import re
from itertools import chain
from typing import Callable, Optional

import numpy as np


def gather_segments(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``tokens[starts[i] : starts[i] + lengths[i]]`` for all i, with no Python loop.

    Output token t of segment i is ``tokens[starts[i] + t - first[i]]`` where ``first`` is the
    segment's first output position: one ``repeat`` and one fancy index.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    index = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    index += np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return tokens[index]


def ragged(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """list of id lists -> (flat int64 tokens, int64 lengths)."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    return np.fromiter(chain.from_iterable(lists), np.int64, int(lengths.sum())), lengths


def merge_groups(groups: list[tuple], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Put back in input order segments encoded in groups: each group is (input positions,
    flat tokens, lengths); together the positions cover range(n). Returns (tokens, lengths)."""
    if len(groups) == 1 and (np.asarray(groups[0][0]) == np.arange(n)).all():
        return groups[0][1], np.asarray(groups[0][2], dtype=np.int64)  # already in input order
    positions = np.concatenate([np.asarray(g[0], dtype=np.int64) for g in groups])
    tokens = np.concatenate([g[1] for g in groups])
    lengths = np.concatenate([g[2] for g in groups])
    starts = np.cumsum(lengths) - lengths
    where = np.empty(n, dtype=np.int64)  # where[i]: the group slot of input segment i
    where[positions] = np.arange(n)
    return gather_segments(tokens, starts[where], lengths[where]), lengths[where]


class ExactSplitter:
    """Cuts documents into independently encodable chunks.

    ``split(text) -> list[bytes] | None``: UTF-8 chunks of ``text`` (for SentencePiece the words,
    without the whitespace between them) whose encodings, concatenated, are ``tokenize(text)``;
    ``None`` when this document holds a character the argument does not cover (the caller then
    encodes it whole). ``encode(chunks) -> (tokens, lengths)``: each chunk encoded on its own,
    as flat int64 tokens [sum(lengths)] and int64 lengths [len(chunks)], in input order.
    ``refine``: optionally, an ExactSplitter that cuts new chunks into smaller exact pieces
    (cheaper to memoise: they repeat more); its ``split(chunks, memo_get)`` returns the memo ids
    of all pieces (int64, in order) and the piece count of each chunk.
    """

    def __init__(
        self,
        split: Callable[[str], Optional[list[bytes]]],
        encode: Callable[[list[bytes]], tuple[np.ndarray, np.ndarray]],
        refine: Optional[ExactSplitter] = None,
    ):
        self.split = split
        self.encode = encode
        self.refine = refine  # optional finer splitter (bytes -> pieces) for new chunks


# Unicode White_Space, which the byte-level regex's \s means (Python's str.isspace() also counts
# \x1c-\x1f, so the classes are spelled out). ASCII members first.
_ASCII_WS = "\t\n\x0b\x0c\r "
_NON_ASCII_WS = re.compile("[\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
# The byte-level regex with its letter / number / other classes merged into one non-space class:
# the same whitespace decisions, so its matches are unions of consecutive pre-tokens.
_BYTE_LEVEL_CHUNK = re.compile(
    rb" ?[^\t\n\x0b\x0c\r ]+|[\t\n\x0b\x0c\r ]+(?![^\t\n\x0b\x0c\r ])|[\t\n\x0b\x0c\r ]+"
)


# Within an ASCII chunk: the byte-level regex itself (\p{L} = [A-Za-z], \p{N} = [0-9] there).
_BYTE_LEVEL_PIECES = re.compile(
    rb"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"
)
_WS_BYTES = frozenset(_ASCII_WS.encode())


def _byte_level_pieces(chunks: list[bytes], get) -> tuple[np.ndarray, np.ndarray]:
    """Memo ids of the pre-token pieces of byte-level chunks, and the piece count per chunk.

    ASCII chunks that end with a non-space (`` ?\\S+``) are joined with "\\n" and split by one
    regex call: "\\n" then always stands alone as a pre-token, marking where a chunk ends.
    Whitespace chunks are one pre-token each; chunks with non-ASCII letters stay whole.
    """
    words = [i for i, c in enumerate(chunks) if c[-1] not in _WS_BYTES and c.isascii()]
    whole = sorted(set(range(len(chunks))) - set(words)) if len(words) < len(chunks) else []
    items = _BYTE_LEVEL_PIECES.findall(b"\n".join([chunks[i] for i in words]))
    ids = np.fromiter(map(get, items), np.int64, len(items))
    sep = ids == get(b"\n")
    counts = np.bincount(np.cumsum(sep)[~sep], minlength=len(words)).astype(np.int64)
    ids_whole = np.fromiter(map(get, [chunks[i] for i in whole]), np.int64, len(whole))
    ones = np.ones(len(whole), dtype=np.int64)
    return merge_groups([(words, ids[~sep], counts), (whole, ids_whole, ones)], len(chunks))


_GLUE = re.compile(rb" ?[^\t\n\x0b\x0c\r ](?:.*[^\t\n\x0b\x0c\r ])?", re.S)


def _byte_level_encode(tok, chunks: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Encode byte-level chunks (each a run of whole pre-tokens) with few tokenizer calls.

    One Encoding per chunk costs ~15 us of overhead, so chunks are glued with "\n" between
    them: when a chunk ends with a non-space and starts with a non-space (or one space and a
    non-space), the "\n" is a pre-token of its own on both sides, whose one token is dropped
    again; token offsets tell which chunk each remaining token came from. Other chunks
    (whitespace runs) are encoded one by one. Returns (tokens, lengths) in input order.
    """
    glue = [i for i, c in enumerate(chunks) if _GLUE.fullmatch(c)]
    rest = sorted(set(range(len(chunks))) - set(glue)) if len(glue) < len(chunks) else []
    groups = []
    if glue:
        blob = b"\n".join([chunks[i] for i in glue])
        # character index of every byte: count the non-continuation bytes before it
        is_char = (np.frombuffer(blob, dtype=np.uint8) & 0xC0) != 0x80
        char_at = np.concatenate([[0], np.cumsum(is_char)])
        byte_len = np.fromiter(map(len, (chunks[i] for i in glue)), np.int64, len(glue))
        byte_start = np.cumsum(byte_len + 1) - byte_len - 1
        char_start = char_at[byte_start]
        # ~8 KB per encode call: one huge string is twice as slow; cut at a separator
        first_chunk = np.flatnonzero(np.diff(byte_start // 8192, prepend=-1))
        bounds = np.append(char_start[first_chunk], char_at[-1] + 1).tolist()
        text = blob.decode("utf-8")
        pieces = [text[a : b - 1] for a, b in zip(bounds[:-1], bounds[1:])]
        encs = tok.encode_batch(pieces, add_special_tokens=False)
        ids = np.fromiter(chain.from_iterable(e.ids for e in encs), np.int64)
        first = np.fromiter(
            (o[0] + base for e, base in zip(encs, bounds) for o in e.offsets), np.int64
        )
        owner = np.searchsorted(char_start, first, side="right") - 1
        # a token starting at or after its owner's end is a separator "\n"
        keep = first < char_at[byte_start + byte_len][owner]
        owner, ids = owner[keep], ids[keep]
        groups.append((glue, ids, np.bincount(owner, minlength=len(glue)).astype(np.int64)))
    if rest:
        encs = tok.encode_batch([chunks[i].decode("utf-8") for i in rest], add_special_tokens=False)
        groups.append((rest, *ragged([e.ids for e in encs])))
    return merge_groups(groups, len(chunks))


def byte_level_splitter(tokenizer) -> Optional[ExactSplitter]:
    """Chunks = the byte-level regex with its non-space classes merged, for GPT-2-style BPE.

    The pre-tokenizer's regex is ``'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|
    \\s+(?!\\S)|\\s+``; ours is `` ?\\S+|\\s+(?!\\S)|\\s+``. Both take the same decisions
    on whitespace, and every non-space class stops at whitespace, so each of our matches is a
    run of whole pre-tokens that ends at whitespace or at the end of the text. Matching looks
    only forward and BPE runs on each pre-token alone, so a chunk encodes on its own exactly
    as it does in context, and the text is the concatenation of its chunks. Holds when
    there is no normaliser, the pre-tokenizer is exactly ByteLevel(use_regex, no prefix space)
    over a BPE without dropout. Documents with non-ASCII whitespace (the byte regex only knows
    ASCII) or with the text of an added token are encoded whole.
    """
    spec = json.loads(tokenizer.tok.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if (
        spec.get("normalizer") is not None
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or pre.get("add_prefix_space")
        or model.get("type") != "BPE"
        or model.get("dropout") not in (None, 0.0)
    ):
        return None
    # Added tokens are cut out before pre-tokenization, which ends a whitespace run early
    # ("a  <|endoftext|>" pre-tokenizes "  " whole, where "a  <x" gives " " and " <x"):
    # a document holding one is encoded whole.
    added = [a["content"] for a in spec.get("added_tokens", []) if a.get("content")]
    has_added = re.compile("|".join(map(re.escape, added))).search if added else None
    tok = tokenizer.tok

    def split(text: str) -> Optional[list[bytes]]:
        if not text.isascii() and _NON_ASCII_WS.search(text):
            return None
        if has_added is not None and has_added(text):
            return None
        return _BYTE_LEVEL_CHUNK.findall(text.encode("utf-8"))

    def encode(chunks: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        return _byte_level_encode(tok, chunks)

    return ExactSplitter(split, encode, ExactSplitter(_byte_level_pieces, encode))
