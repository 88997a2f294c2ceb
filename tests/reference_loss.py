"""Losses computed outside the trainer, to check what the trainer reports.

`checkpoint_loss` rebuilds a saved checkpoint as one single-process model (every TP/PP shard
joined) and evaluates it on one global batch of mock data, the batch a run starting at
`consumed` samples trains on first. The trainer's loss is the mean over every token of the
global batch (equal-size micro-batches), which is what this returns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from megalite.checkpoint.layout import config_from_meta, true_vocab_size
from megalite.checkpoint.reshard import load_full_model
from megalite.model import build_model
from megalite.training.data import MockGPTDataset, collate


def mock_batch(seed: int, seq_length: int, vocab_size: int, consumed: int, global_batch: int):
    """The global batch at `consumed` of `--mock-data` with these flags: {"tokens", "labels"}."""
    dataset = MockGPTDataset(consumed + global_batch, seq_length, vocab_size, seed)
    return collate(dataset, list(range(consumed, consumed + global_batch)))


@torch.no_grad()
def checkpoint_loss(load: str | os.PathLike, batch: dict) -> float:
    """Mean per-token loss of the newest checkpoint in `load` on `batch`, in one process."""
    meta, full = load_full_model(load)
    (model,) = build_model(config_from_meta(meta, 1, 1, None), 0, use_parallel_state=False)
    model.load_state_dict(full, strict=True)
    # the joined model keeps the saved padded vocabulary; padding rows are not real tokens
    logits = model.eval()(batch["tokens"])[..., : true_vocab_size(meta)].float()
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).item()


def first_metrics(path: Path) -> dict:
    """The first training line of a --metrics-file."""
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        if record.get("split", "train") == "train":
            return record
    raise AssertionError(f"{path} holds no training line")
