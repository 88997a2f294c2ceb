"""Shared helpers of the data tests: tiny tokenizers trained on the fly, corpora, edge cases.

(No tests here; the test_data_* files import from it.)
"""

from __future__ import annotations

import io
import json
import os

TEXT_SOURCES = ("argparse", "json/decoder", "textwrap", "unittest/case", "string")

# Text that trips tokenizers: unicode of every kind, whitespace runs and exotic separators,
# strings that look like special tokens, very long words, empty documents.
EDGE_CASES = [
    "plain ascii words and more words",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cform feed",
    "multiple    spaces\n\n\n   and\t\t\tindents\n    def f(x):\n        return x  \n",
    "unicode: naïve café ﬁ ligature ½ ² Ⅷ ¨a Ångström 東京は日本の首都です 😀👍🏽 🇫🇷 مرحبا עברית",
    "combining e\u0301 a\u0308 and zero width \u200b\u200c\u200d joiners \ufeffbom",
    "nbsp\xa0here ideographic\u3000space en\u2002space line\u2028sep para\u2029sep nel\x85x",
    "ascii separators a\x1cb\x1dc\x1ed\x1fe and controls \x00\x07\x7f done",
    "special look-alikes <|endoftext|> </s> <s> <unk> <pad> \u2581 \u2581\u2581word [CLS] <0x41>",
    "<|endoftext|>start and end<|endoftext|>",
    "code: self.assertEqual(x.y[0], {'k': v}) # a+b*c/d; f(**kw)->None && a||b !x ?y",
    "paths/to/file_v2.py:12:34 https://example.com/a?b=c&d=e#frag C:\\Dir\\x.txt ~user",
    "CamelCase_snake-case.dotted/slashed`tick`^caret|pipe a.b a!b !!x x!! _a_ __init__()",
    "very long word " + "a" * 5000 + " and " + "xyz" * 3000 + " " + "=" * 200 + " ok",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F ==== ---- ****** 111111111",
    "contractions don't it's we're they've I'm you'll he'd 'quoted' ''",
    "",
    "   ",
    "\n",
    "x",
    "trailing newline\n",
    "emoji only 😀😀😀😀😀",
    "mixed\u3000\u3000\xa0 runs  \n \t ",
    " \xa0 \u3000 leading exotic space",
]


def stdlib_text(max_chars: int = 400_000) -> list[str]:
    """Documents (paragraphs) taken from a few stdlib modules on this machine."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    docs: list[str] = []
    total = 0
    for name in TEXT_SOURCES:
        with open(os.path.join(root, name + ".py"), encoding="utf-8") as f:
            for para in f.read().split("\n\n"):
                if para.strip():
                    docs.append(para)
                    total += len(para)
        if total >= max_chars:
            break
    return docs


def train_sentencepiece(
    path: str, model_type: str = "bpe", vocab_size: int = 800, **options
) -> str:
    """A SentencePiece model on stdlib text; ``options``: more (or overriding) trainer flags."""
    import sentencepiece as spm

    buf = io.BytesIO()
    flags = dict(
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=model_type == "bpe",
        num_threads=1,
        minloglevel=2,
    )
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(stdlib_text() + EDGE_CASES),
        model_writer=buf,
        **{**flags, **options},
    )
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def train_byte_level_bpe(folder: str, vocab_size: int = 1000) -> dict[str, str]:
    """A GPT-2-style byte-level BPE; writes tokenizer.json, vocab.json and merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_text() + EDGE_CASES, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    tok.model.save(folder)  # vocab.json + merges.txt
    return {
        "tokenizer_json": os.path.join(folder, "tokenizer.json"),
        "vocab": os.path.join(folder, "vocab.json"),
        "merges": os.path.join(folder, "merges.txt"),
    }


def write_jsonl(path: str, texts: list[str], key: str = "text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return path
