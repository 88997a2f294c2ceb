"""Parameters of one rank, counted from the real modules built on the meta device.

No second parameter formula: `stage_params` builds megalite's own `GPTModel` pieces (one
transformer layer, the embedding, the final norm and output layer) for TP rank 0 of a
`PlanningGroup` on ``torch.device("meta")`` (no memory, no process group), lists their
parameters in registration order with the two attributes DDP looks at (size and whether the
gradient waits for a model-parallel reduction), and repeats the layer for every layer of the
stage. Construction cost is one layer per (model shape, TP), cached.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple
from unittest import mock

import torch

from megalite.model.config import GPTConfig


class Param(NamedTuple):
    """One parameter as DDP sees it: elements, and whether it is a deferred-bucket one."""

    numel: int
    deferred: bool
    ndim: int


def _shape_key(config: GPTConfig) -> GPTConfig:
    """The config with what parameter counts do not depend on reset (PP, chunks, recompute,
    dtype, dropout), so that a search builds each TP / SP split once."""
    return dataclasses.replace(
        config,
        pipeline_model_parallel_size=1,
        num_layers_per_virtual_pipeline_stage=None,
        recompute_granularity="none",
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


_CACHE: dict[tuple, dict[str, tuple[Param, ...]]] = {}


def _pieces(config: GPTConfig) -> dict[str, tuple[Param, ...]]:
    key = tuple(getattr(config, f.name) for f in dataclasses.fields(config))
    if key not in _CACHE:
        _CACHE[key] = _build_pieces(config)
    return _CACHE[key]


def _build_pieces(config: GPTConfig) -> dict[str, tuple[Param, ...]]:
    from megalite.data_parallel.ddp import needs_model_parallel_reduction
    from megalite.model.gpt import GPTModel
    from megalite.model.transformer import ParamInit
    from megalite.tensor_parallel.utils import PlanningGroup

    tp = config.tensor_model_parallel_size
    group = PlanningGroup(0, tp)

    def params(module, share: bool) -> tuple[Param, ...]:
        return tuple(
            Param(p.numel(), needs_model_parallel_reduction(p) or (share and "word" in n), p.dim())
            for n, p in module.named_parameters()
        )

    def build(layers: range, pre: bool, post: bool, share: bool):
        # Values are irrelevant on meta, and the first random fill of a meta tensor imports
        # torch._dynamo (seconds): the init functions are made no-ops while building.
        no_init = mock.patch.object(ParamInit, "normal", lambda self, *a, **k: lambda t: None)
        with torch.device("meta"), no_init:
            return GPTModel(
                config, layers, pre_process=pre, post_process=post, seed=0,
                tp_group=group, share_embeddings=share, device="meta",
            )  # fmt: skip

    layer = build(range(1), False, False, False)
    head = build(range(0), False, True, True)
    return {
        "layer": params(layer, False),
        "embedding": params(build(range(0), True, False, True), True),
        # The last stage's output layer: a separate copy of the tied embedding when PP > 1.
        "head": tuple(
            Param(p.numel(), needs_model_parallel_reduction(p), p.dim())
            for _, p in head.named_parameters()
        ),
        "both": params(build(range(0), True, True, False), False),  # PP = 1
    }


def stage_params(config: GPTConfig, pp_rank: int) -> list[list[Param]]:
    """Parameters of each model chunk of pipeline stage `pp_rank`, in registration order."""
    pieces = _pieces(_shape_key(config))
    pp, v = config.pipeline_model_parallel_size, config.virtual_pipeline_size
    chunks = []
    for c in range(v):
        pre = pp_rank == 0 and c == 0
        post = pp_rank == pp - 1 and c == v - 1
        n = len(config.layers_of_chunk(pp_rank, c))
        if pre and post:
            ends = list(pieces["both"])
            # registration order: embedding, layers, final norm (+ untied output layer)
            emb = list(pieces["embedding"])
            chunks.append(emb + list(pieces["layer"]) * n + ends[len(emb) :])
            continue
        params = list(pieces["embedding"]) if pre else []
        params += list(pieces["layer"]) * n
        if post:
            params += list(pieces["head"])
        chunks.append(params)
    return chunks


def layer_params(config: GPTConfig) -> int:
    """Parameters of one transformer layer on one TP rank."""
    return sum(p.numel for p in _pieces(_shape_key(config))["layer"])


def total_params(config: GPTConfig) -> int:
    """Parameters of the whole model (TP = 1, tied output counted once)."""
    whole = dataclasses.replace(_shape_key(config), tensor_model_parallel_size=1)
    pieces = _pieces(whole)
    return sum(p.numel for p in pieces["both"]) + config.num_layers * sum(
        p.numel for p in pieces["layer"]
    )
