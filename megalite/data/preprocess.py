"""JSONL -> Megatron .bin/.idx, with Megatron's flags. Console script ``megalite-preprocess``.

    megalite-preprocess --input 'data/*.jsonl.gz' --output-prefix out/corpus --json-keys text \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod \\
        --workers 2

writes ``out/corpus_text_document.bin/.idx``, one sequence (and document) per input line.

Streaming: the main process reads the inputs in blocks of whole lines, at most ``2 * workers``
blocks are in flight, and each worker returns flat numpy token arrays that the main process
appends to the .bin: memory stays flat whatever the corpus size. Outputs are written under
temporary names and renamed only when everything succeeded. A bad line (malformed JSON, missing
key, non-string value) stops the run with ``file:line`` unless ``--skip-bad-lines``. A document
with no tokens (empty text) is left out, as Megatron does.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

from megalite.data.encode import BlockEncoder, BlockResult
from megalite.data.indexed_dataset import IndexedDatasetWriter, best_dtype
from megalite.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

BLOCK_BYTES = 1 << 20


class PreprocessError(ValueError):
    """Bad input; the message names the file (and line) and what is wrong."""


@dataclass
class PreprocessStats:
    docs: int = 0
    tokens: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    bad_lines: int = 0
    empty_docs: int = 0
    outputs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        sec = max(self.seconds, 1e-9)
        return (
            f"preprocess: {self.docs} docs, {self.tokens} tokens, {self.nbytes / 1e6:.1f} MB "
            f"in {self.seconds:.1f} s: {self.tokens / sec:,.0f} tokens/s, "
            f"{self.nbytes / 1e6 / sec:.1f} MB/s ({self.bad_lines} bad lines skipped, "
            f"{self.empty_docs} empty docs left out)"
        )


def expand_inputs(patterns: list[str]) -> list[str]:
    """Each ``--input`` is a file or a glob; a pattern matching nothing is an error."""
    paths: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        found = [p for p in found if os.path.isfile(p)]
        if not found:
            raise PreprocessError(f"--input {pattern}: no such file")
        paths.extend(found)
    return paths


def read_blocks(paths: list[str], block_bytes: int = BLOCK_BYTES) -> Iterator[tuple]:
    """Yield ``(path, first_line_number, blob)`` with ``blob`` = whole lines, ~block_bytes."""
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            line, rest = 1, b""
            while True:
                data = f.read(block_bytes)
                if not data:
                    break
                data = rest + data if rest else data
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: keep reading
                    rest = data
                    continue
                blob, rest = data[:cut], data[cut:]
                yield path, line, blob
                line += blob.count(b"\n")
            if rest:
                yield path, line, rest


_WORKER: dict = {}


def _init_worker(tokenizer_args: dict, json_keys, append_eod, dtype, fast) -> None:
    # One single-threaded tokenizer per process: Rust-side thread pools would only fight the
    # other workers for the same cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = build_tokenizer(**tokenizer_args)
    _WORKER["encoder"] = BlockEncoder(tokenizer, json_keys, append_eod, dtype, fast)


def _encode(task: tuple) -> tuple[str, BlockResult]:
    path, first_line, blob = task
    return path, _WORKER["encoder"].encode_block(first_line, blob)


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer_args: dict,
    json_keys: tuple[str, ...] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    skip_bad_lines: bool = False,
    fast: bool = True,
    progress: Optional[bool] = None,
    log=sys.stderr,
) -> PreprocessStats:
    """Tokenize JSONL ``inputs`` into ``{output_prefix}_{key}_document.{bin,idx}`` per key.

    ``tokenizer_args``: keyword arguments of ``build_tokenizer``. ``fast=False`` uses the
    tokenizer's plain batched encode instead of chunk memoisation (same tokens, slower).
    ``progress``: a tqdm bar (None: only on a terminal). Raises ``PreprocessError`` for bad
    input, after removing every temporary file.
    """
    start = time.perf_counter()
    paths = expand_inputs(inputs)
    tokenizer = build_tokenizer(**tokenizer_args)  # fail early on a bad tokenizer file
    if append_eod:
        tokenizer.eod  # noqa: B018  (raises when the vocabulary has no eod token)
    dtype = best_dtype(tokenizer.vocab_size)
    stats = PreprocessStats()
    prefixes = {k: f"{output_prefix}_{k}_document" for k in json_keys}
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise PreprocessError(f"--output-prefix {output_prefix}: no directory {out_dir}")
    total = None if any(p.endswith(".gz") for p in paths) else sum(map(os.path.getsize, paths))
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="preprocess",
        disable=(None if progress is None else not progress),
        file=log,
    )
    init = (tokenizer_args, list(json_keys), append_eod, dtype, fast)
    pool = mp.Pool(workers, initializer=_init_worker, initargs=init)
    writers: dict[str, IndexedDatasetWriter] = {}
    try:
        writers = {k: IndexedDatasetWriter(p, dtype) for k, p in prefixes.items()}
        inflight: collections.deque = collections.deque()

        def drain_one() -> None:
            path, res = inflight.popleft().get()
            if res.bad and not skip_bad_lines:
                line, reason = res.bad[0]
                raise PreprocessError(
                    f"{path}:{line}: {reason} (use --skip-bad-lines to skip such lines)"
                )
            for line, reason in res.bad:
                stats.bad_lines += 1
                if stats.bad_lines <= 5:  # show the first few, count the rest
                    print(f"skipped {path}:{line}: {reason}", file=log)
            for k, writer in writers.items():
                lengths = res.lengths[k]
                keep = lengths > 0
                stats.empty_docs += int((~keep).sum())
                writer.add_documents(res.tokens[k], lengths[keep])
            stats.docs += int(res.docs)
            stats.nbytes += res.nbytes
            bar.update(res.nbytes)
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{stats.docs / elapsed:,.0f} docs/s", refresh=False)

        for task in read_blocks(paths):
            inflight.append(pool.apply_async(_encode, (task,)))
            if len(inflight) >= 2 * workers:
                drain_one()
        while inflight:
            drain_one()
        if not any(w.num_tokens for w in writers.values()):
            raise PreprocessError(f"no documents with any text in {', '.join(paths)}")
        stats.tokens = sum(w.num_tokens for w in writers.values())
        for writer in writers.values():
            writer.finalize()
        stats.outputs = list(prefixes.values())
    except BaseException:
        pool.terminate()
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        pool.close()
        pool.join()
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Tokenize JSONL into Megatron .bin/.idx datasets.")
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help="JSONL files, .jsonl.gz or globs")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract")
    g.add_argument("--skip-bad-lines", action="store_true", help="count bad lines, go on")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="SentencePiece .model, or tokenizer.json / folder")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer: ids are 0..V-1, eod = V")
    g.add_argument("--append-eod", action="store_true", help="append eod after each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="worker processes")
    g.add_argument("--no-chunk-cache", action="store_true", help="encode documents whole")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = get_args(argv)
    tokenizer_args = dict(
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        vocab_size=args.vocab_size,
    )
    try:
        stats = preprocess(
            args.input,
            args.output_prefix,
            tokenizer_args,
            json_keys=tuple(args.json_keys),
            append_eod=args.append_eod,
            workers=args.workers,
            skip_bad_lines=args.skip_bad_lines,
            fast=not args.no_chunk_cache,
        )
    except (PreprocessError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(stats.summary(), file=sys.stderr)
    for prefix in stats.outputs:
        print(f"wrote {prefix}.bin and {prefix}.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
