"""GPT pretraining samples over Megatron .bin/.idx datasets, with seeded, cached indices.

Item format (what the trainer gets): ``dataset[i]`` is a dict of two torch.int64 tensors

    {"tokens": [seq_length], "labels": [seq_length]}

cut from one window of ``seq_length + 1`` consecutive tokens ``w``: ``tokens = w[:-1]``,
``labels = w[1:]``. Windows run across document boundaries (documents end with eod when
preprocessed with ``--append-eod``); consecutive windows share one token, as in Megatron.

How samples are laid out (all numpy, no per-token Python):
- the split (``--split 949,50,1``) picks a contiguous range of sequences (as Megatron's
  GPTDataset, which splits by sequence: a document is one sequence unless sentence-split, and a
  document without tokens, which has none, takes no part);
- ``document_index``: the split's sequences, one independently shuffled permutation per epoch,
  for as many epochs as ``num_samples`` needs;
- ``sample_index`` [n + 1, 2]: (position in document_index, token offset) where sample k
  starts: token k * seq_length of the concatenated epochs (one ``searchsorted``);
- ``shuffle_index``: a seeded permutation of the samples (the last, partial epoch is shuffled
  apart when it is short, so early training sees whole epochs, as in Megatron).
The three arrays are cached as .npy (see ``index_cache``), keyed by a hash of the data's content
fingerprint, split range, seq_length, seed and num_samples.

Trainer entry point: ``build_train_valid_test_datasets(data_path, split, seq_length, seed,
num_samples, cache_path=None, is_builder=None, barrier=None)``; under torch.distributed pass
``*index_cache.distributed_hooks()`` so one rank per node builds and all ranks load.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import numpy as np
import torch

from megalite.data.index_cache import cached_arrays, fingerprint
from megalite.data.indexed_dataset import IndexedDataset

log = logging.getLogger("megalite.data")
INDEX_VERSION = 1  # bump when the index-building algorithm changes: old caches are not reused
SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """ "949,50,1" -> [0.949, 0.05, 0.001] (missing parts are 0; weights are normalised)."""
    try:
        parts = [float(s) for s in split.replace("/", ",").split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected numbers like 949,50,1") from None
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r}: weights must be >= 0 with a positive sum")
    return [p / sum(parts) for p in parts]


def split_boundaries(split: str, num_sequences: int) -> list[int]:
    """Sequence boundaries [0, a, b, num_sequences] of train/valid/test, rounded as Megatron."""
    bounds = [0]
    for share in parse_split(split):
        bounds.append(bounds[-1] + int(round(share * float(num_sequences))))
    diff = bounds[-1] - num_sequences
    return [bounds[0]] + [b - diff for b in bounds[1:]]


def build_document_index(documents: np.ndarray, num_epochs: int, rng) -> np.ndarray:
    """[num_epochs * len(documents)] int64: each epoch an independent permutation."""
    return np.concatenate([rng.permutation(documents) for _ in range(num_epochs)])


def build_sample_index(
    sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int
) -> np.ndarray:
    """[num_samples + 1, 2] int64: (document_index position, offset) of token k * seq_length.

    Sample k spans entry k to entry k + 1 inclusive: seq_length + 1 tokens.
    """
    lengths = sizes[document_index].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])  # token where each position starts
    targets = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if targets[-1] >= starts[-1]:
        raise ValueError(f"{starts[-1]} tokens cannot hold {num_samples} samples of {seq_length}")
    # 'right' skips zero-length documents: the sample starts in the document that holds the token
    position = np.searchsorted(starts, targets, side="right") - 1
    return np.stack([position, targets - starts[position]], axis=1)


def _num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens hold num_samples windows (each needs one extra token)."""
    if tokens_per_epoch <= 0:
        raise ValueError("the split has no tokens")
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


class GPTDataset(torch.utils.data.Dataset):
    """``num_samples`` windows of ``seq_length + 1`` tokens over sequences [first, last) of one
    indexed dataset (item format in the module docstring)."""

    def __init__(
        self,
        indexed: IndexedDataset,
        name: str,
        sequences: tuple[int, int],
        seq_length: int,
        num_samples: int,
        seed: int,
        cache_path: Optional[str] = None,
        is_builder: Optional[Callable[[], bool]] = None,
        barrier: Optional[Callable[[], None]] = None,
    ):
        if seq_length < 1 or num_samples < 1:
            raise ValueError(f"seq_length {seq_length} and num_samples {num_samples} must be >= 1")
        self.indexed, self.name, self.seq_length = indexed, name, seq_length
        self.num_samples = num_samples
        first_seq, last_seq = int(sequences[0]), int(sequences[1])
        if not 0 <= first_seq <= last_seq <= len(indexed):
            raise ValueError(f"sequences {sequences} of a dataset of {len(indexed)}")
        self.sequences = np.arange(first_seq, last_seq, dtype=np.int64)
        sizes = indexed.sequence_lengths
        description = {
            "name": f"GPTDataset {name} indices",
            "version": INDEX_VERSION,
            "path": os.path.abspath(indexed.prefix),
            "sequences": [first_seq, last_seq],
            "lengths": fingerprint(sizes[first_seq:last_seq]),
            "seq_length": seq_length,
            "num_samples": num_samples,
            "seed": seed,
        }
        if cache_path is None:
            cache_path = os.path.join(os.path.dirname(os.path.abspath(indexed.prefix)), "cache")
        self.cache_path = cache_path
        arrays = cached_arrays(
            description,
            ("document_index", "sample_index", "shuffle_index"),
            lambda: self._build(sizes, seed),
            cache_path,
            is_builder,
            barrier,
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _build(self, sizes: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.RandomState(seed)
        tokens_per_epoch = int(sizes[self.sequences].sum(dtype=np.int64))
        epochs = _num_epochs(tokens_per_epoch, self.seq_length, self.num_samples)
        document_index = build_document_index(self.sequences, epochs, rng)
        total = (epochs * tokens_per_epoch - 1) // self.seq_length  # all whole windows
        sample_index = build_sample_index(sizes, document_index, self.seq_length, total)
        # Shuffle the last epoch apart when it is mostly unused (Megatron's 80% rule).
        before_last = ((epochs - 1) * tokens_per_epoch - 1) // self.seq_length if epochs > 1 else 0
        per_epoch = (tokens_per_epoch - 1) // self.seq_length
        last_needed = self.num_samples - before_last
        if epochs > 1 and per_epoch > 0 and last_needed < 0.8 * per_epoch:
            shuffle = np.concatenate(
                [rng.permutation(before_last), before_last + rng.permutation(total - before_last)]
            )
        else:
            shuffle = rng.permutation(total)
        log.info(
            "%s: %d sequences x %d epochs -> %d samples of %d tokens",
            self.name,
            len(self.sequences),
            epochs,
            self.num_samples,
            self.seq_length,
        )
        return {
            "document_index": document_index,
            "sample_index": sample_index,
            "shuffle_index": shuffle[: self.num_samples].astype(np.int64),
        }

    def __len__(self) -> int:
        return self.num_samples

    def window(self, idx: int) -> np.ndarray:
        """The raw [seq_length + 1] int64 window of sample ``idx``."""
        k = int(self.shuffle_index[idx])
        (d0, o0), (d1, o1) = self.sample_index[k], self.sample_index[k + 1]
        get, docs = self.indexed.get, self.document_index
        if d0 == d1:
            parts = [get(int(docs[d0]), int(o0), int(o1 - o0 + 1))]
        else:
            parts = [get(int(docs[d0]), int(o0))]
            parts += [get(int(docs[d])) for d in range(d0 + 1, d1)]
            parts.append(get(int(docs[d1]), 0, int(o1) + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} of {self.num_samples}")
        w = torch.from_numpy(self.window(idx))
        return {"tokens": w[:-1], "labels": w[1:]}


def build_train_valid_test_datasets(
    data_path: list[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_path: Optional[str] = None,
    is_builder: Optional[Callable[[], bool]] = None,
    barrier: Optional[Callable[[], None]] = None,
) -> tuple:
    """(train, valid, test) datasets for ``--data-path`` and ``--split``.

    ``data_path``: one prefix, or ``[w1, prefix1, w2, prefix2, ...]`` for a weighted blend (or
    several prefixes, weighted by their token counts). ``num_samples``: samples wanted per split.
    A split with no documents or 0 samples is ``None``. Every rank gets identical datasets: the
    indices depend only on the arguments and the data, and are built once per node when
    ``is_builder``/``barrier`` come from ``index_cache.distributed_hooks()``.
    """
    from megalite.data.blended import BlendedDataset, blend_counts, parse_data_path

    weights, prefixes = parse_data_path(data_path)
    indexed = [IndexedDataset(p) for p in prefixes]
    if weights is None:
        tokens = [float(ds.sequence_lengths.sum(dtype=np.int64)) for ds in indexed]
        total = sum(tokens)
        weights = [t / total if total else 1 / len(tokens) for t in tokens]
    common = dict(cache_path=cache_path, is_builder=is_builder, barrier=barrier)
    out = []
    for s, name in enumerate(SPLIT_NAMES):
        n = int(num_samples[s])
        parts = []
        for ds in indexed:
            bounds = split_boundaries(split, len(ds))
            parts.append((bounds[s], bounds[s + 1]))
        if n <= 0 or all(a == b for a, b in parts):
            out.append(None)
            continue
        if len(indexed) == 1:
            out.append(GPTDataset(indexed[0], name, parts[0], seq_length, n, seed, **common))
            continue
        # A dataset whose share of this split is empty drops out; the others keep their ratios.
        w = [wt if a < b else 0.0 for wt, (a, b) in zip(weights, parts)]
        w = [x / sum(w) for x in w]
        counts = blend_counts(w, n)
        datasets = [
            GPTDataset(ds, name, seqs, seq_length, int(c), seed, **common) if c > 0 else None
            for ds, seqs, c in zip(indexed, parts, counts)
        ]
        out.append(BlendedDataset(datasets, w, n, f"blend {name}", **common))
    return tuple(out)
