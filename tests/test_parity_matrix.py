"""The layout parity matrix: `megalite-pretrain` at every layout gives the one-process losses.

Each layout trains the tiny model of `megalite.check.ModelSpec` (4 layers, hidden 32, 4 heads,
seq 16, vocab 128, global batch 8) for 10 iterations in fp32 with dropout 0, through
`pretrain([...])` on a gloo pool of exactly that layout's world size, and every iteration's loss
must be within a relative 1e-5 of the one-process run's (bf16: `megalite.check.BF16_TOLERANCE`,
compared with a one-process bf16 run), and so must every iteration's gradient norm: AdamW is
almost blind to a uniform scale of the gradients, so a layout that sums instead of averaging
over DP (or divides by the accumulation steps twice) keeps the one-process losses; only the
gradient norms show it. `test_grad_norms_catch_a_uniform_gradient_scale_bug` proves the check
can fail: the DP bucket reduction is patched (in the test's workers only) to sum.
World sizes: 1 (references), 2, 4 and 8 as named per case.
The flags come from `megalite.check.pretrain_argv`, so this also pins what `megalite-check` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
from torch.testing import assert_close

from megalite.check import (
    BF16_TOLERANCE,
    FP32_TOLERANCE,
    Layout,
    ModelSpec,
    max_relative_deviation,
    parse_layout,
    pretrain_argv,
    read_grad_norms,
    read_losses,
)
from tests.harness import run_distributed


class Run(NamedTuple):
    losses: list[float]
    grad_norms: list[float]


GRAD_NORM_TOLERANCE = {False: FP32_TOLERANCE, True: BF16_TOLERANCE}

SPEC = ModelSpec(train_iters=10)
# Layouts on 2 ranks stay in the quick run; the 4- and 8-rank ones and DeepSpeed are slow.
QUICK = ["tp2", "pp2", "dp2z1"]
SLOW = [
    "tp4", "tp2sp", "pp4", "pp2vp2", "dp2", "dp2z2", "tp2pp2", "tp2dp2", "pp2dp2",
    "tp2pp2dp2z1", "dp2ds1", "dp2ds2", "dp2ds3", "tp2pp2bf16",
    "dp2ep2", "tp2dp2ep2sp", "pp2dp2ep2z1a2a", "cp2dp2ep2z1",
]  # fmt: skip


def _pretrain(argv: list[str], sum_over_dp: bool = False) -> int:
    """Runs on every rank of the pool: the real entry point, inside the live process group.

    `sum_over_dp` plants the bug of the negative control: each DP gradient bucket is multiplied
    by the DP size before the reduction divides it, i.e. gradients are summed over DP instead of
    averaged. The patch lives in this worker only and is undone before returning.
    """
    from megalite.data_parallel import ddp
    from megalite.pretrain import pretrain

    launch = ddp.Bucket.launch

    def summed(self, *args, **kwargs):
        # undo the bucket's division by the DP size: a sum over DP instead of a mean
        divisor = getattr(self, "divisor", None) or args[-1]
        self.materialize()
        self.data.mul_(divisor)
        return launch(self, *args, **kwargs)

    if sum_over_dp:
        ddp.Bucket.launch = summed
    try:
        return pretrain(argv)
    finally:
        ddp.Bucket.launch = launch


def train_run(layout: Layout, folder: Path, sum_over_dp: bool = False) -> Run:
    """Train SPEC at `layout` on a pool of its world size; loss and grad norm of every iteration."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = folder / "metrics.jsonl"
    argv = pretrain_argv(layout, SPEC, folder) + [f"--metrics-file={metrics}"]
    statuses = run_distributed(layout.world_size, _pretrain, argv, sum_over_dp, timeout=300)
    assert statuses == [0] * layout.world_size, f"{layout.name}: exit statuses {statuses}"
    run = Run(read_losses(metrics), read_grad_norms(metrics))
    assert len(run.losses) == len(run.grad_norms) == SPEC.train_iters, run
    return run


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """One-process runs (losses and grad norms), computed once per precision on first use."""
    cache: dict = {}

    def get(layout: Layout) -> Run:
        ref = layout.reference()
        if ref not in cache:
            cache[ref] = train_run(ref, tmp_path_factory.mktemp(f"ref-{ref.name}"))
        return cache[ref]

    return get


def _check(name: str, references, tmp_path: Path) -> None:
    layout = parse_layout(name)
    if layout.ds is not None:
        pytest.importorskip("deepspeed")  # conftest already set DS_ACCELERATOR=cpu
    ref = references(layout)
    run = train_run(layout, tmp_path)
    tolerance = BF16_TOLERANCE if layout.bf16 else FP32_TOLERANCE
    deviation = max_relative_deviation(ref.losses, run.losses)
    assert deviation < tolerance, (
        f"{name}: max relative loss deviation {deviation:.3e} >= {tolerance:g}\n"
        f"one process: {ref.losses}\n{name}: {run.losses}"
    )
    norm_tolerance = GRAD_NORM_TOLERANCE[layout.bf16]
    deviation = max_relative_deviation(ref.grad_norms, run.grad_norms)
    assert deviation < norm_tolerance, (
        f"{name}: max relative grad-norm deviation {deviation:.3e} >= {norm_tolerance:g}\n"
        f"one process: {ref.grad_norms}\n{name}: {run.grad_norms}"
    )
    # the loss must move, or agreeing would prove nothing
    assert ref.losses[-1] < ref.losses[0] - 0.01, ref


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
    assert max_relative_deviation(fp32.losses, bf16.losses) > FP32_TOLERANCE


def test_grad_norms_catch_a_uniform_gradient_scale_bug(references, tmp_path):
    """Negative control, world size 2: gradients summed over DP instead of averaged.

    The grad norms double from the first iteration and the check above fails on them. The
    losses barely move (measured: 1.6e-5 relative after 10 iterations, at the edge of the fp32
    tolerance): AdamW divides the update by the gradient's own scale, so a
    loss-only check would pass it or fail it by luck of round-off.
    """
    layout = parse_layout("dp2")
    ref = references(layout)
    bugged = train_run(layout, tmp_path, sum_over_dp=True)
    ratios = [b / r for b, r in zip(bugged.grad_norms, ref.grad_norms)]
    assert max_relative_deviation(ref.grad_norms, bugged.grad_norms) >= FP32_TOLERANCE
    assert_close(ratios[0], 2.0, rtol=1e-5, atol=0)  # before any update: exactly DP times
    loss_deviation = max_relative_deviation(ref.losses, bugged.losses)
    print(f"sum-over-DP bug: loss deviation {loss_deviation:.2e}, grad-norm ratios {ratios}")
    assert loss_deviation < 1e-3, "AdamW was expected to hide this bug from the loss"
