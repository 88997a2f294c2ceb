"""Build a real-text JSONL corpus from text already on this machine (nothing is downloaded).

Sources, walked in sorted order so the same machine always gives the same corpus:

1. prose files (``.rst``, ``.txt``, ``.md``) of the Python standard library and the installed
   packages of the running interpreter;
2. the docstrings (triple-quoted strings) of their ``.py`` files, one document per file;
3. only if that is still short of the target: the ``.py`` source itself.

Each output line is ``{"text": ..., "source": "<relative path>"}``. Files longer than
``MAX_DOC_CHARS`` are cut into several documents at line ends, so document sizes look like a web
corpus (a few KB on average) rather than a handful of huge files.

    python tools/make_corpus.py --out /tmp/corpus.jsonl --target-mb 93
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator

MAX_DOC_CHARS = 64 * 1024
PROSE_SUFFIXES = (".rst", ".txt", ".md")
# Triple-quoted strings: docstrings and other long prose-like literals.
_TRIPLE = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)


def source_roots() -> list[str]:
    """Directories searched: the stdlib and the site-packages of the running interpreter."""
    paths = sysconfig.get_paths()
    roots = []
    for key in ("stdlib", "purelib", "platlib"):
        p = os.path.realpath(paths[key])
        if os.path.isdir(p) and p not in roots:
            roots.append(p)
    return roots


def _files(roots: list[str], suffixes: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(root, path) of every file ending in ``suffixes``, sorted, each file once."""
    seen: set[str] = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(suffixes):
                    path = os.path.realpath(os.path.join(dirpath, name))
                    if path not in seen:
                        seen.add(path)
                        yield root, path


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return ""


def _split_long(text: str) -> Iterator[str]:
    """Cut ``text`` into pieces of at most ~MAX_DOC_CHARS at line ends."""
    if len(text) <= MAX_DOC_CHARS:
        yield text
        return
    piece: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if size and size + len(line) > MAX_DOC_CHARS:
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        yield "".join(piece)


def _documents(roots: list[str], kind: str) -> Iterator[tuple[str, str]]:
    """(source, text) pairs for one kind of source: "prose", "docstrings" or "code"."""
    suffixes = PROSE_SUFFIXES if kind == "prose" else (".py",)
    for root, path in _files(roots, suffixes):
        text = _read(path)
        if kind == "docstrings":
            strings = [a or b for a, b in _TRIPLE.findall(text)]
            text = "\n\n".join(s.strip("\n") for s in strings if s.strip())
        if not text.strip():
            continue
        rel = os.path.relpath(path, root)
        for doc in _split_long(text):
            if doc.strip():
                yield rel, doc


def build_corpus(out_path: str, target_mb: float, roots: list[str] | None = None) -> dict:
    """Write a JSONL corpus of at least ``target_mb`` MB (1e6 bytes of JSON lines) to ``out_path``.

    Returns ``{"path", "docs", "bytes", "text_bytes"}``. Raises ``RuntimeError`` when the machine
    does not hold that much text. The file is written under a temporary name and renamed, so a
    crash never leaves a short corpus behind that a later run would take for a whole one.
    """
    roots = roots or source_roots()
    target = int(target_mb * 1e6)
    tmp = f"{out_path}.tmp{os.getpid()}"
    docs = written = text_bytes = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for kind in ("prose", "docstrings", "code"):
                for source, text in _documents(roots, kind):
                    line = json.dumps({"text": text, "source": source}, ensure_ascii=False)
                    f.write(line + "\n")
                    docs += 1
                    written += len(line.encode("utf-8")) + 1
                    text_bytes += len(text.encode("utf-8"))
                    if written >= target:
                        break
                if written >= target:
                    break
        if written < target:
            raise RuntimeError(
                f"only {written / 1e6:.1f} MB of text found under {roots}, {target_mb} MB asked for"
            )
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"path": out_path, "docs": docs, "bytes": written, "text_bytes": text_bytes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output .jsonl path")
    parser.add_argument("--target-mb", type=float, default=93.0, help="size to reach, in MB")
    args = parser.parse_args(argv)
    info = build_corpus(args.out, args.target_mb)
    print(
        f"wrote {info['path']}: {info['docs']} documents, {info['bytes'] / 1e6:.1f} MB "
        f"({info['text_bytes'] / 1e6:.1f} MB of text)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
