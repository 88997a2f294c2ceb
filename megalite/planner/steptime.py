"""Step time of a layout: model FLOPs at a stated fraction of peak, communication, bubble.

* Compute: `megalite.model.flops` (the count MFU uses; MoE layers count their active
  parameters: router, k experts, shared experts) split over TP x CP x PP x DP, plus what
  recompute adds (full: one more forward; selective: the attention core's forward), on the
  slowest stage (the last also computes the logits), at ``peak x mfu`` (fp32: half the peak).
  Balanced routing spreads an MoE layer's expert work evenly over the stage's ranks.
* TP: per layer and micro-batch, two all-reduces of ``[s, b, h]`` in forward and two in
  backward (sequence parallel: all-gathers + reduce-scatters, the same bytes, plus the two
  all-gathers backward repeats for the column-parallel weight gradients), ring volume
  ``2 (t-1)/t x size``, over the intra-node link (TP stays inside a node).
* CP: ring attention (p2p) sends ``cp - 1`` key/value blocks per layer forward and, backward,
  ``cp - 1`` blocks plus ``cp`` fp32 dK/dV accumulators; the transfers overlap the block
  computation, so only what exceeds the core attention's time is counted. All-to-all attention
  (a2a) trades q, k, v and the output forward and their gradients backward, not overlapped.
* EP: per MoE layer and micro-batch the alltoall dispatcher sends each of its ``T k`` (token,
  expert) rows to the expert's EP rank and back (forward and backward: 4 all-to-alls, the
  ``(ep-1)/ep`` share leaves the rank), plus an all-gather / reduce-scatter over ETP; the
  allgather dispatcher all-gathers the ETP x EP group's tokens and reduce-scatters the outputs.
  Over the intra-node link while the ETP x EP group fits in a node.
* PP: per micro-batch and chunk one activation and one gradient ``[s/sp/cp, b, h]`` to the
  neighbour stage (intra-node when the whole model-parallel block fits in a node).
* DP: megalite's fp32 gradient buckets, all-reduced (ZeRO 0), reduce-scattered + the params
  all-gathered in the model dtype (ZeRO 1), reduce-scattered after every micro-batch (ZeRO 2);
  dense ones over DP x CP, expert ones over expert-DP; over the NIC when the ring leaves the
  node. Exposed unless --overlap-grad-reduce, which
  hides it behind the last micro-batch's backward.
* Bubble: the idle fraction of the schedule itself, run in virtual time by
  `megalite.pipeline_parallel.timeline.simulate`; above `SIMULATE_LIMIT` micro-batch-stages,
  Narayanan's closed form ``(p-1)/(v m + p-1)``, which the simulation reproduces exactly
  (tests/test_planner.py checks it on a grid).
* Per-op overhead (device ``op_overhead_s`` x ops a layer runs, counted on the real layer).

Not modelled: the optimizer step (memory-bound, ~1% at scale), kernel efficiency differences
between shapes, network congestion, stragglers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

from megalite.model.config import GPTConfig
from megalite.model.flops import num_floating_point_operations
from megalite.planner.counts import is_moe, stage_numel
from megalite.planner.devices import Device
from megalite.planner.layout import Layout, Runtime

SIMULATE_LIMIT = 128  # p x m x v above which the bubble comes from the closed form


@dataclass
class StepTime:
    step_time_s: float
    tokens_per_s: float
    compute_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    bubble_fraction: float
    overhead_s: float
    cp_comm_s: float = 0.0
    ep_comm_s: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@lru_cache(maxsize=256)
def bubble_fraction(p: int, m: int, v: int = 1) -> float:
    """Idle fraction of a pipeline step with equal stages (0 without pipelining)."""
    if p == 1:
        return 0.0
    if p * m * v > SIMULATE_LIMIT:
        return (p - 1) / (v * m + p - 1)
    from megalite.pipeline_parallel.interleaved import (
        forward_backward_pipelining_with_interleaving,
    )
    from megalite.pipeline_parallel.schedules import (
        forward_backward_pipelining_without_interleaving,
    )
    from megalite.pipeline_parallel.timeline import simulate

    schedule = (
        forward_backward_pipelining_with_interleaving
        if v > 1
        else forward_backward_pipelining_without_interleaving
    )
    return max(simulate(schedule, p, m, v))


_OPS: dict[tuple, int] = {}


def ops_per_layer(config: GPTConfig, moe=None) -> int:
    """Kernels one layer runs per micro-batch (forward + backward), counted on the real layer
    at a tiny width (the count depends on the structure, not the sizes); `moe`: an MoE layer
    with this rank's number of experts (its batched fallback runs one GEMM per expert)."""
    c = config
    local = moe.num_experts // moe.expert_model_parallel_size if moe is not None else 0
    key = (c.activation, c.normalization, c.position_embedding_type,
           c.num_query_groups < c.num_attention_heads, c.hidden_dropout > 0,
           c.attention_dropout > 0, c.recompute_granularity, local,
           moe.moe_router_topk if moe else 0,
           bool(moe and moe.moe_shared_expert_intermediate_size))  # fmt: skip
    if key not in _OPS:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        from megalite.model.transformer import ParamInit, TransformerLayer, rope_cache
        from megalite.tensor_parallel.random import get_rng_tracker, model_parallel_manual_seed

        tiny = dataclasses.replace(
            c, num_layers=1, hidden_size=16, num_attention_heads=2,
            num_query_groups=1 if key[3] else 2, ffn_hidden_size=32, seq_length=8,
            max_position_embeddings=8, tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1, num_layers_per_virtual_pipeline_stage=None,
            sequence_parallel=False, params_dtype=torch.float32,
        )  # fmt: skip
        count = [0]

        class Counter(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                count[0] += 1
                return func(*args, **(kwargs or {}))

        if not get_rng_tracker().get_states():
            model_parallel_manual_seed(0, 0, 0)
        tiny_moe = None
        if moe is not None:
            tiny_moe = dataclasses.replace(
                moe, num_experts=local, moe_router_topk=min(moe.moe_router_topk, local),
                expert_model_parallel_size=1, expert_tensor_parallel_size=1,
                moe_ffn_hidden_size=32, moe_layer_freq=1,
                moe_shared_expert_intermediate_size=32 if key[-1] else None,
            )  # fmt: skip
        layer = TransformerLayer(
            tiny, "decoder.layers.0.", ParamInit(0, 0.02, 1), None, moe=tiny_moe
        )
        rope = rope_cache(tiny) if tiny.position_embedding_type == "rope" else None
        x = torch.randn(8, 1, 16, requires_grad=True)
        with Counter():
            layer(x, rope).sum().backward()
        _OPS[key] = count[0]
    return _OPS[key]


_CP_OPS: dict[tuple, int] = {}


def cp_attention_ops(config: GPTConfig, layout: Layout) -> int:
    """Kernels the context-parallel core attention adds per layer and micro-batch (forward +
    backward) on one rank: megalite's ring / all-to-all attention run at this rank's shape in
    one process, its CP exchanges replaced by local copies (an op count; values do not
    matter), minus the SDPA call it replaces. Only for devices with a per-op cost (CPU)."""
    c, cp, comm = config, layout.cp, layout.cp_comm_type
    b, tp, d = layout.micro_batch_size, layout.tp, c.head_dim
    shape = (b, c.num_attention_heads // tp, c.num_query_groups // tp, c.seq_length // cp, d)
    key = (shape, cp, comm)
    if key in _CP_OPS:
        return _CP_OPS[key]
    import types
    from unittest import mock

    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from megalite.context_parallel import comm as cp_comm
    from megalite.context_parallel import ring, ulysses

    count = [0]

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            count[0] += 1
            return func(*args, **(kwargs or {}))

    class Done:
        def __init__(self, buffer):
            self.buffer = buffer

        def wait(self):
            return self.buffer

    class LocalRing:  # every "neighbour" is this process: a send is a copy
        def __init__(self, group):
            self.size, self.rank = cp, 0

        def shift(self, tensor, tag=0):
            return Done(torch.empty_like(tensor).copy_(tensor.contiguous()))

    def local_all_to_all(x, group, scatter_dim, gather_dim):
        send = torch.stack(x.chunk(cp, dim=scatter_dim)).contiguous()
        recv = torch.empty_like(send).copy_(send)
        return torch.cat(recv.unbind(0), dim=gather_dim)

    n, g, s = shape[1], shape[2], shape[3]
    q = torch.randn(b, n, s, d, requires_grad=True)
    k = torch.randn(b, g, s, d, requires_grad=True)
    v = torch.randn(b, g, s, d, requires_grad=True)

    def counted(fn) -> int:
        count[0] = 0
        with Counter():
            fn(q, k, v).sum().backward()
        return count[0]

    fake_dist = types.SimpleNamespace(get_world_size=lambda group=None: cp)
    with (
        mock.patch.object(ring, "Ring", LocalRing),
        mock.patch.object(cp_comm, "all_to_all", local_all_to_all),
        mock.patch.object(ulysses, "dist", fake_dist),
    ):
        if comm == "p2p":
            ops = counted(lambda q, k, v: ring.RingAttention.apply(q, k, v, None, d**-0.5, 0.0))
        else:
            ops = counted(lambda q, k, v: ulysses.ulysses_attention(q, k, v, None))

    def sdpa(q, k, v):
        rep = n // g
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    _CP_OPS[key] = max(0, ops - counted(sdpa))
    return _CP_OPS[key]


def _layer_flops(c: GPTConfig, b: int, moe) -> tuple[float, float, float]:
    """(dense layer, MoE layer, logits) FLOPs of one micro-batch, from the MFU count."""
    logits = 3.0 * b * c.seq_length * 2 * c.hidden_size * c.padded_vocab_size
    dense = (num_floating_point_operations(c, b) - logits) / c.num_layers
    if moe is None:
        return dense, 0.0, logits
    every = dataclasses.replace(moe, moe_layer_freq=1)
    return dense, (num_floating_point_operations(c, b, moe=every) - logits) / c.num_layers, logits


def estimate_step_time(
    config: GPTConfig,
    layout: Layout,
    runtime: Runtime,
    device: Device,
    gpus_per_node: int,
    moe=None,
) -> StepTime:
    """Seconds per iteration and tokens/s of `layout` (config already split for it; `moe` the
    MoE settings split by `layout.apply_moe`, or None)."""
    c = config
    tp, pp, dp, v, m = layout.tp, layout.pp, layout.dp, layout.vp, layout.num_microbatches
    cp = layout.cp
    b, s, h, B = layout.micro_batch_size, c.seq_length, c.hidden_size, runtime.dtype_bytes
    rate = device.peak_tflops * 1e12 * device.mfu * device.cores_share * (0.5 if B == 4 else 1)
    intra = device.intra_node_gbps * 1e9 * device.link_efficiency
    inter = device.inter_node_gbps * 1e9 * device.link_efficiency
    n, g, d = c.num_attention_heads, c.num_query_groups, c.head_dim
    tokens = s * b / cp  # this rank's part of a micro-batch

    dense, moe_layer, logits = _layer_flops(c, b, moe)
    core = b * s * 4 * s * n * d  # attention core, forward, whole sequence
    extra = {"full": None, "selective": core, "none": 0.0}[layout.recompute]
    per_stage = c.num_layers // pp
    n_moe = max(
        sum(is_moe(moe, i, c.num_layers) for ch in range(v) for i in c.layers_of_chunk(r, ch))
        for r in range(pp)
    )  # the stage with the most MoE layers

    def with_recompute(flops: float) -> float:
        return flops * 4 / 3 if extra is None else flops + extra

    stage_flops = (per_stage - n_moe) * with_recompute(dense) + n_moe * with_recompute(moe_layer)
    compute = (stage_flops + logits) / (tp * cp) / rate  # the last stage is the slowest

    tp_comm = 0.0
    if tp > 1:
        size = tokens * h * B
        per_layer = 4 * (2 * (tp - 1) / tp * size / intra + device.latency_s)
        if c.sequence_parallel:  # backward all-gathers the two column-parallel inputs again
            per_layer += 2 * ((tp - 1) / tp * size / intra + device.latency_s)
        tp_comm = per_stage * per_layer * (1.5 if layout.recompute == "full" else 1.0)
        # vocab-parallel embedding (1) and cross-entropy (3) all-reduces, on the end stages
        tp_comm += 4 * device.latency_s
    cp_comm = 0.0
    if cp > 1:
        link = intra if tp * cp <= gpus_per_node else inter
        kv = tokens * 2 * g * d / tp  # one key/value block, elements
        if layout.cp_comm_type == "p2p":
            ct = 8 if B == 8 else 4
            moved = (cp - 1) * kv * B * 2 + cp * kv * ct  # forward + backward blocks, dK/dV
            hidden = 3 * core / (tp * cp) / rate  # the core's forward + backward, overlapped
            per_layer = max(0.0, moved / link - hidden) + 3 * cp * device.latency_s
        else:
            moved = 2 * (cp - 1) / cp * tokens * (2 * n + 2 * g) * d / tp * B
            per_layer = moved / link + 8 * device.latency_s
        cp_comm = per_stage * per_layer
    ep_comm = 0.0
    if moe is not None:
        ep, etp, k = layout.ep, layout.expert_tp, moe.moe_router_topk
        rows = tokens / tp * k  # (token, expert) pairs of this rank per MoE layer
        link = intra if ep * etp <= gpus_per_node else inter
        if moe.moe_token_dispatcher_type == "alltoall":
            moved = 4 * (ep - 1) / ep * rows * h * B + 4 * (etp - 1) * rows * h * B
        else:
            group = ep * etp
            moved = 4 * (group - 1) * tokens / tp * h * B
        calls = (4 if ep > 1 else 0) + (4 if etp > 1 else 0)
        ep_comm = n_moe * (moved / link + calls * device.latency_s)
    pp_comm = 0.0
    if pp > 1:
        sp = tp if c.sequence_parallel else 1
        link = intra if tp * cp * dp * pp <= gpus_per_node else inter
        pp_comm = 2 * v * (tokens / sp * h * B / link + device.latency_s)
    overhead = 0.0
    if device.op_overhead_s:  # counted on a real layer run: only for devices that charge it
        ops = ops_per_layer(c) * (per_stage - n_moe)
        ops += ops_per_layer(c, moe) * n_moe if n_moe else 0
        ops += cp_attention_ops(c, layout) * per_stage if cp > 1 else 0
        overhead = device.op_overhead_s * ops

    busy = m * (compute + tp_comm + cp_comm + ep_comm + pp_comm + overhead)
    bubble = bubble_fraction(pp, m, v)
    pipeline = busy / (1.0 - bubble)

    dp_comm = 0.0
    groups = ((False, layout.grad_dp), (True, layout.expert_dp))
    for expert, size in groups:
        if size == 1:
            continue
        grads = max(stage_numel(c, r, moe, expert) for r in {0, pp - 1})
        link = intra if tp * cp * dp <= gpus_per_node else inter
        ring = (size - 1) / size
        if layout.deepspeed_stage:  # DeepSpeed reduces 16-bit gradients
            dp_comm += 2 * ring * grads * B / link
        elif layout.zero_stage == 0:
            dp_comm += 2 * ring * grads * 4 / link
        elif layout.zero_stage == 1:
            dp_comm += ring * grads * (4 + B) / link
        else:
            dp_comm += ring * grads * (4 * m + B) / link + m * device.latency_s
    if runtime.overlap_grad_reduce:
        dp_comm = max(0.0, dp_comm - (2 / 3) * (compute + tp_comm))
    step = pipeline + dp_comm
    return StepTime(
        step_time_s=step,
        tokens_per_s=layout.global_batch_size * s / step,
        compute_s=m * compute,
        tp_comm_s=m * tp_comm,
        pp_comm_s=m * pp_comm,
        dp_comm_s=dp_comm,
        bubble_fraction=bubble,
        overhead_s=m * overhead,
        cp_comm_s=m * cp_comm,
        ep_comm_s=m * ep_comm,
    )
