"""gigatoken (a Rust tokenizer on PyPI) as the fast path, used only where it is shown exact.

``choose_fast_encoder`` builds a gigatoken tokenizer for the given megalite tokenizer and runs a
self-check: gigatoken and the reference tokenizer (``tokenize_body_batch``: the ``tokenizers``
library, or ``sentencepiece``) encode a sample of the input plus ``PROBES`` (text that
separates exact tokenizers from near ones: special-token look-alikes, whitespace runs, exotic
spaces, scripts, emoji, code). Any token that differs, and preprocessing keeps its own exact
path and says why. Documents holding the text of a tokenizer's special or added tokens or control
pieces (``exact_only_pattern``) never go through gigatoken.

Which tokenizers are tried: HuggingFaceTokenizer and GPT2BPETokenizer (byte-level BPE), and the
SentencePiece BPE types (gigatoken's SentencePiece path reads ``<s>`` in text as the control
token where sentencepiece does not: such documents are kept from it). A BPE model without byte
fallback is handed to gigatoken with byte pieces added (``_with_byte_pieces``), which are turned
back into ``<unk>`` as sentencepiece gives it.
TikTokenizer and NullTokenizer stay on their own encoders.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import numpy as np

from megalite.data.tokenizers import (
    GPTSentencePieceTokenizer,
    HuggingFaceTokenizer,
    Tokenizer,
)

Encoder = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]

PROBES = [
    "plain words, punctuation; and CamelCase_snake-case.dotted/slashed",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cform feed\x1c\x1d\x1e\x1f",
    "multiple    spaces\n\n\n   and\t\t\tindents\n    def f(x):\n        return x  \n",
    "unicode: naïve café ﬁ ligature ½ ² Ⅷ Ångström 東京は日本の首都です 😀👍🏽 🇫🇷 مرحبا עברית",
    "combining e\u0301 a\u0308 and zero width \u200b\u200c\u200d joiners \ufeffbom",
    "nbsp\xa0here ideographic\u3000space en\u2002space line\u2028sep para\u2029sep nel\x85x",
    "special look-alikes <|endoftext|> </s> <s> <unk> <pad> \u2581 \u2581\u2581word [CLS] <0x41>",
    "<|endoftext|>start and end<|endoftext|> <|begin_of_text|><|end_of_text|>",
    "code: self.assertEqual(x.y[0], {'k': v}) # a+b*c/d; f(**kw)->None && a||b !x ?y",
    "https://example.com/a?b=c&d=e#frag C:\\Dir\\x.txt ~user 1234567890 3.14159 -42 1e-9",
    "contractions don't it's we're they've I'm you'll he'd 'quoted' '' DON'T",
    "x" * 3000 + " " + "=" * 200 + " " + "ab" * 500,
    " \xa0 \u3000 leading exotic space",
    "controls \x00\x07\x7f and emoji only 😀😀😀😀😀",
    "",
    "   ",
]
SAMPLE_DOCS = 2000  # the self-check's sample: the input's first documents, up to
SAMPLE_BYTES = 1 << 18  # this many characters (the reference tokenizer is the slow side)


def exact_only_pattern(tokenizer: Tokenizer) -> Optional[re.Pattern]:
    """Text that sends a document to the tokenizer itself, never to the fast path: the
    tokenizer's special tokens (the legacy SentencePieceTokenizer splits at them), the added
    tokens of a ``tokenizers`` tokenizer (``<|endoftext|>``: with ``--special-tokens-as-text``
    the library encodes it as characters, a setting that its JSON, which gigatoken reads, does
    not carry) and, for SentencePiece models, the text of their control and unknown pieces
    (``<s>``, ``</s>``, ``<unk>``), which gigatoken reads as those pieces where
    ``sentencepiece`` encodes the characters. On a 93 MB corpus with a 16k byte-fallback BPE,
    all 71 documents gigatoken got wrong held such text."""
    texts = set(getattr(tokenizer, "special_tokens", {}) or {})
    if isinstance(tokenizer, HuggingFaceTokenizer):
        texts.update(a.content for a in tokenizer.tok.get_added_tokens_decoder().values())
    if isinstance(tokenizer, GPTSentencePieceTokenizer):
        sp = tokenizer.sp
        for i in range(sp.get_piece_size()):
            if sp.is_control(i) or sp.is_unknown(i):
                texts.add(sp.id_to_piece(i))
    texts.discard("")
    if not texts:
        return None
    return re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True))))


def _with_byte_pieces(model_file: str) -> Optional[bytes]:
    """A SentencePiece BPE model without byte fallback, rewritten with byte fallback on and the
    256 byte pieces appended after its own ids (which stay as they are); None for other models.

    gigatoken loads only byte-fallback BPE. On text whose characters are all in the vocabulary
    the two models are the same BPE (unknown characters belong to no piece, so they never take
    part in a merge); a character outside it comes out as byte pieces, ids at or past the
    original vocabulary size, where sentencepiece gives one ``<unk>`` per run of unknown
    characters: ``gigatoken_encoder`` rewrites them so. The self-check verifies the whole on
    the input (on the benchmark corpus 18% of the documents hold such characters)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    model = model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        model.ParseFromString(f.read())
    if (
        model.trainer_spec.model_type != model_pb2.TrainerSpec.BPE
        or model.trainer_spec.byte_fallback
    ):
        return None
    if any(p.type == model_pb2.ModelProto.SentencePiece.BYTE for p in model.pieces):
        return None
    model.trainer_spec.byte_fallback = True
    for b in range(256):
        model.pieces.add(
            piece=f"<0x{b:02X}>", score=0.0, type=model_pb2.ModelProto.SentencePiece.BYTE
        )
    return model.SerializeToString()


def gigatoken_encoder_for(tokenizer: Tokenizer) -> tuple[Optional[Encoder], str]:
    """The gigatoken encoder for ``tokenizer`` (not yet checked), or (None, why not)."""
    try:
        import gigatoken
    except ImportError:
        return None, "gigatoken is not installed"
    try:
        if isinstance(tokenizer, HuggingFaceTokenizer):
            return gigatoken_encoder(gigatoken.Tokenizer.from_json(tokenizer.tok.to_str())), ""
        if isinstance(tokenizer, GPTSentencePieceTokenizer):
            rewritten = _with_byte_pieces(tokenizer.model_file)
            if rewritten is None:
                gt = gigatoken.Tokenizer.from_sentencepiece(tokenizer.model_file)
                return gigatoken_encoder(gt), ""
            gt = gigatoken.Tokenizer.from_sentencepiece(rewritten)
            unknown = (tokenizer.sp.get_piece_size(), tokenizer.sp.unk_id())
            return gigatoken_encoder(gt, unknown), ""
    except Exception as e:  # gigatoken refuses configurations it does not support
        return None, f"gigatoken cannot load it ({type(e).__name__}: {e})"
    return None, f"gigatoken has no path for {type(tokenizer).__name__}"


def gigatoken_encoder(gt_tokenizer, unknown: Optional[tuple[int, int]] = None) -> Encoder:
    """texts -> (flat tokens, int64 lengths), on the calling thread (gigatoken releases the
    GIL while it encodes, so several threads encode at once). ``unknown``: (vocabulary size,
    unk id) of a model given byte pieces by ``_with_byte_pieces``: each run of byte pieces
    becomes one unk, as sentencepiece turns a run of unknown characters into one ``<unk>``."""

    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        tokens, lengths = awkward_ragged(gt_tokenizer.encode_batch(texts, parallel=False))
        if unknown is not None:
            tokens, lengths = _bytes_to_unk(tokens, lengths, *unknown)
        return tokens, lengths

    return encode


def _bytes_to_unk(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int, unk: int):
    """Every maximal run of ids >= vocab_size inside a document -> one ``unk``."""
    is_byte = tokens >= vocab_size
    if not is_byte.any():
        return tokens, lengths
    first = np.zeros(len(tokens), dtype=bool)  # a document's first token starts a run
    first[(np.cumsum(lengths) - lengths)[lengths > 0]] = True
    follows = np.concatenate([[False], is_byte[:-1]]) & ~first
    drop = is_byte & follows
    out = np.where(is_byte, unk, tokens).astype(tokens.dtype)[~drop]
    owner = np.searchsorted(np.cumsum(lengths), np.flatnonzero(drop), side="right")
    return out, lengths - np.bincount(owner, minlength=len(lengths))


def awkward_ragged(out) -> tuple[np.ndarray, np.ndarray]:
    """gigatoken's awkward [docs, var] token array -> (flat tokens, int64 lengths), read
    straight from its offsets and flat buffer (no per-document work)."""
    import awkward as ak

    layout = out.layout
    if isinstance(layout, ak.contents.ListOffsetArray) and isinstance(
        layout.content, ak.contents.NumpyArray
    ):
        offsets = np.asarray(layout.offsets)
        flat = np.asarray(layout.content.data)[offsets[0] : offsets[-1]]
        return flat, np.diff(offsets).astype(np.int64)  # uint32 tokens, as gigatoken gives
    flat = ak.to_numpy(ak.flatten(out, axis=1))
    return flat, ak.to_numpy(ak.num(out, axis=1)).astype(np.int64)


def first_difference(tokenizer: Tokenizer, encoder: Encoder, texts: list[str]) -> Optional[str]:
    """None when ``encoder`` gives ``tokenizer``'s body tokens on every text (but those that
    ``exact_only_pattern`` keeps from it), else where not."""
    pattern = exact_only_pattern(tokenizer)
    texts = [t for t in texts if not (pattern and pattern.search(t))]
    want = tokenizer.tokenize_body_batch(texts)
    flat, lengths = encoder(texts)
    ends = np.cumsum(lengths)
    for d, (ref, end, n) in enumerate(zip(want, ends, lengths)):
        got = flat[end - n : end].tolist()
        if got != ref:
            at = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(n, len(ref)))
            return (
                f"document {d} of the sample ({texts[d][:40]!r}...): token {at} is "
                f"{got[at : at + 3]}, the reference gives {ref[at : at + 3]}"
            )
    return None


def choose_fast_encoder(
    tokenizer: Tokenizer, sample: list[str], log: Callable[[str], None], build=None
) -> Optional[Encoder]:
    """The gigatoken encoder when it passes the self-check on ``sample`` + ``PROBES``, else
    None (and a line through ``log`` saying why). ``build``: a stand-in for the gigatoken
    encoder factory (tests pass a deliberately wrong one to see the fallback).

    Measured in one process on 20 MB of the benchmark corpus (CPU seconds, JSON parsing
    included): a 16k byte-fallback SentencePiece BPE 0.67 through gigatoken against 1.2 through
    megalite's chunk memo; byte-level BPE is further apart (see docs/benchmarks.md, "Data")."""
    if build is None:
        encoder, reason = gigatoken_encoder_for(tokenizer)
        if encoder is None:
            log(f"fast path: {reason}; using megalite's exact encoder")
            return None
    else:
        encoder = build(tokenizer)
    sizes = np.cumsum([len(t) for t in sample[:SAMPLE_DOCS]])
    sample = list(sample[: max(1, int(np.searchsorted(sizes, SAMPLE_BYTES)))])
    try:
        diff = first_difference(tokenizer, encoder, sample + PROBES)
    except Exception as e:  # a fast path that crashes is as unusable as a wrong one
        diff = f"it failed ({type(e).__name__}: {e})"
    if diff is not None:
        log(f"fast path: gigatoken is NOT exact for this tokenizer: {diff}; "
            "falling back to megalite's exact encoder")  # fmt: skip
        return None
    log(f"fast path: gigatoken, exact on the {len(sample)}-document sample "
        f"and {len(PROBES)} probes")  # fmt: skip
    return encoder
