"""Turn blocks of JSONL lines into flat token arrays, fast: the worker side of preprocessing.

Speed comes from two things. (1) Chunk memoisation: with an ``ExactSplitter`` (see
``tokenizers.py``) each document is cut into chunks whose encodings concatenate to the
document's, and each distinct chunk is encoded once; real text repeats its words endlessly, so the
tokenizer runs on a few percent of the bytes. (2) No per-token Python: chunk encodings live in one
flat numpy pool and a block's tokens are gathered from it with one vectorised index.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import count, islice
from typing import Optional

import numpy as np

from megalite.data.chunking import gather_segments, merge_groups, ragged
from megalite.data.fastpath import exact_only_pattern
from megalite.data.indexed_dataset import _Growable
from megalite.data.tokenizers import Tokenizer

_EOD_KEY = -1  # the memo key of the eod "chunk"; every real key is bytes, so it cannot clash


class ChunkCache:
    """Memoised encoder over an ``ExactSplitter``; memory bounded by ``max_chunks`` entries.

    Holds ``pool`` (int32 tokens of every known chunk back to back) with per-chunk ``offsets``
    and ``lengths`` indexed by the chunk's id. Past ``max_chunks`` distinct chunks it starts over
    empty, so memory stays flat however large and varied the corpus is. When the splitter has a
    ``refine`` splitter, chunks seen for the first time are encoded through a second cache over
    their finer pieces (for byte-level BPE: "foo.bar(x)" -> "foo", ".", "bar", "(", "x", ")"),
    so the tokenizer itself only sees pieces never seen before.
    """

    def __init__(self, tokenizer: Tokenizer, max_chunks: int = 1 << 20, splitter=None):
        splitter = splitter or tokenizer.exact_splitter()
        if splitter is None:
            raise ValueError(f"{type(tokenizer).__name__}: no exact splitter for this tokenizer")
        self.splitter = splitter
        self.tokenizer = tokenizer
        self.max_chunks = max_chunks
        self.inner = None
        if splitter.refine is not None:
            self.inner = ChunkCache(tokenizer, max_chunks, splitter.refine)
        self._reset()

    def _reset(self) -> None:
        # chunk -> dense id in order of first sight; an unseen chunk is numbered by the C-level
        # defaultdict machinery (no Python call per new chunk); ids >= known await encoding
        self.memo: defaultdict = defaultdict(count().__next__)
        self.known = 0
        self.special = False  # eod or whole-document keys may be among the new ones
        self.pool = _Growable(np.int32, 1 << 16)
        self.offsets = _Growable(np.int64)
        self.lengths = _Growable(np.int32)

    def _add_new(self) -> None:
        """Encode the keys first seen in this block and pool their tokens, in id order.

        Keys: bytes chunks (through the refining cache, or the splitter's batched encode),
        ``(text,)`` documents the splitter does not cover (the tokenizer's own encode), and the
        eod key.
        """
        new = list(islice(reversed(self.memo), len(self.memo) - self.known))
        self.known = len(self.memo)
        if not new:
            return
        new.reverse()
        if self.special:
            chunks = [i for i, k in enumerate(new) if type(k) is bytes]
            keys = [new[i] for i in chunks]
            self.special = False
        else:  # all bytes
            chunks, keys = np.arange(len(new)), new
        groups = []
        if len(chunks):
            if self.inner is not None:
                groups.append((chunks, *self.inner.encode_pieces(keys)))
            else:
                groups.append((chunks, *self.splitter.encode(keys)))
        if len(chunks) < len(new):
            whole = [i for i, k in enumerate(new) if type(k) is tuple]
            encoded = self.tokenizer.tokenize_body_batch([new[i][0] for i in whole])
            eod = [i for i, k in enumerate(new) if type(k) is int]
            encoded += [[self.tokenizer.eod]] * len(eod)
            groups.append((whole + eod, *ragged(encoded)))
        tokens, lengths = merge_groups(groups, len(new))
        self.offsets.extend(len(self.pool) + np.cumsum(lengths) - lengths)
        self.lengths.extend(lengths)
        self.pool.extend(tokens)

    def _gather(self, ids, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of the chunk ids ``ids`` and their per-document totals (``counts`` ids each)."""
        self._add_new()
        if isinstance(ids, list):
            ids = np.fromiter(ids, np.int64, len(ids))
        lens = self.lengths.view()[ids].astype(np.int64)
        tokens = gather_segments(self.pool.view(), self.offsets.view()[ids], lens)
        ends = np.concatenate([[0], np.cumsum(lens)])
        doc_ends = ends[np.cumsum(counts)]
        return tokens, np.diff(np.concatenate([[0], doc_ends]))

    def encode_pieces(self, blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, lengths) of each blob, cut by this cache's splitter (a ``refine`` one, whose
        ``split(blobs, memo_get)`` returns the piece ids of all blobs and their counts)."""
        if len(self.memo) > self.max_chunks:
            self._reset()
        ids, counts = self.splitter.split(blobs, self.memo.__getitem__)
        return self._gather(ids, counts)

    def encode(self, texts: list[str], append_eod: bool) -> tuple[np.ndarray, np.ndarray]:
        """Encode documents; returns (tokens [sum(lengths)] int32, lengths [len(texts)] int64).

        A document's length counts its eod. A document with no tokens of its own gets length 0
        and no eod (the caller drops it, as Megatron does).
        """
        if len(self.memo) > self.max_chunks:
            self._reset()
        get, split = self.memo.__getitem__, self.splitter.split
        flat: list[int] = []
        counts = np.zeros(len(texts), dtype=np.int64)
        if append_eod and _EOD_KEY not in self.memo:
            self.special = True
        for d, text in enumerate(texts):
            chunks = split(text)
            if chunks is None:  # a character the splitter's argument does not cover
                chunks = [(text,)]
                self.special = True
            if chunks:
                n = len(flat)
                flat += map(get, chunks)
                if append_eod:
                    flat.append(get(_EOD_KEY))
                counts[d] = len(flat) - n
        tokens, lengths = self._gather(flat, counts)
        if append_eod:
            only_eod = np.flatnonzero(lengths == 1)
            if len(only_eod):  # chunks that encode to nothing: drop the lone eod after them
                tokens = np.delete(tokens, np.cumsum(lengths)[only_eod] - 1)
                lengths[only_eod] = 0
        return tokens, lengths


def plain_encode(
    tokenizer: Tokenizer, texts: list[str], append_eod: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The same contract as ``ChunkCache.encode`` with the tokenizer's own batched encode."""
    encoded = tokenizer.tokenize_batch(texts)
    if append_eod:
        eod = tokenizer.eod
        for ids in encoded:
            if ids:
                ids.append(eod)
    return ragged(encoded)


def frame(
    tokens: np.ndarray, lengths: np.ndarray, prefix: list[int], suffix: list[int], eod
) -> tuple[np.ndarray, np.ndarray]:
    """Documents' bodies -> ``prefix + body + suffix (+ [eod])`` each, with no Python loop.

    A document with no tokens at all (empty body, no prefix or suffix) stays empty, with no
    eod, as Megatron leaves such documents out; ``eod=None`` appends nothing.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    p, s = len(prefix), len(suffix)
    if p + s == 0:  # the common case, eod only: one C-level insert (5x the general path)
        if eod is None:
            return tokens, lengths
        keep = lengths > 0
        return np.insert(tokens, np.cumsum(lengths)[keep], eod), lengths + keep
    keep = lengths + p + s > 0
    out_len = np.where(keep, lengths + p + s + (eod is not None), 0)
    out = np.empty(int(out_len.sum()), dtype=np.int64)
    first = (np.cumsum(out_len) - out_len)[keep]  # where each kept document starts in out
    for j, t in enumerate(prefix):
        out[first + j] = t
    body_start = np.cumsum(lengths) - lengths
    shift = np.repeat(np.cumsum(out_len) - out_len + p - body_start, lengths)
    out[np.arange(len(tokens), dtype=np.int64) + shift] = tokens
    ends = first + p + lengths[keep]
    for j, t in enumerate(suffix):
        out[ends + j] = t
    if eod is not None:
        out[ends + s] = eod
    return out, out_len


class FastPathMismatch(ValueError):
    """The fast path gave other tokens than the reference tokenizer during the run."""


@dataclass
class BlockResult:
    """What a worker returns for one block of lines, per JSON key."""

    tokens: dict[str, np.ndarray] = field(default_factory=dict)
    # one length per document (0: no tokens), or with sentence splitting one per sentence
    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    # with sentence splitting: the number of sentences of each document (0: none with tokens)
    per_doc: dict[str, np.ndarray] = field(default_factory=dict)
    docs: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    nbytes: int = 0

    def sequences(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(the lengths of all sequences, how many sequences each document has): a document
        without tokens has none, as Megatron's ``add_document(ids=[], lengths=[])`` writes it."""
        lengths = self.lengths[key]
        if key in self.per_doc:
            return lengths, self.per_doc[key]
        return lengths[lengths > 0], (lengths > 0).astype(np.int64)


def _loads_or_none():
    try:  # orjson parses 2-3x faster; any line it refuses goes through json (same semantics)
        import orjson

        return orjson.loads
    except ImportError:
        return None


_FAST_LOADS = _loads_or_none()


def _parse_fast(json_keys: list[str], lines: list[bytes]) -> Optional[dict]:
    """``{key: texts}`` when every line is a JSON object with a string under every key, else
    None (the caller then goes line by line for the exact error)."""
    if _FAST_LOADS is None:
        return None
    try:
        objs = [_FAST_LOADS(line) for line in lines]
        texts = {k: [o[k] for o in objs] for k in json_keys}
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    if any(type(o) is not dict for o in objs):
        return None
    for values in texts.values():
        if not all(type(v) is str for v in values):
            return None
    return texts


def parse_jsonl(json_keys: list[str], first_line: int, blob: bytes) -> tuple[BlockResult, dict]:
    """Whole JSONL lines -> (a BlockResult with docs / bad / nbytes, ``{key: texts}``)."""
    out = BlockResult(nbytes=len(blob))
    lines = blob.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    if all(line and not line.isspace() for line in lines):
        texts = _parse_fast(json_keys, lines)
        if texts is not None:
            out.docs = len(lines)
            return out, texts
    texts = {k: [] for k in json_keys}
    for i, line in enumerate(lines):
        if not line or line.isspace():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            out.bad.append((first_line + i, f"malformed JSON ({e})"))
            continue
        if not isinstance(obj, dict):
            out.bad.append((first_line + i, f"a JSON {type(obj).__name__}, not an object"))
            continue
        values = [obj.get(k) for k in json_keys]
        bad = [k for k, v in zip(json_keys, values) if not isinstance(v, str)]
        if bad:
            problem = bad[0]
            what = "missing" if problem not in obj else f"of type {type(obj[problem]).__name__}"
            out.bad.append((first_line + i, f"key {problem!r} is {what}, not a string"))
            continue
        for k, v in zip(json_keys, values):
            texts[k].append(v)
        out.docs += 1
    return out, texts


class BlockEncoder:
    """Parses blocks (JSONL lines or parquet rows) and encodes the values of ``json_keys``
    (one worker's state).

    Encoding paths, all giving the same tokens: ``fast_encoder`` (a ``fastpath`` encoder that
    passed its self-check) for the documents' bodies; else the chunk cache when the tokenizer has
    an exact splitter; else the tokenizer's own batched encode. Bodies are then framed with the
    tokenizer's ``prefix`` / ``suffix`` and the eod.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        json_keys: list[str],
        append_eod: bool,
        dtype,
        fast: bool = True,
        max_chunks: int = 1 << 20,
        fast_encoder=None,
        sentence_splitter=None,
    ):
        self.tokenizer = tokenizer
        self.sentence_splitter = sentence_splitter  # sentences.build_splitter's, or None
        self.json_keys = json_keys
        self.append_eod = append_eod
        self.dtype = np.dtype(dtype)
        self.fast_encoder = fast_encoder
        self.exact_only = exact_only_pattern(tokenizer) if fast_encoder is not None else None
        self.framed = bool(tokenizer.prefix or tokenizer.suffix)
        self.cache: Optional[ChunkCache] = None
        if fast and fast_encoder is None and tokenizer.exact_splitter() is not None:
            self.cache = ChunkCache(tokenizer, max_chunks)

    def _bodies(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each document's tokens without prefix, suffix or eod, through the fast encoder;
        documents holding special-token text go through the tokenizer itself."""
        pattern = self.exact_only
        special = []
        if pattern is not None and pattern.search("\n".join(texts)):  # one scan per block
            special = [i for i, t in enumerate(texts) if pattern.search(t)]
        if not special:
            tokens, lengths = self.fast_encoder(texts)
            self._spot_check(texts, tokens, lengths)
            return tokens, lengths
        plain = sorted(set(range(len(texts))) - set(special))
        encoded = ragged(self.tokenizer.tokenize_body_batch([texts[i] for i in special]))
        fast = self.fast_encoder([texts[i] for i in plain])
        self._spot_check([texts[i] for i in plain], *fast)
        return merge_groups([(plain, *fast), (special, *encoded)], len(texts))

    def _spot_check(self, texts: list[str], tokens: np.ndarray, lengths: np.ndarray) -> None:
        """The fast path's start-up check covers a sample; this one re-encodes one document
        of every block (the first of at most 4K characters, else the shortest: a fraction of a
        percent of the text) with the reference tokenizer, and stops the run if they differ:
        the output would not be the reference's."""
        if not texts:
            return
        sizes = np.fromiter(map(len, texts), np.int64, len(texts))
        small = np.flatnonzero(sizes <= 4096)
        d = int(small[0]) if len(small) else int(sizes.argmin())
        want = self.tokenizer.tokenize_body_batch([texts[d]])[0]
        start = int(lengths[:d].sum())
        if tokens[start : start + lengths[d]].tolist() != want:
            raise FastPathMismatch(
                f"the fast path (gigatoken) and {type(self.tokenizer).__name__} disagree on "
                f"{texts[d][:60]!r}...: rerun with --fast-tokenizer exact"
            )

    def encode_texts(
        self, texts: list[str], append_eod: Optional[bool] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each text as one sequence: (tokens, lengths [len(texts)], 0 for no tokens)."""
        append_eod = self.append_eod if append_eod is None else append_eod
        tok, eod = self.tokenizer, (self.tokenizer.eod if append_eod else None)
        if self.fast_encoder is not None:
            tokens, lengths = frame(*self._bodies(texts), tok.prefix, tok.suffix, eod)
        elif self.cache is not None and self.framed:
            tokens, lengths = frame(*self.cache.encode(texts, False), tok.prefix, tok.suffix, eod)
        elif self.cache is not None:
            tokens, lengths = self.cache.encode(texts, append_eod)
        else:
            tokens, lengths = plain_encode(tok, texts, append_eod)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= tok.vocab_size):
            raise ValueError(f"token id outside the vocabulary of {tok.vocab_size}")
        return tokens.astype(self.dtype, copy=False), lengths

    def _encode_key(self, out: BlockResult, key: str, texts: list[str]) -> None:
        """Encode one key's documents into ``out``; with sentence splitting, as Megatron: each
        sentence encoded on its own, sentences without tokens dropped, the eod appended to a
        document's last sentence."""
        if self.sentence_splitter is None:
            out.tokens[key], out.lengths[key] = self.encode_texts(texts)
            return
        parts = [self.sentence_splitter(t) for t in texts]
        counts = np.fromiter(map(len, parts), np.int64, len(parts))
        tokens, lengths = self.encode_texts([s for p in parts for s in p], append_eod=False)
        owner = np.repeat(np.arange(len(texts)), counts)[lengths > 0]
        lengths = lengths[lengths > 0]
        per_doc = np.bincount(owner, minlength=len(texts)).astype(np.int64)
        if self.append_eod and len(lengths):
            last = np.cumsum(per_doc)[per_doc > 0] - 1  # each document's last sentence
            tokens = np.insert(tokens, np.cumsum(lengths)[last], self.tokenizer.eod)
            lengths[last] += 1
        out.tokens[key], out.lengths[key], out.per_doc[key] = tokens, lengths, per_doc

    def encode_block(self, first_line: int, blob) -> BlockResult:
        """``blob``: whole JSONL lines (bytes), the first numbered ``first_line`` (1-based), or
        a parquet batch ``{key: values}`` whose first row is ``first_line``."""
        if isinstance(blob, dict):
            return self._encode_rows(first_line, blob)
        out, texts = parse_jsonl(self.json_keys, first_line, blob)
        for k in self.json_keys:
            self._encode_key(out, k, texts[k])
        return out

    def _encode_rows(self, first_row: int, columns: dict) -> BlockResult:
        """Parquet rows; a null in a key column is a bad row (like a missing JSON key)."""
        out = BlockResult()
        rows = len(columns[self.json_keys[0]])
        good = np.ones(rows, dtype=bool)
        for k in self.json_keys:
            for r in (i for i, v in enumerate(columns[k]) if v is None):
                if good[r]:
                    out.bad.append((first_row + r, f"column {k!r} is null, not a string"))
                good[r] = False
        out.bad.sort()
        for k in self.json_keys:
            texts = [v for v, g in zip(columns[k], good) if g] if len(out.bad) else columns[k]
            out.nbytes += sum(len(t.encode("utf-8")) for t in texts)
            self._encode_key(out, k, texts)
        out.docs = int(good.sum())
        return out
