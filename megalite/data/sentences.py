"""Sentence splitting for ``--split-sentences``: NLTK's Punkt algorithm, untrained.

Megatron splits with NLTK's *trained* english Punkt model (``tokenizers/punkt/english.pickle``),
which ``nltk.download`` fetches from the internet. megalite fetches nothing, so it runs the same
``PunktSentenceTokenizer`` with empty parameters: no learned abbreviations, collocations or
sentence starters. It still ends sentences at ``.``, ``?`` and ``!`` followed by whitespace, but
it also breaks after abbreviations the trained model knows ("Mr. Smith" -> "Mr.", "Smith"), so
the sentence boundaries (and so the .idx) can differ from Megatron's on such text; the tokens of
each sentence are the tokenizer's, exactly.

``--keep-newlines``: as in Megatron, the whitespace after a sentence's end (newlines included)
stays with that sentence instead of being dropped between sentences.

Like Megatron, a document is split in pieces of at most ``MAX_CHARS`` characters, each piece on
its own.
"""

from __future__ import annotations

from typing import Callable

MAX_CHARS = 1_000_000


def build_splitter(keep_newlines: bool) -> Callable[[str], list[str]]:
    """text -> its sentences (see the module docstring). Raises ImportError naming nltk."""
    try:
        from nltk.tokenize.punkt import (
            PunktLanguageVars,
            PunktParameters,
            PunktSentenceTokenizer,
        )
    except ImportError as e:
        raise ImportError(
            "--split-sentences needs the nltk package (pip install nltk); no model is downloaded"
        ) from e

    if keep_newlines:

        class KeepWhitespace(PunktLanguageVars):
            # Punkt's period-context regex with the whitespace after the sentence end taken
            # into the match (``\s*``, and the next word right after it), so that it becomes
            # part of the sentence: Megatron's CustomLanguageVars, less its leading ``\S*``
            # (word material before the end), which recent NLTK dropped from its own regex as
            # quadratic on long runs without whitespace (a 20,000-character run: 3.5 s).
            # Without it, sentences differ only around words with periods inside them
            # (1 document of 1,500 on the benchmark corpus).
            _period_context_fmt = r"""
                %(SentEndChars)s             # a possible sentence end
                \s*                          # the whitespace after it, kept
                (?=(?P<after_tok>
                    %(NonWord)s              # other punctuation
                    |
                    (?P<next_tok>\S+)        # or the next word
                ))"""

        splitter = PunktSentenceTokenizer(PunktParameters(), lang_vars=KeepWhitespace())
    else:
        splitter = PunktSentenceTokenizer(PunktParameters())

    def split(text: str) -> list[str]:
        sentences: list[str] = []
        for start in range(0, len(text), MAX_CHARS):
            sentences += splitter.tokenize(text[start : start + MAX_CHARS])
        return sentences

    return split
