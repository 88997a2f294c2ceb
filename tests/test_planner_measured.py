"""megalite-plan against measurement: predicted peak bytes vs the exact storage tracker.

World size 2 (gloo). Each row trains three steps of a tiny GPT with the real model, DDP,
optimizer and schedules (`megalite.planner.measure.measure_layout`) and compares every rank's
steady-state peak with the planner's prediction for its pipeline stage; one row splits the
sequence (context parallelism), one the experts (MoE, EP 2). The full matrix (32 layouts, up to
8 ranks) is tools/bench_plan_memory.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megalite.planner.measure import AllocationTracker, MeasureSpec, measure_layout
from tests.harness import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_plan_memory import predict  # noqa: E402

TOLERANCE = 0.10
ROWS = [
    MeasureSpec(pp=2, num_microbatches=4, vp_layers=1),
    MeasureSpec(tp=2, sequence_parallel=True, recompute="selective", swiglu=True, rope=True),
    MeasureSpec(zero_stage=2, num_microbatches=2, bf16=True),
    MeasureSpec(pp=2, num_microbatches=4, recompute="full", zero_stage=1),
    MeasureSpec(cp=2, num_microbatches=2, rope=True),  # ring attention
    MeasureSpec(num_experts=4, ep=2, num_microbatches=2, zero_stage=1),  # EP 2, all-to-all
]


@pytest.mark.parametrize("spec", ROWS, ids=lambda s: s.name)
def test_predicted_peak_within_tolerance(spec):
    measured = run_distributed(2, measure_layout, spec)
    predicted = predict(spec, 2)
    for r in measured:
        p, m = predicted[r["pp_rank"]], r["peak_bytes"]
        assert abs(p - m) / m < TOLERANCE, (
            f"{spec.name} rank {r['rank']}: predicted {p}, measured {m} ({100 * (p - m) / m:+.1f}%)"
        )
        if not spec.num_experts:  # MoE: routing (so the activations) moves with the weights
            assert len(set(r["step_peaks"][1:])) == 1  # steady state: the same peak every step


def test_tracker_counts_live_storages_exactly():
    with AllocationTracker(torch.device("cpu")) as t:
        t.mark()
        a = torch.empty(1000)  # 4000 bytes
        view = a[:10]
        b = torch.empty(500, dtype=torch.float64)  # +4000
        del a  # the view keeps the storage
        live_with_view = t.live
        del view
        c = torch.zeros(250)  # +1000, after a's storage died
        del b, c
        t.mark()
    assert live_with_view == 8000
    assert t.window_peaks() == [8000, 0]


def _saved_by_column_linear(sp: bool) -> list:
    """Sizes of the activations a column-parallel linear keeps for backward (2 TP ranks)."""
    from megalite import parallel_state as ps
    from megalite.tensor_parallel import ColumnParallelLinear

    ps.initialize_model_parallel(2)
    layer = ColumnParallelLinear(
        8, 16, group=ps.get_tensor_model_parallel_group(), sequence_parallel=sp,
        init_method=lambda w: torch.nn.init.normal_(w, generator=torch.Generator().manual_seed(0)),
    )  # fmt: skip
    x = torch.randn(6 if sp else 12, 2, 8, requires_grad=True)
    shapes = []

    params = {q.untyped_storage().data_ptr() for q in layer.parameters()}

    def pack(t):
        # the input, however autograd views it (not the weight or bias, which some kernels keep)
        if t.untyped_storage().data_ptr() not in params:
            shapes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = layer(x)
    out.sum().backward()
    return shapes


def test_column_linear_keeps_the_local_shard_under_sequence_parallelism():
    """What the planner's activation model assumes (world size 2): under SP the QKV / FC1
    linears keep their [s/tp, b, h] input for backward, not the all-gathered [s, b, h]."""
    assert run_distributed(2, _saved_by_column_linear, True) == [[6 * 2 * 8]] * 2
    assert run_distributed(2, _saved_by_column_linear, False) == [[12 * 2 * 8]] * 2
