"""The layout parity matrix: `megalite-pretrain` at every layout gives the one-process losses.

Each layout trains the tiny model of `megalite.check.ModelSpec` (4 layers, hidden 32, 4 heads,
seq 16, vocab 128, global batch 8) for 10 iterations in fp32 with dropout 0, through
`pretrain([...])` on a gloo pool of exactly that layout's world size, and every iteration's loss
must be within a relative 1e-5 of the one-process run's (bf16: `megalite.check.BF16_TOLERANCE`,
compared with a one-process bf16 run). World sizes: 1 (references), 2, 4 and 8 as named per case.
The flags come from `megalite.check.pretrain_argv`, so this also pins what `megalite-check` runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megalite.check import (
    BF16_TOLERANCE,
    FP32_TOLERANCE,
    Layout,
    ModelSpec,
    max_relative_deviation,
    parse_layout,
    pretrain_argv,
    read_losses,
)
from tests.harness import run_distributed

SPEC = ModelSpec(train_iters=10)
# Layouts on 2 ranks stay in the quick run; the 4- and 8-rank ones and DeepSpeed are slow.
QUICK = ["tp2", "pp2", "dp2z1"]
SLOW = [
    "tp4", "tp2sp", "pp4", "pp2vp2", "dp2", "dp2z2", "tp2pp2", "tp2dp2", "pp2dp2",
    "tp2pp2dp2z1", "dp2ds1", "dp2ds2", "dp2ds3", "tp2pp2bf16",
    "dp2ep2", "tp2dp2ep2sp", "pp2dp2ep2z1a2a",
]  # fmt: skip


def _pretrain(argv: list[str]) -> int:
    """Runs on every rank of the pool: the real entry point, inside the live process group."""
    from megalite.pretrain import pretrain

    return pretrain(argv)


def train_losses(layout: Layout, folder: Path) -> list[float]:
    """Train SPEC at `layout` on a pool of its world size; the loss of every iteration."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = folder / "metrics.jsonl"
    argv = pretrain_argv(layout, SPEC, folder) + [f"--metrics-file={metrics}"]
    statuses = run_distributed(layout.world_size, _pretrain, argv, timeout=300)
    assert statuses == [0] * layout.world_size, f"{layout.name}: exit statuses {statuses}"
    losses = read_losses(metrics)
    assert len(losses) == SPEC.train_iters, losses
    return losses


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """One-process losses, computed once per precision on first use."""
    cache: dict = {}

    def get(layout: Layout) -> list[float]:
        ref = layout.reference()
        if ref not in cache:
            cache[ref] = train_losses(ref, tmp_path_factory.mktemp(f"ref-{ref.name}"))
        return cache[ref]

    return get


def _check(name: str, references, tmp_path: Path) -> None:
    layout = parse_layout(name)
    if layout.ds is not None:
        pytest.importorskip("deepspeed")  # conftest already set DS_ACCELERATOR=cpu
    ref = references(layout)
    losses = train_losses(layout, tmp_path)
    tolerance = BF16_TOLERANCE if layout.bf16 else FP32_TOLERANCE
    deviation = max_relative_deviation(ref, losses)
    assert deviation < tolerance, (
        f"{name}: max relative deviation {deviation:.3e} >= {tolerance:g}\n"
        f"one process: {ref}\n{name}: {losses}"
    )
    # the loss must move, or agreeing would prove nothing
    assert ref[-1] < ref[0] - 0.01, ref


@pytest.mark.parametrize("name", QUICK)
def test_layout_matches_one_process(name, references, tmp_path):
    _check(name, references, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_layout_matches_one_process_slow(name, references, tmp_path):
    _check(name, references, tmp_path)


def test_bf16_deviates_beyond_the_fp32_tolerance(references, tmp_path):
    """The fp32 bound is tight enough to catch a real difference: bf16 vs fp32 breaks it."""
    fp32 = references(Layout())
    bf16 = references(Layout(bf16=True))
    assert max_relative_deviation(fp32, bf16) > FP32_TOLERANCE
