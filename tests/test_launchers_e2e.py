"""The example launch scripts train for real: torchrun, mpiexec, and the deepspeed launcher.

Each multi-process run is compared with a one-process run of the same script (NPROC/NP=1,
TP=PP=1, same model and flags, dropout off): every iteration's loss and gradient norm must
agree to fp32 round-off, so a launcher that wires ranks wrongly (two ranks reading the same
data, a DP group of the wrong size) fails here instead of merely training.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megalite.check import FP32_TOLERANCE, max_relative_deviation

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(script: str, env_extra: dict, flags: list[str], tmp_path: Path) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    metrics = tmp_path / "metrics.jsonl"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), **env_extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "examples" / script),
            *flags,
            "--metrics-file",
            str(metrics),
            "--log-interval",
            "1",
            "--distributed-timeout-minutes",
            "2",
            "--hidden-dropout",
            "0",
            "--attention-dropout",
            "0",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def _same_as_one_process(rows: list[dict], one: list[dict]) -> None:
    assert [r["iteration"] for r in rows] == [r["iteration"] for r in one]
    for key in ("lm_loss", "grad_norm"):
        want, got = [r[key] for r in one], [r[key] for r in rows]
        deviation = max_relative_deviation(want, got)
        assert deviation < FP32_TOLERANCE, f"{key}: one process {want}, launcher {got}"
    # the weights move, or agreeing after "updates" would prove little
    assert abs(one[-1]["lm_loss"] - one[0]["lm_loss"]) > 1e-3, one


def test_torchrun_example(tmp_path):
    flags = ["--train-iters", "3"]
    rows = _run("pretrain_torchrun.sh", dict(NPROC="4", TP="2", PP="2"), flags, tmp_path / "4")
    one = _run("pretrain_torchrun.sh", dict(NPROC="1", TP="1", PP="1"), flags, tmp_path / "1")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    _same_as_one_process(rows, one)


def test_mpiexec_example(tmp_path):
    flags = ["--train-iters", "3"]
    rows = _run("pretrain_mpiexec.sh", dict(NP="4", TP="2", PP="2"), flags, tmp_path / "4")
    one = _run("pretrain_mpiexec.sh", dict(NP="1", TP="1", PP="1"), flags, tmp_path / "1")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    _same_as_one_process(rows, one)


def test_deepspeed_launcher_example(tmp_path):
    port = 29600 + os.getpid() % 1000
    flags = ["--train-iters", "3"]
    env = dict(ZERO="2", TP="1", MASTER_PORT=str(port))
    rows = _run("pretrain_deepspeed.sh", dict(env, NPROC="2"), flags, tmp_path / "2")
    one = _run("pretrain_deepspeed.sh", dict(env, NPROC="1"), flags, tmp_path / "1")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    _same_as_one_process(rows, one)
