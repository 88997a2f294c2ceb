"""The transformer layer from tensor-parallel pieces: causal self-attention and an MLP.

Activations are ``[s, b, h]``; under sequence parallelism the residual stream, norms and dropout
work on ``[s/tp, b, h]`` and the column-parallel linears all-gather the sequence on the way in
(the row-parallel ones reduce-scatter it on the way out).

Fused QKV layout (Megatron-core's, grouped-query attention): the output dim of `linear_qkv` is
``num_query_groups`` blocks, one per key/value head, each holding that group's query heads then
its key head then its value head::

    [ q(g0,0) .. q(g0,n/g-1) k(g0) v(g0) | q(g1,0) .. k(g1) v(g1) | ... ]   each head_dim wide

so a contiguous TP shard (``partition_stride=1``) is whole groups: rank r holds query heads,
keys and values of groups ``[r*g/tp, (r+1)*g/tp)`` and attention needs no communication. Query
head j uses key/value group ``j // (n/g)``.

SwiGLU's fc1 is the fused ``[gate; up]`` (``2 * ffn`` rows) with ``partition_stride=2``: each
rank holds its slice of gate *and* of up, so the local output splits into matching halves and a
TP=1 checkpoint reshards by plain slicing.

Every weight is initialized from `ParamInit`: a `torch.Generator` seeded by (seed, global
parameter name), so the same seed gives the same full model at any TP/PP split.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalite.context_parallel import check_heads, context_parallel_attention
from megalite.model.config import GPTConfig
from megalite.model.norms import build_norm
from megalite.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    checkpoint,
    get_rng_tracker,
)
from megalite.tensor_parallel.utils import group_rank_and_size

InitMethod = Callable[[torch.Tensor], None]
Rope = Optional[tuple[torch.Tensor, torch.Tensor]]  # (cos, sin), each [s, 1, 1, head_dim]


class ParamInit:
    """Deterministic init per parameter: N(0, std) from a generator seeded by (seed, name)."""

    def __init__(self, seed: int, std: float, num_layers: int):
        self.seed, self.std = seed, std
        # Output projections feed the residual sum of 2L branches (GPT-2 / Megatron scaling).
        self.scaled_std = std / math.sqrt(2.0 * num_layers)

    def generator(self, name: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}/{name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def normal(self, name: str, scaled: bool = False, rows: Optional[int] = None) -> InitMethod:
        """Init filling the full weight; with `rows`, only its first `rows` rows are drawn and
        the rest (vocabulary padding) are zero, so the real rows do not depend on the padding."""
        std = self.scaled_std if scaled else self.std

        def init(full: torch.Tensor) -> None:
            with torch.no_grad():
                real = full if rows is None else full[:rows]
                real.normal_(0.0, std, generator=self.generator(name))
                if rows is not None:
                    full[rows:].zero_()

        return init


def rope_cache(config: GPTConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[max_positions, 1, 1, rotary_dim]`` for rotate-half RoPE (Megatron's).

    With ``rotary_percent < 1`` only the first `rotary_dim` channels of each head rotate.
    """
    d = config.rotary_dim
    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    emb = torch.cat([angles, angles], dim=-1)[:, None, None, :]
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``[s, b, heads, d]`` by position: ``x * cos + rotate_half(x) * sin``.

    cos/sin are cast to x's dtype (Megatron-core does the same), so bf16 stays bf16. When cos is
    narrower than the head (``--rotary-percent``), the remaining channels pass through.
    """
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class SelfAttention(nn.Module):
    """Causal self-attention: ``[s, b, h]`` (``[s/tp, b, h]`` with SP) -> the same shape.

    With a CP group of 2+ ranks, ``s`` is this rank's load-balanced part of the sequence
    (`megalite.context_parallel.split`) and the core attention runs over the CP group
    (``config.cp_comm_type`` "p2p": ring, "a2a": all-to-all); it equals full causal attention.
    """

    def __init__(
        self, config: GPTConfig, prefix: str, init: ParamInit, tp_group, device=None,
        cp_group=None,
    ):  # fmt: skip
        super().__init__()
        _, tp = group_rank_and_size(tp_group)
        c, d = config, config.head_dim
        self.cp_group, self.cp_comm_type = cp_group, c.cp_comm_type
        cp = group_rank_and_size(cp_group)[1]
        if cp == 1:
            self.cp_group = None
        elif c.cp_comm_type == "a2a":
            check_heads(c.num_attention_heads, c.num_query_groups, cp, tp)
        self.heads_per_group = c.num_attention_heads // c.num_query_groups
        self.local_groups = c.num_query_groups // tp
        self.head_dim, self.dropout = d, c.attention_dropout
        self.sequence_parallel = c.sequence_parallel and tp > 1
        self.recompute_core = c.recompute_granularity == "selective"
        common = dict(
            group=tp_group,
            bias=c.add_bias_linear,
            sequence_parallel=c.sequence_parallel,
            params_dtype=c.params_dtype,
            device=device,
        )
        qkv_size = (c.num_attention_heads + 2 * c.num_query_groups) * d
        qkv_common = dict(common, bias=c.add_bias_linear or c.add_qkv_bias)
        self.linear_qkv = ColumnParallelLinear(
            c.hidden_size, qkv_size, init_method=init.normal(prefix + "linear_qkv.weight"),
            gather_output=False, **qkv_common,
        )  # fmt: skip
        self.linear_proj = RowParallelLinear(
            c.num_attention_heads * d, c.hidden_size, input_is_parallel=True,
            init_method=init.normal(prefix + "linear_proj.weight", scaled=True), **common,
        )  # fmt: skip

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [s, b, n_local, d]``, ``k, v [s, b, g_local, d]`` -> ``[s, b, n_local * d]``."""
        s, b = q.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        p = self.dropout if self.training else 0.0
        # Dropout on this rank's heads must differ across TP ranks: draw it from the tracker's
        # model-parallel stream (under SP the whole layer already runs inside that stream).
        fork = p > 0 and not self.sequence_parallel
        with get_rng_tracker().fork() if fork else contextlib.nullcontext():
            if self.cp_group is not None:  # GQA: the CP attention takes the g key/value heads
                out = context_parallel_attention(q, k, v, self.cp_group, self.cp_comm_type, p)
            else:
                if self.heads_per_group > 1:
                    k = k.repeat_interleave(self.heads_per_group, dim=1)
                    v = v.repeat_interleave(self.heads_per_group, dim=1)
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def forward(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        qkv, _ = self.linear_qkv(x)  # [s, b, g_local * (n/g + 2) * d], full s even under SP
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.local_groups, self.heads_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.heads_per_group].reshape(s, b, -1, self.head_dim)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
        if rope is not None:  # the model passes cos/sin of this rank's positions (CP: global)
            cos, sin = rope[0][:s], rope[1][:s]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.recompute_core and self.training and torch.is_grad_enabled():
            # Selective recompute: keep q, k, v, recompute the s x s attention in backward.
            context = checkpoint(self.core_attention, q, k, v)
        else:
            context = self.core_attention(q, k, v)
        out, _ = self.linear_proj(context)
        return out


class MLP(nn.Module):
    """``[s, b, h] -> [s, b, ffn/tp] -> [s, b, h]``; GeLU, or SwiGLU's ``silu(gate) * up``."""

    def __init__(self, config: GPTConfig, prefix: str, init: ParamInit, tp_group, device=None):
        super().__init__()
        c = config
        self.swiglu = c.activation == "swiglu"
        common = dict(
            group=tp_group,
            bias=c.add_bias_linear,
            sequence_parallel=c.sequence_parallel,
            params_dtype=c.params_dtype,
            device=device,
        )
        width = c.ffn_hidden_size * (2 if self.swiglu else 1)
        self.linear_fc1 = ColumnParallelLinear(
            c.hidden_size, width, init_method=init.normal(prefix + "linear_fc1.weight"),
            partition_stride=2 if self.swiglu else 1, gather_output=False, **common,
        )  # fmt: skip
        self.linear_fc2 = RowParallelLinear(
            c.ffn_hidden_size, c.hidden_size, input_is_parallel=True,
            init_method=init.normal(prefix + "linear_fc2.weight", scaled=True), **common,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.linear_fc1(x)
        if self.swiglu:
            gate, up = y.chunk(2, dim=-1)  # this rank's [gate_r | up_r] (partition_stride=2)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y)
        out, _ = self.linear_fc2(y)
        return out


class TransformerLayer(nn.Module):
    """Pre-norm block: ``x + drop(attn(norm(x)))``, then ``x + drop(mlp(norm(x)))``.

    With `moe` (a `megalite.moe.MoEConfig` that makes this layer an MoE layer) the MLP is a
    `megalite.moe.MoELayer` over `moe_groups` (same name, ``mlp.``, so names stay Megatron's:
    ``mlp.router.weight``, ``mlp.experts.*``, ``mlp.shared_experts.*``). With a `cp_group` of 2+
    ranks the attention is context-parallel (see `SelfAttention`).
    """

    def __init__(
        self, config: GPTConfig, prefix: str, init: ParamInit, tp_group, device=None,
        moe=None, moe_groups=None, cp_group=None,
    ):  # fmt: skip
        super().__init__()
        c = config

        def norm():
            return build_norm(
                c.normalization, c.hidden_size, c.norm_epsilon,
                zero_centered_gamma=c.apply_layernorm_1p, sequence_parallel=c.sequence_parallel,
                params_dtype=c.params_dtype, device=device,
            )  # fmt: skip

        self.input_layernorm = norm()
        self.self_attention = SelfAttention(
            c, prefix + "self_attention.", init, tp_group, device, cp_group
        )
        self.pre_mlp_layernorm = norm()
        if moe is not None:
            from megalite.moe.layer import MoEGroups, MoELayer

            groups = moe_groups if moe_groups is not None else MoEGroups(tp=tp_group)
            self.mlp = MoELayer(c, moe, prefix + "mlp.", init, groups, device)
        else:
            self.mlp = MLP(c, prefix + "mlp.", init, tp_group, device)
        self.hidden_dropout = c.hidden_dropout

    def forward(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        p = self.hidden_dropout if self.training else 0.0
        x = x + F.dropout(self.self_attention(self.input_layernorm(x), rope), p)
        return x + F.dropout(self.mlp(self.pre_mlp_layernorm(x)), p)
