"""Preprocessing across nodes: shard sets per task, merged == one process over the same shards.

The first test drives ``megalite.data.shards`` in-process; the second runs
slurm/preprocess.sbatch as a real Slurm job array on the local cluster (tests/slurm_local),
fails one task on a bad shard, reruns it alone and merges.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megalite.data.preprocess import main as preprocess_main
from megalite.data.shards import main as shards_main
from megalite.data.shards import plan_sets
from tests.test_data_common import EDGE_CASES, stdlib_text, train_byte_level_bpe

ROOT = Path(__file__).resolve().parents[1]


def _make_shards(folder: Path, docs: list[str], n: int = 7) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    step = len(docs) // n + 1
    for i in range(n):
        lines = "".join(json.dumps({"text": t}) + "\n" for t in docs[i * step : (i + 1) * step])
        if i % 2:
            with gzip.open(folder / f"shard{i:02d}.jsonl.gz", "wt", encoding="utf-8") as f:
                f.write(lines)
        else:
            (folder / f"shard{i:02d}.jsonl").write_text(lines, encoding="utf-8")


def _bytes(prefix) -> list[bytes]:
    return [Path(f"{prefix}_text_document{e}").read_bytes() for e in (".bin", ".idx")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    bpe = train_byte_level_bpe(str(d / "bpe"))
    _make_shards(d / "in", EDGE_CASES + stdlib_text(60_000))
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model"]
    flags += [bpe["tokenizer_json"], "--append-eod"]
    single = str(d / "single")
    assert preprocess_main(["--input", str(d / "in"), "--output-prefix", single] + flags) == 0
    return {"dir": d, "flags": flags, "single": single, "tokenizer": bpe["tokenizer_json"]}


def test_plan_sets_are_consecutive_and_balanced(tmp_path):
    paths = []
    for i, size in enumerate([10, 10, 10, 100, 10, 10, 10, 10]):
        paths.append(str(tmp_path / f"{i}"))
        Path(paths[-1]).write_bytes(b"x" * size)
    sets = plan_sets(paths, 3)
    assert [p for s in sets for p in s] == paths and all(sets)
    assert sets[1] == [paths[3]]  # the big shard alone
    assert len(plan_sets(paths, 8)) == 8
    with pytest.raises(ValueError, match="--task-count 9: must be between 1 and the 8 shards"):
        plan_sets(paths, 9)


def test_tasks_then_merge_equal_one_process(corpus, tmp_path, capsys):
    work, out = str(tmp_path / "work"), str(tmp_path / "merged")
    common = ["--input", str(corpus["dir"] / "in"), "--output-prefix", out] + corpus["flags"]
    for i in range(3):
        assert shards_main(["task", "--work-dir", work, "--task-index", str(i)]
                           + ["--task-count", "3"] + common) == 0  # fmt: skip
    assert shards_main(["task", "--work-dir", work, "--task-index", "1", "--task-count", "3"]
                       + common) == 0  # fmt: skip
    assert "task 1: already done" in capsys.readouterr().err
    assert shards_main(["merge", "--work-dir", work, "--output-prefix", out]) == 0
    assert _bytes(out) == _bytes(corpus["single"])
    # a different task count against the same work dir is refused
    assert shards_main(["task", "--work-dir", work, "--task-index", "0", "--task-count", "4"]
                       + common) == 1  # fmt: skip
    assert "use a new --work-dir" in capsys.readouterr().err


# ---- the real Slurm job array ------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    from tests.test_slurm import DOWN, ENV, UP

    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root")
    env = dict(os.environ, **ENV)
    up = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, f"local Slurm did not start:\n{up.stdout}\n{up.stderr}"
    yield env
    subprocess.run(["bash", str(DOWN)], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_job_array_equals_one_process(corpus, slurm, tmp_path):
    from tests.test_slurm import _submit, _wait

    shards = tmp_path / "in"
    _make_shards(shards, EDGE_CASES + stdlib_text(60_000))
    bad = shards / "shard02.jsonl"
    good_text = bad.read_text(encoding="utf-8")
    bad.write_text(good_text + '{"text": "broken\n', encoding="utf-8")  # task 1 fails on it
    out = tmp_path / "merged"
    env = dict(
        slurm,
        PYTHON=sys.executable,
        PYTHONPATH=str(ROOT),
        INPUT=str(shards),
        OUTPUT_PREFIX=str(out),
        TOKENIZER_TYPE="HuggingFaceTokenizer",
        TOKENIZER_MODEL=corpus["tokenizer"],
        NUM_TASKS="3",
        WORKERS="1",
    )
    sbatch = str(ROOT / "slurm/preprocess.sbatch")
    logs = f"--output={tmp_path}/%A_%a.out"
    submit = subprocess.run(
        ["bash", sbatch], env=dict(env, SBATCH_ARGS=f"--cpus-per-task=1 {logs}"),
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    array, merge = [w for w in submit.stdout.split() if w.isdigit()]
    for task in range(3):
        state = _wait(f"{array}_{task}", 180)
        assert state == ("FAILED" if task == 1 else "COMPLETED"), (task, state, _logs(tmp_path))
    _wait(merge, 5)  # never runs: its dependency cannot be met
    subprocess.run(["scancel", merge], timeout=30)
    done = sorted(p.name for p in (tmp_path / "merged.work").glob("*.done"))
    assert done == ["task00000.done", "task00002.done"]
    stamps = {n: os.stat(tmp_path / "merged.work" / n).st_mtime_ns for n in done}

    bad.write_text(good_text, encoding="utf-8")  # fix the shard, rerun task 1 alone
    state = _wait(_submit(["--array=1", "--cpus-per-task=1", logs, sbatch], env, tmp_path), 240)
    assert state == "COMPLETED", _logs(tmp_path)
    merge_env = dict(env, STAGE="merge")
    state = _wait(_submit(["--cpus-per-task=1", logs, sbatch], merge_env, tmp_path), 120)
    assert state == "COMPLETED", _logs(tmp_path)
    assert stamps == {n: os.stat(tmp_path / "merged.work" / n).st_mtime_ns for n in done}
    assert _bytes(out) == _bytes(corpus["single"])


def _logs(folder: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(folder.glob("*.out")))
