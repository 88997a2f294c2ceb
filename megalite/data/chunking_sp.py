"""Exact chunking for SentencePiece models: words, then runs of ASCII letters / symbols.

Two levels feed ``ChunkCache`` (encode.py). ``sentencepiece_splitter`` cuts documents into
words at ASCII whitespace; for BPE models whose vocabulary never joins an ASCII letter to an
ASCII symbol, ``_piece_splitter`` cuts each word seen for the first time into runs of letters
and runs of other printable ASCII (``self.assertEqual(x,`` -> ``self . assertEqual ( x ,``), so
SentencePiece only ever encodes pieces it has not seen before: most new words are new
combinations of known identifiers and punctuation.
"""

from __future__ import annotations

import re
from operator import itemgetter
from typing import Optional

import numpy as np

from megalite.data.chunking import ExactSplitter, merge_groups, ragged

_PRINTABLE = "".join(map(chr, range(0x21, 0x7F)))  # ASCII without space and controls
_IS_LETTER = np.zeros(256, dtype=bool)
_IS_LETTER[list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")] = True
_KEEP_WHOLE = np.ones(256, dtype=bool)  # a byte that is not printable ASCII keeps its word whole
_KEEP_WHOLE[0x21:0x7F] = False
_IS_PRINTABLE = ~_KEEP_WHOLE
_IS_SYMBOL = _IS_PRINTABLE & ~_IS_LETTER
_IS_SPACE = np.zeros(256, dtype=bool)  # what bytes.split() splits at
_IS_SPACE[list(b"\t\n\x0b\x0c\r ")] = True
_ANY = np.ones(256, dtype=bool)  # every byte a rule can hold (not 0: free trie units are 0)
_ANY[0] = False
_SYMBOL = r"!-@\[-`{-~"  # printable ASCII that is not a letter, as a regex class body
# first byte of a run key -> 0: first run ("\n"), 1: later run of letters, 2: of symbols
_KIND = [0] * 256
for _b in range(0x21, 0x7F):
    _KIND[_b] = 1 if _IS_LETTER[_b] else 2
# _LOW_BYTES[n]: a uint64 mask of bytes 1..n (byte 0, the lowest, is left for a kind)
_LOW_BYTES = np.array([((1 << (8 * (n + 1))) - 1) & ~0xFF for n in range(8)], dtype=np.uint64)
_GROUP = 8  # words per SentencePiece input string when encoding new words
_CROSSES = re.compile(f"[A-Za-z][{_SYMBOL}]|[{_SYMBOL}][A-Za-z]")


def sentencepiece_splitter(tokenizer) -> Optional[ExactSplitter]:
    """Split at ASCII whitespace, when the model makes every such split an exact cut.

    After normalisation SentencePiece sees ``▁word▁word...``. When (1) the normaliser turns
    each separator into one ``▁``, collapses runs and strips the ends (remove_extra_whitespaces)
    and puts a ``▁`` in front (add_dummy_prefix), each word normalises on its own to exactly
    its ``▁word`` segment. When (2) no piece holds ``▁`` but at its start and ``▁`` itself is
    a piece, no merge can join two words, and a BPE model applies to each word the same
    merges in the same order (highest score first, then leftmost) as in context: the text's
    encoding is the concatenation of its words' encodings. (3) No normalisation rule may
    reach over whitespace (``a b -> y`` would join two words; the charsmap is probed). Separators
    the normaliser does not map to a space (``\\x0b`` for nmt_nfkc deletes it), and a literal
    ``▁`` it does not collapse like one, are never cut at: a document holding one is encoded
    whole. New words are then encoded in groups (``_grouped_word_encoder``) and, for BPE
    vocabularies that allow it, cut into runs (``_piece_splitter``).

    Unigram models are left out on purpose: Viterbi adds float32 path scores, and segmentations
    that tie in exact arithmetic (``====`` runs cut as 16+15 or 15+16 pieces) are decided by
    rounding that depends on the score of everything before the word (on a 20 MB sample of our
    corpus: 34 of 4.8M tokens differed); such models take the tokenizer's own encode.
    """
    sp = tokenizer.sp
    if tokenizer.model_type not in ("bpe", "word", "char"):
        return None
    if sp.normalize("  a  b ") != "\u2581a\u2581b":
        return None  # keeps extra whitespace, lacks the dummy prefix, or uses suffix ▁
    space = sp.piece_to_id("\u2581")
    if space == sp.unk_id() or sp.is_control(space):
        return None  # a lone ▁ would become <unk>, and adjacent unknowns get merged
    charsmap, symbols = sentencepiece_normalizer_and_symbols(sp.serialized_model_proto())
    user_defined = set(symbols)
    crossing = False  # does some piece (other than a user-defined one) join a letter to a symbol?
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        if "\u2581" in piece[1:] and not sp.is_unused(i):
            return None  # a piece spans a word boundary: words are not independent
        if piece not in user_defined:
            crossing = crossing or _CROSSES.search(piece) is not None
    if _charsmap_joins(charsmap, _ANY, _IS_SPACE) or _charsmap_joins(charsmap, _IS_SPACE, _ANY):
        return None  # a normalisation rule reaches over whitespace: words are not independent
    unsafe = [c for c in "\t\n\x0b\x0c\r " if sp.normalize(f"a{c}b") != "\u2581a\u2581b"]
    # a literal ▁ in the text: exact only when the normaliser collapses it like a space
    if sp.normalize("a \u2581 b") != "\u2581a\u2581b" or sp.normalize("\u2581a\u2581") != "\u2581a":
        unsafe.append("\u2581")

    def split(text: str) -> Optional[list[bytes]]:
        for c in unsafe:
            if c in text:
                return None
        return text.encode("utf-8").split()

    def encode(chunks: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        return ragged(sp.encode(chunks, num_threads=1))

    if tokenizer.model_type == "bpe" and not _charsmap_joins(
        charsmap, _IS_PRINTABLE, _IS_PRINTABLE
    ):
        encode = _grouped_word_encoder(sp, sp.get_piece_size()) or encode
    refine = None
    if tokenizer.model_type == "bpe" and not crossing:
        crossing_symbols = [s for s in symbols if _CROSSES.search(s)]
        refine = _piece_splitter(sp, charsmap, crossing_symbols, encode)
    return ExactSplitter(split, encode, refine)


def _piece_splitter(
    sp, charsmap: bytes, symbols: list[str], word_encode
) -> Optional[ExactSplitter]:
    """Cut words of printable ASCII between a letter and a symbol, when that is exact.

    A BPE merge only ever makes a piece of the vocabulary. If no piece holds a letter next to
    a symbol (the caller checked; SentencePiece's default ``split_by_unicode_script`` trains
    such vocabularies), no merge crosses such a boundary, and by the argument for words each
    run is merged on its own exactly as in context. It also needs: every printable ASCII
    character normalises to itself, no normalisation rule spans a letter/symbol boundary
    (``_charsmap_joins``). Words with any other byte (non-ASCII, controls) stay whole, and so
    do words with a character that is not a piece (adjacent unknown characters become one
    ``<unk>``) or holding a user-defined piece that spans a boundary (``symbols``: matched
    before any merge, like ``<|endoftext|>``).

    A word's first run is encoded as a word (with the dummy-prefix ``▁``); a later run ``r``
    needs its encoding without ``▁``: that is ``encode(c + r)`` minus ``encode(c)``, for a
    known character ``c`` of the other class (and in no such symbol), since ``c | r`` is
    itself an exact cut.
    """
    if any(sp.normalize(c) != "\u2581" + c for c in _PRINTABLE):
        return None
    unknown = {c for c in _PRINTABLE if sp.piece_to_id(c) == sp.unk_id()}
    keep_whole = _KEEP_WHOLE.copy()  # and words with a character the vocabulary lacks
    keep_whole[[ord(c) for c in unknown]] = True
    if _charsmap_joins(charsmap, _IS_LETTER, _IS_SYMBOL):
        return None
    if _charsmap_joins(charsmap, _IS_SYMBOL, _IS_LETTER):
        return None
    leads = [c for c in _PRINTABLE if c not in unknown and not any(c in s for s in symbols)]
    letters = [c for c in leads if c.isalpha()]
    others = [c for c in leads if not c.isalpha()]
    if not letters or not others:
        return None
    # (text put in front of a later run, the ids it encodes to), by the run's first class
    lead_for_letter = (others[0].encode(), sp.encode(others[0]))
    lead_for_symbol = (letters[0].encode(), sp.encode(letters[0]))
    has_symbol = re.compile(b"|".join(re.escape(s.encode()) for s in symbols)) if symbols else None
    short_runs = _RunIds()

    def split(words: list[bytes], get) -> tuple[np.ndarray, np.ndarray]:
        n = len(words)
        blob = b"\n".join(words)
        arr = np.frombuffer(blob, dtype=np.uint8)
        inner = arr != 10
        change = _IS_LETTER[arr[1:]] != _IS_LETTER[arr[:-1]]
        first = np.flatnonzero(inner & np.concatenate([[True], change | ~inner[:-1]]))
        last = np.flatnonzero(inner & np.concatenate([change | ~inner[1:], [True]]))
        word_of = np.cumsum(~inner)  # of each byte; a "\n" counts with the word after it
        run_word = word_of[first]
        runs_per_word = np.bincount(run_word, minlength=n).astype(np.int64)
        # words of one run gain nothing from cutting; non-ASCII and control bytes forbid it
        whole = runs_per_word == 1
        whole[word_of[keep_whole[arr] & inner]] = True
        if has_symbol is not None:
            whole[word_of[[m.start() for m in has_symbol.finditer(blob)]]] = True
        cut, kept = np.flatnonzero(~whole), np.flatnonzero(whole)
        groups = []
        if len(cut):
            runs = ~whole[run_word]
            ids = short_runs.ids(arr, blob, first[runs], last[runs], get)
            groups.append((cut, ids, runs_per_word[cut]))
        if len(kept):
            keys = [b"\n" + w for w in _pick(words, kept)]
            ids = np.fromiter(map(get, keys), np.int64, len(keys))
            groups.append((kept, ids, np.ones(len(kept), dtype=np.int64)))
        return merge_groups(groups, n)

    def encode(keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Keys: ``b"\\n" + run`` (a word's first run, or a whole word) or a later run."""
        kind = np.fromiter(map(_KIND.__getitem__, map(itemgetter(0), keys)), np.int8, len(keys))
        heads = (None, lead_for_letter[0], lead_for_symbol[0])
        texts = [heads[k] + key if k else key[1:] for k, key in zip(kind.tolist(), keys)]
        tokens, lengths = word_encode(texts)
        starts = np.cumsum(lengths) - lengths
        drop = np.zeros(len(tokens), dtype=bool)
        for k, lead in ((1, lead_for_letter[1]), (2, lead_for_symbol[1])):
            at = starts[kind == k][:, None] + np.arange(len(lead))
            ok = (lengths[kind == k] >= len(lead)).all() and (tokens[at] == lead).all()
            if not ok:  # the exactness argument failed: refuse rather than write wrong tokens
                raise AssertionError("SentencePiece run split: a lead did not encode on its own")
            drop[at.ravel()] = True
        lengths = lengths - np.where(kind == 1, len(lead_for_letter[1]), 0)
        lengths -= np.where(kind == 2, len(lead_for_symbol[1]), 0)
        return tokens[~drop], lengths

    return ExactSplitter(split, encode)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes):
    """Yield (field number, wire type, value) of a serialized protobuf message: varints as int,
    length-delimited fields as bytes (fixed-width fields are skipped)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            return
        yield number, wire, value


def sentencepiece_model_type(serialized: bytes) -> str:
    """ "unigram", "bpe", "word" or "char": ModelProto.trainer_spec (2) .model_type (3)."""
    kind = 1  # proto default: UNIGRAM
    for number, wire, value in _proto_fields(serialized):
        if number == 2 and wire == 2:
            for inner, inner_wire, inner_value in _proto_fields(value):
                if inner == 3 and inner_wire == 0:
                    kind = inner_value
    return {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(kind, "unknown")


def sentencepiece_normalizer_and_symbols(serialized: bytes) -> tuple[bytes, list[str]]:
    """(ModelProto.normalizer_spec (3) .precompiled_charsmap (2), the user-defined pieces:
    ModelProto.pieces (1) with .type (3) USER_DEFINED (4), their text in .piece (1))."""
    charsmap, symbols = b"", []
    for number, wire, value in _proto_fields(serialized):
        if number == 3 and wire == 2:
            for inner, inner_wire, inner_value in _proto_fields(value):
                if inner == 2 and inner_wire == 2:
                    charsmap = inner_value
        elif number == 1 and wire == 2 and b"\x18\x04" in value:  # field 3 = 4, if anywhere
            fields = {n: v for n, _, v in _proto_fields(value)}
            if fields.get(3) == 4:
                symbols.append(fields[1].decode("utf-8"))
    return charsmap, symbols


class _RunIds:
    """Memo ids of the runs of "\\n"-joined words, mostly without a Python object per run.

    A run's memo key is ``b"\\n" + run`` for a word's first run and ``run`` for a later one.
    Runs of up to 7 bytes (nine in ten) are also packed exactly into one uint64 (a kind byte,
    then the run's bytes, zero-padded: printable runs hold no zero byte), and a sorted table of
    packed keys -> ids answers them with ``np.unique`` and ``searchsorted``; only keys the
    table lacks, and longer runs, go through the memo itself. The table follows the memo:
    a new memo object (after a reset) empties it.
    """

    def __init__(self):
        self.memo = None
        self.keys = np.zeros(0, dtype=np.uint64)
        self.values = np.zeros(0, dtype=np.int64)

    def ids(self, arr: np.ndarray, blob: bytes, first, last, get) -> np.ndarray:
        """Ids of the runs ``blob[first[i] : last[i] + 1]`` (``arr``: ``blob`` as uint8) of
        printable words joined by "\\n", in order."""
        if get.__self__ is not self.memo:
            self.__init__()
            self.memo = get.__self__
        length = last - first + 1
        starts_word = (first == 0) | (arr[first - 1] == 10)
        ids = np.empty(len(first), dtype=np.int64)
        short = np.flatnonzero(length <= 7)
        if len(short):
            # the 8 bytes from the one before each run, read as a little-endian uint64 through
            # a 1-byte-stride view; keep the run's bytes, put the kind in the lowest byte
            padded = b"\n" + blob + bytes(8)
            windows = np.ndarray((len(blob) + 1,), "<u8", padded, strides=(1,))
            packed = windows[first[short]] & _LOW_BYTES[length[short]]
            packed |= np.where(starts_word[short], 1, 2).astype(np.uint64)
            ids[short] = self._lookup(packed, get)
        long = np.flatnonzero(length > 7)
        if len(long):
            lead = np.where(starts_word[long], 1, 0)  # include the "\n" before a first run
            head = b"\n" + blob  # head[i + 1] == blob[i]
            bounds = zip((first[long] + 1 - lead).tolist(), (last[long] + 2).tolist())
            keys = [head[a:b] for a, b in bounds]
            ids[long] = np.fromiter(map(get, keys), np.int64, len(keys))
        return ids

    def _lookup(self, packed: np.ndarray, get) -> np.ndarray:
        at = np.searchsorted(self.keys, packed)
        found = np.zeros(len(packed), dtype=bool)
        if len(self.keys):
            found = self.keys[np.minimum(at, len(self.keys) - 1)] == packed
        values = np.empty(len(packed), dtype=np.int64)
        values[found] = self.values[at[found]]
        if not found.all():
            new, inverse = np.unique(packed[~found], return_inverse=True)
            keys = []
            for word in new.tolist():
                raw = word.to_bytes(8, "little")
                run = raw[1:].rstrip(b"\0")
                keys.append(b"\n" + run if raw[0] == 1 else run)
            new_values = np.fromiter(map(get, keys), np.int64, len(keys))
            values[~found] = new_values[inverse.ravel()]
            where = np.searchsorted(self.keys, new)
            self.keys = np.insert(self.keys, where, new)
            self.values = np.insert(self.values, where, new_values)
        return values


def _pick(items: list, index: np.ndarray) -> list:
    """``[items[i] for i in index]`` in C."""
    if len(index) == 1:
        return [items[int(index[0])]]
    return list(itemgetter(*index.tolist())(items))


def _grouped_word_encoder(sp, vocab_size: int):
    """Encode words of printable ASCII ``_GROUP`` to a call, joined by spaces; else one by one.

    SentencePiece spends ~0.6 us per input string on top of the work per byte, and most new
    words are short. Joined words encode to the concatenation of their encodings (the word
    argument), and each such word, normalised to ``▁word`` with no other ``▁`` in it, gives
    exactly one token that starts with ``▁``: its first. Those tokens mark where each word's
    encoding begins. That needs printable ASCII to normalise to itself, character by character
    (checked here) and with no rule over two of them (the caller checked the charsmap); a
    group whose count of such tokens is off anyway is encoded word by word. Returns None when
    a printable ASCII character does not normalise to itself.
    """
    if any(sp.normalize(c) != "\u2581" + c for c in _PRINTABLE):
        return None
    starts_word = np.array([sp.id_to_piece(i).startswith("\u2581") for i in range(vocab_size)])

    def encode(words: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        n = len(words)
        arr = np.frombuffer(b"\n".join(words), dtype=np.uint8)
        alone = np.zeros(n, dtype=bool)
        alone[np.cumsum(arr == 10)[_KEEP_WHOLE[arr] & (arr != 10)]] = True
        joined, single = np.flatnonzero(~alone), np.flatnonzero(alone)
        groups = []
        if len(joined):
            ws = _pick(words, joined) if len(single) else words
            texts = [b" ".join(ws[i : i + _GROUP]) for i in range(0, len(ws), _GROUP)]
            tokens = ragged(sp.encode(texts, num_threads=1))[0]
            first = np.flatnonzero(starts_word[tokens])
            if len(first) == len(joined) and (len(first) == 0 or first[0] == 0):
                groups.append((joined, tokens, np.diff(first, append=len(tokens))))
            else:  # not one ▁-token per word after all: encode these words one by one
                single = np.arange(n)
        if len(single):
            groups.append((single, *ragged(sp.encode(_pick(words, single), num_threads=1))))
        return merge_groups(groups, n)

    return encode


def _charsmap_joins(charsmap: bytes, left: np.ndarray, right: np.ndarray) -> bool:
    """Could a normalisation rule match a byte of class ``left`` followed by one of ``right``?

    ``left``/``right``: boolean masks over byte values. ``charsmap`` is SentencePiece's
    precompiled map: a little-endian uint32 byte size, then a darts-clone double-array trie
    over the rules' UTF-8 source strings, then their replacements. A rule holding ``ab`` has a
    trie node for a prefix ending in ``a`` with a child ``b``. Every unit labelled with a
    ``left`` byte is taken for such a node (unused units only make the answer more cautious)
    and its ``right`` children are probed: a child sits at ``base ^ byte`` and its unit
    carries that byte as its label (a leaf unit carries bit 31, so it never matches).
    """
    if len(charsmap) < 4:
        return False
    size = int.from_bytes(charsmap[:4], "little")
    if size % 4 or 4 + size > len(charsmap):
        return True  # not the layout we know: assume the worst
    units = np.frombuffer(charsmap, dtype=np.uint32, count=size // 4, offset=4).astype(np.int64)
    nodes = np.flatnonzero(left[units & 0xFF] & (units >> 31 == 0))
    base = nodes ^ ((units[nodes] >> 10) << ((units[nodes] & (1 << 9)) >> 6))
    child = np.flatnonzero(right)
    at = base[:, None] ^ child[None, :]
    inside = at < len(units)
    found = (units[np.where(inside, at, 0)] & ((1 << 31) | 0xFF)) == child[None, :]
    return bool((found & inside).any())
