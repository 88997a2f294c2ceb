"""Benchmark megalite's preprocessing against a plain loop, on real text from this machine.

    python tools/bench_preprocess.py                    # 93 MB corpus, SP-BPE + HF, 1 and 2 workers
    python tools/bench_preprocess.py --target-mb 50 --workers 2 --tokenizers hf

The plain loop is what a straightforward Megatron-style script does: ``Pool(workers).imap`` over
the lines, each worker parses one JSON line and calls the tokenizer's ``encode`` on the document,
the main process appends each document's ids through the same .bin/.idx writer. Both run as
separate process trees under the same core count; wall time includes start-up. Peak RSS is the
sum over the whole tree (main + workers), sampled every 20 ms; CPU s is the tree's user + system
time, a check that holds even on a busy machine where wall times swing (``--repeat`` keeps the
best of interleaved runs). The output checksums (md5 of
.bin and .idx) must match: the fast path is token-for-token identical. Finally megalite runs
on the corpus repeated 2x and 4x, at each worker count, to show its memory staying flat: it is
bounded by each worker's chunk memo (at most 2^20 chunks), which fills up with the corpus
vocabulary. With 2 workers each has seen only half the corpus at 1x, so its memo is still
filling there. ``--rss-only`` runs just these memory runs.

Tokenizers are trained here on the first ~8 MB of the corpus (nothing is downloaded):
``sp`` = SentencePiece BPE, ``hf`` = byte-level BPE (GPT-2 style) as tokenizer.json,
``sp_unigram`` = SentencePiece unigram (no exact chunk split exists: megalite encodes whole
documents, batched; included to show that case honestly).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

VOCAB = 16000


def train_tokenizers(corpus: str, workdir: str, kinds: list[str]) -> dict[str, list[str]]:
    """Train the asked tokenizers on ~8 MB of the corpus; return their preprocess flags."""
    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1])
            if size > 8e6:
                break
    flags = {}
    for kind in kinds:
        if kind in ("sp", "sp_unigram"):
            path = os.path.join(workdir, f"{kind}.model")
            if not os.path.exists(path):
                import sentencepiece as spm

                buf = io.BytesIO()
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(texts),
                    model_writer=buf,
                    vocab_size=VOCAB,
                    model_type="bpe" if kind == "sp" else "unigram",
                    input_sentence_size=0,
                    max_sentence_length=1 << 20,
                    num_threads=2,
                    minloglevel=2,
                )
                with open(path, "wb") as f:
                    f.write(buf.getvalue())
            flags[kind] = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", path]
        elif kind == "hf":
            path = os.path.join(workdir, "tokenizer.json")
            if not os.path.exists(path):
                from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

                tok = Tokenizer(models.BPE())
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tok.decoder = decoders.ByteLevel()
                trainer = trainers.BpeTrainer(
                    vocab_size=VOCAB,
                    special_tokens=["<|endoftext|>"],
                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                    show_progress=False,
                )
                tok.train_from_iterator(texts, trainer)
                tok.save(path)
            flags[kind] = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", path]
        else:
            raise SystemExit(f"unknown tokenizer kind {kind!r}")
    return flags


# ---- the plain loop (runs in its own process tree via --run-plain) ---------------------------

_TOK = None


def _plain_init(tokenizer_args: dict) -> None:
    global _TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from megalite.data.tokenizers import build_tokenizer

    _TOK = build_tokenizer(**tokenizer_args)


def _plain_encode(line: bytes) -> list[int]:
    ids = _TOK.tokenize(json.loads(line)["text"])
    if ids:
        ids.append(_TOK.eod)
    return ids


def run_plain(corpus: str, prefix: str, tokenizer_args: dict, workers: int) -> None:
    import numpy as np

    from megalite.data.indexed_dataset import IndexedDatasetWriter, best_dtype
    from megalite.data.tokenizers import build_tokenizer

    dtype = best_dtype(build_tokenizer(**tokenizer_args).vocab_size)
    with mp.Pool(workers, _plain_init, (tokenizer_args,)) as pool, open(corpus, "rb") as f:
        with IndexedDatasetWriter(prefix, dtype) as writer:
            for ids in pool.imap(_plain_encode, f, 32):
                if ids:
                    writer.add_document(np.array(ids, dtype=dtype))


# ---- measurement -----------------------------------------------------------------------------


def measure(cmd: list[str], with_stderr: bool = False) -> tuple:
    """Run ``cmd``; return (wall s, peak RSS MB of its process tree, CPU s of the tree), and
    its stderr too with ``with_stderr``.

    CPU seconds (user + system of the command and every process it waited for, i.e. the pool
    workers too) barely depend on what else runs on the machine, unlike wall time.
    """
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = root.memory_info().rss
            for child in root.children(recursive=True):
                try:
                    rss += child.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return (wall, peak / 1e6, cpu, err) if with_stderr else (wall, peak / 1e6, cpu)


def checksum(prefix: str) -> str:
    h = hashlib.md5()
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:12]


def count_tokens(prefix: str) -> int:
    from megalite.data.indexed_dataset import IndexedDataset

    return int(IndexedDataset(prefix).sequence_lengths.sum(dtype="int64"))


def run_case(corpus: str, workdir: str, kind: str, flags: list[str], workers: int, plain: bool):
    tag = f"{kind}_w{workers}_{'plain' if plain else 'megalite'}"
    out = os.path.join(workdir, tag)
    if plain:
        args = dict(zip(["tokenizer_type", "tokenizer_model"], flags[1::2]))
        cmd = [sys.executable, __file__, "--run-plain", json.dumps(args), corpus, out, str(workers)]
        prefix = out
    else:
        cmd = [sys.executable, "-m", "megalite.data.preprocess", "--input", corpus]
        cmd += ["--output-prefix", out, "--append-eod", "--workers", str(workers)] + flags
        prefix = out + "_text_document"
    wall, rss, cpu = measure(cmd)
    tokens = count_tokens(prefix)
    result = dict(kind=kind, workers=workers, impl="plain" if plain else "megalite", wall=wall)
    result.update(rss=rss, cpu=cpu, tokens=tokens, checksum=checksum(prefix))
    for ext in (".bin", ".idx"):
        os.remove(prefix + ext)
    return result


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--run-plain":
        _, _, args, corpus, prefix, workers = sys.argv
        return run_plain(corpus, prefix, json.loads(args), int(workers))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/megalite-bench-preprocess")
    p.add_argument("--target-mb", type=float, default=93.0, help="corpus size (>= 50 MB)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizers", nargs="+", default=["sp", "hf"])
    p.add_argument("--repeat", type=int, default=1, help="runs per case, interleaved; best kept")
    p.add_argument("--no-4x", action="store_true", help="skip the 2x / 4x-corpus memory runs")
    p.add_argument("--rss-only", action="store_true", help="only the 1x / 2x / 4x memory runs")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    env_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from make_corpus import build_corpus

    corpus = os.path.join(args.workdir, f"corpus_{args.target_mb:g}mb.jsonl")
    if not os.path.exists(corpus):
        build_corpus(corpus, args.target_mb)
    mb = os.path.getsize(corpus) / 1e6
    flags = train_tokenizers(corpus, args.workdir, args.tokenizers)
    print(f"corpus {corpus}: {mb:.1f} MB, {env_cores} cores", flush=True)
    header = (
        f"{'tokenizer':10} {'workers':>7} {'impl':9} {'seconds':>8} {'MB/s':>7} "
        f"{'Mtok/s':>7} {'CPU s':>7} {'peak RSS MB':>11} {'speedup':>7} {'CPU ratio':>9}  "
        "checksum"
    )
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    for kind in args.tokenizers if not args.rss_only else []:
        for workers in args.workers:
            runs: dict[bool, list] = {True: [], False: []}
            for _ in range(args.repeat):  # interleaved, so both see the same background load
                for plain in (True, False):
                    r = run_case(corpus, args.workdir, kind, flags[kind], workers, plain)
                    runs[plain].append(r)
            base, fast = (min(runs[p], key=lambda r: r["wall"]) for p in (True, False))
            for r, same_kind in ((base, runs[True]), (fast, runs[False])):
                r["rss"] = max(x["rss"] for x in same_kind)
                r["cpu"] = min(x["cpu"] for x in same_kind)
            for r in (base, fast):
                print(
                    f"{kind:10} {workers:>7} {r['impl']:9} {r['wall']:8.2f} {mb / r['wall']:7.1f} "
                    f"{r['tokens'] / r['wall'] / 1e6:7.2f} {r['cpu']:7.1f} {r['rss']:11.0f} "
                    f"{base['wall'] / r['wall']:6.2f}x {base['cpu'] / r['cpu']:8.2f}x  "
                    f"{r['checksum']}",
                    flush=True,
                )
            same = base["checksum"] == fast["checksum"]
            print(f"{'':10} identical output: {'yes' if same else 'NO'}", flush=True)
            rows += [base, fast]
    if not args.no_4x:
        kind = args.tokenizers[0]
        for workers in args.workers:  # each worker's memo is bounded, so memory stays flat
            peaks = []
            for times in (1, 2, 4):
                done = [
                    r
                    for r in rows
                    if (r["impl"], r["workers"], r["kind"]) == ("megalite", workers, kind)
                ]
                if times == 1 and done:
                    peaks.append(done[0]["rss"])
                    continue
                path = repeated(corpus, times)
                peaks.append(run_case(path, args.workdir, kind, flags[kind], workers, False)["rss"])
            shown = ", ".join(f"{p:.0f} MB at {t}x" for p, t in zip(peaks, (1, 2, 4)))
            print(f"peak RSS, megalite {kind} {workers} workers: {shown} ({mb:.0f} MB x)")


def repeated(corpus: str, times: int) -> str:
    """``corpus`` written ``times`` times over into one file (made once, kept in the workdir)."""
    if times == 1:
        return corpus
    path = corpus.replace(".jsonl", f"_x{times}.jsonl")
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as out:
            for _ in range(times):
                with open(corpus, "rb") as f:
                    while block := f.read(1 << 24):
                        out.write(block)
        os.replace(path + ".tmp", path)
    return path


if __name__ == "__main__":
    main()
