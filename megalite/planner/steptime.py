"""Step time of a layout: model FLOPs at a stated fraction of peak, communication, bubble.

* Compute: `megalite.model.flops` (the count MFU uses) split over TP x PP x DP, plus what
  recompute adds (full: one more forward; selective: the attention core's forward), on the
  slowest stage (the last also computes the logits), at ``peak x mfu`` (fp32: half the peak).
* TP: per layer and micro-batch, two all-reduces of ``[s, b, h]`` in forward and two in
  backward (sequence parallel: all-gathers + reduce-scatters, the same bytes), ring volume
  ``2 (t-1)/t x size``, over the intra-node link (TP stays inside a node).
* PP: per micro-batch and chunk one activation and one gradient ``[s/sp, b, h]`` to the
  neighbour stage (intra-node when the whole model-parallel block fits in a node).
* DP: megalite's fp32 gradient buckets, all-reduced (ZeRO 0), reduce-scattered + the params
  all-gathered in the model dtype (ZeRO 1), reduce-scattered after every micro-batch (ZeRO 2);
  over the NIC when the DP ring leaves the node. Exposed unless --overlap-grad-reduce, which
  hides it behind the last micro-batch's backward.
* Bubble: the idle fraction of the schedule itself, run in virtual time by
  X
  micro-batch-stages, Narayanan's closed form ``(p-1)/(v m + p-1)``, which the simulation
  reproduces exactly (tests/test_planner.py checks it on a grid).
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
from megalite.planner.counts import stage_params
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


def ops_per_layer(config: GPTConfig) -> int:
    """Kernels one layer runs per micro-batch (forward + backward), counted on the real layer
    at a tiny width (the count depends on the structure, not the sizes)."""
    c = config
    key = (c.activation, c.normalization, c.position_embedding_type,
           c.num_query_groups < c.num_attention_heads, c.hidden_dropout > 0,
           c.attention_dropout > 0, c.recompute_granularity)  # fmt: skip
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
        layer = TransformerLayer(tiny, "decoder.layers.0.", ParamInit(0, 0.02, 1), None)
        rope = rope_cache(tiny) if tiny.position_embedding_type == "rope" else None
        x = torch.randn(8, 1, 16, requires_grad=True)
        with Counter():
            layer(x, rope).sum().backward()
        _OPS[key] = count[0]
    return _OPS[key]


def estimate_step_time(
    config: GPTConfig, layout: Layout, runtime: Runtime, device: Device, gpus_per_node: int
) -> StepTime:
    """Seconds per iteration and tokens/s of `layout` (config already split for it)."""
    c = config
    tp, pp, dp, v, m = layout.tp, layout.pp, layout.dp, layout.vp, layout.num_microbatches
    b, s, h, B = layout.micro_batch_size, c.seq_length, c.hidden_size, runtime.dtype_bytes
    rate = device.peak_tflops * 1e12 * device.mfu * device.cores_share * (0.5 if B == 4 else 1)

    per_mb = num_floating_point_operations(c, b)  # one micro-batch through the whole model
    logits = 3.0 * b * s * 2 * h * c.padded_vocab_size
    layers = (per_mb - logits) / c.num_layers
    extra = 0.0
    if layout.recompute == "full":
        extra = layers / 3.0
    elif layout.recompute == "selective":
        extra = b * s * 4 * s * c.num_attention_heads * c.head_dim  # attention core, forward
    per_stage = c.num_layers // pp
    stage_flops = per_stage * (layers + extra) + logits  # the last stage is the slowest
    compute = stage_flops / tp / rate  # one micro-batch through the slowest stage

    intra = device.intra_node_gbps * 1e9 * device.link_efficiency
    inter = device.inter_node_gbps * 1e9 * device.link_efficiency
    tp_comm = 0.0
    if tp > 1:
        size = s * b * h * B
        per_layer = 4 * (2 * (tp - 1) / tp * size / intra + device.latency_s)
        tp_comm = per_stage * per_layer * (1.5 if layout.recompute == "full" else 1.0)
        # vocab-parallel embedding (1) and cross-entropy (3) all-reduces, on the end stages
        tp_comm += 4 * device.latency_s
    pp_comm = 0.0
    if pp > 1:
        sp = tp if c.sequence_parallel else 1
        link = intra if tp * dp * pp <= gpus_per_node else inter
        pp_comm = 2 * v * ((s // sp) * b * h * B / link + device.latency_s)
    overhead = device.op_overhead_s * ops_per_layer(c) * per_stage

    busy = m * (compute + tp_comm + pp_comm + overhead)
    bubble = bubble_fraction(pp, m, v)
    pipeline = busy / (1.0 - bubble)

    dp_comm = 0.0
    if dp > 1:
        grads = max(sum(p.numel for ch in stage_params(c, r) for p in ch) for r in {0, pp - 1})
        link = intra if tp * dp <= gpus_per_node else inter
        ring = (dp - 1) / dp
        if layout.deepspeed_stage:  # DeepSpeed reduces 16-bit gradients
            dp_comm = 2 * ring * grads * B / link
        elif layout.zero_stage == 0:
            dp_comm = 2 * ring * grads * 4 / link
        elif layout.zero_stage == 1:
            dp_comm = ring * grads * (4 + B) / link
        else:
            dp_comm = ring * grads * (4 * m + B) / link + m * device.latency_s
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
    )
