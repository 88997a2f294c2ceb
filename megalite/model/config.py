"""GPTConfig: the shape of the model and how it is split, checked before anything is built.

Every field that is a flag is declared with `megalite.config.option` and carries Megatron-LM's
flag name (``--num-layers`` <-> `num_layers`): the training CLI, config files, checkpoint
metadata and the offline tools all build this one dataclass. Derived defaults (the SwiGLU FFN
width, the position table, the query groups) are computed once, here, in ``__post_init__``.

The split the model is built for (TP, PP, chunks, sequence parallelism) is part of the config, as
in Megatron's TransformerConfig, so that a layout the model cannot take fails here, naming the
numbers, before any process group or weight exists. Those fields are not flags of their own: the
flags live in `megalite.config.ParallelConfig`, and `ParallelConfig.model_split()` fills them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megalite.config import ConfigError, option

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
RECOMPUTE = ("none", "full", "selective")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def swiglu_ffn_size(hidden_size: int) -> int:
    """Megatron's SwiGLU default: about 8h/3 rounded down to a multiple of 64 (same parameters
    as a 4h GeLU MLP); 4h when that rounds to zero."""
    return int(2 * 4 * hidden_size / 3 / 64) * 64 or 4 * hidden_size


@dataclass
class GPTConfig:
    """A decoder-only transformer (pre-norm GPT) and its tensor/pipeline split."""

    num_layers: int = option(help="transformer layers in the whole model", required=True)
    hidden_size: int = option(help="width h of the residual stream", required=True)
    num_attention_heads: int = option(help="query heads", required=True)
    seq_length: int = option(help="tokens per sample", required=True)
    vocab_size: Optional[int] = option(
        None,
        "tokenizer vocabulary (set from the tokenizer; padded to padded_vocab_size)",
        cli=False,
    )
    group_query_attention: bool = option(False, "grouped-query attention (with --num-query-groups)")
    num_query_groups: Optional[int] = option(None, "key/value heads (GQA); default: one per head")
    kv_channels: Optional[int] = option(None, "channels per head; default hidden / heads")
    ffn_hidden_size: Optional[int] = option(
        None, "MLP inner width; default 4h, or ~8h/3 (multiple of 64) with --swiglu"
    )
    max_position_embeddings: Optional[int] = option(
        None, "rows of the learned position table / RoPE cache; default --seq-length"
    )
    make_vocab_size_divisible_by: int = option(128, "pad the vocabulary to a multiple of this x TP")
    normalization: str = option("LayerNorm", "norm of every block", choices=NORMALIZATIONS)
    norm_epsilon: float = option(1e-5, "epsilon of every norm")
    apply_layernorm_1p: bool = option(
        False, "norm weights stored as w - 1 (zero-centred gamma, initialised to 0)"
    )
    swiglu: bool = option(False, "SwiGLU MLP: silu(gate) * up")
    position_embedding_type: str = option(
        "learned_absolute", "absolute table or rotary", choices=POSITION_EMBEDDINGS
    )
    no_position_embedding: bool = option(
        False, "no learned position table (with --position-embedding-type rope: no effect)"
    )
    rotary_base: int = option(10000, "RoPE base theta")
    rotary_percent: float = option(1.0, "fraction of each head's channels that RoPE rotates")
    disable_bias_linear: bool = option(False, "no biases on the QKV, projection and MLP linears")
    add_qkv_bias: bool = option(
        False, "a bias on the QKV linear even with --disable-bias-linear (Qwen2 style)"
    )
    untie_embeddings_and_output_weights: bool = option(
        False, "separate output layer instead of reusing the word embedding"
    )
    hidden_dropout: float = option(0.1, "dropout after embedding, attention and MLP")
    attention_dropout: float = option(0.1, "dropout on the attention probabilities")
    init_method_std: float = option(0.02, "std of the normal init (output projections / sqrt(2L))")
    recompute_granularity: str = option(
        "none", "activation recompute: full layers or core attention", choices=RECOMPUTE
    )
    params_dtype: Optional[torch.dtype] = option(
        None, "parameter dtype (from --bf16 / --fp16)", cli=False
    )
    # The split the model is built for; the flags are ParallelConfig's.
    tensor_model_parallel_size: int = option(1, "TP size the model is split for", cli=False)
    pipeline_model_parallel_size: int = option(1, "pipeline stages", cli=False)
    num_layers_per_virtual_pipeline_stage: Optional[int] = option(
        None, "layers per model chunk (interleaved schedule)", cli=False
    )
    sequence_parallel: bool = option(False, "norms/dropout split along the sequence", cli=False)
    context_parallel_size: int = option(1, "CP: ranks each sequence is split across", cli=False)
    cp_comm_type: str = option("p2p", "CP attention: p2p (ring) or a2a (all-to-all)", cli=False)

    def __post_init__(self) -> None:
        if self.position_embedding_type == "learned":  # megalite's name before the flag's
            self.position_embedding_type = "learned_absolute"
        if self.recompute_granularity is None:
            self.recompute_granularity = "none"
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            if getattr(self, name) is None:
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        if self.group_query_attention and self.num_query_groups is None:
            raise ConfigError("--group-query-attention needs --num-query-groups")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            h = self.hidden_size
            self.ffn_hidden_size = swiglu_ffn_size(h) if self.swiglu else 4 * h
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.params_dtype is None:
            self.params_dtype = torch.float32
        elif isinstance(self.params_dtype, str):  # from a saved config
            self.params_dtype = getattr(torch, self.params_dtype)
        self._check_values()
        self._check_layout()

    def _check_values(self) -> None:
        names = (
            "num_layers hidden_size num_attention_heads seq_length num_query_groups "
            "ffn_hidden_size max_position_embeddings make_vocab_size_divisible_by "
            "tensor_model_parallel_size pipeline_model_parallel_size"
        ).split()
        if self.vocab_size is not None:
            names.append("vocab_size")
        if self.kv_channels is not None:
            names.append("kv_channels")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{_flag(name)} must be an integer >= 1, got {value!r}")
        for name, allowed in (
            ("normalization", NORMALIZATIONS),
            ("position_embedding_type", POSITION_EMBEDDINGS),
            ("recompute_granularity", RECOMPUTE),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{_flag(name)} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.init_method_std <= 0:
            raise ConfigError(f"--init-method-std must be > 0, got {self.init_method_std}")
        h, heads, groups = self.hidden_size, self.num_attention_heads, self.num_query_groups
        if self.kv_channels is None and h % heads != 0:
            raise ConfigError(
                f"--hidden-size {h} is not divisible by --num-attention-heads {heads}; "
                "set --kv-channels to choose the head width"
            )
        if heads % groups != 0:
            raise ConfigError(
                f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}"
            )
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        if self.position_embedding_type == "rope" and self.rotary_dim % 2 != 0:
            raise ConfigError(
                f"RoPE needs an even number of rotated channels, got {self.rotary_dim} "
                f"(head dim {self.head_dim} x rotary_percent {self.rotary_percent})"
            )
        if self.max_position_embeddings < self.seq_length:
            raise ConfigError(
                f"--max-position-embeddings {self.max_position_embeddings} < --seq-length "
                f"{self.seq_length}"
            )

    def _check_context_parallel(self) -> None:
        """The load-balanced split and the CP attention's own limits, naming the numbers."""
        from megalite.context_parallel import check_heads, check_seq_length

        cp, tp = self.context_parallel_size, self.tensor_model_parallel_size
        try:
            check_seq_length(self.seq_length, cp, tp if self.sequence_parallel else 1)
            if self.cp_comm_type == "a2a":
                check_heads(self.num_attention_heads, self.num_query_groups, cp, tp)
        except ValueError as e:
            raise ConfigError(f"--context-parallel-size {cp}: {e}") from None

    def _check_layout(self) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        heads, groups, layers = self.num_attention_heads, self.num_query_groups, self.num_layers
        by_tp = f"--tensor-model-parallel-size {tp}"
        if heads % tp != 0:
            raise ConfigError(f"--num-attention-heads {heads} is not divisible by {by_tp}")
        if groups % tp != 0:
            raise ConfigError(f"--num-query-groups {groups} is not divisible by {by_tp}")
        if self.ffn_hidden_size % tp != 0:
            ffn = self.ffn_hidden_size
            raise ConfigError(f"--ffn-hidden-size {ffn} is not divisible by {by_tp}")
        if self.sequence_parallel and self.seq_length % tp != 0:
            raise ConfigError(
                f"--sequence-parallel needs --seq-length {self.seq_length} divisible by {by_tp}"
            )
        if layers % pp != 0:
            raise ConfigError(
                f"--num-layers {layers} is not divisible by --pipeline-model-parallel-size {pp}"
            )
        if self.context_parallel_size > 1:
            self._check_context_parallel()
        per_virtual = self.num_layers_per_virtual_pipeline_stage
        if per_virtual is not None:
            if not isinstance(per_virtual, int) or per_virtual < 1:
                raise ConfigError(
                    f"--num-layers-per-virtual-pipeline-stage must be >= 1, got {per_virtual!r}"
                )
            if pp < 2:
                raise ConfigError(
                    "--num-layers-per-virtual-pipeline-stage (interleaved schedule) needs "
                    f"--pipeline-model-parallel-size > 1, got {pp}"
                )
            if (layers // pp) % per_virtual != 0:
                raise ConfigError(
                    f"layers per pipeline stage (--num-layers {layers} / "
                    f"--pipeline-model-parallel-size {pp} = {layers // pp}) are not divisible by "
                    f"--num-layers-per-virtual-pipeline-stage {per_virtual}"
                )

    @property
    def activation(self) -> str:
        """MLP activation: "swiglu" or "gelu"."""
        return "swiglu" if self.swiglu else "gelu"

    @property
    def add_bias_linear(self) -> bool:
        """Biases on the QKV, projection and MLP linears."""
        return not self.disable_bias_linear

    @property
    def learned_positions(self) -> bool:
        """A learned absolute position table is added to the embedding (Megatron's
        ``add_position_embedding``: ``--no-position-embedding`` turns it off; RoPE has none)."""
        return self.position_embedding_type == "learned_absolute" and not self.no_position_embedding

    @property
    def head_dim(self) -> int:
        """Channels per attention head (Megatron's kv_channels)."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (the rest pass through)."""
        return int(self.head_dim * self.rotary_percent)

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rows of the embedding / logits: a multiple of divisible_by x TP."""
        from megalite.tensor_parallel.utils import vocab_size_with_padding

        if self.vocab_size is None:
            raise ConfigError("the model's vocab_size is not set (it comes from the tokenizer)")
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
