"""Summarize a training run: loss curve from --metrics-file against the unigram baseline.

    python tools/quickstart_report.py --metrics runs/qs/metrics.jsonl --data-prefix P

The unigram baseline is the entropy (nats/token) of the token frequencies of the dataset: the
loss of a model that ignores context. A model that learned anything sits well below it.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np


def unigram_entropy(prefix: str) -> float:
    from megalite.data.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    tokens = np.frombuffer(ds._bin, dtype=ds.dtype)  # all tokens back to back
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--data-prefix", required=True)
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in open(args.metrics)]
    train = [r for r in rows if r.get("split") != "valid"]
    valid = [r for r in rows if r.get("split") == "valid"]
    base = unigram_entropy(args.data_prefix)
    print(f"unigram baseline: {base:.3f} nats/token (ppl {math.exp(base):.1f})")
    step = max(1, len(train) // 8)
    for r in train[::step] + ([train[-1]] if (len(train) - 1) % step else []):
        print(
            f"  iteration {r['iteration']:>5}  lm loss {r['lm_loss']:.3f}  "
            f"tokens/s {r['tokens_per_sec']:.0f}"
        )
    if valid:
        v = valid[-1]
        print(f"  validation at {v['iteration']}: lm loss {v['lm_loss']:.3f}")
    final = train[-1]["lm_loss"]
    print(f"final lm loss {final:.3f} = {final - base:+.3f} nats vs the unigram baseline")
    return 0 if final < base else 1


if __name__ == "__main__":
    raise SystemExit(main())
