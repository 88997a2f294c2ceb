"""Corpus -> Megatron .bin/.idx, with Megatron's flags. Console script ``megalite-preprocess``.

    megalite-preprocess --input 'data/*.jsonl.zst' --output-prefix out/corpus --json-keys text \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod \\
        --workers 2

writes ``out/corpus_text_document.bin/.idx``, one sequence (and document) per input line;
with ``--split-sentences`` ``out/corpus_text_sentence.bin/.idx``, one document per line made of
one sequence per sentence (sentences.py: NLTK's Punkt, untrained; see there how it differs).
Inputs (readers.py): ``.jsonl`` / ``.json``, ``.gz`` and ``.zst`` of those, ``.parquet`` (the
``--json-keys`` columns), folders of such shards and globs, in sorted order.

Streaming: the main process reads the inputs in blocks (1 MB of whole lines, 4 MB on the
gigatoken path, or 1024 parquet rows), at most ``2 * workers`` blocks are in flight, and each
worker (a process; a thread of this process on the gigatoken path, see ``_Threads``) returns
flat numpy token arrays that the main process appends to the .bin: memory stays flat whatever
the corpus size.
Outputs are written under temporary names and renamed only when everything succeeded. A bad
line (malformed JSON, missing key, non-string value, parquet null) stops the run with
``file:line`` unless ``--skip-bad-lines``. A document with no tokens (empty text) stays in the
index as a document of no sequences, as Megatron's ``preprocess_data.py`` writes it.
Encoding goes through gigatoken when its start-up self-check shows it exact (fastpath.py).
Tokens are Megatron-LM's, byte for byte (tokenizers.py has the rules per type; the test
``tests/test_data_megatron_fixture.py`` compares with its output): no BOS, eod ``</s>`` for the
SentencePiece types, ``<|endoftext|>`` text becomes that token for the byte-level ones unless
``--special-tokens-as-text``; ``--tokenizer-sentencepiece-legacy`` writes megalite's old rules.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from megalite.data.chunking import gather_segments
from megalite.data.encode import BlockEncoder, BlockResult, parse_jsonl
from megalite.data.fastpath import SAMPLE_DOCS, choose_fast_encoder, gigatoken_encoder_for
from megalite.data.indexed_dataset import IndexedDatasetWriter, best_dtype
from megalite.data.merge import merge_datasets
from megalite.data.readers import InputError, expand_inputs, known_size, read_blocks
from megalite.data.sentences import build_splitter
from megalite.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

# Blocks of JSON lines on the gigatoken path: larger than the process pool's (nothing is copied
# between processes), so the per-block spot check re-encodes a smaller share of the text.
FAST_BLOCK_BYTES = 4 << 20


class PreprocessError(InputError):
    """Bad input; the message names the file (and line) and what is wrong."""


@dataclass
class PreprocessStats:
    docs: int = 0
    tokens: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    startup: float = 0.0  # of seconds: tokenizer loading, the self-check, starting the pool
    bad_lines: int = 0
    empty_docs: int = 0
    outputs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        sec = max(self.seconds, 1e-9)
        return (
            f"preprocess: {self.docs} docs, {self.tokens} tokens, {self.nbytes / 1e6:.1f} MB "
            f"in {self.seconds:.2f} s (start-up {self.startup:.2f} s): "
            f"{self.tokens / sec:,.0f} tokens/s, "
            f"{self.nbytes / 1e6 / sec:.1f} MB/s ({self.bad_lines} bad lines skipped, "
            f"{self.empty_docs} documents without tokens)"
        )


_WORKER: dict = {}


def _init_worker(
    tokenizer_args: dict, json_keys, append_eod, dtype, fast, fast_build, sentences
) -> None:
    # One single-threaded tokenizer per process: Rust-side thread pools would only fight the
    # other workers for the same cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = build_tokenizer(**tokenizer_args)
    encoder = None
    if fast_build == "gigatoken":
        encoder = gigatoken_encoder_for(tokenizer)[0]
    elif fast_build is not None:
        encoder = fast_build(tokenizer)
    _WORKER["encoder"] = _block_encoder(
        tokenizer, encoder, json_keys, append_eod, dtype, fast, sentences
    )


def _block_encoder(tokenizer, encoder, json_keys, append_eod, dtype, fast, sentences):
    """The BlockEncoder of a worker process or of the shared threads (`sentences`: the
    sentence splitter's arguments, None without --split-sentences)."""
    return BlockEncoder(
        tokenizer,
        json_keys,
        append_eod,
        dtype,
        fast,
        fast_encoder=encoder,
        sentence_splitter=None if sentences is None else build_splitter(*sentences),
    )


def _encode(task: tuple) -> tuple[str, BlockResult]:
    path, first_line, blob = task
    return path, _WORKER["encoder"].encode_block(first_line, blob)


class _Pending:
    """A future with ``AsyncResult``'s ``get``. (Not ``future.get = future.result``: that
    reference cycle kept every block's tokens alive until the cyclic GC ran, +70 MB of peak
    RSS over 4x the corpus.)"""

    __slots__ = ("future",)

    def __init__(self, future):
        self.future = future

    def get(self):
        return self.future.result()


class _Threads:
    """The gigatoken path's pool: ``workers`` threads of this process sharing one BlockEncoder.

    gigatoken encodes with the GIL released, so the threads encode in parallel, while JSON
    parsing and the numpy work interleave under the GIL; unlike a process pool there is no
    worker start-up and no pickling of blocks and token arrays between processes. Offers the
    ``multiprocessing.Pool`` calls that ``preprocess`` makes."""

    def __init__(self, workers: int, encoder: BlockEncoder):
        self.encoder = encoder
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="megalite-encode")

    def apply_async(self, fn, args: tuple):
        task = args[0]
        future = self.executor.submit(lambda: (task[0], self.encoder.encode_block(*task[1:])))
        return _Pending(future)

    def terminate(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        pass

    def join(self) -> None:
        self.executor.shutdown(wait=True)


def read_sample(paths: list[str], json_keys: list[str], docs: int = SAMPLE_DOCS) -> list[str]:
    """The first ``docs`` documents' texts (first key) of the input: the self-check's sample."""
    sample: list[str] = []
    for _, first, blob in read_blocks(paths, json_keys):
        if isinstance(blob, dict):
            sample += [t for t in blob[json_keys[0]] if t is not None]
        else:
            sample += parse_jsonl(json_keys, first, blob)[1][json_keys[0]]
        if len(sample) >= docs:
            break
    return sample[:docs]


class _Partitions:
    """Megatron's ``--partitions P`` order: document ``i`` goes to partition ``i % P`` and the
    partitions are concatenated (documents 0, P, 2P, ..., then 1, P+1, ...). Each partition is
    a temporary dataset, merged at the end in constant memory."""

    def __init__(self, prefix: str, dtype, count: int):
        self.count, self.seen, self.prefix = count, 0, prefix
        self.names = [f"{prefix}.partition{p}" for p in range(count)]
        self.writers = [IndexedDatasetWriter(n, dtype) for n in self.names]
        self.num_tokens = 0

    def add_sequences(self, tokens: np.ndarray, lengths: np.ndarray, per_doc: np.ndarray) -> None:
        """As ``IndexedDatasetWriter.add_sequences``; documents with no sequences take their
        turn too (Megatron deals input lines, empty or not)."""
        where = (self.seen + np.arange(len(per_doc))) % self.count
        seq_where = np.repeat(where, per_doc)
        starts = np.cumsum(lengths) - lengths
        for p, writer in enumerate(self.writers):
            mine = seq_where == p
            mine_tokens = gather_segments(tokens, starts[mine], lengths[mine])
            writer.add_sequences(mine_tokens, lengths[mine], per_doc[where == p])
        self.seen += len(per_doc)
        self.num_tokens += len(tokens)

    def finalize(self) -> None:
        for writer in self.writers:
            writer.finalize()
        merge_datasets(self.names, self.prefix).close()
        self.abort()

    def abort(self) -> None:
        for writer, name in zip(self.writers, self.names):
            writer.abort()
            for ext in (".bin", ".idx"):
                if os.path.exists(name + ext):
                    os.remove(name + ext)


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
    log=None,
    fast_tokenizer: str = "auto",
    partitions: int = 1,
    keep_sequential_samples: bool = False,
    log_interval: int = 0,
    split_sentences: bool = False,
    keep_newlines: bool = False,
    _fast_build: Optional[Callable] = None,
) -> PreprocessStats:
    """Tokenize ``inputs`` into ``{output_prefix}_{key}_document.{bin,idx}`` per key
    (``..._sentence...`` with ``split_sentences``).

    ``tokenizer_args``: keyword arguments of ``build_tokenizer``. ``fast=False`` uses the
    tokenizer's plain batched encode instead of chunk memoisation (same tokens, slower).
    ``fast_tokenizer``: "auto" tries gigatoken behind its self-check, "exact" never does.
    ``partitions`` > 1 without ``keep_sequential_samples``: Megatron's round-robin order (see
    ``_Partitions``); with it, input order (as Megatron's sequential partitions give).
    ``log_interval``: a Megatron-style progress line every that many documents (0: none).
    ``split_sentences``: each document a sequence per sentence (sentences.py); with
    ``keep_newlines`` the whitespace after a sentence stays in it.
    ``progress``: a tqdm bar (None: only on a terminal). Raises ``PreprocessError`` for bad
    input, after removing every temporary file. ``_fast_build``: tests' stand-in fast path.
    """
    start = time.perf_counter()
    log = log or sys.stderr
    say = lambda line: print(line, file=log)  # noqa: E731
    json_keys = list(json_keys)
    paths = expand_inputs(inputs)
    tokenizer = build_tokenizer(**tokenizer_args)  # fail early on a bad tokenizer file
    if append_eod:
        tokenizer.eod  # noqa: B018  (raises when the vocabulary has no eod token)
    dtype = best_dtype(tokenizer.vocab_size)
    stats = PreprocessStats()
    level = "sentence" if split_sentences else "document"  # Megatron's file names
    prefixes = {k: f"{output_prefix}_{k}_{level}" for k in json_keys}
    sentences = (keep_newlines,) if split_sentences else None
    if sentences is not None:
        build_splitter(*sentences)  # fail early when nltk is missing
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise PreprocessError(f"--output-prefix {output_prefix}: no directory {out_dir}")
    fast_build = None
    if fast_tokenizer == "auto" and fast:
        encoder = choose_fast_encoder(
            tokenizer, read_sample(paths, json_keys), say, build=_fast_build
        )
        if encoder is not None:
            fast_build = _fast_build or "gigatoken"
    total = sum(map(os.path.getsize, paths)) if known_size(paths) else None
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="preprocess",
        disable=(None if progress is None else not progress),
        file=log,
    )
    init = (tokenizer_args, json_keys, append_eod, dtype, fast, fast_build, sentences)
    block_bytes = None
    if fast_build == "gigatoken":
        block_bytes = FAST_BLOCK_BYTES
        shared = _block_encoder(tokenizer, encoder, json_keys, append_eod, dtype, fast, sentences)
        pool = _Threads(workers, shared)
    else:
        pool = mp.Pool(workers, initializer=_init_worker, initargs=init)
    stats.startup = time.perf_counter() - start
    writers: dict = {}
    try:
        if partitions > 1 and not keep_sequential_samples:
            writers = {k: _Partitions(p, dtype, partitions) for k, p in prefixes.items()}
        else:
            writers = {k: IndexedDatasetWriter(p, dtype) for k, p in prefixes.items()}
        inflight: collections.deque = collections.deque()
        next_log = log_interval

        def drain_one() -> None:
            nonlocal next_log
            path, res = inflight.popleft().get()
            if res.bad and not skip_bad_lines:
                line, reason = res.bad[0]
                raise PreprocessError(
                    f"{path}:{line}: {reason} (use --skip-bad-lines to skip such lines)"
                )
            for line, reason in res.bad:
                stats.bad_lines += 1
                if stats.bad_lines <= 5:  # show the first few, count the rest
                    say(f"skipped {path}:{line}: {reason}")
            for k, writer in writers.items():
                lengths, per_doc = res.sequences(k)
                stats.empty_docs += int((per_doc == 0).sum())
                writer.add_sequences(res.tokens[k], lengths, per_doc)
            stats.docs += int(res.docs)
            stats.nbytes += res.nbytes
            bar.update(res.nbytes)
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{stats.docs / elapsed:,.0f} docs/s", refresh=False)
            if log_interval and stats.docs >= next_log:
                next_log += log_interval * ((stats.docs - next_log) // log_interval + 1)
                say(
                    f"Processed {stats.docs} documents ({stats.docs / elapsed:.1f} docs/s, "
                    f"{stats.nbytes / elapsed / 2**20:.2f} MB/s)."
                )

        for task in read_blocks(paths, json_keys, block_bytes=block_bytes):
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
    p = argparse.ArgumentParser(description="Tokenize a corpus into Megatron .bin/.idx datasets.")
    g = p.add_argument_group("input data")
    g.add_argument(
        "--input",
        nargs="+",
        required=True,
        help=".jsonl/.json(.gz/.zst) or .parquet files, folders of them, or globs (sorted)",
    )
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys (parquet: columns)")
    g.add_argument("--skip-bad-lines", action="store_true", help="count bad lines, go on")
    g.add_argument(
        "--split-sentences",
        action="store_true",
        help="a sequence per sentence (NLTK Punkt untrained, not Megatron's english model)",
    )
    g.add_argument(
        "--keep-newlines",
        action="store_true",
        help="with --split-sentences: whitespace after a sentence stays in it (as Megatron)",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="SentencePiece .model, tokenizer.json, tiktoken .json")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument(
        "--vocab-size", type=int, help="NullTokenizer: ids 0..V-1, eod = V; TikTokenizer: V"
    )
    g.add_argument("--tiktoken-pattern", choices=("v1", "v2"), help="TikTokenizer split regex")
    g.add_argument(
        "--tiktoken-num-special-tokens", type=int, default=1000, help="TikTokenizer: ids below"
    )
    g.add_argument(
        "--tiktoken-special-tokens",
        "--tokenizer-special-tokens",
        nargs="+",
        help="TikTokenizer: must hold <unk> <s> </s> (default: those three)",
    )
    g.add_argument(
        "--special-tokens-as-text",
        action="store_true",
        help="encode the text of special tokens inside documents as plain characters, for "
        "every type; without it, as Megatron-LM: GPT2BPETokenizer and HuggingFaceTokenizer turn "
        "it (<|endoftext|>, a tokenizer.json's special tokens) into those tokens, the other "
        "types encode it as text already (legacy SentencePieceTokenizer: as text too)",
    )
    g.add_argument(
        "--tokenizer-sentencepiece-legacy",
        action="store_true",
        help="the older Megatron wrapper's rules (megalite before they changed): "
        "SentencePieceTokenizer adds <CLS> <SEP> <EOD> <MASK>... after the pieces (eod <EOD>, "
        "their text becomes them), Llama2Tokenizer puts BOS before every document",
    )
    g.add_argument("--append-eod", action="store_true", help="append eod after each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/idx")
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--workers", type=int, default=1, help="worker processes (threads on the gigatoken path)"
    )
    g.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="Megatron's partitions: documents dealt round-robin, then concatenated",
    )
    g.add_argument(
        "--keep-sequential-samples",
        action="store_true",
        help="with --partitions: keep the input order (Megatron's sequential partitions)",
    )
    g.add_argument("--log-interval", type=int, default=1000, help="progress line every N docs")
    g.add_argument("--no-chunk-cache", action="store_true", help="encode documents whole")
    g.add_argument(
        "--fast-tokenizer",
        choices=("auto", "exact"),
        default="auto",
        help="auto: gigatoken where its self-check shows it exact; exact: never",
    )
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.partitions < 1:
        p.error(f"--partitions must be at least 1 (got {args.partitions})")
    if args.log_interval < 0:
        p.error(f"--log-interval must be 0 (off) or more (got {args.log_interval})")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    return run(get_args(argv))


def run(args: argparse.Namespace) -> int:
    """Preprocess with parsed flags (``get_args``); 0 on success, 1 after an error message."""
    tokenizer_args = dict(
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        vocab_size=args.vocab_size,
        special_tokens_as_text=args.special_tokens_as_text,
        tokenizer_sentencepiece_legacy=args.tokenizer_sentencepiece_legacy,
    )
    if args.tokenizer_type == "TikTokenizer":
        tokenizer_args.update(
            tiktoken_pattern=args.tiktoken_pattern,
            tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
            tiktoken_special_tokens=args.tiktoken_special_tokens,
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
            fast_tokenizer=args.fast_tokenizer,
            partitions=args.partitions,
            keep_sequential_samples=args.keep_sequential_samples,
            log_interval=args.log_interval,
            split_sentences=args.split_sentences,
            keep_newlines=args.keep_newlines,
        )
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(stats.summary(), file=sys.stderr)
    for prefix in stats.outputs:
        print(f"wrote {prefix}.bin and {prefix}.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
