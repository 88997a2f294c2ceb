"""Model FLOPs per training iteration, for MFU (Narayanan et al., 2021; Megatron-LM's count).

Counts every matrix multiply of forward and backward (backward = 2x forward, so 3x forward in
all), with 2 FLOPs per multiply-add. Per layer and token, forward:

    QKV          2 h (n + 2g) d        n query heads, g query groups (GQA), d head dim
    attention    4 s n d               QK^T and attention x V over the full s x s (as Megatron:
                                       causal masking is not discounted)
    projection   2 n d h
    MLP          2 h f k + 2 f h       f = ffn hidden, k = 2 for SwiGLU's [gate; up], else 1
and once per token the logit layer ``2 h V`` (padded vocabulary). With n d = h this is
Megatron's ``12 B s L h^2 [(1 + g/n + s/h) + (f/h)(3/2 if SwiGLU) + V/(2 L h)]``, and for MHA
with f = 4h it is Narayanan's ``72 B s L h^2 (1 + s/(6h) + V/(12 h L))``.

MoE layers (`moe`, a `megalite.moe.MoEConfig`) count *active* parameters: the router ``2 h E``,
then k experts of width f_e per token and the shared expert of width f_s, each ``2 h f k' + 2 f h``
as the dense MLP (dropless routing: exactly k experts per token), plus ``2 h`` for the shared
expert's gate (``--moe-shared-expert-gate``).

These are *model* FLOPs: activation recompute adds work but not model FLOPs (that would be
hardware FLOPs), so MFU = this / (step time x peak FLOP/s x number of devices).
"""

from __future__ import annotations

from typing import Optional

from megalite.model.config import GPTConfig


def num_floating_point_operations(
    config: GPTConfig, batch_size: int, seq_length: Optional[int] = None, moe=None
) -> float:
    """Forward + backward FLOPs of one iteration over `batch_size` sequences (global batch)."""
    c = config
    s = c.seq_length if seq_length is None else seq_length
    h, n, g, d, f = (
        c.hidden_size,
        c.num_attention_heads,
        c.num_query_groups,
        c.head_dim,
        c.ffn_hidden_size,
    )
    gated = 2 if c.activation == "swiglu" else 1
    attention = 2 * h * (n + 2 * g) * d + 4 * s * n * d + 2 * n * d * h  # QKV, core, projection

    def mlp(width: int) -> int:
        return 2 * h * width * gated + 2 * width * h  # fc1, fc2

    per_token = 2 * h * c.padded_vocab_size
    for layer in range(c.num_layers):
        per_token += attention
        if moe is not None and moe.is_moe_layer(layer, c.num_layers):
            per_token += 2 * h * moe.num_experts  # router
            per_token += moe.moe_router_topk * mlp(moe.moe_ffn_hidden_size or f)
            per_token += mlp(moe.moe_shared_expert_intermediate_size or 0)
            if moe.moe_shared_expert_gate:  # sigmoid(x . w_gate): one h-vector per token
                per_token += 2 * h
        else:
            per_token += mlp(f)
    return 3.0 * batch_size * s * per_token
