"""Runs that stop early and come back: exit signals, time budgets, async saves, DeepSpeed resume.

Every resumed run is compared with a run that was never interrupted: the same loss (and grad
norm) at every iteration, bit for bit on CPU. World sizes: 2 (quick ones) and 2/4 (DeepSpeed).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from megalite.check import spawn_ranks, wait_all
from megalite.checkpoint import format as ckpt
from tests.harness import run_distributed

pytestmark = pytest.mark.extended

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --mock-data --vocab-size 128 "
    "--log-interval 1 --eval-iters 0 --distributed-timeout-minutes 2 --seed 7"
).split()


def _pretrain(argv):
    from megalite.pretrain import pretrain

    return pretrain(argv)


def _curve(path: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [(r["iteration"], r["lm_loss"], r["grad_norm"]) for r in rows if "split" not in r]


def _straight(argv: list[str], tmp_path: Path, world: int = 2) -> list:
    path = tmp_path / "straight.jsonl"
    assert run_distributed(world, _pretrain, argv + ["--metrics-file", str(path)]) == [0] * world
    return _curve(path)


@pytest.mark.slow
def test_a_signal_mid_run_saves_exits_0_and_the_resumed_run_matches(tmp_path):
    """World size 2 (DP 2, ZeRO-1), independent processes: SIGTERM reaches rank 1 only, at
    iteration >= 3 of 40; both ranks save the same iteration and exit 0, the log says why; the
    resumed run's losses and grad norms equal an uninterrupted run's."""
    base = TINY + ["--train-iters", "40", "--zero-stage", "1"]
    ck, first, second = tmp_path / "ck", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    argv = base + ["--save", str(ck), "--exit-signal-handler", "--metrics-file", str(first)]
    procs = spawn_ranks(2, argv, tmp_path / "logs")
    try:
        deadline = time.monotonic() + 240
        while not first.exists() or len(first.read_text().splitlines()) < 3:
            assert all(p.poll() is None for p in procs), "a rank ended before the signal"
            assert time.monotonic() < deadline, "training did not reach iteration 3"
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGTERM)
        codes = wait_all(procs, timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert codes == [0, 0], f"exit codes {codes}:\n{log[-3000:]}"
    stopped = ckpt.read_tracker(ck)
    assert stopped is not None and 3 <= stopped < 40, stopped
    assert f"stopping at iteration {stopped}: received SIGTERM (--exit-signal-handler)" in log
    assert [i for i, _, _ in _curve(first)] == list(range(1, stopped + 1))

    argv = base + ["--load", str(ck), "--metrics-file", str(second)]
    assert run_distributed(2, _pretrain, argv) == [0, 0]
    straight = _straight(base, tmp_path)
    assert _curve(first) + _curve(second) == straight


def _signal_during_save(argv: list[str]) -> int:
    """Sends this process SIGTERM from inside the first checkpoint file write."""
    from megalite.checkpoint import format as fmt

    write = fmt._save
    sent = []

    def signalling(obj, path):
        if not sent:
            sent.append(path)
            os.kill(os.getpid(), signal.SIGTERM)
        return write(obj, path)

    fmt._save = signalling
    try:
        return _pretrain(argv)
    finally:
        fmt._save = write


def test_a_signal_during_a_save_finishes_that_save_first(tmp_path):
    """World size 2: SIGTERM arrives while the iteration-3 checkpoint is being written; the save
    completes (tracker 3, every file loads), then the run stops there and exits 0."""
    ck, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    argv = TINY + ["--train-iters", "10", "--save", str(ck), "--save-interval", "3"]
    argv += ["--exit-signal-handler", "--metrics-file", str(metrics)]
    assert run_distributed(2, _signal_during_save, argv) == [0, 0]
    assert ckpt.read_tracker(ck) == 3
    assert [i for i, _, _ in _curve(metrics)] == [1, 2, 3]
    folder, meta = ckpt.load_meta(ck)
    assert meta["iteration"] == 3
    for dp in (0, 1):
        ckpt.load_shard_files(
            folder, {"tp": 0, "pp": 0, "dp": dp}, optim=True, optimizer_sharded=False, rng=True
        )
    assert not (ck / "iter_0000003.tmp").exists()


def test_the_time_budget_stops_every_rank_after_a_save(tmp_path, capfd):
    """World size 2: a budget already spent when the first iteration ends stops the run there,
    with a checkpoint of iteration 1, exit 0 and the reason in the log."""
    ck = tmp_path / "ck"
    argv = TINY + ["--train-iters", "10", "--save", str(ck), "--exit-duration-in-mins", "1e-6"]
    assert run_distributed(2, _pretrain, argv) == [0, 0]
    assert ckpt.read_tracker(ck) == 1


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_async_saves_resume_exactly(tmp_path, writer, monkeypatch):
    """World size 2 (TP 2): --async-save every 2 iterations, stop at 5 (--exit-interval); the
    tracker names 5 (the last save is published before exit) and resuming to 8 gives the
    uninterrupted run's curve."""
    base = TINY + ["--train-iters", "8", "--tensor-model-parallel-size", "2"]
    ck, first, second = tmp_path / "ck", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    argv = base + ["--save", str(ck), "--save-interval", "2", "--async-save"]
    legs = argv + ["--exit-interval", "5", "--metrics-file", str(first)]
    assert run_distributed(2, _pretrain_with_writer, writer, legs) == [0, 0]
    assert ckpt.read_tracker(ck) == 5
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000002", "iter_0000004", "iter_0000005"
    ]  # fmt: skip
    argv = base + ["--load", str(ck), "--metrics-file", str(second)]
    assert run_distributed(2, _pretrain, argv) == [0, 0]
    assert _curve(first) + _curve(second) == _straight(base, tmp_path)


def _pretrain_with_writer(mode: str, argv):
    """pretrain with the background writer of `mode` ("process" or "thread")."""
    from megalite.checkpoint import async_save

    init = async_save.AsyncCheckpointSaver.__init__

    def forced(self, writer=None, mode_=None, priority="idle"):
        init(self, writer, mode, priority)

    async_save.AsyncCheckpointSaver.__init__ = forced
    try:
        return _pretrain(argv)
    finally:
        async_save.AsyncCheckpointSaver.__init__ = init


# --- DeepSpeed ---------------------------------------------------------------------------------
def _ds_flags(tmp_path: Path, stage: int) -> list[str]:
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    path = tmp_path / f"ds{stage}.json"
    path.write_text(json.dumps({"zero_optimization": zero, "steps_per_print": 10**9}))
    return ["--deepspeed", "--deepspeed_config", str(path)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_resume_is_bit_exact(tmp_path, stage):
    """World size 2 (DP 2): 20 iterations straight == 10 + save + resume + 10, ZeRO 1/2/3."""
    pytest.importorskip("deepspeed")
    base = TINY + ["--train-iters", "20"] + _ds_flags(tmp_path, stage)
    ck, first, second = tmp_path / "ck", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    legs = ["--save", str(ck), "--load", str(ck)]
    argv = base + legs + ["--exit-interval", "10", "--metrics-file", str(first)]
    assert run_distributed(2, _pretrain, argv, timeout=300) == [0, 0]
    assert ckpt.read_tracker(ck) == 10
    argv = base + legs + ["--metrics-file", str(second)]
    assert run_distributed(2, _pretrain, argv, timeout=300) == [0, 0]
    straight = _straight(base, tmp_path)
    assert [i for i, _, _ in straight] == list(range(1, 21))
    assert _curve(first) + _curve(second) == straight


@pytest.mark.slow
def test_deepspeed_zero3_at_dp4_resumes_at_dp2_and_on_megalite_zero1(tmp_path):
    """A ZeRO-3 checkpoint taken at DP 4 (world 4) resumes at DP 2 on DeepSpeed ZeRO-3 and on
    megalite's own ZeRO-1 (world 2), and megalite-reshard turns it into TP 2 x PP 2 (world 4):
    the per-parameter format does not depend on the partitioning. Same global batch, so the
    curves match the DP-4 uninterrupted run to fp32
    round-off (dropout off: its masks depend on the DP layout)."""
    pytest.importorskip("deepspeed")
    from megalite.check import FP32_TOLERANCE, max_relative_deviation

    base = TINY + ["--train-iters", "8", "--hidden-dropout", "0", "--attention-dropout", "0"]
    ds = _ds_flags(tmp_path, 3)
    ck = tmp_path / "ck"
    argv = base + ds + ["--save", str(ck), "--exit-interval", "4"]
    assert run_distributed(4, _pretrain, argv, timeout=300) == [0] * 4
    straight = _straight(base + ds, tmp_path, world=4)
    # megalite-reshard reads it like any megalite checkpoint: TP 1 -> TP 2 x PP 2 (world 4)
    from megalite.checkpoint.reshard import reshard

    resharded = tmp_path / "tp2pp2"
    reshard(ck, resharded, 2, 2)
    legs = (
        ("ds3", ds, ck, 2),
        ("zero1", ["--zero-stage", "1"], ck, 2),
        ("tp2pp2", ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
         resharded, 4),
    )  # fmt: skip
    for name, flags, load, world in legs:
        metrics = tmp_path / f"{name}.jsonl"
        argv = base + flags + ["--load", str(load), "--metrics-file", str(metrics)]
        assert run_distributed(world, _pretrain, argv, timeout=300) == [0] * world
        got = _curve(metrics)
        assert [i for i, _, _ in got] == [5, 6, 7, 8]
        for k in (1, 2):
            want = [row[k] for row in straight[4:]]
            deviation = max_relative_deviation(want, [row[k] for row in got])
            assert deviation < FP32_TOLERANCE, f"{name}: {want} vs {got}"
