"""From datasets to micro-batches: which samples each DP rank reads, and mock data.

Global batch `n` is samples ``[consumed, consumed + global_batch)`` of the (already shuffled)
dataset, whatever the layout. It is cut into steps of ``micro_batch x DP`` samples; in each step
DP rank `d` reads the `d`-th run of `micro_batch` samples (Megatron's pretraining sampler). So the
set of samples per iteration is layout-invariant, and resuming from `consumed` continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch

from megalite.errors import UserError


class MockGPTDataset:
    """Synthetic, learnable token sequences: ``(start + step * j) mod vocab``.

    `start` and `step` come from a generator seeded by (seed, index), so sample `i` is the same
    on every rank and every run. A model must read the context to get the step: loss falls
    quickly but not to zero at once. Items as `megalite.data.gpt_dataset`'s:
    ``{"tokens": int64[seq_length], "labels": int64[seq_length]}`` (labels = tokens shifted).
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 0):
        if vocab_size < 2:
            raise ValueError(f"--vocab-size {vocab_size} must be >= 2 for --mock-data")
        self.num_samples, self.seq_length = num_samples, seq_length
        self.vocab_size, self.seed = vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.num_samples:
            raise IndexError(idx)
        rng = np.random.default_rng([self.seed, idx])
        start = int(rng.integers(self.vocab_size))
        step = int(rng.integers(1, min(8, self.vocab_size)))
        j = np.arange(self.seq_length + 1, dtype=np.int64)
        w = torch.from_numpy((start + step * j) % self.vocab_size)
        return {"tokens": w[:-1], "labels": w[1:]}


def microbatch_indices(
    consumed: int, micro_batch: int, dp_size: int, dp_rank: int, num_microbatches: int
) -> list[list[int]]:
    """Sample indices of each of this DP rank's micro-batches for the next global batch."""
    step = micro_batch * dp_size
    return [
        list(
            range(
                consumed + k * step + dp_rank * micro_batch,
                consumed + k * step + (dp_rank + 1) * micro_batch,
            )
        )
        for k in range(num_microbatches)
    ]


class DataError(UserError, ValueError):
    """Data that the model cannot take (a token id outside the vocabulary, ...)."""


def collate(
    dataset,
    indices: list[int],
    device: Optional[torch.device] = None,
    vocab_size: Optional[int] = None,
) -> dict:
    """``{"tokens", "labels"}`` int64 ``[b, s]`` for the samples `indices` (items hold both).

    With `vocab_size`, a token id outside ``[0, vocab_size)`` is a `DataError` naming the
    sample: an embedding lookup would crash on it, and a vocab-parallel loss would be inf.
    """
    n = len(dataset)
    items = [dataset[i % n] for i in indices]  # wraps past the end like a further epoch
    batch = {
        key: torch.stack([torch.as_tensor(it[key], dtype=torch.int64) for it in items])
        for key in ("tokens", "labels")
    }
    if vocab_size is not None:
        ids = torch.cat([batch["tokens"], batch["labels"]], dim=1)
        bad = (ids < 0) | (ids >= vocab_size)
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0])
            value = int(ids[row][bad[row]][0])
            raise DataError(
                f"sample {indices[row]} of {getattr(dataset, 'name', type(dataset).__name__)} "
                f"holds token id {value}, outside the vocabulary of {vocab_size}: was the data "
                f"tokenized with another tokenizer (or --vocab-size too small)? Data that "
                f"megalite's earlier SentencePieceTokenizer wrote holds ids past the model's "
                f"pieces (its added <CLS> <SEP> <EOD> <MASK>..., every document ending in "
                f"<EOD>): train on it with --tokenizer-sentencepiece-legacy"
            )
    if device is not None and device.type != "cpu":
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def microbatch_iterator(
    dataset,
    consumed: int,
    micro_batch: int,
    dp_size: int,
    dp_rank: int,
    num_microbatches: int,
    device: Optional[torch.device] = None,
    vocab_size: Optional[int] = None,
) -> Iterator[dict]:
    """Yields this DP rank's `num_microbatches` batches of the global batch at `consumed`."""
    for idx in microbatch_indices(consumed, micro_batch, dp_size, dp_rank, num_microbatches):
        yield collate(dataset, idx, device, vocab_size)
