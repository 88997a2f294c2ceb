"""GPT samples, splits, cached indices (build once, reuse, rebuild on change), blending."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megalite.data import index_cache
from megalite.data.blended import blend_counts, build_blend_indices, parse_data_path
from megalite.data.gpt_dataset import (
    GPTDataset,
    build_sample_index,
    build_train_valid_test_datasets,
    split_boundaries,
)
from megalite.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter


def _make(prefix, num_docs, seed, base=0):
    """Documents of random length 1..50 whose tokens count up, so any window can be checked."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, 50, size=num_docs)
    with IndexedDatasetWriter(str(prefix), np.int32) as w:
        w.add_documents(base + np.arange(lengths.sum()), lengths)
    return str(prefix)


@pytest.fixture()
def data(tmp_path):
    return {"a": _make(tmp_path / "a", 400, 0), "b": _make(tmp_path / "b", 300, 1, 10**6)}


def test_split_boundaries_like_megatron():
    assert split_boundaries("949,50,1", 1000) == [0, 949, 999, 1000]
    assert split_boundaries("98,2,0", 7) == [0, 7, 7, 7]
    assert split_boundaries("1", 10) == [0, 10, 10, 10]
    with pytest.raises(ValueError, match="--split 'a,b'"):
        split_boundaries("a,b", 10)


def test_sample_index_vectorised_matches_a_token_walk():
    sizes = np.array([3, 0, 5, 1, 7, 2])
    doc_index = np.array([2, 0, 1, 5, 4, 3])
    seq = 4
    idx = build_sample_index(sizes, doc_index, seq, 4)
    walk = [(p, o) for p, d in enumerate(doc_index) for o in range(sizes[d])]
    assert [tuple(x) for x in idx] == [walk[k * seq] for k in range(5)]


def test_samples_are_windows_over_shuffled_documents(data, tmp_path):
    ds = IndexedDataset(data["a"])
    gpt = GPTDataset(ds, "train", (0, 400), 16, 1500, seed=3, cache_path=str(tmp_path / "c"))
    assert len(gpt) == 1500
    item = gpt[7]
    assert item["tokens"].shape == (16,) and item["labels"].shape == (16,)
    assert item["tokens"].dtype == item["labels"].dtype == __import__("torch").int64
    assert item["tokens"][1:].tolist() == item["labels"][:-1].tolist()
    # Each window is the concatenation of the shuffled documents at the recorded positions.
    stream = np.concatenate([ds[int(d)] for d in gpt.document_index])
    for k in (0, 1, 123, 1499):
        s = int(gpt.shuffle_index[k])
        assert gpt.window(k).tolist() == stream[s * 16 : s * 16 + 17].tolist()
    # Every epoch is a permutation of all documents, and epochs differ.
    epochs = np.asarray(gpt.document_index).reshape(-1, 400)
    assert len(epochs) >= 2 and all(sorted(e) == list(range(400)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    assert sorted(gpt.shuffle_index) == sorted(set(gpt.shuffle_index))  # no sample twice


def test_cache_reuse_and_rebuild_on_change(data, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    ds = IndexedDataset(data["a"])
    first = GPTDataset(ds, "train", (0, 300), 32, 100, seed=1, cache_path=cache)
    files = sorted(os.listdir(cache))
    assert len([f for f in files if f.endswith(".npy")]) == 3
    calls = []
    monkeypatch.setattr(GPTDataset, "_build", lambda *a: calls.append(a) or {})
    again = GPTDataset(ds, "train", (0, 300), 32, 100, seed=1, cache_path=cache)
    assert calls == [] and sorted(os.listdir(cache)) == files  # loaded, not rebuilt
    assert np.array_equal(again.shuffle_index, first.shuffle_index)
    assert isinstance(again.shuffle_index, np.memmap)
    monkeypatch.undo()
    GPTDataset(ds, "train", (0, 300), 64, 100, seed=1, cache_path=cache)  # seq_length changed
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 6


def test_one_builder_and_a_barrier(data, tmp_path):
    """Simulated ranks: only the builder writes; the others wait at the barrier and load."""
    cache, ds, events = str(tmp_path / "cache"), IndexedDataset(data["a"]), []
    follower_kwargs = dict(
        cache_path=cache,
        is_builder=lambda: False,
        barrier=lambda: events.append(("barrier", os.path.isdir(cache))),
    )
    builder = GPTDataset(
        ds,
        "train",
        (0, 400),
        8,
        50,
        seed=2,
        cache_path=cache,
        barrier=lambda: events.append("builder waits"),
    )
    follower = GPTDataset(ds, "train", (0, 400), 8, 50, seed=2, **follower_kwargs)
    # Every rank calls the barrier exactly once, files or not (a collective must match up).
    assert events == ["builder waits", ("barrier", True)]
    assert np.array_equal(builder.shuffle_index, follower.shuffle_index)
    # A follower that arrives first: it waits at the barrier, during which the builder rank
    # writes the files; then it loads them.
    cache2 = str(tmp_path / "cache2")

    def barrier_while_builder_runs():
        events.append(("follower waits", os.path.isdir(cache2)))
        GPTDataset(ds, "train", (0, 400), 8, 50, seed=2, cache_path=cache2)

    early = GPTDataset(
        ds,
        "train",
        (0, 400),
        8,
        50,
        seed=2,
        cache_path=cache2,
        is_builder=lambda: False,
        barrier=barrier_while_builder_runs,
    )
    assert events[-1] == ("follower waits", False)
    assert isinstance(early.shuffle_index, np.memmap)  # loaded from the builder's files
    assert np.array_equal(early.shuffle_index, builder.shuffle_index)
    # An unwritable cache: every rank builds in memory, identically.
    ro = tmp_path / "ro"
    ro.write_text("a file, not a directory")
    a = GPTDataset(ds, "train", (0, 400), 8, 50, seed=2, cache_path=str(ro / "x"))
    assert np.array_equal(a.shuffle_index, builder.shuffle_index)


def test_same_seed_same_order_other_seed_other_order(data, tmp_path):
    def order(seed, cache):
        ds = IndexedDataset(data["a"])
        g = GPTDataset(ds, "train", (0, 400), 8, 200, seed, cache_path=str(tmp_path / cache))
        return [g[i]["tokens"].tolist() for i in range(200)]

    assert order(5, "c1") == order(5, "c2")
    assert order(5, "c1") != order(6, "c1")


def test_blend_counts_and_interleaving():
    counts = blend_counts([0.3, 0.7], 10_001)
    assert counts.sum() == 10_001 and abs(counts[0] - 3000.3) < 1
    which, within = build_blend_indices([0.2, 0.5, 0.3], 10_000)
    for prefix in (100, 1000, 10_000):
        share = np.bincount(which[:prefix], minlength=3) / prefix
        assert np.allclose(share, [0.2, 0.5, 0.3], atol=0.01)
    for d in range(3):
        assert within[which == d].tolist() == list(range((which == d).sum()))
    assert parse_data_path(["0.3", "A", "0.7", "B"]) == ([0.3, 0.7], ["A", "B"])
    assert parse_data_path(["A"]) == (None, ["A"])
    with pytest.raises(ValueError, match="weight prefix pairs"):
        parse_data_path(["0.3", "A", "0.7"])


def test_build_train_valid_test_blended(data, tmp_path):
    kwargs = dict(
        split="90,8,2",
        seq_length=8,
        seed=1234,
        num_samples=(10_000, 500, 10),
        cache_path=str(tmp_path / "cache"),
    )
    path = ["0.3", data["a"], "0.7", data["b"]]
    train, valid, test = build_train_valid_test_datasets(path, **kwargs)
    assert (len(train), len(valid), len(test)) == (10_000, 500, 10)
    # dataset b's tokens are >= 1e6: tell the source of every sample by its first token
    from_b = np.array([train[i]["tokens"][0].item() >= 10**6 for i in range(10_000)])
    assert abs(from_b.mean() - 0.7) < 0.01
    again = build_train_valid_test_datasets(path, **kwargs)[0]
    for i in (0, 17, 9999):
        assert train[i]["tokens"].tolist() == again[i]["tokens"].tolist()
    single = build_train_valid_test_datasets([data["a"]], **kwargs)
    assert isinstance(single[0], GPTDataset) and single[2] is not None
    none_test = build_train_valid_test_datasets([data["a"]], **{**kwargs, "split": "90,10,0"})
    assert none_test[2] is None


def test_dataloader_batches_and_pickling(data, tmp_path):
    import pickle

    import torch

    ds = IndexedDataset(data["a"])
    gpt = GPTDataset(ds, "train", (0, 400), 16, 64, seed=0, cache_path=str(tmp_path / "c"))
    batch = next(iter(torch.utils.data.DataLoader(gpt, batch_size=4)))
    assert batch["tokens"].shape == batch["labels"].shape == (4, 16)
    assert batch["tokens"].dtype == torch.int64
    copy = pickle.loads(pickle.dumps(gpt))  # what a "spawn" DataLoader worker receives
    assert copy[5]["tokens"].tolist() == gpt[5]["tokens"].tolist()


def _ranks_build(path: list[str], cache: str, late_rank: int) -> list[list[int]]:
    """On every rank: build the blended train set with torch.distributed hooks."""
    import time

    import torch.distributed as dist

    if dist.get_rank() == late_rank:
        time.sleep(1.0)  # arrives after the builder has written the files: must not hang
    is_builder, barrier = index_cache.distributed_hooks()
    train, _, _ = build_train_valid_test_datasets(
        path, "90,8,2", 8, 1234, (2000, 100, 10), cache, is_builder, barrier
    )
    return [train[i]["tokens"].tolist() for i in range(0, 2000, 37)]


@pytest.mark.parametrize("late_rank", [0, 1])
def test_every_rank_gets_the_same_order_under_torch_distributed(data, tmp_path, late_rank):
    """World size 2 on gloo: local rank 0 builds, rank 1 loads; identical samples on both."""
    from tests.harness import run_distributed

    cache = str(tmp_path / "cache")
    path = ["0.3", data["a"], "0.7", data["b"]]
    orders = run_distributed(2, _ranks_build, path, cache, late_rank, timeout=120)
    assert orders[0] == orders[1]
    # train, valid, test: 3 index arrays per dataset and 2 for the blend, written once
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 3 * (2 * 3 + 2)


def test_distributed_hooks_single_process():
    is_builder, barrier = index_cache.distributed_hooks()
    assert is_builder() is True and barrier() is None
