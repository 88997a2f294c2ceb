"""Activation bytes per micro-batch: what autograd keeps for backward, op by op.

Units are one token ``[1, 1, h]`` of this rank's part of the sequence (``s*b/cp`` tokens per
micro-batch; ``/tp`` inside the TP block, ``/tp`` outside it too under sequence parallelism).
A dense layer (pre-norm attention + MLP) keeps:

    layer input h/sp, norm stats, QKV input h/sp, QKV 3h/tp (+2h/tp for RoPE on MHA),
    attention out h/tp, flash log-sum-exp n/tp (fp32), attention residual h/sp, MLP input h/sp,
    MLP 2f/tp (GeLU: input and output; SwiGLU 4f/tp), dropout masks 2h/sp (CPU math attention
    with attention dropout: 2h/tp + 3ns/tp more, the s x s scores)

(Under sequence parallelism the column-parallel linears keep their local input shard and
all-gather it again in backward, as Megatron's do: `tensor_parallel.layers`.)

Context parallelism changes only the core attention (`megalite.context_parallel`): ring
attention (p2p) saves its q, k, v inputs (views of the fused QKV output; GQA: a copy of q beside
it), its merged output and fp32 log-sum-exp, and the projection saves its own contiguous copy
of the output; all-to-all attention (a2a) keeps the post-all-to-all q, k, v (keys and values
repeated to n heads) of the same size, SDPA's output and log-sum-exp, and the projection input.

An MoE layer (`megalite.moe`) keeps, instead of the MLP, per local token (T: the layer's
tokens, ``/tp`` when TP > 1 with or without SP) the router's fp32 input and its top-k indices
and weights; per routed row (M = T k etp rows reach this rank's experts when routing is
balanced) the expert input, the experts' inner activations (as the dense MLP's, width
f_e/etp) and the sort orders; per (token, expert) pair the returned expert output and weight
the combine multiplies; shared experts keep a dense MLP's activations. Routing is data
dependent: the planner assumes balanced experts (the aux loss's aim), and the measured matrix
shows what a random router's imbalance costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalite.model.config import GPTConfig
from megalite.planner.layout import Layout, Runtime


@dataclass
class ActivationModel:
    """Bytes per micro-batch of one layer, of the first stage's extras and of the head."""

    layer: int
    layer_full_rebuild: int  # one layer's saved activations when rebuilt under full recompute
    embedding: int
    head: int
    logits_forward: int  # transient of the loss forward beyond `head`
    logits_backward: int  # transient of the loss backward beyond `head`
    layer_backward: int  # transient of a layer's backward (grads in flight)
    moe_layer: int = 0  # an MoE layer (0: dense model)
    moe_layer_full_rebuild: int = 0
    moe_layer_backward: int = 0  # transient of an MoE layer's backward (dispatcher gradients)

    def of_layer(self, moe: bool) -> int:
        return self.moe_layer if moe else self.layer


def activation_model(
    config: GPTConfig, layout: Layout, runtime: Runtime, moe=None
) -> ActivationModel:
    c, B = config, runtime.dtype_bytes
    s, b = c.seq_length, layout.micro_batch_size
    cp, comm = c.context_parallel_size, c.cp_comm_type
    tokens = s * b / cp
    h, t = c.hidden_size, layout.tp
    sp = t if c.sequence_parallel else 1
    n, g, f = c.num_attention_heads, c.num_query_groups, c.ffn_hidden_size
    d = c.head_dim
    nd = n * d  # query channels (= h unless --kv-channels says otherwise)
    V = c.padded_vocab_size
    cpu = runtime.device_kind == "cpu"
    mask = B if cpu else 1  # dropout keeps a mask of the input's dtype on CPU, bool on CUDA
    norm = 2 * 4 / sp if c.normalization == "LayerNorm" else (h * B + 4) / sp  # per norm
    rope = c.position_embedding_type == "rope"

    def attention(mode: str) -> float:
        """Bytes per token the attention block keeps from its QKV output to its projection."""
        if cp > 1 and comm == "a2a":
            return (3 * nd / t + nd / t + nd / t) * B + (0 if mode == "selective" else 4 * n / t)
        if cp > 1:  # ring: q, k, v views of the QKV output (GQA: q copied, RoPE: q, k rotated)
            qkv = (n + 2 * g) * d / t
            if g != n:
                qkv += (nd + (g * d if rope else 0)) / t
            elif rope:
                qkv += 2 * nd / t
            out = nd / t if mode == "selective" else 2 * nd / t
            return (qkv + out) * B + (0 if mode == "selective" else 4 * n / t)
        # MHA: the fused QKV output stays (v is a view of it); GQA: q and the key/value heads
        # repeated to n are kept instead, 3 n d either way. RoPE on MHA adds rotated q and k.
        qkv = 3 * nd / t + (2 * nd / t if rope and g == n else 0)
        math = cpu and c.attention_dropout > 0  # torch's CPU flash kernel has no dropout
        if mode == "selective":
            core = 0.0  # recomputed: only its q, k, v inputs stay
        elif math:
            core = (2 * nd / t + 3 * n * s / t) * B
        else:
            core = n / t * 4  # flash attention's log-sum-exp, fp32
        return (qkv + nd / t) * B + core

    def saved(mode: str, mlp: float) -> float:
        """Bytes per token of a layer whose MLP part keeps `mlp` bytes per token."""
        if mode == "full":
            return h * B / sp
        drop = 2 * h / sp * mask if c.hidden_dropout > 0 else 0
        return (h / sp + h / sp + h / sp) * B + attention(mode) + mlp + drop + 2 * norm

    dense_mlp = (h / sp + (4 if c.activation == "swiglu" else 2) * f / t) * B
    layer = saved(c.recompute_granularity, dense_mlp)
    moe_mlp = moe_bytes_per_token(c, layout, runtime, moe) if moe is not None else 0.0
    # Token ids: a view of the batch at TP=1 (the embedding keeps it), local ids + mask at TP>1.
    embedding = (b * (s + 1) * 8 if t == 1 and cp == 1 else tokens * (8 if t == 1 else 9)) + (
        tokens * h / sp * mask if c.hidden_dropout > 0 else 0
    )
    head = tokens * ((h / sp + h / sp) * B + norm + 4 * V / t + 8 + 1 + 1)
    padded = c.padded_vocab_size > c.vocab_size
    # Loss forward: the masked logits, their fp32 shift and exp (the softmax not yet saved).
    logits_fwd = tokens * V / t * (B + 8 + (4 if B < 4 else 0)) - tokens * 4 * V / t
    # Loss backward: the gradient of the padded logits (and its cast), then the output layer's
    # weight gradient.
    logits_bwd = tokens * V / t * ((B if padded else 0) + (B if B < 4 else 0)) + V // t * h * B
    f_eff = f * (2 if c.activation == "swiglu" else 1)
    # A layer's backward starts at the MLP: the incoming gradient (all-gathered under SP) and
    # the gradient of the MLP's wide activation; its weight gradient is added by the caller.
    layer_bwd = tokens * B * (h / sp + (h if sp > 1 else 0) + f_eff / t)
    if cp > 1 and comm == "p2p":
        # Ring backward, after the MLP's activations are gone: fp32 copies of q and the output
        # gradient, dq, the travelling K/V pair and its dK/dV accumulator (two of each in flight).
        ct = 8 if B == 8 else 4
        ring = (3 * nd * ct + 2 * (2 * g * d) * (B + ct)) / t - dense_mlp
        layer_bwd = max(layer_bwd, tokens * ring)
    return ActivationModel(
        layer=int(layer * tokens),
        layer_full_rebuild=int(saved("none", dense_mlp) * tokens),
        embedding=int(embedding),
        head=int(head),
        logits_forward=int(logits_fwd),
        logits_backward=int(logits_bwd),
        layer_backward=int(layer_bwd),
        moe_layer=int(saved(c.recompute_granularity, moe_mlp) * tokens) if moe else 0,
        moe_layer_full_rebuild=int(saved("none", moe_mlp) * tokens) if moe else 0,
        moe_layer_backward=int(moe_backward_per_token(c, layout, runtime, moe) * tokens)
        if moe
        else 0,
    )


def moe_bytes_per_token(c: GPTConfig, layout: Layout, runtime: Runtime, moe) -> float:
    """Bytes an MoE layer's MLP part keeps per token of the rank's sequence (see the module
    docstring), under balanced routing."""
    B, h, t = runtime.dtype_bytes, c.hidden_size, layout.tp
    k, etp = moe.moe_router_topk, layout.expert_tp
    fe = moe.moe_ffn_hidden_size or c.ffn_hidden_size
    wide = (4 if c.activation == "swiglu" else 2) * fe / etp
    local = 1 / t  # the layer's tokens per token of the sequence: split over TP when TP > 1
    rows = local * k * etp  # rows computed by this rank's experts
    pairs = local * k  # (token, expert) pairs this rank combines
    # fp32 input, fp32 logits (their top-k gather), top-k indices, top-k softmax
    router = 4 * h + 4 * moe.num_experts + 8 * k + 4 * k
    if moe.moe_token_dispatcher_type == "alltoall":
        per_row = h * B + wide * B + 16  # expert input, inner activations, two sort orders
        # returned output and its weighted copy (the combine's multiply and index_add keep
        # them), weight, token ids, weight order
        per_pair = 2 * h * B + B + 16
    else:  # allgather: every token of the ETP x EP group is seen; rows are this rank's share
        # input, inner, output and weighted output, weight, ids, order
        per_row = 3 * h * B + wide * B + B + 16
        per_pair = layout.ep * etp  # the mask of the gathered pairs (bool)
    bytes_ = local * router + rows * per_row + pairs * per_pair
    fs = moe.moe_shared_expert_intermediate_size
    if fs:  # a dense MLP; its input is the router's own (fp32, unsplit) unless a copy is made
        sp = t if c.sequence_parallel else 1
        shared_input = h * B / sp if B < 4 else (h * B if t > 1 and sp == 1 else 0)
        bytes_ += shared_input + (4 if c.activation == "swiglu" else 2) * fs / t * B
    return bytes_


def moe_backward_per_token(c: GPTConfig, layout: Layout, runtime: Runtime, moe) -> float:
    """Gradients in flight when an MoE layer's backward starts, per token of the sequence:
    the combine's row gradients, moved back to the experts (alltoall) or all-gathered over
    the ETP x EP group (allgather), and the experts' inner-activation gradient."""
    B, h, t = runtime.dtype_bytes, c.hidden_size, layout.tp
    k, etp = moe.moe_router_topk, layout.expert_tp
    fe = moe.moe_ffn_hidden_size or c.ffn_hidden_size
    inner = fe * (2 if c.activation == "swiglu" else 1) / etp
    local = 1 / t
    rows = local * k * etp
    if moe.moe_token_dispatcher_type == "alltoall":
        return (2 * local * k * h + rows * (h + inner)) * B
    return (local * layout.ep * etp * h + rows * (h + inner)) * B
