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

These are *model* FLOPs: activation recompute adds work but not model FLOPs (that would be
hardware FLOPs), so MFU = this / (step time x peak FLOP/s x number of devices).
"""

from __future__ import annotations

from typing import Optional

from megalite.model.config import GPTConfig


def num_floating_point_operations(
    config: GPTConfig, batch_size: int, seq_length: Optional[int] = None
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
    per_token_layer = (
        2 * h * (n + 2 * g) * d  # fused QKV
        + 4 * s * n * d  # scores and weighted values
        + 2 * n * d * h  # output projection
        + 2 * h * f * gated  # fc1
        + 2 * f * h  # fc2
    )
    per_token = c.num_layers * per_token_layer + 2 * h * c.padded_vocab_size
    return 3.0 * batch_size * s * per_token
