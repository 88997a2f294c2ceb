"""Launcher detection (pure env parsing); real mpiexec / torchrun runs of TP=2 x PP=2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megalite import parallel_state as ps
from megalite.distributed import detect_launch, expand_nodelist

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("node[03-05,7]", ["node03", "node04", "node05", "node7"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("gpu-[009-011]-ib", ["gpu-009-ib", "gpu-010-ib", "gpu-011-ib"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("x[1,3],y[08-09],z", ["x1", "x3", "y08", "y09", "z"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-2", "node1-2]", "node[a-b]", "node[5-3]"])
def test_expand_nodelist_rejects_garbage(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


def test_detect_torchrun():
    env = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="h0", MASTER_PORT="1234")
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("torchrun", 3, 8, 1)
    assert (info.master_addr, info.master_port) == ("h0", 1234)


def test_detect_slurm_step():
    env = dict(
        SLURM_PROCID="5",
        SLURM_STEP_ID="0",
        SLURM_STEP_NUM_TASKS="8",
        SLURM_NTASKS="16",
        SLURM_LOCALID="1",
        SLURM_STEP_NODELIST="gpu[07-08]",
        SLURM_JOB_ID="4242",
    )
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 5, 8, 1)
    assert info.master_addr == "gpu07" and info.master_port == 20000 + 4242


def test_slurm_batch_script_without_srun_is_single_process():
    # In the batch script itself SLURM_PROCID=0 is set but no step: one process, not rank 0 of N.
    env = dict(SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_NODELIST="n[1-2]", SLURM_JOB_ID="1")
    assert detect_launch(env).launcher == "single"


def test_torchrun_inside_slurm_wins():
    env = dict(RANK="2", WORLD_SIZE="4", SLURM_PROCID="0", SLURM_STEP_ID="0", SLURM_NODELIST="n1")
    assert detect_launch(env).launcher == "torchrun"


@pytest.mark.parametrize(
    "env, expect",
    [
        (
            dict(
                OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="0"
            ),
            (2, 4, 0),
        ),
        (dict(PMI_RANK="1", PMI_SIZE="2", MPI_LOCALRANKID="1"), (1, 2, 1)),
        (dict(PMIX_RANK="3", PMIX_SIZE="4"), (3, 4, 0)),
    ],
)
def test_detect_mpi(env, expect):
    info = detect_launch(env)
    assert info.launcher == "mpi" and (info.rank, info.world_size, info.local_rank) == expect


def test_detect_single():
    info = detect_launch({})
    assert (info.launcher, info.rank, info.world_size) == ("single", 0, 1)


def _check_layout_json(path: Path, launcher: str, world: int, tp: int, pp: int):
    ranks = json.loads(path.read_text())
    expected = ps.group_ranks(world, tp, pp)
    assert [r["rank"] for r in ranks] == list(range(world))
    for r in ranks:
        assert r["launcher"] == launcher
        for kind in ("tp", "pp", "dp", "mp", "embedding"):
            mine = [g for g in expected[kind] if r["rank"] in g]
            assert r["groups"][kind] == mine[0], (kind, r)


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_mpiexec_brings_up_tp2_pp2(tmp_path):
    mpiexec = BIN / "mpiexec"
    if not mpiexec.exists():
        mpiexec = shutil.which("mpiexec")
    assert mpiexec, "mpiexec not found: install the 'mpi' extra (mpi4py + mpich)"
    out = _run(
        [
            str(mpiexec),
            "-n",
            "4",
            sys.executable,
            str(ROOT / "examples/show_layout.py"),
            "--tp",
            "2",
            "--pp",
            "2",
            "--backend",
            "gloo",
            "--json",
            "layout.json",
        ],
        tmp_path,
    )
    assert "world 4 = TP 2 x PP 2 x DP 1" in out
    _check_layout_json(tmp_path / "layout.json", "mpi", 4, 2, 2)


def test_torchrun_brings_up_tp2_pp2(tmp_path):
    out = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "4",
            "--standalone",
            str(ROOT / "examples/show_layout.py"),
            "--tp",
            "2",
            "--pp",
            "2",
            "--backend",
            "gloo",
            "--json",
            "layout.json",
        ],
        tmp_path,
    )
    assert "world 4 = TP 2 x PP 2 x DP 1" in out
    _check_layout_json(tmp_path / "layout.json", "torchrun", 4, 2, 2)
