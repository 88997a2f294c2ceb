"""Per-rank memory of a layout: model states from the real modules, activations per op.

Model states (per pipeline stage; every TP and DP rank of a stage holds the same, up to one
bucket's padding, and DP rank 0 is the largest):

* parameters: counted from the modules (`counts.stage_params`), in the model dtype;
* gradients: megalite's DDP buckets as `data_parallel/ddp.py` builds them (fp32, reverse
  parameter order, split at `bucket_size` elements, deferred SP/tied parameters apart, padded to
  a multiple of DP); ZeRO-2 keeps a persistent 1/DP fp32 shard and materializes the full
  buckets during each backward;
* optimizer (`data_parallel/optimizer.py`): Adam's two fp32 moments for the pieces a rank owns
  (all of them under ZeRO 0, its bucket shards under ZeRO 1/2), an fp32 main copy only when the
  model is bf16/fp16, and torch's 4-byte ``step`` tensor per piece (host memory on GPUs).
  DeepSpeed stages follow its own estimator: 16-bit params, 16-bit grads (stage 1: full, 2/3:
  sharded) plus an fp32 grad partition, 12 bytes/param of optimizer state, sharded.

Dense gradient buckets are reduced and sharded over DP x CP (the CP ranks hold the same
weights), expert buckets (MoE) over expert-DP = TP x CP x DP / (EP x ETP).

Activations (`megalite.planner.activations`): what autograd keeps for backward, per
micro-batch, op by op for megalite's layer (dense, context-parallel attention, MoE).
Selective recompute drops what the core attention saves beyond its inputs; full recompute keeps
only the layer input (and rebuilds one layer's activations at a time in backward). The first
stage adds the token ids, the last the final norm, the logits' fp32 softmax (``4 V/tp`` bytes a
token) and its targets. Micro-batches in flight per stage come from the schedules' own warm-up
counts (`inflight`). The peak is the largest of a few instants (the loss forward, the first
backward, the embedding's dense gradient, the optimizer step) with the transients each adds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from megalite.model.config import GPTConfig
from megalite.planner.activations import ActivationModel, activation_model  # noqa: F401 (re-export)
from megalite.planner.counts import Param, is_moe, stage_params
from megalite.planner.layout import Layout, Runtime, moe_key


@dataclass
class RankMemory:
    """Bytes on one rank role (one pipeline stage's TP x DP ranks), at its peak."""

    role: str
    pp_rank: int
    num_params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    other_bytes: int
    peak_bytes: int
    detail: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        keys = ("role pp_rank num_params param_bytes grad_bytes optimizer_bytes "
                "activation_bytes other_bytes peak_bytes").split()  # fmt: skip
        return {k: getattr(self, k) for k in keys} | {"detail": self.detail}


# --- model states ------------------------------------------------------------------------------
def buckets(params: list[Param], bucket_size: int) -> list[list[Param]]:
    """DDP's buckets for one chunk (`DistributedDataParallel._build_buckets`): dense ones first,
    then expert ones; each kind's non-deferred before its deferred."""
    out = []
    for expert in (False, True):
        for deferred in (False, True):
            current, size = [], 0
            for p in reversed(params):
                if p.deferred != deferred or p.expert != expert:
                    continue
                current.append(p)
                size += p.numel
                if size >= bucket_size:
                    out.append(current)
                    current, size = [], 0
            if current:
                out.append(current)
    return out


@dataclass
class ModelStates:
    num_params: int
    param_bytes: int
    grad_bytes: int  # at the peak of a backward
    grad_bytes_at_step: int  # during the optimizer step
    optimizer_bytes: int
    optimizer_transient: int
    largest_weight: int  # elements


def megalite_states(chunks: list[list[Param]], layout: Layout, runtime: Runtime) -> ModelStates:
    """Model states of DP rank 0 under megalite's DDP + (distributed) optimizer. Dense buckets
    are reduced and sharded over DP x CP, expert buckets over expert-DP."""
    zero, dtype = layout.zero_stage, runtime.dtype_bytes
    cpu = runtime.device_kind == "cpu"
    n = sum(p.numel for c in chunks for p in c)
    full = shard = owned = pieces = max_piece = max_bucket = 0
    for chunk in chunks:
        for bucket in buckets(chunk, runtime.bucket_size):
            dp = layout.expert_dp if bucket[0].expert else layout.grad_dp
            real = sum(p.numel for p in bucket)
            padded = -(-real // dp) * dp
            full, max_bucket = full + padded, max(max_bucket, padded + padded // dp)
            size = padded // dp if zero > 0 else padded
            shard += padded // dp
            owned += min(size, real)
            start = 0
            for p in bucket:  # pieces: parameters that overlap [0, size)
                if start < size:
                    pieces += 1
                    max_piece = max(max_piece, min(start + p.numel, size) - start)
                start += p.numel
    grads = 4 * full + (4 * shard if zero == 2 else 0)
    grads_at_step = 4 * shard if zero == 2 else 4 * full
    opt = owned * (8 + (4 if dtype < 4 else 0)) + (4 * pieces if cpu else 0)
    # AdamW: torch's single-tensor loop (CPU) makes two temporaries of one piece; the foreach
    # path (CUDA) one temporary list the size of every piece. ZeRO 1/2 then gather each bucket.
    adam = 2 * 4 * max_piece if cpu else 4 * owned
    gather = max_bucket * dtype if zero > 0 else 0
    largest = max((p.numel for c in chunks for p in c if p.ndim > 1), default=0)
    return ModelStates(n, n * dtype, grads, grads_at_step, opt, max(adam, gather), largest)


def deepspeed_states(chunks: list[list[Param]], layout: Layout, runtime: Runtime) -> ModelStates:
    """DeepSpeed ZeRO-1/2/3 model states, as `estimate_zero{2,3}_model_states_mem_needs` count
    them (no offload): 16-bit params (stage 3: sharded + the largest layer gathered with its
    grads), 16-bit grads (stage 1 whole, 2 sharded), an fp32 grad partition, and 12 B/param of
    Adam moments + fp32 master, sharded."""
    dp, stage, dtype = layout.grad_dp, layout.deepspeed_stage, runtime.dtype_bytes
    n = sum(p.numel for c in chunks for p in c)
    per = -(-n // dp)
    largest = max((p.numel for c in chunks for p in c if p.ndim > 1), default=0)
    params = n * dtype if stage < 3 else per * dtype
    # stage 1: 16-bit grads whole + fp32 partition; stage 2: both sharded; stage 3: the 16-bit
    # grads of a gathered layer are reduce-scattered straight into the fp32 partition.
    grads = {1: n * dtype, 2: per * dtype, 3: 0}[stage] + (4 * per if dtype < 4 else per * dtype)
    opt = per * (12 if dtype < 4 else 8)
    gathered = 2 * largest * dtype if stage == 3 else 0  # the layer's params + grads, gathered
    return ModelStates(n, params + gathered, grads, grads, opt, 0, largest)


def inflight(layout: Layout, pp_rank: int) -> list[int]:
    """Model chunk of each micro-batch activation held at once by stage `pp_rank` at its peak
    (the first backward), from the schedules' warm-up counts."""
    p, v, m, r = layout.pp, layout.vp, layout.num_microbatches, pp_rank
    if p == 1:
        return [0]
    if v == 1:  # 1F1B: min(p - r - 1, m) warm-up forwards, then one more before the backward
        return [0] * min(p - r, m)
    total = m * v
    warmup = total if m == p else min(2 * (p - r - 1) + (v - 1) * p, total)
    held = min(warmup + 1, total)
    return [(k % (p * v)) // p for k in range(held)]  # interleaved.chunk_id(k, forward=True)


_STATES: dict[tuple, ModelStates] = {}


def _states(
    config: GPTConfig, layout: Layout, runtime: Runtime, pp_rank: int, moe=None
) -> ModelStates:
    """Model states of a stage, cached on what they depend on (a search varies the rest)."""
    key = (tuple(getattr(config, f.name) for f in dataclasses.fields(config)), pp_rank,
           layout.grad_dp, layout.expert_dp, layout.zero_stage, layout.deepspeed_stage, runtime,
           moe_key(moe))  # fmt: skip
    if key not in _STATES:
        chunks = stage_params(config, pp_rank, moe)
        build = deepspeed_states if layout.deepspeed_stage else megalite_states
        _STATES[key] = build(chunks, layout, runtime)
    return _STATES[key]


# --- one rank ----------------------------------------------------------------------------------
def rank_memory(
    config: GPTConfig, layout: Layout, runtime: Runtime, pp_rank: int, moe=None
) -> RankMemory:
    """Peak bytes of pipeline stage `pp_rank` (config already split for `layout`; `moe` the
    MoE settings split for it, or None)."""
    states = _states(config, layout, runtime, pp_rank, moe)
    act = activation_model(config, layout, runtime, moe)
    p, v, B = layout.pp, layout.vp, runtime.dtype_bytes
    first, last = pp_rank == 0, pp_rank == p - 1
    kinds = [[is_moe(moe, i, config.num_layers) for i in config.layers_of_chunk(pp_rank, c)]
             for c in range(v)]  # fmt: skip

    def chunk_bytes(c: int) -> int:
        total = sum(act.of_layer(k) for k in kinds[c])
        total += act.embedding if first and c == 0 else 0
        total += act.head if last and c == v - 1 else 0
        return total

    held_chunks = inflight(layout, pp_rank)
    held = sum(chunk_bytes(c) for c in held_chunks)
    zero2 = layout.deepspeed_stage is None and layout.zero_stage == 2
    static = states.param_bytes + states.optimizer_bytes
    bwd = static + states.grad_bytes
    fwd = static + (states.grad_bytes_at_step if zero2 else states.grad_bytes)
    rebuild = 0
    if config.recompute_granularity == "full":
        any_moe = any(k for ks in kinds for k in ks)
        rebuild = max(act.layer_full_rebuild, act.moe_layer_full_rebuild if any_moe else 0)
    # The layers' backward runs after the loss's: that micro-batch's head activations are gone.
    head_done = act.head if last else 0
    # The first backward walks the last chunk's layers in reverse: a layer's transient (the
    # MLP's gradients, an MoE layer's dispatcher gradients) meets what the layers after it
    # have already freed (their activations, unless full recompute keeps only the inputs).
    transient, freed = 0, 0
    for moe_layer in reversed(kinds[-1]):
        grads = act.moe_layer_backward if moe_layer else act.layer_backward
        transient = max(transient, grads - freed)
        freed += act.of_layer(moe_layer) if config.recompute_granularity != "full" else 0
    candidates = {
        "backward": bwd + held - head_done + transient + rebuild + states.largest_weight * B,
        "optimizer step": static + states.grad_bytes_at_step + states.optimizer_transient,
    }
    if last:
        candidates["loss forward"] = fwd + held + act.logits_forward
        candidates["loss backward"] = bwd + held + act.logits_backward
    if first:
        emb = config.padded_vocab_size // layout.tp * config.hidden_size * B
        tied_pp1 = p == 1 and not config.untie_embeddings_and_output_weights
        rest = held - chunk_bytes(held_chunks[-1]) + act.embedding
        candidates["embedding backward"] = bwd + rest + emb * (2 if tied_pp1 else 1)
    phase = max(candidates, key=candidates.get)
    peak = int(candidates[phase])
    grads = states.grad_bytes
    known = states.param_bytes + grads + states.optimizer_bytes + held
    role = (
        "only stage"
        if p == 1
        else "first stage"
        if first
        else "last stage"
        if last
        else (f"stage {pp_rank}")
    )
    return RankMemory(
        role=role,
        pp_rank=pp_rank,
        num_params=states.num_params,
        param_bytes=states.param_bytes,
        grad_bytes=grads,
        optimizer_bytes=states.optimizer_bytes,
        activation_bytes=held,
        other_bytes=max(peak - known, 0),
        peak_bytes=max(peak, known),
        detail={
            "peak_at": phase,
            "candidates": {k: int(v) for k, v in candidates.items()},
            "microbatches_in_flight": len(held_chunks),
            "activation_bytes_per_layer_microbatch": act.layer,
        },
    )


def plan_memory(
    config: GPTConfig,
    layout: Layout,
    runtime: Runtime,
    stages: Optional[list[int]] = None,
    moe=None,
) -> list[RankMemory]:
    """One `RankMemory` per pipeline stage, or per stage in `stages` (config already split
    for `layout`, `moe` by `layout.apply_moe`)."""
    wanted = range(layout.pp) if stages is None else stages
    return [rank_memory(config, layout, runtime, r, moe) for r in wanted]
