"""Where each parameter of a megalite checkpoint lives, and how its TP shards join and split.

A checkpoint's ``meta.json`` holds its model config; `config_from_meta` rebuilds that
`GPTConfig` at any TP/PP/virtual layout, and `GPTConfig` itself refuses a layout
that cannot hold the model (heads, query groups or ffn not divisible by TP, layers not divisible
by PP x chunks) before anything is read or written.

Split rules, by parameter name (the same as the attributes the TP layers set, see
docs/CONTRACTS.md; tests/test_reshard_units.py checks the table against a built model):

====================================================  ===========  =====================
name                                                  partition    note
====================================================  ===========  =====================
embedding.word_embeddings.weight, output_layer.weight  dim 0        padded vocabulary rows
*.linear_qkv.weight / .bias                            dim 0        whole query groups
*.linear_fc1.weight / .bias                            dim 0        stride 2 with SwiGLU
*.linear_proj.weight, *.linear_fc2.weight              dim 1
everything else (norms, row biases, positions)         replicated
====================================================  ===========  =====================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from megalite.model import GPTConfig
from megalite.tensor_parallel.utils import shard_tensor, vocab_size_with_padding

WORD_EMBEDDING = "embedding.word_embeddings.weight"
POSITION_EMBEDDING = "embedding.position_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
VOCAB_PARAMS = (WORD_EMBEDDING, OUTPUT_LAYER)


@dataclass(frozen=True)
class Split:
    """How one parameter is divided over TP ranks: ``dim`` None = replicated."""

    dim: Optional[int]
    stride: int = 1
    vocab: bool = False


def split_rule(name: str, swiglu: bool) -> Split:
    """The TP split of parameter `name` (global megalite name)."""
    if name in VOCAB_PARAMS:
        return Split(0, 1, vocab=True)
    if name.endswith((".linear_qkv.weight", ".linear_qkv.bias")):
        return Split(0)
    if name.endswith((".linear_fc1.weight", ".linear_fc1.bias")):
        return Split(0, 2 if swiglu else 1)
    if name.endswith((".linear_proj.weight", ".linear_fc2.weight")):
        return Split(1)
    return Split(None)


def merge_shards(shards: list[torch.Tensor], rule: Split) -> torch.Tensor:
    """The full tensor from TP shards in rank order (inverse of `shard_tensor`)."""
    if rule.dim is None or len(shards) == 1:
        return shards[0].clone()
    if rule.stride == 1:
        return torch.cat(shards, dim=rule.dim)
    # stride k: each shard is [block0_r; block1_r; ...]; the full tensor is block by block
    pieces = [s.chunk(rule.stride, dim=rule.dim) for s in shards]
    return torch.cat([p[b] for b in range(rule.stride) for p in pieces], dim=rule.dim)


def split_full(full: torch.Tensor, rule: Split, tp: int, rank: int) -> torch.Tensor:
    """TP `rank`'s shard of `full` (a copy), as the model's layers cut it."""
    if rule.dim is None:
        return full.clone()
    return shard_tensor(full, rule.dim, tp, rank, rule.stride)


def resize_vocab(full: torch.Tensor, rows: int, true_vocab: Optional[int]) -> torch.Tensor:
    """A ``[V_padded, ...]`` vocabulary tensor cut or padded to `rows` rows.

    Padding rows sit after the real ones, so cutting drops padding only (``rows >= V``). New
    padding rows repeat the last existing padding row (as Megatron's checkpoint saver does:
    a trained padding row gives a low logit), or are zeros when there was none to repeat. The
    real rows never change; the loss moves only through the padding logits in the softmax.
    """
    have = full.shape[0]
    if rows == have:
        return full
    if true_vocab is not None and rows < true_vocab:
        raise ValueError(f"cannot cut the vocabulary to {rows} rows: it has {true_vocab} tokens")
    if rows < have:
        return full[:rows].clone()
    if true_vocab is not None and have > true_vocab:
        extra = full[-1:].expand(rows - have, *full.shape[1:])
    else:
        extra = full.new_zeros(rows - have, *full.shape[1:])
    return torch.cat([full, extra], dim=0)


def true_vocab_size(meta: dict) -> Optional[int]:
    """The tokenizer's vocabulary size of a checkpoint (what the trainer padded), if knowable.

    Saved in the model config; for an old checkpoint that lacks it, the tokenizer is rebuilt from
    its files when these still exist.
    """
    if meta["model"].get("vocab_size"):
        return int(meta["model"]["vocab_size"])
    settings = meta.get("settings", {})
    paths = [settings.get(k) for k in ("tokenizer_model", "vocab_file", "merge_file")]
    if not any(p and os.path.exists(p) for p in paths):
        return None
    from megalite.data.config import tokenizer_from_settings

    tok = tokenizer_from_settings(settings)
    return tok.vocab_size


def config_from_meta(
    meta: dict,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    layers_per_virtual: Optional[int] = -1,
    vocab_size: Optional[int] = None,
) -> GPTConfig:
    """The `GPTConfig` of a checkpoint at layout (tp, pp, layers per virtual stage).

    Omitted layout values keep the checkpoint's (``layers_per_virtual=-1``: keep). `vocab_size`
    defaults to the saved padded size, which pads to itself at the saved TP. Dropout is off (the
    tools only convert). Raises ``ValueError`` (GPTConfig's message) for a layout that cannot
    hold the model.
    """
    from megalite.checkpoint.format import saved_model_config

    m = meta["model"]
    changes = {
        "tensor_model_parallel_size": m["tensor_model_parallel_size"] if tp is None else tp,
        "pipeline_model_parallel_size": m["pipeline_model_parallel_size"] if pp is None else pp,
        "vocab_size": vocab_size or meta["padded_vocab_size"],
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }
    if layers_per_virtual != -1:
        changes["num_layers_per_virtual_pipeline_stage"] = layers_per_virtual
    if changes["tensor_model_parallel_size"] == 1:
        changes["sequence_parallel"] = False
    return saved_model_config(meta, **changes)


def padded_vocab(meta: dict, tp: int) -> int:
    """The padded vocabulary the checkpoint's model has at TP size `tp`."""
    if tp == meta["model"]["tensor_model_parallel_size"]:
        return meta["padded_vocab_size"]
    vocab = true_vocab_size(meta)
    divisible = meta["model"].get("make_vocab_size_divisible_by", 128)
    if vocab is None:
        # The padded size still bounds the vocabulary: pad it again for the new TP size.
        vocab = meta["padded_vocab_size"]
        if vocab % (divisible * tp) == 0:
            return vocab
        raise ValueError(
            "cannot tell the tokenizer's vocabulary size (its files are gone): the padded "
            f"vocabulary ({vocab}) changes at TP {tp}; pass --true-vocab-size"
        )
    return vocab_size_with_padding(vocab, divisible, tp)


def chunk_of_layer(config: GPTConfig, layer: int) -> tuple[int, int]:
    """(pipeline rank, chunk index) holding global layer `layer`."""
    per_chunk = config.num_layers // (
        config.pipeline_model_parallel_size * config.virtual_pipeline_size
    )
    virtual_stage = layer // per_chunk
    pp = config.pipeline_model_parallel_size
    return virtual_stage % pp, virtual_stage // pp


def last_chunk(config: GPTConfig) -> tuple[int, int]:
    """(pipeline rank, chunk) of the final norm and output layer."""
    return config.pipeline_model_parallel_size - 1, config.virtual_pipeline_size - 1


def unit_of(name: str) -> str:
    """The unit a parameter is converted with: "embedding", "layer.{i}" or "final"."""
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("decoder.layers."):
        return "layer." + name.split(".")[2]
    return "final"


def place(config: GPTConfig, name: str) -> tuple[int, int]:
    """(pipeline rank, chunk) holding parameter `name` in a model with `config`'s layout."""
    unit = unit_of(name)
    if unit == "embedding":
        return 0, 0
    if unit == "final":
        return last_chunk(config)
    return chunk_of_layer(config, int(unit.split(".")[1]))
