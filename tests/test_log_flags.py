"""--log-num-zeros-in-grad: the count reaches the log line and the metrics file (world size 1),
and is refused under --deepspeed, whose engine does not count."""

from __future__ import annotations

import json

import pytest

from tests.harness import run_distributed

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--micro-batch-size 2 --global-batch-size 4 --lr 1e-3 --mock-data --vocab-size 128 "
    "--log-interval 1 --eval-iters 0 --distributed-timeout-minutes 2 --seed 7 --train-iters 2 "
    "--untie-embeddings-and-output-weights"
).split()


def _pretrain(argv: list[str]) -> int:
    from megalite.pretrain import pretrain

    return pretrain(argv)


def _pretrain_printing(argv: list[str]) -> tuple[int, str]:
    """`pretrain(argv)` in the pool worker with its stdout caught there: the worker's file
    descriptors belong to whichever test spawned the pool, so capfd here cannot see them."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = _pretrain(argv)
    return status, out.getvalue()


def test_num_zeros_in_grad_is_logged(tmp_path):
    """4 sequences of 16 tokens use at most 64 of the 128 embedding rows: the other rows'
    gradient is exactly zero, so each step counts at least 64 x 32 zeros (and fewer zeros than
    parameters)."""
    metrics = tmp_path / "m.jsonl"
    argv = TINY + ["--log-num-zeros-in-grad", "--metrics-file", str(metrics)]
    [(status, printed)] = run_distributed(1, _pretrain_printing, argv)
    assert status == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert isinstance(r["num_zeros_in_grad"], int)
        assert 64 * 32 <= r["num_zeros_in_grad"] < 128 * 32 * 2
    assert f"num zeros {rows[-1]['num_zeros_in_grad']}" in printed


def test_num_zeros_in_grad_is_refused_under_deepspeed(tmp_path, capsys):
    pytest.importorskip("deepspeed")
    from megalite.pretrain import pretrain

    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 1}}')
    argv = TINY + ["--deepspeed", "--deepspeed_config", str(config), "--log-num-zeros-in-grad"]
    assert pretrain(argv + ["--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--log-num-zeros-in-grad" in err and "--deepspeed" in err, err
