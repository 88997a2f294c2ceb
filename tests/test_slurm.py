"""Real Slurm: a local cluster of two simulated nodes (tests/slurm_local) runs slurm/*.sbatch.

Needs root (it starts slurmctld, two slurmd and munge, installing Debian's packages if missing);
skipped otherwise. Both launch modes of slurm/pretrain.sbatch are checked: srun starting one task
per rank, and srun starting one torchrun per node.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UP = ROOT / "tests/slurm_local/local_slurm_up.sh"
DOWN = ROOT / "tests/slurm_local/local_slurm_down.sh"
ENV = dict(SLURM_LOCAL_NNODES="2", SLURM_LOCAL_CPUS="4", SLURM_LOCAL_GPUS="2")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root")
    env = dict(os.environ, **ENV)
    # a cluster already up (another test session on this machine uses it) is left running: its
    # teardown would cancel that session's jobs mid-run
    was_up = subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=30)
    up = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"local Slurm did not start:\n{up.stdout}\n{up.stderr}"
    yield env
    if was_up.returncode != 0:
        subprocess.run(["bash", str(DOWN)], env=env, capture_output=True, timeout=120)


def _submit(args: list[str], env: dict, cwd: Path) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _wait(job: str, timeout: float = 300) -> str:
    """Poll scontrol (sbatch --wait polls slowly here) until the job ends; its final state."""
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        info = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30
        ).stdout
        m = re.search(r"JobState=(\w+)", info)
        state = m.group(1) if m else state
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1.0)
    subprocess.run(["scancel", job], timeout=30)
    return f"still {state} after {timeout:.0f}s (cancelled)"


@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_pretrain_sbatch_on_two_nodes(slurm, tmp_path, mode):
    env = dict(slurm, MODE=mode, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    log = tmp_path / f"{mode}.out"
    job = _submit(
        [
            "--nodes=2",
            "--ntasks-per-node=2",
            "--gpus-per-node=2",
            f"--output={log}",
            str(ROOT / "slurm/pretrain.sbatch"),
        ],
        env,
        tmp_path,
    )
    state = _wait(job)
    text = log.read_text() if log.exists() else "(no log)"
    assert state == "COMPLETED", f"job {job} {state}:\n{text[-4000:]}"
    assert f"mode {mode}" in text
    assert "placement: n1: ranks 0-1; n2: ranks 2-3" in text
    assert re.search(r"iteration\s+20/20 \| consumed samples 320 \| lm loss", text)
    assert "node n1: rank 0 finished iterations 1..20" in text
    assert "node n2: rank 2 finished iterations 1..20" in text


def test_preprocess_sbatch(slurm, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"{i} {i + 1} {i + 2}"}) + "\n" for i in range(50))
    )
    env = dict(
        slurm,
        PYTHON=sys.executable,
        PYTHONPATH=str(ROOT),
        INPUT=str(corpus),
        OUTPUT_PREFIX=str(tmp_path / "out"),
        TOKENIZER_TYPE="NullTokenizer",
        VOCAB_SIZE="100",
        WORKERS="1",
    )
    log = tmp_path / "pre.out"
    job = _submit(
        ["--cpus-per-task=1", f"--output={log}", str(ROOT / "slurm/preprocess.sbatch")],
        env,
        tmp_path,
    )
    state = _wait(job, 180)
    assert state == "COMPLETED", log.read_text() if log.exists() else state
    from megalite.data.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert len(ds) == 50 and ds.get(3).tolist() == [3, 4, 5, 100]  # eod = vocab size


def _losses(path: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["iteration"], r["lm_loss"]) for r in rows if "split" not in r]


@pytest.mark.extended
@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_warning_signal_saves_requeues_and_resumes(slurm, tmp_path, mode):
    """2 nodes x 2 ranks: the batch shell gets USR1 mid-run (as --signal=B:USR1@120 would send
    it before the time limit); the ranks save and exit, the job requeues itself, comes back,
    resumes from the checkpoint and finishes; its per-iteration losses (both legs, one metrics
    file) equal an uninterrupted run's."""
    iters = 200
    args = (
        "--tensor-model-parallel-size 2 --num-layers 2 --hidden-size 32 --num-attention-heads 4 "
        "--seq-length 16 --micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --mock-data "
        f"--vocab-size 128 --log-interval 1 --eval-iters 0 --train-iters {iters} "
        "--hidden-dropout 0 --attention-dropout 0 --distributed-timeout-minutes 2"
    )
    runs = {}
    for name in ("signalled", "straight"):
        metrics = tmp_path / f"{name}.jsonl"
        env = dict(slurm, MODE=mode, PYTHON=sys.executable, PYTHONPATH=str(ROOT),
                   TRAIN_ARGS=f"{args} --metrics-file {metrics}")  # fmt: skip
        if name == "signalled":
            env["SAVE"] = str(tmp_path / "ck")
        log = tmp_path / f"{name}.out"
        job = _submit(
            ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", f"--output={log}",
             str(ROOT / "slurm/pretrain.sbatch")], env, tmp_path,
        )  # fmt: skip
        if name == "signalled":
            deadline = time.monotonic() + 240
            while not metrics.exists() or len(metrics.read_text().splitlines()) < 5:
                assert time.monotonic() < deadline, log.read_text() if log.exists() else job
                time.sleep(0.2)
            signal_out = subprocess.run(
                ["scancel", "--signal=USR1", "--batch", job], capture_output=True, text=True
            )
            assert signal_out.returncode == 0, signal_out.stderr
        state = _wait(job, 480)
        text = log.read_text() if log.exists() else "(no log)"
        assert state == "COMPLETED", f"job {job} {state}:\n{text[-4000:]}"
        runs[name] = (_losses(metrics), text)
    (signalled, text), (straight, _) = runs["signalled"], runs["straight"]
    assert "megalite: warning signal: the ranks save and stop" in text
    assert "megalite: requeueing job" in text and "(restart 1)" in text
    stopped = re.search(r"stopping at iteration (\d+): received SIG(TERM|USR1)", text)
    assert stopped, text[-4000:]
    assert 5 <= int(stopped[1]) < iters
    assert f"loaded checkpoint {tmp_path / 'ck'}/iter_{int(stopped[1]):07d}" in text
    assert [i for i, _ in straight] == list(range(1, iters + 1))
    assert signalled == straight
