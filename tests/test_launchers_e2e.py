"""The example launch scripts train for real: torchrun, mpiexec, and the deepspeed launcher."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(script: str, env_extra: dict, flags: list[str], tmp_path: Path) -> list[dict]:
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
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_torchrun_example(tmp_path):
    rows = _run(
        "pretrain_torchrun.sh", dict(NPROC="4", TP="2", PP="2"), ["--train-iters", "3"], tmp_path
    )
    assert [r["iteration"] for r in rows] == [1, 2, 3]


def test_mpiexec_example(tmp_path):
    rows = _run(
        "pretrain_mpiexec.sh", dict(NP="4", TP="2", PP="2"), ["--train-iters", "3"], tmp_path
    )
    assert [r["iteration"] for r in rows] == [1, 2, 3]


def test_deepspeed_launcher_example(tmp_path):
    rows = _run(
        "pretrain_deepspeed.sh",
        dict(ZERO="2", NPROC="2", TP="1", MASTER_PORT=str(29600 + os.getpid() % 1000)),
        ["--train-iters", "3"],
        tmp_path,
    )
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all(r["lm_loss"] > 0 for r in rows)
