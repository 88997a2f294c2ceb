"""Background checkpoint writes (`megalite.checkpoint.async_save`), world size 2 on gloo and one
process killed with SIGKILL in the middle of a background write.

The writers in these tests are the real one (`checkpointing._save`) behind a gate the test
opens, so that "training goes on while the file is written" happens at a known moment.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from megalite.checkpoint import async_save
from megalite.checkpoint import format as ckpt
from megalite.checkpoint.async_save import AsyncCheckpointSaver, to_host
from tests.harness import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def _state(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(100 * rank + step)
    return {
        "model": {"chunk0": {"w": torch.randn(8, 4, generator=g), "b": torch.zeros(4) + step}},
        "optim": {"state": {0: {"exp_avg": torch.randn(8, generator=g), "step": step}}},
    }


def _save_kwargs(state: dict, dp: int) -> dict:
    return dict(
        coords={"tp": 0, "pp": 0, "dp": dp},
        model_state=lambda: state["model"],
        optimizer_state=lambda: state["optim"],
        optimizer_sharded=True,
        rng_state={"torch": torch.get_rng_state()},
        meta={"settings": {}, "model": {}, "consumed_train_samples": 0},
    )


def _gated_writer(gate: Path):
    """Writes once `gate` exists: a file, so that it opens a forked writer's gate too."""

    def write(obj, path):
        deadline = time.monotonic() + 60
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        ckpt._save(obj, path)

    return write


class _Step(torch.optim.Optimizer):
    """A training step's in-place changes, made inside a torch optimizer's step(): the code a
    thread writer's snapshot copy is guaranteed to come before."""

    def __init__(self, state: dict):
        super().__init__([torch.zeros(1, requires_grad=True)], {})
        self.live = state

    @torch.no_grad()
    def step(self, closure=None):
        self.live["model"]["chunk0"]["w"].add_(1000.0)
        self.live["optim"]["state"][0]["exp_avg"].mul_(-1)


def _snapshot_then_train_on(root_async: str, root_sync: str, mode: str):
    """Save iteration 1 synchronously, then iteration 2 in the background while the state is
    changed in place (a training step); returns what each stage of the tracker showed."""
    rank = dist.get_rank()
    state = _state(rank, 1)
    ckpt.save_checkpoint(root_async, 1, **_save_kwargs(state, rank))
    gate = Path(root_async) / f"gate{rank}"
    saver = AsyncCheckpointSaver(writer=_gated_writer(gate), mode=mode)
    state = _state(rank, 2)
    expected = to_host(state)
    real_to_host = async_save.to_host

    def slow_to_host(obj, staging=None):  # a thread writer's copy, slower than the next step
        time.sleep(0.5)
        return real_to_host(obj, staging)

    async_save.to_host = slow_to_host
    try:
        saver.save(root_async, 2, **_save_kwargs(state, rank))
        # "training goes on": an optimizer step changes the live tensors in place right away,
        # before the writer has copied (thread) or written (both) anything
        _Step(state).step()
    finally:
        async_save.to_host = real_to_host
    assert state["model"]["chunk0"]["w"][0, 0] > 500
    polled_while_writing = saver.poll()
    tracker_while_writing = ckpt.read_tracker(root_async)
    gate.touch()
    published = saver.finalize()
    # the same state saved synchronously: the files must be identical in content
    ckpt.save_checkpoint(root_sync, 2, **_save_kwargs(expected, rank))
    out = {}
    for root in (root_async, root_sync):
        folder, meta = ckpt.load_meta(root)
        files = ckpt.load_shard_files(
            folder, {"tp": 0, "pp": 0, "dp": rank}, optim=True, optimizer_sharded=True, rng=True
        )
        out[root] = (meta["iteration"], files["optimizer"], files["model"])
    return polled_while_writing, tracker_while_writing, published, expected, out


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_background_save_writes_the_snapshot_and_publishes_last(tmp_path, mode):
    a, s = str(tmp_path / "async"), str(tmp_path / "sync")
    results = run_distributed(2, _snapshot_then_train_on, a, s, mode)
    for polled, tracker, published, expected, out in results:
        assert polled is None, "poll() published a save whose writer had not finished"
        assert tracker == 1, "the tracker moved before every rank's files were durable"
        assert published == 2 and ckpt.read_tracker(a) == 2
        it_a, optim_a, model_a = out[a]
        it_s, optim_s, model_s = out[s]
        assert it_a == it_s == 2
        assert_close(optim_a, expected["optim"], rtol=0, atol=0)
        assert_close(optim_a, optim_s, rtol=0, atol=0)
        assert_close(model_a, model_s, rtol=0, atol=0)  # dp rank 0's model file
    assert not (Path(a) / "iter_0000002.tmp").exists()


def _one_rank_fails(root: str, mode: str):
    rank = dist.get_rank()
    state = _state(rank, 1)
    ckpt.save_checkpoint(root, 1, **_save_kwargs(state, rank))

    def broken(obj, path):
        if rank == 1:
            raise OSError(28, "No space left on device", str(path))
        ckpt._save(obj, path)

    saver = AsyncCheckpointSaver(writer=broken, mode=mode)
    saver.save(root, 2, **_save_kwargs(state, rank))
    try:
        saver.finalize()
    except ckpt.CheckpointError as e:
        return str(e), ckpt.read_tracker(root)
    return None, ckpt.read_tracker(root)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_a_failed_background_write_on_one_rank_fails_every_rank_and_keeps_the_previous(
    tmp_path, mode
):
    root = str(tmp_path / "ck")
    results = run_distributed(2, _one_rank_fails, root, mode)
    for message, tracker in results:
        assert message is not None and "rank 1: OSError" in message, message
        assert "iteration 1 is intact" in message
        assert tracker == 1
    assert not (Path(root) / "iter_0000002.tmp").exists()
    assert not (Path(root) / "iter_0000002").exists()


KILLED_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from megalite.checkpoint.async_save import AsyncCheckpointSaver
    from megalite.checkpoint import format as ckpt

    root, flag, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    def kw(step):
        return dict(coords={"tp": 0, "pp": 0, "dp": 0},
                    model_state=lambda: {"chunk0": {"w": torch.full((256, 256), float(step))}},
                    optimizer_state=lambda: {"state": {0: {"m": torch.full((256,), float(step))}}},
                    optimizer_sharded=False, rng_state={"torch": torch.get_rng_state()},
                    meta={"settings": {}, "model": {}, "consumed_train_samples": step})
    saver = AsyncCheckpointSaver()
    saver.save(root, 1, **kw(1))
    saver.finalize()

    def stuck(obj, path):  # writes half a file, then "the disk is slow"
        with open(path, "wb") as f:
            f.write(b"PK\\x03\\x04 half a zip")
        flag.write_text(str(path))
        time.sleep(600)

    saver = AsyncCheckpointSaver(writer=stuck, mode=mode)
    saver.save(root, 2, **kw(2))
    while True:  # training goes on
        time.sleep(0.05)
    """
)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_sigkill_during_a_background_write_leaves_the_previous_checkpoint_loadable(tmp_path, mode):
    root, flag = tmp_path / "ck", tmp_path / "writing"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(root), str(flag), mode],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert child.poll() is None, f"child died early: {child.stderr.read()}"
            assert time.monotonic() < deadline, "the background write never started"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert Path(flag.read_text()).parent.parent.name == "iter_0000002.tmp"
    assert ckpt.read_tracker(root) == 1
    folder, meta = ckpt.load_meta(root)
    assert meta["consumed_train_samples"] == 1
    files = ckpt.load_shard_files(
        folder, {"tp": 0, "pp": 0, "dp": 0}, optim=True, optimizer_sharded=False, rng=True
    )
    assert_close(files["model"]["chunk0"]["w"], torch.full((256, 256), 1.0))
    assert_close(files["optimizer"]["state"][0]["m"], torch.full((256,), 1.0))
    # the next save clears the half-written folder and publishes normally
    saver = AsyncCheckpointSaver()
    saver.save(root, 2, **_save_kwargs(_state(0, 2), 0))
    assert saver.finalize() == 2 and ckpt.read_tracker(root) == 2


def test_to_host_copies_every_tensor_and_keeps_the_structure():
    live = {"a": [torch.ones(3), (torch.zeros(2), 5)], "b": "x", "c": None}
    copy = to_host(live)
    live["a"][0].add_(1)
    assert_close(copy["a"][0], torch.ones(3))
    assert copy["a"][1][1] == 5 and copy["b"] == "x" and copy["c"] is None
    assert isinstance(copy["a"][1], tuple)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_host_from_device_is_exact():
    x = torch.randn(1000, device="cuda")
    assert_close(to_host({"x": x})["x"], x.cpu(), rtol=0, atol=0)


def test_to_host_reuses_the_staging_buffers_of_the_previous_call():
    live = {"w": torch.ones(4, 3), "m": [torch.zeros(5)], "s": torch.tensor(1.0)}
    staging: dict = {}
    first = to_host(live, staging)
    live["w"].add_(1)
    live["m"][0].sub_(2)
    second = to_host(live, staging)
    assert second["w"] is not live["w"] and second["w"].data_ptr() == first["w"].data_ptr()
    assert second["m"][0].data_ptr() == first["m"][0].data_ptr()
    assert_close(second, live, rtol=0, atol=0)
    live["w"] = torch.ones(2, 2)  # another shape at the same place: a new buffer
    third = to_host(live, staging)
    assert third["w"].shape == (2, 2) and third["w"].data_ptr() != first["w"].data_ptr()


def test_to_host_staging_takes_transposed_and_expanded_tensors():
    base = torch.arange(6.0).reshape(2, 3)
    live = {"t": base.t(), "e": torch.ones(3).expand(4, 3)}
    staging: dict = {}
    for _ in range(2):
        assert_close(to_host(live, staging), live, rtol=0, atol=0)
