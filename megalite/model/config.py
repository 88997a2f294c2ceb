"""GPTConfig: the shape of the model and how it is split, checked before anything is built.

Field names follow Megatron-LM's flags (``--num-layers`` -> `num_layers`, ...). The parallel
sizes are part of the config (as Megatron's ModelParallelConfig) so that a layout the model
cannot take (heads not divisible by TP, layers not divisible across stages) fails here, with the
numbers, before any process group or weight exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "swiglu")
POSITION_EMBEDDINGS = ("learned", "rope")
RECOMPUTE = ("none", "full", "selective")


@dataclass
class GPTConfig:
    """A decoder-only transformer (pre-norm GPT) and its tensor/pipeline split."""

    num_layers: int
    """Transformer layers in the whole model (all pipeline stages together)."""
    hidden_size: int
    """Width h of the residual stream."""
    num_attention_heads: int
    """Query heads; head dim = hidden_size / num_attention_heads."""
    vocab_size: int
    """Tokenizer vocabulary; the embedding is padded to `padded_vocab_size`."""
    seq_length: int
    """Tokens per sample s."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention (GQA); None = num_attention_heads (MHA)."""
    ffn_hidden_size: Optional[int] = None
    """MLP inner width; None = 4 * hidden_size. With SwiGLU the fc1 output is twice this."""
    max_position_embeddings: Optional[int] = None
    """Rows of the learned position table (and RoPE's cache); None = seq_length."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this x TP (Megatron's rule)."""
    normalization: str = "LayerNorm"
    """"LayerNorm" or "RMSNorm"."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every norm."""
    activation: str = "gelu"
    """MLP activation: "gelu" or "swiglu" (silu(gate) * up, Megatron's --swiglu)."""
    position_embedding_type: str = "learned"
    """"learned" (absolute table on the first stage) or "rope" (rotary, inside attention)."""
    rotary_base: int = 10000
    """RoPE base theta."""
    add_bias_linear: bool = True
    """Biases on the QKV, projection and MLP linears (False: --disable-bias-linear)."""
    untie_embeddings_and_output_weights: bool = False
    """False: the output layer reuses the word embedding (summed grads across stages)."""
    hidden_dropout: float = 0.1
    """Dropout on the embedding output and after attention / MLP, before the residual add."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    init_method_std: float = 0.02
    """Std of the normal init; output projections use std / sqrt(2 * num_layers)."""
    sequence_parallel: bool = False
    """Split norms/dropout/residual along the sequence over TP ranks ([s/tp, b, h])."""
    recompute_granularity: str = "none"
    """"none", "full" (recompute every layer in backward) or "selective" (core attention)."""
    params_dtype: torch.dtype = torch.float32
    """dtype of the parameters (initialization always happens in fp32)."""
    tensor_model_parallel_size: int = 1
    """TP size the model is split for."""
    pipeline_model_parallel_size: int = 1
    """PP size: number of pipeline stages."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Layers per model chunk for the interleaved schedule; None = one chunk per stage."""

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.recompute_granularity is None:
            self.recompute_granularity = "none"
        self._check_values()
        self._check_layout()

    def _check_values(self) -> None:
        for name in (
            "num_layers hidden_size num_attention_heads vocab_size seq_length num_query_groups "
            "ffn_hidden_size max_position_embeddings make_vocab_size_divisible_by "
            "tensor_model_parallel_size pipeline_model_parallel_size"
        ).split():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, allowed in (
            ("normalization", NORMALIZATIONS),
            ("activation", ACTIVATIONS),
            ("position_embedding_type", POSITION_EMBEDDINGS),
            ("recompute_granularity", RECOMPUTE),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.init_method_std <= 0:
            raise ValueError(f"init_method_std must be > 0, got {self.init_method_std}")
        h, heads, groups = self.hidden_size, self.num_attention_heads, self.num_query_groups
        if h % heads != 0:
            raise ValueError(f"hidden_size ({h}) is not divisible by num_attention_heads ({heads})")
        if heads % groups != 0:
            raise ValueError(
                f"num_attention_heads ({heads}) is not divisible by num_query_groups ({groups})"
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")
        if self.max_position_embeddings < self.seq_length:
            raise ValueError(
                f"max_position_embeddings ({self.max_position_embeddings}) < seq_length "
                f"({self.seq_length})"
            )

    def _check_layout(self) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        heads, groups, layers = self.num_attention_heads, self.num_query_groups, self.num_layers
        by_tp = f"tensor-model-parallel size ({tp})"
        if heads % tp != 0:
            raise ValueError(f"num_attention_heads ({heads}) is not divisible by {by_tp}")
        if groups % tp != 0:
            raise ValueError(f"num_query_groups ({groups}) is not divisible by {by_tp}")
        if self.ffn_hidden_size % tp != 0:
            ffn = self.ffn_hidden_size
            raise ValueError(f"ffn_hidden_size ({ffn}) is not divisible by {by_tp}")
        if self.sequence_parallel and self.seq_length % tp != 0:
            raise ValueError(
                f"sequence parallelism needs seq_length ({self.seq_length}) divisible by {by_tp}"
            )
        if layers % pp != 0:
            raise ValueError(
                f"num_layers ({layers}) is not divisible by pipeline-model-parallel size ({pp})"
            )
        per_virtual = self.num_layers_per_virtual_pipeline_stage
        if per_virtual is not None:
            if not isinstance(per_virtual, int) or per_virtual < 1:
                raise ValueError(
                    f"num_layers_per_virtual_pipeline_stage must be >= 1, got {per_virtual!r}"
                )
            if pp < 2:
                raise ValueError(
                    "num_layers_per_virtual_pipeline_stage (interleaved schedule) needs "
                    f"pipeline-model-parallel size > 1, got {pp}"
                )
            if (layers // pp) % per_virtual != 0:
                raise ValueError(
                    f"layers per pipeline stage ({layers} / {pp} = {layers // pp}) are not "
                    f"divisible by num_layers_per_virtual_pipeline_stage ({per_virtual})"
                )

    @property
    def head_dim(self) -> int:
        """Channels per attention head (Megatron's kv_channels)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rows of the embedding / logits: a multiple of divisible_by x TP."""
        from megalite.tensor_parallel.utils import vocab_size_with_padding

        return vocab_size_with_padding(
            self.vocab_size, self.make_vocab_size_divisible_by, self.tensor_model_parallel_size
        )

    @property
    def virtual_pipeline_size(self) -> int:
        """Model chunks per pipeline stage (1 without interleaving)."""
        if self.num_layers_per_virtual_pipeline_stage is None:
            return 1
        per_stage = self.num_layers // self.pipeline_model_parallel_size
        return per_stage // self.num_layers_per_virtual_pipeline_stage

    def layers_of_chunk(self, pp_rank: int, vp_rank: int = 0) -> range:
        """Global indices of the layers in model chunk `vp_rank` of stage `pp_rank`.

        Chunk c of stage r is virtual stage ``c * pp + r`` (Megatron's interleaving): with 8
        layers, PP=2 and 2 chunks, stage 0 holds layers 0-1 and 4-5, stage 1 holds 2-3 and 6-7.
        """
        pp, v = self.pipeline_model_parallel_size, self.virtual_pipeline_size
        if not (0 <= pp_rank < pp and 0 <= vp_rank < v):
            raise ValueError(f"no chunk {vp_rank} on stage {pp_rank} (PP={pp}, chunks={v})")
        per_chunk = self.num_layers // (pp * v)
        first = (vp_rank * pp + pp_rank) * per_chunk
        return range(first, first + per_chunk)
