"""Weighted mixtures of datasets: ``--data-path 0.3 A 0.7 B``.

``BlendedDataset(datasets, weights, size)`` takes exactly ``blend_counts(weights, size)``
samples from each dataset (largest-remainder rounding, so the counts sum to ``size`` and each is
within one sample of ``weight * size``), interleaved evenly: the k-th sample of dataset d sits at
fraction (k + 1/2) / count_d of the way through, and the datasets are merged by that fraction.
Any prefix of the order is therefore within about one sample per dataset of the weights, too.
Items are those of the underlying datasets (see ``gpt_dataset``). The order depends only on the
weights and the size, so it is the same on every rank; it is cached like the other indices.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from megalite.data.index_cache import cached_arrays


def parse_data_path(data_path: list[str]) -> tuple[Optional[list[float]], list[str]]:
    """``["A"]`` / ``["A", "B"]`` -> (None, prefixes); ``["0.3", "A", "0.7", "B"]`` ->
    (normalised weights, prefixes)."""
    if isinstance(data_path, str):
        data_path = data_path.split()
    if not data_path:
        raise ValueError("--data-path is empty")

    def number(s: str) -> Optional[float]:
        try:
            return float(s)
        except ValueError:
            return None

    if number(data_path[0]) is None:
        return None, list(data_path)
    if len(data_path) % 2:
        raise ValueError(f"--data-path {' '.join(data_path)}: expected weight prefix pairs")
    weights = [number(w) for w in data_path[0::2]]
    prefixes = list(data_path[1::2])
    if any(w is None or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--data-path {' '.join(data_path)}: weights must be numbers >= 0")
    return [w / sum(weights) for w in weights], prefixes


def blend_counts(weights: list[float], size: int) -> np.ndarray:
    """[len(weights)] int64 counts summing to ``size``, each floor or ceil of weight * size."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * size
    counts = np.floor(exact).astype(np.int64)
    short = size - int(counts.sum())
    if short:  # largest remainders first; ties to the earlier dataset
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def build_blend_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index [size] int16, dataset_sample_index [size] int64), evenly interleaved."""
    counts = blend_counts(weights, size)
    which = np.repeat(np.arange(len(counts), dtype=np.int16), counts)
    within = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
    position = (within + 0.5) / np.repeat(np.maximum(counts, 1), counts)
    order = np.argsort(position, kind="stable")  # stable: ties go to the earlier dataset
    return which[order], within[order]


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``; a dataset may be
    None only when its weight is 0. Dataset d must hold at least its blend count of samples."""

    def __init__(
        self,
        datasets: list,
        weights: list[float],
        size: int,
        name: str = "blend",
        cache_path: Optional[str] = None,
        is_builder: Optional[Callable[[], bool]] = None,
        barrier: Optional[Callable[[], None]] = None,
    ):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        counts = blend_counts(weights, size)
        for d, (ds, c) in enumerate(zip(datasets, counts)):
            if c and (ds is None or len(ds) < c):
                have = 0 if ds is None else len(ds)
                raise ValueError(f"{name}: dataset {d} has {have} samples, the blend needs {c}")
        self.datasets, self.weights, self.size = datasets, list(weights), size
        description = {"name": f"{name} order", "weights": self.weights, "size": size}
        if cache_path is None:
            first = next(ds for ds in datasets if ds is not None)
            cache_path = getattr(first, "cache_path", None)
        arrays = cached_arrays(
            description,
            ("dataset_index", "dataset_sample_index"),
            lambda: dict(zip(("dataset_index", "dataset_sample_index"), self._build())),
            cache_path,
            is_builder,
            barrier,
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def _build(self) -> tuple[np.ndarray, np.ndarray]:
        return build_blend_indices(self.weights, self.size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} of {self.size}")
        d = int(self.dataset_index[idx])
        return self.datasets[d][int(self.dataset_sample_index[idx])]
