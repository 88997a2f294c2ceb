"""GPT split into pipeline stages and virtual chunks; `build_model` makes this rank's chunks.

A chunk is one `GPTModel`: the embedding if it is the first virtual stage (``pre_process``),
some transformer layers, and the final norm + output layer + loss if it is the last
(``post_process``). Other chunks take their input from `set_input_tensor` (the pipeline
schedule's activation from the previous stage) and return their ``[s, b, h]`` output.

Parameter names are *global*: layer i is ``decoder.layers.{i}.*`` in whatever chunk holds it,
so a chunk's ``state_dict`` keys are the single-process model's keys (checkpoints and
resharding map by name). Names, also used to seed each weight's init:

    embedding.word_embeddings.weight         [V/tp, h]      first stage
    embedding.position_embeddings.weight     [max_pos, h]   first stage, learned positions only
                                                            (not with --no-position-embedding)
    decoder.layers.{i}.input_layernorm.*  .self_attention.linear_qkv.*  .self_attention.
        linear_proj.*  .pre_mlp_layernorm.*  .mlp.linear_fc1.*  .mlp.linear_fc2.*
    decoder.final_layernorm.*                               last stage
    output_layer.weight                      [V/tp, h]      last stage, unless tied on one stage

Tied embeddings with PP > 1: the last stage's ``output_layer.weight`` is a copy of the word
embedding, initialized from the same name (``embedding.word_embeddings.weight``) so the copies
start equal without communication; both carry ``shared_embedding=True`` and their gradients are
summed over the embedding group each step (`megalite.model.grads.allreduce_embedding_grads`).
With one stage the output layer simply uses the embedding's weight.

Vocabulary padding (Megatron pads to a multiple of ``make_vocab_size_divisible_by x TP``, so
the padded size depends on TP) is made invisible: padded rows of the embedding and output
weights start at zero and padded logits are -inf, so they get no probability and no gradient.
The model is then the same function at every TP, as layout invariance demands, where Megatron's
loss would shift slightly with the padding. (Label smoothing over the padded vocabulary would
see -inf log-probabilities: the model's loss uses none.)
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from megalite.context_parallel import check_seq_length
from megalite.context_parallel import position_ids as cp_position_ids
from megalite.model.config import GPTConfig
from megalite.model.norms import build_norm
from megalite.model.transformer import ParamInit, TransformerLayer, rope_cache
from megalite.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    checkpoint,
    get_rng_tracker,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from megalite.tensor_parallel.utils import group_rank_and_size

WORD_EMBEDDING = "embedding.word_embeddings.weight"


class Embedding(nn.Module):
    """Token (+ learned position) embedding: ids ``[b, s]`` -> ``[s, b, h]`` (``[s/tp, b, h]``).

    The vocab-parallel lookup is all-reduced, positions added, then (sequence parallel) each
    rank keeps its chunk of the sequence: the position table's gradient is then whole on every
    TP rank, with no extra reduction to remember.
    """

    def __init__(self, config: GPTConfig, init: ParamInit, tp_group, device=None):
        super().__init__()
        c = config
        self.word_embeddings = VocabParallelEmbedding(
            c.padded_vocab_size, c.hidden_size, group=tp_group,
            init_method=init.normal(WORD_EMBEDDING, rows=c.vocab_size),
            params_dtype=c.params_dtype, device=device,
        )  # fmt: skip
        if c.learned_positions:
            name = "embedding.position_embeddings.weight"
            table = torch.empty(c.max_position_embeddings, c.hidden_size)
            init.normal(name)(table)
            self.position_embeddings = nn.Embedding.from_pretrained(
                table.to(device=device, dtype=c.params_dtype), freeze=False
            )
            self.position_embeddings.weight.tensor_model_parallel = False
        else:
            self.position_embeddings = None
        self.tp_group = tp_group
        self.sequence_parallel = c.sequence_parallel and group_rank_and_size(tp_group)[1] > 1

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`positions` ``[s]``: each token's global position (CP: of this rank's chunks)."""
        x = self.word_embeddings(tokens.t())  # [s, b, h]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings.weight.index_select(0, positions).unsqueeze(1)
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, self.tp_group)
        return x


class GPTModel(nn.Module):
    """One model chunk: layers `layer_ids` (global indices), plus the ends it owns.

    ``forward(tokens [b, s] or None, labels [b, s] or None)``:
      * not `post_process`: the hidden states ``[s, b, h]`` (``[s/tp, b, h]`` with SP);
      * `post_process` with labels: the per-token loss ``[b, s]`` (fp32);
      * `post_process` without labels: this rank's logits ``[b, s, V/tp]``.
    `tokens` is read only by the `pre_process` chunk; the others use `set_input_tensor`.

    Context parallelism (a `cp_group` of 2+ ranks): tokens, labels and activations are this
    rank's load-balanced part of the sequence (``s/cp`` tokens, `megalite.context_parallel`);
    positions (learned table and RoPE) are the global ones of those tokens, and the returned
    per-token loss is this rank's part too.
    """

    def __init__(
        self,
        config: GPTConfig,
        layer_ids: range,
        *,
        pre_process: bool,
        post_process: bool,
        seed: int,
        tp_group=None,
        share_embeddings: bool = False,
        device=None,
        moe=None,
        moe_groups=None,
        cp_group=None,
    ):
        super().__init__()
        c = config
        self.cp_group = cp_group
        self.cp_rank, self.cp_size = group_rank_and_size(cp_group)
        init = ParamInit(seed, c.init_method_std, c.num_layers)
        self.config, self.layer_ids = c, layer_ids
        self.pre_process, self.post_process = pre_process, post_process
        self.tp_group, self.tp_size = tp_group, group_rank_and_size(tp_group)[1]
        self.sequence_parallel = c.sequence_parallel and self.tp_size > 1
        if self.cp_size > 1:
            check_seq_length(
                c.seq_length, self.cp_size, self.tp_size if self.sequence_parallel else 1
            )
        self.input_tensor: Optional[torch.Tensor] = None
        self.embedding = Embedding(c, init, tp_group, device) if pre_process else None
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleDict(
            {
                str(i): TransformerLayer(
                    c,
                    f"decoder.layers.{i}.",
                    init,
                    tp_group,
                    device,
                    moe=moe if moe is not None and moe.is_moe_layer(i, c.num_layers) else None,
                    moe_groups=moe_groups,
                    cp_group=cp_group,
                )  # fmt: skip
                for i in layer_ids
            }
        )
        if c.position_embedding_type == "rope":
            cos, sin = rope_cache(c, device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        tied = not c.untie_embeddings_and_output_weights
        self.output_layer = None
        if post_process:
            self.decoder.final_layernorm = build_norm(
                c.normalization, c.hidden_size, c.norm_epsilon,
                zero_centered_gamma=c.apply_layernorm_1p, sequence_parallel=c.sequence_parallel,
                params_dtype=c.params_dtype, device=device,
            )  # fmt: skip
            self.output_layer = ColumnParallelLinear(
                c.hidden_size, c.padded_vocab_size, group=tp_group, bias=False,
                # Tied: the same init stream as the word embedding, so the copies start equal.
                init_method=init.normal(
                    WORD_EMBEDDING if tied else "output_layer.weight", rows=c.vocab_size
                ),
                sequence_parallel=c.sequence_parallel, gather_output=False,
                skip_weight_param_allocation=tied and pre_process,
                params_dtype=c.params_dtype, device=device,
            )  # fmt: skip
        if post_process:
            # Logits of vocabulary padding are -inf: padding never gets probability, so layouts
            # whose TP pads the vocabulary differently still compute the same model.
            rank = group_rank_and_size(tp_group)[0]
            per_rank = c.padded_vocab_size // self.tp_size
            ids = torch.arange(rank * per_rank, (rank + 1) * per_rank, device=device)
            self.register_buffer("vocab_padding", ids >= c.vocab_size, persistent=False)
        shared = self.shared_embedding_weight() if tied and share_embeddings else None
        if shared is not None:
            shared.shared_embedding = True

    def shared_embedding_weight(self) -> Optional[nn.Parameter]:
        """The word embedding (first stage) or its output-layer copy (last stage), if held."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self.post_process and not self.config.untie_embeddings_and_output_weights:
            return self.output_layer.weight
        return None

    def set_input_tensor(self, input_tensor: Union[torch.Tensor, list, None]) -> None:
        """The previous stage's activation ``[s, b, h]`` for the next forward (schedules)."""
        if isinstance(input_tensor, (list, tuple)):
            (input_tensor,) = input_tensor
        self.input_tensor = input_tensor

    def forward(
        self, tokens: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if self.pre_process:
            x = self.embedding(tokens, self.positions(tokens.shape[1], tokens.device))
        else:
            x = self.input_tensor
        if x is None:
            raise RuntimeError("a chunk without the embedding needs set_input_tensor() first")
        p = self.config.hidden_dropout if self.training else 0.0
        # Under SP each TP rank holds different tokens: dropout there draws from the tracker's
        # per-rank stream (Megatron). Without SP the default stream is the same on all TP ranks.
        fork = self.sequence_parallel and p > 0
        with get_rng_tracker().fork() if fork else contextlib.nullcontext():
            if self.pre_process:
                x = F.dropout(x, p)
            x = self._layers(x)
        if not self.post_process:
            return x
        x = self.decoder.final_layernorm(x)
        weight = self.embedding.word_embeddings.weight if self.output_layer.weight is None else None
        logits, _ = self.output_layer(x, weight)  # [s, b, V/tp]
        if self.config.padded_vocab_size > self.config.vocab_size:
            logits = logits.masked_fill(self.vocab_padding, float("-inf"))
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        loss = vocab_parallel_cross_entropy(logits, labels.t(), self.tp_group)  # [s, b]
        return loss.t().contiguous()

    def positions(self, local_seq: int, device=None) -> torch.Tensor:
        """Global positions ``[local_seq]`` of this rank's tokens (CP: its two chunks)."""
        if self.cp_size == 1:
            return torch.arange(local_seq, device=device)
        return cp_position_ids(local_seq * self.cp_size, self.cp_size, self.cp_rank, device)

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        rope = None
        if self.config.position_embedding_type == "rope":
            # Layers see the whole local sequence (SP gathers it): cos/sin of its positions.
            local_seq = x.shape[0] * (self.tp_size if self.sequence_parallel else 1)
            if self.cp_size == 1:
                rope = (self.rope_cos[:local_seq], self.rope_sin[:local_seq])
            else:
                pos = self.positions(local_seq, self.rope_cos.device)
                rope = (self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos))
        full = self.config.recompute_granularity == "full" and self.training
        for layer in self.decoder.layers.values():
            if full and torch.is_grad_enabled():
                # Full recompute: keep only each layer's input, rerun the layer in backward.
                x = checkpoint(layer, x, rope)
            else:
                x = layer(x, rope)
        return x


def pipeline_tensor_shape(config: GPTConfig, micro_batch_size: int) -> tuple[int, int, int]:
    """The ``[s, b, h]`` crossing every stage boundary (``[s/tp, b, h]`` with SP, and ``/cp``
    with context parallelism): the schedules' `tensor_shape`."""
    s = config.seq_length // config.context_parallel_size
    if config.sequence_parallel and config.tensor_model_parallel_size > 1:
        s //= config.tensor_model_parallel_size
    return (s, micro_batch_size, config.hidden_size)


def build_model(
    config: GPTConfig,
    seed: int,
    *,
    tp_group=None,
    pp_rank: Optional[int] = None,
    device=None,
    use_parallel_state: bool = True,
    moe=None,
    moe_groups=None,
    cp_group=None,
) -> list[GPTModel]:
    """This rank's model chunks (one per virtual stage, in chunk order).

    By default the TP group and the pipeline rank come from `megalite.parallel_state` and must
    agree with the sizes in `config`; ``use_parallel_state=False`` builds from `tp_group` and
    `pp_rank` alone (a single-process model: ``tp_group=None, pp_rank=0`` with TP = PP = 1).
    The same `seed` gives the same full model at every layout. `moe` (a
    `megalite.moe.MoEConfig` with experts) makes its MoE layers; their groups come from
    parallel_state, or `moe_groups` (None with ``use_parallel_state=False``: one process).
    Context parallelism: the CP group comes from the parallel state (``use_parallel_state=False``:
    `cp_group`, None for CP = 1), the attention kind from ``config.cp_comm_type``; the weights do
    not depend on CP.
    """
    if moe is not None and not moe.enabled:
        moe = None
    if use_parallel_state:
        from megalite import parallel_state as ps

        cp = ps.get_context_parallel_world_size()
        cp_group = ps.get_context_parallel_group() if cp > 1 else None
        if cp != config.context_parallel_size:
            raise ValueError(
                f"GPTConfig is split for context-parallel size {config.context_parallel_size} "
                f"but the parallel state has {cp}"
            )
        tp_group = ps.get_tensor_model_parallel_group()
        pp_rank = ps.get_pipeline_model_parallel_rank()
        if moe is not None and moe_groups is None:
            from megalite.moe.layer import MoEGroups

            moe_groups = MoEGroups.from_parallel_state()
            _check_expert_layout(moe, ps)
        actual = (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        )
    else:
        actual = (group_rank_and_size(tp_group)[1], config.pipeline_model_parallel_size,
                  config.virtual_pipeline_size)  # fmt: skip
        pp_rank = 0 if pp_rank is None else pp_rank
    wanted = (
        config.tensor_model_parallel_size,
        config.pipeline_model_parallel_size,
        config.virtual_pipeline_size,
    )
    if actual != wanted:
        raise ValueError(
            f"GPTConfig is split for (TP, PP, virtual chunks) = {wanted} but the parallel state "
            f"is {actual}"
        )
    pp, v = config.pipeline_model_parallel_size, config.virtual_pipeline_size
    return [
        GPTModel(
            config,
            config.layers_of_chunk(pp_rank, c),
            pre_process=pp_rank == 0 and c == 0,
            post_process=pp_rank == pp - 1 and c == v - 1,
            seed=seed,
            tp_group=tp_group,
            share_embeddings=pp > 1,
            device=device,
            moe=moe,
            moe_groups=moe_groups,
            cp_group=cp_group,
        )
        for c in range(v)
    ]


def _check_expert_layout(moe, ps) -> None:
    """The MoE config's EP / ETP must be the parallel state's."""
    tp = ps.get_tensor_model_parallel_world_size()
    wanted = (moe.expert_model_parallel_size, moe.expert_tensor_parallel(tp))
    actual = (ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())
    if wanted != actual:
        raise ValueError(
            f"MoEConfig is split for (EP, ETP) = {wanted} but the parallel state is {actual}"
        )
