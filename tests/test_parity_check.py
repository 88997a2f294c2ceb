"""`megalite-check` itself (layout syntax, comparison, the CLI with its spawned ranks) and the two
benchmark scripts it sits beside (`tools/bench_overhead.py`, `tools/bench_mfu.py --tiny`), so
that CI keeps them working. World sizes: the CLI spawns 1 and 2 ranks; the scripts run on 1.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megalite.check import (
    STANDARD_MATRIX,
    Layout,
    LayoutSyntaxError,
    max_relative_deviation,
    parse_layout,
)
from megalite.check import main as check_main
from tests.harness import run_distributed

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text, layout, world",
    [
        ("1", Layout(), 1),
        ("tp2pp2dp2z1", Layout(tp=2, pp=2, dp=2, zero=1), 8),
        ("dp2tp2", Layout(tp=2, dp=2), 4),
        ("tp2sp", Layout(tp=2, sp=True), 2),
        ("pp2vp2", Layout(pp=2, vp=2), 2),
        ("dp2ds3", Layout(dp=2, ds=3), 2),
        ("TP2PP2BF16", Layout(tp=2, pp=2, bf16=True), 4),
    ],
)
def test_layout_syntax(text, layout, world):
    parsed = parse_layout(text)
    assert parsed == layout and parsed.world_size == world
    assert parse_layout(parsed.name) == parsed  # the printed name reads back
    assert parsed.reference() == Layout(bf16=layout.bf16)


@pytest.mark.parametrize(
    "text, message",
    [
        ("tp2x", "cannot read 'x'"),
        ("tp2tp4", "tp given twice"),
        ("sp", "sp needs tp > 1"),
        ("vp2", "vp needs pp > 1"),
        ("pp2ds2", "pp1 only"),
        ("dp2z1ds1", "exclude each other"),
        ("tp0", "tp must be >= 1"),
        ("dp2z3", "z must be 0, 1 or 2"),
    ],
)
def test_bad_layouts_are_named(text, message):
    with pytest.raises(LayoutSyntaxError, match=message):
        parse_layout(text)


def test_standard_matrix_covers_the_issue():
    names = {parse_layout(n).name for n in STANDARD_MATRIX}
    assert names == set(STANDARD_MATRIX)  # every name is canonical
    assert max(parse_layout(n).world_size for n in STANDARD_MATRIX) == 8


def test_max_relative_deviation():
    assert max_relative_deviation([2.0, 4.0], [2.0, 4.0]) == 0.0
    assert max_relative_deviation([2.0, 4.0], [2.0, 4.4]) == pytest.approx(0.1)
    assert max_relative_deviation([2.0, 4.0], [2.0]) == math.inf  # a run that stopped early
    assert max_relative_deviation([2.0], [math.nan]) == math.inf


def _check(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megalite.check", *argv],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip


def test_cli_refuses_a_bad_layout_before_running_anything():
    run = _check("tp2q")
    assert run.returncode == 2 and "layout 'tp2q': cannot read 'q'" in run.stderr


def test_layouts_the_model_cannot_take_are_named_before_any_rank_starts(tmp_path, capsys):
    """megalite-pretrain's own validation, in the checking process: exit 2, no run folder."""
    with pytest.raises(SystemExit) as e:
        check_main(["tp3", "pp8", "pp2vp4", "dp2", f"--workdir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "tp3: --num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3" in err
    assert "pp8: --num-layers 4 is not divisible by --pipeline-model-parallel-size 8" in err
    assert "pp2vp4: 4 layers do not split into pp2 x vp4 chunks" in err
    assert "dp2:" not in err
    assert not list(tmp_path.rglob("metrics.jsonl"))


@pytest.mark.slow
def test_cli_table_and_exit_status(tmp_path):
    """Spawns 1 + 1 + 2 + 2 ranks: tp2 passes; tp2 in bf16 against a tolerance of 1e-12 (bf16
    rounds TP's partial sums differently) is reported and makes the exit status 1."""
    run = _check("tp2", "tp2bf16", "--iters=3", "--bf16-tolerance=1e-12",
                 f"--workdir={tmp_path}")  # fmt: skip
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isalnum()}
    assert rows["1"][-1] == "ok" and rows["bf16"][-1] == "ok", out
    assert rows["tp2"][-1] == "ok" and float(rows["tp2"][3]) < 1e-5, out
    assert float(rows["tp2"][4]) < 1e-5, out  # grad norms compared too
    assert rows["tp2bf16"][-1] == "DEVIATES", out
    assert "3/4 ok" in out
    assert len((tmp_path / "tp2" / "metrics.jsonl").read_text().splitlines()) == 3


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_mfu_tiny() -> dict:
    return _load_tool("bench_mfu").main(["--tiny", "--peak-tflops=2.0", "--steps=2"])


def test_bench_mfu_tiny_runs_on_cpu():
    """World size 1: the CPU configuration of the MFU script; its numbers agree."""
    (out,) = run_distributed(1, _bench_mfu_tiny, timeout=120)
    assert out["tokens_per_s"] == pytest.approx(4 * 64 / out["step_s"])
    assert out["tflops"] == pytest.approx(out["flops_per_step"] / out["step_s"] / 1e12)
    assert out["mfu"] == pytest.approx(out["tflops"] / 2.0)
    assert math.isfinite(out["last_loss"]) and out["parameters"] > 0


def _bench_overhead_tiny() -> float:
    argv = ["--num-layers=2", "--hidden-size=32", "--num-attention-heads=4", "--seq-length=16",
            "--vocab-size=256", "--batch=2", "--rounds=2", "--steps=2"]  # fmt: skip
    return _load_tool("bench_overhead").main(argv)


def test_bench_overhead_plain_loop_computes_the_same_loss():
    """World size 1: the plain PyTorch twin loads megalite's weights and gives the same first
    loss (the script exits otherwise), so the ratio compares the same math."""
    (ratio,) = run_distributed(1, _bench_overhead_tiny, timeout=120)
    assert ratio > 0


def test_a_grad_norm_deviation_alone_fails_the_layout():
    """A uniform gradient-scale bug: same losses, doubled grad norms -> DEVIATES, exit 1."""
    from megalite.check import Result, format_table, parse_layout

    ref = Result(parse_layout("1"), [4.0, 3.9], 0.01, grad_norms=[1.0, 1.1])
    bug = Result(parse_layout("dp2"), [4.0, 3.9], 0.01, grad_norms=[2.0, 2.2])
    bug.deviation = max_relative_deviation(ref.losses, bug.losses)
    bug.norm_deviation = max_relative_deviation(ref.grad_norms, bug.grad_norms)
    table = format_table([ref, bug], {False: 1e-5, True: 2e-3})
    row = [line.split() for line in table.splitlines() if line.startswith("dp2")][0]
    assert row[3] == "0.00e+00" and row[4] == "1.00e+00" and row[-1] == "DEVIATES", table
