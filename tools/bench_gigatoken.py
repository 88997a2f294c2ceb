"""megalite's preprocessing against Megatron-LM's gigatoken pipeline, on real text here.

    python tools/bench_gigatoken.py          # 93 MB corpus, byte-level BPE, SP-BPE byte fallback
    python tools/bench_gigatoken.py --target-mb 20 --tokenizers hf --repeat 3
    python tools/bench_gigatoken.py --tokenizers hf sp_bf sp --repeat 2 --rss   # docs/benchmarks.md

Implementations, each a separate process tree timed from start to exit (imports included) and
by its own processing time (after imports and tokenizer loading):

* ``exact``: ``megalite-preprocess --workers W --fast-tokenizer exact`` (megalite's own exact
  path: chunk memo + the reference tokenizer): the reference output;
* ``megalite``: the same with ``--fast-tokenizer auto`` (gigatoken behind its self-check where
  exact, else the exact path);
* ``mlm-fast``: Megatron-LM's ``tools/preprocess_data_fast.py`` pipeline, re-written here step
  by step (Megatron-LM is not installed on this machine): a ``spawn`` pool of one process per
  JSON key; in it the imports that script pays (torch, which Megatron's indexed_dataset imports;
  not transformers, which its HuggingFaceTokenizer would add), the tokenizer (for eod and vocab
  size), gigatoken's ``encode_files(JsonlFileSource)`` on all cores (its ``tokenize_files``), an
  eod column concatenated to every document with awkward, the tokens written by a pool of
  threads at their offsets (its ``add_documents_parallel``) and the .idx (one document of one
  sequence per line; an empty line gets its eod too, unlike ``preprocess_data.py``);
* ``megatron-fast``: Megatron-LM's own script, run only when ``--megatron-fast PATH`` names it.

The table prints wall and processing seconds, CPU seconds of the tree (user + system: the
number that holds on a busy machine, where wall times swing), the throughput ratios of
megalite against each other implementation measured in the same run, peak RSS of the tree and
an md5 of the .bin + .idx: equal digests mean byte-identical outputs ("identical" compares with
``exact``; for a difference the number of differing documents is printed). ``--rss`` runs
megalite again on the corpus repeated 4x: peak RSS at 1x and 4x.
Tokenizers are trained on the first ~8 MB of the corpus, 16k vocabulary: ``hf`` byte-level
BPE and ``sp`` SentencePiece BPE as in tools/bench_preprocess.py, ``sp_bf`` SentencePiece BPE
with byte fallback (gigatoken loads only those), run as GPTSentencePieceTokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_preprocess import checksum, measure, repeated, train_tokenizers  # noqa: E402


def _mlm_fast_key(corpus: str, prefix: str, flags: list[str], key: str) -> float:
    """One key of the Megatron-LM fast pipeline (runs in the spawned pool process)."""
    t0 = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    import awkward as ak
    import gigatoken
    import numpy as np
    import torch  # noqa: F401  (Megatron's indexed_dataset imports it)

    from megalite.data.indexed_dataset import best_dtype, write_index
    from megalite.data.tokenizers import build_tokenizer

    args = dict(zip([f[2:].replace("-", "_") for f in flags[0::2]], flags[1::2]))
    tok = build_tokenizer(**args)  # eod and vocab size, as Megatron's builder gives them
    if hasattr(tok, "tok"):
        gt = gigatoken.Tokenizer.from_json(tok.tok.to_str())
    else:
        gt = gigatoken.Tokenizer.from_sentencepiece(tok.model_file)
    t1 = time.perf_counter()
    docs = gt.encode_files(gigatoken.JsonlFileSource([corpus], field=key), parallel=True)
    eod = ak.singletons(ak.Array(np.full(len(docs), tok.eod, dtype=np.uint32)))
    docs = ak.concatenate([docs, eod], axis=1)
    dtype = best_dtype(tok.vocab_size)
    layout = docs.layout
    offsets = np.asarray(layout.offsets, dtype=np.int64)
    flat = np.asarray(layout.content.data)[offsets[0] : offsets[-1]]
    # add_documents_parallel: threads convert and write slices of the tokens at their offsets
    path = f"{prefix}_{key}_document"
    fd = os.open(path + ".bin", os.O_CREAT | os.O_TRUNC | os.O_WRONLY)
    try:
        bounds = np.linspace(0, len(flat), 17).astype(np.int64)

        def write(i: int) -> None:
            a, b = int(bounds[i]), int(bounds[i + 1])
            os.pwrite(fd, flat[a:b].astype(dtype).tobytes(), a * np.dtype(dtype).itemsize)

        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(write, range(16)))
    finally:
        os.close(fd)
    lengths = np.diff(offsets)
    write_index(path + ".idx", dtype, lengths, np.arange(len(lengths) + 1))
    t2 = time.perf_counter()
    print(f"mlm-fast {key}: start-up {t1 - t0:.2f} s, processing {t2 - t1:.2f} s", file=sys.stderr)
    return t2 - t1


def run_mlm_fast(corpus: str, prefix: str, flags: list[str], keys: list[str]) -> None:
    """preprocess_data_fast.py's main: a spawn pool with one process per JSON key."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(len(keys)) as pool:
        seconds = pool.starmap(_mlm_fast_key, [(corpus, prefix, flags, k) for k in keys])
    print(f"mlm-fast: processing {max(seconds):.2f} s", file=sys.stderr)


def train_byte_fallback_sp(corpus: str, workdir: str) -> list[str]:
    """A 16k SentencePiece BPE with byte fallback (what gigatoken loads) on ~8 MB of the corpus,
    as GPTSentencePieceTokenizer flags."""
    path = os.path.join(workdir, "sp_bf.model")
    if not os.path.exists(path):
        import io

        import sentencepiece as spm

        texts, size = [], 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1])
                if size > 8e6:
                    break
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=16000, model_type="bpe",
            byte_fallback=True, input_sentence_size=0, max_sentence_length=1 << 20,
            num_threads=2, minloglevel=2,
        )  # fmt: skip
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    return ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", path]


def processing_seconds(stderr: str) -> float:
    for line in stderr.splitlines():
        if line.startswith("mlm-fast: processing "):
            return float(line.split("processing ")[1].split(" s")[0])
    return float("nan")


def run(impl: str, corpus: str, workdir: str, kind: str, flags: list[str], args) -> dict:
    out = os.path.join(workdir, f"{kind}_{impl}")
    if impl in ("megalite", "exact"):
        cmd = [sys.executable, "-m", "megalite.data.preprocess", "--input", corpus]
        cmd += ["--output-prefix", out, "--append-eod", "--workers", str(args.workers)]
        cmd += flags + ["--log-interval", "0", "--fast-tokenizer", impl.replace("megalite", "auto")]
        prefix = out + "_text_document"
    elif impl == "mlm-fast":
        cmd = [sys.executable, __file__, "--run-mlm-fast", corpus, out, json.dumps(flags)]
        prefix = out + "_text_document"
    else:
        cmd = [sys.executable, args.megatron_fast, "--input", corpus, "--output-prefix", out]
        cmd += ["--append-eod", "--workers", str(args.workers)] + flags
        prefix = out + "_text_document"
    wall, rss, cpu, err = measure(cmd, with_stderr=True)
    if impl in ("megalite", "exact"):
        # "in X s (start-up Y s)" of the summary: from the call of preprocess() (after
        # imports) to the end; processing is what follows the start-up (tokenizer loading,
        # self-check), as mlm-fast's follows its tokenizer loading
        total = float(err.split(" MB in ")[1].split(" s")[0])
        proc = total - float(err.split("(start-up ")[1].split(" s")[0])
        path = next((ln for ln in err.splitlines() if ln.startswith("fast path:")), "")
    else:
        proc, path = processing_seconds(err), ""
    result = dict(impl=impl, kind=kind, wall=wall, proc=proc, rss=rss, cpu=cpu)
    result.update(checksum=checksum(prefix), prefix=prefix, path=path)
    return result


def differing_documents(a: str, b: str) -> int:
    from megalite.data.indexed_dataset import IndexedDataset

    x, y = IndexedDataset(a), IndexedDataset(b)
    if len(x) != len(y):
        return abs(len(x) - len(y))
    return sum(not (x[i].shape == y[i].shape and (x[i] == y[i]).all()) for i in range(len(x)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target-mb", type=float, default=93)
    p.add_argument("--workdir", default="/tmp/megalite_bench_gigatoken")
    p.add_argument(
        "--tokenizers", nargs="+", default=["hf", "sp_bf"], choices=["hf", "sp", "sp_bf"]
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="interleaved runs; best wall kept")
    p.add_argument("--megatron-fast", help="path of Megatron-LM's tools/preprocess_data_fast.py")
    p.add_argument("--rss", action="store_true", help="megalite's peak RSS at 1x and 4x corpus")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    corpus = os.path.join(args.workdir, f"corpus_{args.target_mb:g}mb.jsonl")
    if not os.path.exists(corpus):
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools/make_corpus.py"), "--out", corpus]
            + ["--target-mb", str(args.target_mb)],
            check=True,
        )
    flags = train_tokenizers(corpus, args.workdir, [k for k in args.tokenizers if k != "sp_bf"])
    if "sp_bf" in args.tokenizers:
        flags["sp_bf"] = train_byte_fallback_sp(corpus, args.workdir)
    impls = ["exact", "megalite", "mlm-fast"] + (["megatron-fast"] if args.megatron_fast else [])
    if not args.megatron_fast:
        print("Megatron-LM's tools/preprocess_data_fast.py: not installed here (pass "
              "--megatron-fast PATH to run it); 'mlm-fast' below re-writes its steps")  # fmt: skip
    mb = os.path.getsize(corpus) / 1e6
    print(f"corpus {corpus}: {mb:.1f} MB; {args.workers} megalite workers; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for kind in args.tokenizers:
        best: dict = {}
        for _ in range(args.repeat):
            for impl in impls:
                try:
                    r = run(impl, corpus, args.workdir, kind, flags[kind], args)
                except SystemExit as e:  # gigatoken refuses some models (no byte fallback)
                    print(f"{kind}: {impl} failed: {str(e).strip().splitlines()[-1]}")
                    continue
                if impl in best:  # the best wall run, and the least CPU of all runs
                    r["cpu"] = min(r["cpu"], best[impl]["cpu"])
                if impl not in best or r["wall"] < best[impl]["wall"]:
                    best[impl] = r
                else:
                    best[impl]["cpu"] = r["cpu"]
        ref, ours = best["exact"], best["megalite"]
        print(f"\n{kind}: {ours['path']}")
        print(f"{'impl':>14} {'wall s':>7} {'proc s':>7} {'MB/s':>7} {'CPU s':>6} "
              f"{'RSS MB':>7} {'md5':>13}  identical")  # fmt: skip
        for impl, r in best.items():
            same = r["checksum"] == ref["checksum"]
            note = "yes" if same else f"NO ({differing_documents(ref['prefix'], r['prefix'])} docs)"
            print(f"{impl:>14} {r['wall']:7.2f} {r['proc']:7.2f} {mb / r['proc']:7.1f} "
                  f"{r['cpu']:6.1f} {r['rss']:7.0f} {r['checksum']:>13}  {note}")  # fmt: skip
        for impl, r in best.items():
            if impl != "megalite":
                print(f"throughput megalite / {impl}: wall {r['wall'] / ours['wall']:.2f}x, "
                      f"processing {r['proc'] / ours['proc']:.2f}x, "
                      f"CPU {r['cpu'] / ours['cpu']:.2f}x")  # fmt: skip
        if args.rss:
            peaks = []
            for times in (1, 4):
                r = run("megalite", repeated(corpus, times), args.workdir, kind, flags[kind], args)
                peaks.append(r["rss"])
                os.remove(r["prefix"] + ".bin")
            print(f"peak RSS, megalite {kind}: {peaks[0]:.0f} MB at 1x, {peaks[1]:.0f} MB at 4x "
                  f"({peaks[1] / peaks[0]:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--run-mlm-fast":
        run_mlm_fast(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), ["text"])
    else:
        main()
