"""Bad input, end to end through `megalite-pretrain`: a clear message, a non-zero exit on every
rank, and nothing already saved lost.

Each case runs `pretrain([...])` on a gloo pool (world size 2 unless stated) with
``--save C --load C``, C a copy of a real checkpoint (iteration 2 of the tiny model at DP=2),
and checks the message, every rank's exit status, and that every file of C is byte-identical
afterwards (no new iteration, no leftover temporary folder). The tokenizer case runs the console
script itself in a subprocess (world size 1) to pin the real process exit status.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megalite.check import Layout, ModelSpec, pretrain_argv
from tests.harness import run_distributed

SPEC = ModelSpec(train_iters=2)
SAVED_ITERATION = 2


def _pretrain(argv: list[str], full_disk: str | None = None) -> tuple[int, str]:
    """On every rank: pretrain(argv) -> (status, what it printed to stderr).

    `full_disk`: checkpoint files whose name contains it fail to write with ENOSPC on this rank,
    as a full disk would (only on the ranks that write such a file).
    """
    from megalite.checkpoint import format as ckpt
    from megalite.pretrain import pretrain

    real_save = ckpt._save

    def save_or_disk_full(obj, path):
        if full_disk is not None and full_disk in path.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(obj, path)

    ckpt._save = save_or_disk_full
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            status = pretrain(argv)
    finally:
        ckpt._save = real_save
    return status, err.getvalue()


def _flags(layout: Layout, folder: Path, **changes) -> list[str]:
    """The tiny model's flags at `layout`; `changes` ("hidden_size": 64, ...) override it."""
    spec = ModelSpec(**{**SPEC.__dict__, **{k: v for k, v in changes.items() if k != "drop"}})
    argv = pretrain_argv(layout, spec, folder)
    return [a for a in argv if a.split("=")[0] not in changes.get("drop", ())]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A complete checkpoint: the tiny model after 2 iterations at DP=2 (world size 2)."""
    root = tmp_path_factory.mktemp("saved")
    argv = _flags(Layout(dp=2), root) + [f"--save={root / 'ckpt'}"]
    statuses = run_distributed(2, _pretrain, argv, timeout=180)
    assert [s for s, _ in statuses] == [0, 0], statuses
    assert (root / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    return root / "ckpt"


@pytest.fixture
def ckpt_copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def fails_cleanly(
    argv: list[str], ckpt: Path, message: str, world: int = 2, load: bool = True, **kw
) -> list[str]:
    """Run with --save (and --load) `ckpt` on `world` ranks; every rank exits 2, `message` is
    printed, `ckpt` is untouched. Returns each rank's stderr."""
    before = _snapshot(ckpt)
    argv = argv + [f"--save={ckpt}"] + ([f"--load={ckpt}"] if load else [])
    results = run_distributed(world, _pretrain, argv, timeout=120, **kw)
    statuses, errors = [s for s, _ in results], [e for _, e in results]
    assert statuses == [2] * world, f"exit statuses {statuses}\n" + "\n".join(errors)
    assert message in errors[0], f"expected {message!r} in rank 0's stderr:\n{errors[0]}"
    assert "Traceback" not in errors[0], errors[0]  # a user error, not a crash
    assert _snapshot(ckpt) == before, "the saved checkpoint changed"
    return errors


def test_world_size_not_divisible_by_tp_x_pp(ckpt_copy, tmp_path):
    argv = _flags(Layout(tp=2, pp=2), tmp_path)
    fails_cleanly(argv, ckpt_copy, "world size 2 is not divisible by tensor-model-parallel size")


@pytest.mark.parametrize(
    "layout, changes, message",
    [
        (Layout(tp=2), {"num_attention_heads": 3, "hidden_size": 48},
         "--num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2"),
        (Layout(dp=2), {"hidden_size": 30},
         "--hidden-size 30 is not divisible by --num-attention-heads 4"),
        (Layout(pp=2), {"num_layers": 3},
         "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"),
        (Layout(dp=2), {"vocab_size": 1}, "--vocab-size 1 must be >= 2"),
        (Layout(dp=2), {"global_batch_size": 6},
         "--global-batch-size 6 must equal --micro-batch-size 2 x data-parallel size 2"),
    ],
    ids=["heads-by-tp", "hidden-by-heads", "layers-by-pp", "vocab", "batch-by-dp"],
)  # fmt: skip
def test_sizes_that_do_not_divide(layout, changes, message, ckpt_copy, tmp_path):
    fails_cleanly(_flags(layout, tmp_path, **changes), ckpt_copy, message)


def _tiny_dataset(prefix: Path, vocab: int = 128) -> None:
    from megalite.data.indexed_dataset import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(str(prefix)) as w:
        for _ in range(64):
            w.add_document(rng.integers(0, vocab, size=int(rng.integers(20, 60))))


def _data_flags(tmp_path: Path, prefix: str) -> list[str]:
    """Real data through NullTokenizer (whose vocabulary, V + 1 with its eod, differs from the
    saved mock-data model's: these runs save into the checkpoint folder but do not load it)."""
    argv = _flags(Layout(dp=2), tmp_path, drop=("--mock-data",))
    return argv + [f"--data-path={prefix}", "--tokenizer-type=NullTokenizer", "--split=98,2,0"]


def test_data_path_missing(ckpt_copy, tmp_path):
    missing = tmp_path / "nowhere" / "corpus_text_document"
    fails_cleanly(_data_flags(tmp_path, str(missing)), ckpt_copy, f"{missing}.idx", load=False)


def test_truncated_idx(ckpt_copy, tmp_path):
    prefix = tmp_path / "corpus_text_document"
    _tiny_dataset(prefix)
    idx = Path(f"{prefix}.idx")
    idx.write_bytes(idx.read_bytes()[:-100])  # a copy cut short
    errors = fails_cleanly(_data_flags(tmp_path, str(prefix)), ckpt_copy, str(idx), load=False)
    assert "truncated" in errors[0] or "bytes" in errors[0], errors[0]


def test_tokenizer_file_missing(ckpt_copy, tmp_path):
    """World size 1, the real console entry point in a subprocess: exit status 2, one line."""
    prefix = tmp_path / "corpus_text_document"
    _tiny_dataset(prefix)
    missing = tmp_path / "tok.model"
    argv = _flags(Layout(), tmp_path, drop=("--mock-data", "--vocab-size"))
    argv += [f"--data-path={prefix}", "--tokenizer-type=SentencePieceTokenizer",
             f"--tokenizer-model={missing}"]  # fmt: skip
    argv += [f"--save={ckpt_copy}", f"--load={ckpt_copy}"]
    before = _snapshot(ckpt_copy)
    run = subprocess.run(
        [sys.executable, "-m", "megalite.pretrain", *argv],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert f"--tokenizer-model {missing}: no such file" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert _snapshot(ckpt_copy) == before


def test_load_with_a_different_model_shape(ckpt_copy, tmp_path):
    argv = _flags(Layout(dp=2), tmp_path, hidden_size=64)
    fails_cleanly(argv, ckpt_copy, "--hidden-size: checkpoint 32, this run 64")


@pytest.mark.parametrize("layout, flag", [(Layout(tp=2), "tensor"), (Layout(pp=2), "pipeline")])
def test_load_with_a_different_tp_or_pp(layout, flag, ckpt_copy, tmp_path):
    errors = fails_cleanly(
        _flags(layout, tmp_path),
        ckpt_copy,
        f"--{flag}-model-parallel-size: checkpoint 1, this run 2",
    )
    assert "tools/checkpoint_reshard.py" in errors[0]


class _Payload:
    """Unpickling this creates a file: proof that a loader executed the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_object_in_checkpoint_is_refused_never_executed(ckpt_copy, tmp_path):
    target = ckpt_copy / f"iter_{SAVED_ITERATION:07d}" / "mp_rank_00_000" / "model.pt"
    marker = tmp_path / "executed"
    target.write_bytes(pickle.dumps({"chunk0": _Payload(marker)}))
    fails_cleanly(_flags(Layout(dp=2), tmp_path), ckpt_copy, f"refusing to load {target}")
    assert not marker.exists(), "the pickled payload ran"


def test_nan_loss_in_bf16_stops_with_the_iteration(tmp_path):
    """An absurd learning rate in bf16: the first update is finite (and saved), the next
    iteration's loss is not; training stops naming that iteration, the saved one intact."""
    ckpt = tmp_path / "ckpt"
    argv = _flags(Layout(dp=2, bf16=True), tmp_path, train_iters=20, lr=1e10)
    argv += [f"--save={ckpt}", "--save-interval=1", "--clip-grad=0"]
    results = run_distributed(2, _pretrain, argv, timeout=120)
    assert [s for s, _ in results] == [2, 2], results
    found = [e for _, e in results if "NaN/inf at iteration" in e]
    assert found, results
    bad = int(found[0].split("NaN/inf at iteration ")[1].split()[0])
    assert bad >= 2, found[0]
    last = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert last == bad - 1, (last, bad)
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir())[-1] == f"iter_{last:07d}"


def test_disk_full_while_saving_keeps_the_previous_checkpoint(ckpt_copy, tmp_path):
    """Resume at iteration 2, train to 4; rank 1's write of its RNG file hits a full disk."""
    argv = _flags(Layout(dp=2), tmp_path, train_iters=4)
    errors = fails_cleanly(argv, ckpt_copy, "No space left on device", full_disk="rng_dp001")
    assert f"iteration {SAVED_ITERATION} is intact" in errors[0]
    assert "rank 1" in errors[0]


def test_token_ids_outside_the_vocabulary(ckpt_copy, tmp_path):
    """Data tokenized for a bigger vocabulary: a clear error naming the sample, not an
    IndexError (TP=1) or an inf loss that trains on (TP=2)."""
    prefix = tmp_path / "corpus_text_document"
    _tiny_dataset(prefix, vocab=500)
    argv = _data_flags(tmp_path, str(prefix)) + ["--vocab-size=100"]
    errors = fails_cleanly(argv, ckpt_copy, "outside the vocabulary of 101", load=False)
    assert "holds token id" in errors[1]


def test_a_corrupt_shard_on_one_rank_fails_every_rank_with_its_reason(ckpt_copy, tmp_path):
    """Only DP rank 1 reads rng_dp001.pt: every rank must still stop with rank 1's reason
    (loads agree like saves do), instead of rank 0 seeing a peer vanish or hanging."""
    shard = ckpt_copy / f"iter_{SAVED_ITERATION:07d}" / "mp_rank_00_000" / "rng_dp001.pt"
    shard.write_bytes(b"not a checkpoint")
    errors = fails_cleanly(_flags(Layout(dp=2), tmp_path), ckpt_copy, "rank 1: refusing to load")
    assert str(shard) in errors[0] and str(shard) in errors[1]
