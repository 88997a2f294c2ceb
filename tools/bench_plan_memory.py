"""Check `megalite-plan` against measurement: predicted vs measured peak bytes on every rank.

Trains each layout of a matrix (TP/PP/DP up to 8 gloo ranks, ZeRO 0/1/2, recompute none /
selective / full, micro-batch counts, 1F1B and interleaved, SP, SwiGLU/RoPE/GQA/RMSNorm, bf16,
context parallelism (ring and all-to-all), MoE with EP / ETP and both token dispatchers)
for two steps with megalite's real model, DDP, optimizer and schedules in spawned processes
(`tests/harness.py`), records each rank's peak allocated tensor bytes with the exact
allocation-level tracker (`megalite.planner.measure.AllocationTracker`), and prints, per rank,
predicted / measured / error. Then it times a few steps of each layout and prints the Spearman
rank correlation between the planner's step-time estimate (CPU device model) and the measured
step times.

    PYTHONPATH=. OMP_NUM_THREADS=1 python tools/bench_plan_memory.py [--only NAME] [--no-time]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalite.planner.measure import MeasureSpec  # noqa: E402

S = MeasureSpec
# (world size, spec): >= 20 layouts; every rank of each is compared.
MATRIX = [
    (1, S()),
    (1, S(num_microbatches=4, recompute="full")),
    (1, S(swiglu=True, rope=True, rmsnorm=True, num_query_groups=2, untie=True)),
    (1, S(bf16=True, num_microbatches=2)),
    (2, S(tp=2, num_microbatches=2)),
    (2, S(tp=2, sequence_parallel=True, recompute="selective")),
    (2, S(pp=2, num_microbatches=4)),
    (2, S(zero_stage=1, num_microbatches=2)),
    (2, S(zero_stage=2, num_microbatches=2)),
    (2, S(pp=2, num_microbatches=4, vp_layers=1)),
    (2, S(pp=2, num_microbatches=4, hidden_dropout=0.1, attention_dropout=0.1)),
    (4, S(tp=2, pp=2, num_microbatches=4, zero_stage=1)),
    (4, S(pp=4, num_microbatches=8, recompute="full")),
    (4, S(pp=4, num_microbatches=4, num_layers=8, vp_layers=1)),
    (4, S(tp=2, pp=2, num_microbatches=4, vp_layers=1, sequence_parallel=True)),
    (4, S(pp=2, zero_stage=2, num_microbatches=4, recompute="selective")),
    (4, S(tp=4, sequence_parallel=True, swiglu=True, rope=True)),
    (4, S(zero_stage=1, bf16=True, num_microbatches=2)),
    (
        4,
        S(
            tp=2,
            pp=2,
            swiglu=True,
            rope=True,
            rmsnorm=True,
            num_query_groups=2,
            untie=True,
            num_microbatches=4,
        ),
    ),
    (8, S(tp=2, pp=2, zero_stage=1, num_microbatches=4)),
    (8, S(tp=2, pp=4, num_microbatches=8, num_layers=8, vp_layers=1, zero_stage=2)),
    (8, S(pp=8, num_layers=8, num_microbatches=8)),
    (8, S(tp=8, sequence_parallel=True, num_attention_heads=8, recompute="full")),
    # context parallelism: ring (p2p) and all-to-all (a2a) attention
    (2, S(cp=2, num_microbatches=2)),
    (4, S(cp=4, seq_length=128)),
    (4, S(tp=2, cp=2, sequence_parallel=True, cp_comm_type="a2a")),
    (4, S(pp=2, cp=2, num_microbatches=4, rope=True, num_query_groups=2, zero_stage=1)),
    # mixture of experts: EP, ETP, both dispatchers, shared experts, MoE every other layer
    (2, S(num_experts=4, ep=2, num_microbatches=2)),
    (4, S(num_experts=4, ep=4, zero_stage=1, seq_length=128)),
    (4, S(tp=2, sequence_parallel=True, num_experts=4, ep=2, etp=2)),
    (4, S(tp=2, num_experts=4, ep=4, etp=1, swiglu=True, shared_expert_size=64)),
    (4, S(pp=2, num_experts=4, ep=2, num_microbatches=4, moe_layer_freq=2, dispatcher="allgather")),
    (
        8,
        S(
            tp=2,
            cp=2,
            sequence_parallel=True,
            num_experts=4,
            ep=2,
            zero_stage=2,
            swiglu=True,
            bf16=True,
            num_microbatches=2,
        ),
    ),
]
# Step-time ranking: 2-rank layouts (one rank per core of the 2-core test machine) of one model
# family, differing in the split (DP / TP / PP / interleaved / CP / EP) and in the work per rank.
_T = dict(hidden_size=128, num_microbatches=4, timed_steps=6)
TIMED = [
    S(**_T),
    S(**(_T | {"num_microbatches": 8})),
    S(**(_T | {"hidden_size": 64, "num_microbatches": 2})),
    S(**(_T | {"hidden_size": 256})),
    S(**(_T | {"recompute": "full"})),
    S(tp=2, **_T),
    S(tp=2, sequence_parallel=True, **(_T | {"num_microbatches": 8})),
    S(pp=2, **_T),
    S(pp=2, **(_T | {"num_microbatches": 8})),
    S(pp=2, vp_layers=1, **(_T | {"num_microbatches": 8})),
    S(cp=2, **_T),
    S(cp=2, cp_comm_type="a2a", **_T),
    S(num_experts=4, ep=2, **_T),
]


def _layout(spec: MeasureSpec, world: int):
    from megalite.planner import Layout

    config = spec.model_config()
    return Layout(
        tp=spec.tp, pp=spec.pp, dp=world // (spec.tp * spec.pp * spec.cp),
        vp=config.virtual_pipeline_size, sequence_parallel=config.sequence_parallel,
        micro_batch_size=spec.micro_batch_size, num_microbatches=spec.num_microbatches,
        zero_stage=spec.zero_stage, recompute=spec.recompute, cp=spec.cp,
        cp_comm_type=spec.cp_comm_type, ep=spec.ep, etp=spec.etp,
    )  # fmt: skip


def predict(spec: MeasureSpec, world: int) -> list[int]:
    """The planner's peak bytes per pipeline stage for `spec` on `world` CPU ranks."""
    from megalite.planner import Runtime, plan_memory
    from megalite.planner.layout import DEFAULT_BUCKET_SIZE, apply_moe

    config = spec.model_config()
    layout = _layout(spec, world)
    runtime = Runtime(
        params_dtype=config.params_dtype,
        device_kind="cpu",
        bucket_size=spec.bucket_size or DEFAULT_BUCKET_SIZE,
    )
    moe = apply_moe(spec.moe_config(), layout)
    return [r.peak_bytes for r in plan_memory(config, layout, runtime, moe=moe)]


def compare(matrix, only: str = "") -> list[dict]:
    from megalite.planner.measure import measure_layout
    from tests.harness import run_distributed

    rows = []
    for world, spec in matrix:
        if only and only not in spec.name:
            continue
        measured = run_distributed(world, measure_layout, spec, timeout=300)
        predicted = predict(spec, world)
        for r in measured:
            p = predicted[r["pp_rank"]]
            err = (p - r["peak_bytes"]) / r["peak_bytes"]
            rows.append(dict(layout=spec.name, world=world, rank=r["rank"], pp_rank=r["pp_rank"],
                             predicted=p, measured=r["peak_bytes"], error=err))  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'layout':44} {'ws':>2} {'rank':>4} {'pp':>2} {'predicted':>10} {'measured':>10} "
          f"{'error':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['layout']:44} {r['world']:>2} {r['rank']:>4} {r['pp_rank']:>2} "
              f"{r['predicted']:>10} {r['measured']:>10} {100 * r['error']:>6.1f}%")  # fmt: skip
    worst = max(rows, key=lambda r: abs(r["error"]))
    layouts = len({r["layout"] for r in rows})
    print(f"\n{layouts} layouts, {len(rows)} ranks: max |error| {100 * abs(worst['error']):.1f}% "
          f"({worst['layout']} rank {worst['rank']})")  # fmt: skip


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var


def _links(bytes_: int = 1 << 22) -> tuple[float, float]:
    """(latency s, bandwidth GB/s) of this gloo group as a training step sees it.

    Latency: the extra time of a 1-element all-reduce issued between bits of compute (as a
    layer's collectives are), so that it includes the wait for the peer to be scheduled on a
    shared machine, not only the best case of two ranks released by a barrier together.
    Bandwidth: a 4 MiB all-reduce."""
    import torch
    import torch.distributed as dist

    def best(t: torch.Tensor) -> float:
        times = []
        for _ in range(10):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - start)
        return min(times)

    a, one = torch.randn(96, 96), torch.ones(1)

    def loop(n: int, collective: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(n):
            for _ in range(4):
                a @ a
            if collective:
                dist.all_reduce(one)
        return time.perf_counter() - start

    n = 50
    loop(5, True)
    latency = max(loop(n, True) - loop(n, False), 0.0) / n
    world = dist.get_world_size()
    big = best(torch.ones(bytes_ // 4)) - best(one)
    return latency, 2 * (world - 1) / world * bytes_ / big / 1e9


def timing(world: int = 2) -> tuple[list[dict], float]:
    from megalite.planner import Runtime, cpu_device, estimate_step_time
    from megalite.planner.layout import apply_moe
    from megalite.planner.measure import measure_layout
    from tests.harness import run_distributed

    latency, gbps = run_distributed(world, _links)[0]
    device = cpu_device(ranks=world).with_overrides(
        latency_s=latency, intra_node_gbps=gbps, inter_node_gbps=gbps
    )
    print(f"CPU device: {device}")
    rows = []
    for spec in TIMED:
        measured = max(r["step_time_s"] for r in run_distributed(world, measure_layout, spec))
        config = spec.model_config()
        layout = _layout(spec, world)
        moe = apply_moe(spec.moe_config(), layout)
        rt = Runtime(config.params_dtype, "cpu")
        est = estimate_step_time(config, layout, rt, device, 1, moe)
        rows.append(dict(layout=f"{spec.name}-h{spec.hidden_size}",
                         estimated=est.step_time_s, measured=measured))  # fmt: skip
    rho = spearman([r["estimated"] for r in rows], [r["measured"] for r in rows])
    return rows, rho


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="layouts whose name contains this")
    ap.add_argument("--no-time", action="store_true", help="skip the step-time ranking")
    ap.add_argument("--time-only", action="store_true", help="only the step-time ranking")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.time()
    result = {}
    if not a.time_only:
        rows = compare(MATRIX, a.only)
        print_table(rows)
        result["memory"] = rows
    if not a.no_time:
        trows, rho = timing()
        print(f"\n{'layout':44} {'estimated s':>12} {'measured s':>11}")
        for r in trows:
            print(f"{r['layout']:44} {r['estimated']:>12.4f} {r['measured']:>11.4f}")
        print(f"Spearman rank correlation (estimate vs measured step time): {rho:.3f}")
        result |= {"timing": trows, "spearman": rho}
    print(f"({time.time() - start:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
