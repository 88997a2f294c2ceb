"""A plan (memory per rank role + step time) for one layout, the layout search, and the text.

`plan_for` and `format_plan` are what `megalite-pretrain --dry-run` calls; `search` enumerates
TP (inside a node) x CP (long sequences) x PP x DP x EP / ETP (MoE) x micro-batch size x
interleaving x ZeRO x recompute for a fixed global batch, keeps the layouts whose largest rank
fits the device memory, and ranks them by estimated tokens/s.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Optional

from megalite.model.config import GPTConfig
from megalite.planner.devices import Device
from megalite.planner.layout import Layout, Runtime, apply_layout, apply_moe
from megalite.planner.memory import RankMemory, plan_memory
from megalite.planner.steptime import StepTime, estimate_step_time

GIB = 1024**3


@dataclass
class Plan:
    layout: Layout
    ranks: list[RankMemory]
    step: StepTime
    memory_bytes: int  # usable device memory per GPU (0: unknown, e.g. CPU)

    @property
    def peak_bytes(self) -> int:
        return max(r.peak_bytes for r in self.ranks)

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= 0 or self.peak_bytes <= self.memory_bytes

    @property
    def headroom(self) -> Optional[float]:
        return 1 - self.peak_bytes / self.memory_bytes if self.memory_bytes > 0 else None

    def to_json(self) -> dict:
        return {
            "layout": dataclasses.asdict(self.layout) | {"world": self.layout.world},
            "ranks": [r.to_json() for r in self.ranks],
            "peak_bytes": self.peak_bytes,
            "memory_bytes": self.memory_bytes,
            "fits": self.fits,
            "headroom": self.headroom,
            "step_time_s": self.step.step_time_s,
            "tokens_per_s": self.step.tokens_per_s,
            "step": self.step.to_json(),
        }


def plan_for(
    config: GPTConfig,
    layout: Layout,
    runtime: Runtime,
    device: Device,
    gpus_per_node: int = 8,
    memory_bytes: Optional[int] = None,
    stages: Optional[list[int]] = None,
    moe=None,
) -> Plan:
    """The plan of `layout` for the (unsplit) model `config` (and its MoE settings `moe`, or
    None); raises ValueError naming the numbers when the layout cannot split this model."""
    split = apply_layout(config, layout, runtime)
    moe_split = apply_moe(moe, layout)
    memory = int(device.memory_gib * GIB) if memory_bytes is None else memory_bytes
    ranks = plan_memory(split, layout, runtime, stages, moe_split)
    step = estimate_step_time(split, layout, runtime, device, gpus_per_node, moe_split)
    return Plan(layout, ranks, step, memory)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


LONG_SEQUENCE = 8192  # tokens from which the search also splits sequences (CP)


def candidate_layouts(
    config: GPTConfig,
    num_gpus: int,
    gpus_per_node: int,
    global_batch_size: int,
    zero_stages=(0, 1, 2),
    recomputes=("none", "selective", "full"),
    micro_batch_sizes=(1, 2, 4, 8),
    max_chunks: int = 4,
    moe=None,
    context_parallel_sizes: Optional[tuple] = None,
) -> list[Layout]:
    """Every layout the model and the batch allow, TP kept inside a node. Context parallelism
    (ring, and all-to-all where the heads divide) is searched for sequences of `LONG_SEQUENCE`
    tokens or more, expert parallelism (EP dividing the experts, ETP = TP or 1) for MoE models.
    """
    c = config
    if context_parallel_sizes is None:
        long = c.seq_length >= LONG_SEQUENCE
        context_parallel_sizes = (1, 2, 4, 8, 16) if long else (1,)
    out = []
    for tp in _divisors(min(gpus_per_node, num_gpus)):
        if num_gpus % tp or c.num_attention_heads % tp or c.num_query_groups % tp:
            continue
        if c.ffn_hidden_size % tp or c.seq_length % tp:
            continue
        for cp in context_parallel_sizes:
            if num_gpus % (tp * cp) or c.seq_length % (2 * cp * tp):
                continue
            comms = ["p2p"]
            if cp > 1 and c.num_query_groups % (tp * cp) == 0:
                comms.append("a2a")
            for pp in _divisors(c.num_layers):
                if num_gpus % (tp * cp * pp):
                    continue
                dp = num_gpus // (tp * cp * pp)
                for comm, (ep, etp) in itertools.product(comms, _expert_splits(moe, tp, cp, dp)):
                    out += _batch_layouts(
                        c, tp, cp, comm, pp, dp, ep, etp, global_batch_size, zero_stages,
                        recomputes, micro_batch_sizes, max_chunks,
                    )  # fmt: skip
    return out


def _expert_splits(moe, tp: int, cp: int, dp: int) -> list[tuple[int, Optional[int]]]:
    """(EP, ETP) pairs for an MoE model: EP dividing the experts and the stage's ranks, with
    ETP = TP (Megatron's default) or 1 (experts whole, TP folded into EP)."""
    if moe is None or not moe.enabled:
        return [(1, None)]
    block, out = tp * cp * dp, []
    for etp in [None] + ([1] if tp > 1 else []):
        e_tp = tp if etp is None else etp
        for ep in _divisors(moe.num_experts):
            if block % (ep * e_tp) == 0:
                out.append((ep, etp))
    return out


def _batch_layouts(c, tp, cp, comm, pp, dp, ep, etp, gbs, zeros, recomputes, mbss, max_chunks):
    out = []
    for mbs in mbss:
        if gbs % (mbs * dp):
            continue
        m = gbs // (mbs * dp)
        chunks = [1] + [
            v for v in range(2, max_chunks + 1)
            if pp > 1 and (c.num_layers // pp) % v == 0 and m % pp == 0
        ]  # fmt: skip
        for v in chunks:
            for zero in zeros if dp * cp > 1 or ep * (etp or tp) < tp * cp * dp else (0,):
                for rc in recomputes:
                    out.append(Layout(
                        tp=tp, pp=pp, dp=dp, vp=v, sequence_parallel=tp > 1,
                        micro_batch_size=mbs, num_microbatches=m, zero_stage=zero,
                        recompute=rc, cp=cp, cp_comm_type=comm, ep=ep, etp=etp,
                    ))  # fmt: skip
    return out


@dataclass
class SearchResult:
    plans: list[Plan]  # feasible, best first
    evaluated: int
    smallest: Optional[Plan]  # the layout with the smallest peak (feasible or not)

    def to_json(self, top: int) -> dict:
        return {
            "layouts": [p.to_json() for p in self.plans[:top]],
            "evaluated": self.evaluated,
            "feasible": len(self.plans),
            "smallest_peak_bytes": self.smallest.peak_bytes if self.smallest else None,
            "smallest_peak_layout": self.smallest.layout.describe() if self.smallest else None,
        }


def search(
    config: GPTConfig,
    runtime: Runtime,
    device: Device,
    num_gpus: int,
    gpus_per_node: int,
    global_batch_size: int,
    memory_bytes: Optional[int] = None,
    moe=None,
    **options,
) -> SearchResult:
    """Feasible layouts ranked by tokens/s (first and last stage sized: they bound the rest)."""
    memory = int(device.memory_gib * GIB) if memory_bytes is None else memory_bytes
    plans, smallest, n = [], None, 0
    layouts = candidate_layouts(
        config, num_gpus, gpus_per_node, global_batch_size, moe=moe, **options
    )
    for layout in layouts:
        try:
            plan = plan_for(config, layout, runtime, device, gpus_per_node, memory,
                            stages=sorted({0, layout.pp - 1}), moe=moe)  # fmt: skip
        except ValueError:
            continue  # the model cannot take this split (e.g. vocabulary, layers)
        n += 1
        if smallest is None or plan.peak_bytes < smallest.peak_bytes:
            smallest = plan
        if plan.fits:
            plans.append(plan)
    plans.sort(key=lambda p: (-p.step.tokens_per_s, p.peak_bytes))
    # Complete the few that will be shown with every stage.
    for i, p in enumerate(plans[:20]):
        plans[i] = plan_for(config, p.layout, runtime, device, gpus_per_node, memory, moe=moe)
    return SearchResult(plans, n, smallest)


# --- text ----------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def format_plan(plan: Plan, device: Device) -> str:
    lay, st = plan.layout, plan.step
    lines = [
        f"layout {lay.describe()}  (world {lay.world}, global batch {lay.global_batch_size})",
        f"device {device.name}: usable memory "
        + (f"{plan.memory_bytes / GIB:.1f} GiB" if plan.memory_bytes > 0 else "not set"),
        "",
        f"{'rank role':14} {'params':>14} {'param GiB':>9} {'grad GiB':>9} {'optim GiB':>9} "
        f"{'activ GiB':>9} {'other GiB':>9} {'PEAK GiB':>9}  peak at",
    ]
    shown = plan.ranks if len(plan.ranks) <= 8 else plan.ranks[:3] + plan.ranks[-2:]
    for r in shown:
        lines.append(
            f"{r.role:14} {r.num_params:>14,} {_gib(r.param_bytes):>9} {_gib(r.grad_bytes):>9} "
            f"{_gib(r.optimizer_bytes):>9} {_gib(r.activation_bytes):>9} "
            f"{_gib(r.other_bytes):>9} {_gib(r.peak_bytes):>9}  {r.detail.get('peak_at', '')}"
            f" ({r.detail.get('microbatches_in_flight', 0)} in flight)"
        )
    if len(plan.ranks) > len(shown):
        lines.append(f"  ({len(plan.ranks) - len(shown)} middle stages not shown; --json has all)")
    fit = "fits" if plan.fits else "DOES NOT FIT"
    if plan.memory_bytes > 0:
        lines.append(f"largest rank {plan.peak_bytes / GIB:.2f} GiB: {fit} "
                     f"(headroom {100 * plan.headroom:.1f}%)")  # fmt: skip
    lines += [
        "",
        f"step time {st.step_time_s:.3f} s, {st.tokens_per_s:,.0f} tokens/s "
        f"(compute {st.compute_s:.3f} s at {device.mfu:.0%} of peak, TP comm {st.tp_comm_s:.3f}"
        f" s, PP comm {st.pp_comm_s:.3f} s, DP comm {st.dp_comm_s:.3f} s, "
        + (f"CP comm {st.cp_comm_s:.3f} s, " if lay.cp > 1 else "")
        + (f"EP comm {st.ep_comm_s:.3f} s, " if st.ep_comm_s else "")
        + f"bubble {st.bubble_fraction:.1%})",
    ]
    return "\n".join(lines)


def format_search(result: SearchResult, device: Device, top: int = 10) -> str:
    if not result.plans:
        s = result.smallest
        if s is None:
            return "no layout can split this model over these GPUs"
        return (
            f"no layout fits: the smallest peak any of the {result.evaluated} layouts needs is "
            f"{s.peak_bytes / GIB:.2f} GiB per GPU ({s.layout.describe()}), the device has "
            f"{s.memory_bytes / GIB:.2f} GiB usable"
        )
    lines = [
        f"{len(result.plans)} of {result.evaluated} layouts fit on {device.name}; best "
        f"{min(top, len(result.plans))} by estimated tokens/s:",
        f"{'#':>3} {'layout':44} {'tokens/s':>12} {'step s':>8} {'bubble':>7} {'peak GiB':>9} "
        f"{'headroom':>8}",
    ]
    for i, p in enumerate(result.plans[:top], 1):
        head = f"{100 * p.headroom:7.1f}%" if p.headroom is not None else "       -"
        lines.append(
            f"{i:>3} {p.layout.describe():44} {p.step.tokens_per_s:>12,.0f} "
            f"{p.step.step_time_s:>8.3f} {p.step.bubble_fraction:>7.1%} "
            f"{p.peak_bytes / GIB:>9.2f} {head}"
        )
    return "\n".join(lines)
