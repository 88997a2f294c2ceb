"""Parameters of one rank, counted from the real modules built on the meta device.

No second parameter formula: `stage_params` builds megalite's own `GPTModel` pieces (one
transformer layer, the embedding, the final norm and output layer) for TP rank 0 of a
`PlanningGroup` on ``torch.device("meta")`` (no memory, no process group), lists their
parameters in registration order with the attributes DDP looks at (size, whether the gradient
waits for a model-parallel reduction, whether it is an expert weight reduced over expert-DP),
and repeats the layer for every layer of the stage. MoE models build an MoE layer too (router,
this EP rank's experts as its ETP shard, shared experts) with stand-in EP / ETP groups, and a
layer of the stage takes the dense or the MoE piece as ``MoEConfig.is_moe_layer`` says.
Construction cost is one layer of each kind per (model shape, TP, EP, ETP), cached.
"""

from __future__ import annotations

import contextlib
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
    expert: bool = False


def _shape_key(config: GPTConfig) -> GPTConfig:
    """The config with what parameter counts do not depend on reset (PP, chunks, recompute,
    dtype, dropout, CP), so that a search builds each TP / SP split once."""
    return dataclasses.replace(
        config,
        context_parallel_size=1,
        cp_comm_type="p2p",
        pipeline_model_parallel_size=1,
        num_layers_per_virtual_pipeline_stage=None,
        recompute_granularity="none",
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


_CACHE: dict[tuple, dict[str, tuple[Param, ...]]] = {}


def _pieces(config: GPTConfig, moe=None) -> dict[str, tuple[Param, ...]]:
    from megalite.planner.layout import moe_key

    key = tuple(getattr(config, f.name) for f in dataclasses.fields(config)) + moe_key(moe)
    if key not in _CACHE:
        _CACHE[key] = _build_pieces(config, moe)
    return _CACHE[key]


def _meta_cat(tensors, dim: int = 0, **_):
    tensors = list(tensors)
    shape = list(tensors[0].shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.empty(shape, dtype=tensors[0].dtype, device="meta")


def _meta_arange(start, end=None, step=1, **kwargs):
    if end is None:
        start, end = 0, start
    return torch.empty(max(0, -(-(end - start) // step)), dtype=torch.int64, device="meta")


def _meta_compare(self, other):
    return torch.empty(self.shape, dtype=torch.bool, device="meta")


def _meta_stack(tensors, dim: int = 0, **_):
    tensors = list(tensors)
    shape = list(tensors[0].shape)
    shape.insert(dim, len(tensors))
    return torch.empty(shape, dtype=tensors[0].dtype, device="meta")


@contextlib.contextmanager
def _no_init():
    """Values are irrelevant on meta, and the first random fill, cat, stack, arange or >= of a
    meta tensor imports torch._dynamo (seconds, for their Python meta kernels): while building,
    the init functions are no-ops and those ops (and the RoPE cache) only make tensors of the
    right shape."""
    from megalite.model import gpt
    from megalite.model.transformer import ParamInit

    def rope_buffers(config, device=None):  # buffers, not parameters: only their shape
        shape = (config.max_position_embeddings, 1, 1, config.rotary_dim)
        return torch.empty(shape, device="meta"), torch.empty(shape, device="meta")

    with (
        mock.patch.object(ParamInit, "normal", lambda self, *a, **k: lambda t: None),
        mock.patch.object(gpt, "rope_cache", rope_buffers),
        mock.patch.object(torch, "cat", _meta_cat),
        mock.patch.object(torch, "stack", _meta_stack),
        mock.patch.object(torch, "arange", _meta_arange),
        mock.patch.object(torch.Tensor, "__ge__", _meta_compare),
    ):
        yield


def _build_pieces(config: GPTConfig, moe=None) -> dict[str, tuple[Param, ...]]:
    from megalite.data_parallel.ddp import is_expert_param, needs_model_parallel_reduction
    from megalite.model.gpt import GPTModel
    from megalite.model.transformer import ParamInit, TransformerLayer
    from megalite.tensor_parallel.utils import PlanningGroup

    tp = config.tensor_model_parallel_size
    group = PlanningGroup(0, tp)

    def params(module, share: bool) -> tuple[Param, ...]:
        return tuple(
            Param(p.numel(), needs_model_parallel_reduction(p) or (share and "word" in n), p.dim(),
                  is_expert_param(p))
            for n, p in module.named_parameters()
        )  # fmt: skip

    def build(layers: range, pre: bool, post: bool, share: bool):
        with torch.device("meta"), _no_init():
            return GPTModel(
                config, layers, pre_process=pre, post_process=post, seed=0,
                tp_group=group, share_embeddings=share, device="meta",
            )  # fmt: skip

    layer = build(range(1), False, False, False)
    head = build(range(0), False, True, True)
    moe_layer = ()
    if moe is not None:
        from megalite.moe.layer import MoEGroups

        ep, etp = moe.expert_model_parallel_size, moe.expert_tensor_parallel(tp)
        groups = MoEGroups(tp=group, ep=PlanningGroup(0, ep), etp=PlanningGroup(0, etp),
                           etp_ep=PlanningGroup(0, ep * etp))  # fmt: skip
        with torch.device("meta"), _no_init():
            built = TransformerLayer(config, "decoder.layers.0.", ParamInit(0, 0.02, 1), group,
                                     "meta", moe=moe, moe_groups=groups)  # fmt: skip
        moe_layer = params(built, False)
    return {
        "moe_layer": moe_layer,
        "layer": params(layer, False),
        "embedding": params(build(range(0), True, False, True), True),
        # The last stage's output layer: a separate copy of the tied embedding when PP > 1.
        "head": tuple(
            Param(p.numel(), needs_model_parallel_reduction(p), p.dim())
            for _, p in head.named_parameters()
        ),
        "both": params(build(range(0), True, True, False), False),  # PP = 1
    }


def is_moe(moe, layer: int, num_layers: int) -> bool:
    return moe is not None and moe.is_moe_layer(layer, num_layers)


def config_key(config: GPTConfig) -> tuple:
    """A hashable key of every field of `config` (the caches' key)."""
    return tuple(getattr(config, f.name) for f in dataclasses.fields(config))


_STAGES: dict[tuple, list[list[Param]]] = {}


def stage_params(config: GPTConfig, pp_rank: int, moe=None) -> list[list[Param]]:
    """Parameters of each model chunk of pipeline stage `pp_rank`, in registration order
    (`moe`: the MoE settings with this layout's EP / ETP, or None). Cached: do not modify."""
    from megalite.planner.layout import moe_key

    key = (config_key(config), pp_rank, moe_key(moe))
    if key not in _STAGES:
        _STAGES[key] = _stage_params(config, pp_rank, moe)
    return _STAGES[key]


def stage_numel(config: GPTConfig, pp_rank: int, moe=None, expert: bool = False) -> int:
    """Dense (or, `expert`, expert) parameters of stage `pp_rank` on one rank."""
    return sum(p.numel for c in stage_params(config, pp_rank, moe) for p in c if p.expert == expert)


def _stage_params(config: GPTConfig, pp_rank: int, moe=None) -> list[list[Param]]:
    pieces = _pieces(_shape_key(config), moe)
    pp, v = config.pipeline_model_parallel_size, config.virtual_pipeline_size
    chunks = []
    for c in range(v):
        pre = pp_rank == 0 and c == 0
        post = pp_rank == pp - 1 and c == v - 1
        layers = []
        for i in config.layers_of_chunk(pp_rank, c):
            kind = "moe_layer" if is_moe(moe, i, config.num_layers) else "layer"
            layers += list(pieces[kind])
        if pre and post:
            ends = list(pieces["both"])
            # registration order: embedding, layers, final norm (+ untied output layer)
            emb = list(pieces["embedding"])
            chunks.append(emb + layers + ends[len(emb) :])
            continue
        params = list(pieces["embedding"]) if pre else []
        params += layers
        if post:
            params += list(pieces["head"])
        chunks.append(params)
    return chunks


def layer_params(config: GPTConfig, moe=None) -> int:
    """Parameters of one (dense, or with `moe` MoE) transformer layer on one TP / EP rank."""
    return sum(p.numel for p in _pieces(_shape_key(config), moe)["moe_layer" if moe else "layer"])


def total_params(config: GPTConfig, moe=None) -> int:
    """Parameters of the whole model (TP = EP = 1, tied output counted once)."""
    whole = dataclasses.replace(_shape_key(config), tensor_model_parallel_size=1)
    if moe is not None:
        moe = dataclasses.replace(moe, expert_model_parallel_size=1, expert_tensor_parallel_size=1)
    pieces = _pieces(whole, moe)
    n = config.num_layers
    return sum(p.numel for p in pieces["both"]) + sum(
        sum(p.numel for p in pieces["moe_layer" if is_moe(moe, i, n) else "layer"])
        for i in range(n)
    )
