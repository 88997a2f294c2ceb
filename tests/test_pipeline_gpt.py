"""The GPT split over TP x PP (x DP) against the same GPT in one process, on gloo.

Each case builds the model at a layout and, on every rank, the single-process model from the
same seed; one global batch goes through the pipeline schedule (micro-batches, DP shards) and
through the serial model at once. The mean loss and every parameter and gradient (TP shards
gathered to full tensors, matched by global name) must agree.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.model import (
    GPTConfig,
    allreduce_embedding_grads,
    allreduce_sequence_parallel_grads,
    build_model,
    pipeline_tensor_shape,
)
from megalite.model.gpt import WORD_EMBEDDING
from megalite.pipeline_parallel import get_forward_backward_func
from tests.harness import run_distributed

SEED, MB = 1234, 2  # init seed, micro-batch size
BASE = dict(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    vocab_size=100,  # padded to 112 at TP=1, 128 at TP=2 (16 x TP): padding must not matter
    make_vocab_size_divisible_by=16,
    seq_length=16,
    ffn_hidden_size=64,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)
MODERN = dict(
    swiglu=True,
    position_embedding_type="rope",
    normalization="RMSNorm",
    num_query_groups=2,
    disable_bias_linear=True,
)


def _pp_sizes() -> tuple[int, int]:
    """(PP, model chunks per stage) of the live parallel state: the schedule to use."""
    return (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    )


def _full(t: torch.Tensor, param, tp_group) -> torch.Tensor:
    """The full tensor from this TP rank's shard `t` of `param` (all ranks call this)."""
    tp = dist.get_world_size(tp_group)
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=tp_group)
    dim, stride = param.partition_dim, param.partition_stride
    blocks = [part.chunk(stride, dim) for part in parts]  # stride blocks per rank, rank-major
    return torch.cat([blocks[r][j] for j in range(stride) for r in range(tp)], dim)


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    inner = getattr(model, "module", model)  # DDP-wrapped or not
    out = model(tokens if inner.pre_process else None, labels if inner.post_process else None)

    def loss_func(per_token):
        loss = per_token.mean()
        return loss, {"lm_loss": loss.detach()}

    return out, loss_func


def _run_case(case: dict) -> tuple[list[str], int]:
    """One layout on this rank; asserts equality and returns (names checked, micro-batches)."""
    case = dict(case)
    tp, pp, m = case.pop("tp"), case.pop("pp"), case.pop("m")
    vpp, use_ddp = case.pop("vpp", None), case.pop("ddp", False)
    layers_per_virtual = BASE["num_layers"] // (pp * vpp) if vpp else None
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp)
    cfg = GPTConfig(
        **{**BASE, **case},
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        num_layers_per_virtual_pipeline_stage=layers_per_virtual,
    )
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tp_group = ps.get_tensor_model_parallel_group()

    # The serial reference: the whole global batch at once, mean loss, one backward.
    ref_cfg = dataclasses.replace(
        cfg,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        num_layers_per_virtual_pipeline_stage=None,
        sequence_parallel=False,
        recompute_granularity="none",
    )
    (ref,) = build_model(ref_cfg, SEED, use_parallel_state=False)
    g = torch.Generator().manual_seed(99)
    batch = torch.randint(0, cfg.vocab_size, (dp * m * MB, cfg.seq_length + 1), generator=g)
    ref_loss = ref(batch[:, :-1], batch[:, 1:]).mean()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())

    chunks = build_model(cfg, SEED)
    model = chunks
    if use_ddp:
        from megalite.data_parallel.ddp import DistributedDataParallel
        from megalite.data_parallel.finalize import finalize_model_grads

        model = [
            DistributedDataParallel(c, ps.get_data_parallel_group(), overlap_grad_reduce=True)
            for c in chunks
        ]
        extra = dict(
            no_sync_func=[c.no_sync for c in model],
            finalize_model_grads_func=functools.partial(
                finalize_model_grads, groups=ps.get_model_parallel_groups()
            ),
        )
    else:
        extra = dict(finalize_model_grads_func=functools.partial(_finalize, dp=dp))
    mine = batch[dp_rank * m * MB : (dp_rank + 1) * m * MB]
    micro = [(mine[i * MB : (i + 1) * MB, :-1], mine[i * MB : (i + 1) * MB, 1:]) for i in range(m)]
    losses = get_forward_backward_func(
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    )(
        _forward_step,
        [iter(micro) for _ in model] if vpp else iter(micro),
        model if vpp else model[0],
        m,
        tensor_shape=pipeline_tensor_shape(cfg, MB),
        **extra,
    )
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        loss = torch.stack([d["lm_loss"] for d in losses]).mean()
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        torch.testing.assert_close(loss / dp, ref_loss.detach())
        assert len(losses) == m
    else:
        assert losses == []

    names = []
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            tied_copy = (
                name == "output_layer.weight" and not cfg.untie_embeddings_and_output_weights
            )
            ref_name = WORD_EMBEDDING if tied_copy else name
            grad = p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
            ref_param, ref_grad = ref_params[ref_name].detach(), ref_params[ref_name].grad
            full, full_grad = _full(p.detach(), p, tp_group), _full(grad, p, tp_group)
            if ref_name == WORD_EMBEDDING or name == "output_layer.weight":
                # Vocabulary rows: the padding differs with TP; it is zero and stays zero.
                v = cfg.vocab_size
                assert not full[v:].any() and not full_grad[v:].any(), name
                full, full_grad = full[:v], full_grad[:v]
                ref_param, ref_grad = ref_param[:v], ref_grad[:v]
            torch.testing.assert_close(full, ref_param, msg=lambda e, n=name: f"{n}: {e}")
            torch.testing.assert_close(
                full_grad, ref_grad, msg=lambda e, n=name: f"grad of {n}: {e}"
            )
            names.append(ref_name)
    return names, m


def _finalize(chunks, dp):
    """What the trainer's finalize does without DDP: SP and embedding sums, then DP average."""
    allreduce_sequence_parallel_grads(chunks, ps.get_tensor_model_parallel_group())
    # Middle stages belong to no embedding group (and parallel_state holds none for them).
    in_embedding = "embedding" in ps.get_parallel_state().groups
    allreduce_embedding_grads(chunks, ps.get_embedding_group() if in_embedding else None)
    if dp > 1:
        for chunk in chunks:
            for p in chunk.parameters():
                dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
                p.grad /= dp


def _run_cases(cases):
    out = []
    for case in cases:
        out.append(_run_case(case))
        ps.destroy_model_parallel()
    return out


def _serial_names(case: dict) -> set[str]:
    kwargs = {k: v for k, v in case.items() if k not in ("tp", "pp", "m", "vpp", "ddp")}
    cfg = GPTConfig(**{**BASE, **kwargs, "sequence_parallel": False})
    return {n for n, _ in build_model(cfg, SEED, use_parallel_state=False)[0].named_parameters()}


CASES = {
    2: [
        dict(tp=1, pp=2, m=3, untie_embeddings_and_output_weights=True),  # 1F1B, m > p
        dict(tp=2, pp=1, m=2, sequence_parallel=True, **MODERN),  # TP + SP, no pipelining
    ],
    4: [
        dict(tp=1, pp=4, m=5),  # 1F1B, tied embeddings across 4 stages
        dict(tp=1, pp=2, vpp=2, m=4, **MODERN),  # interleaved, DP=2
        dict(tp=2, pp=2, m=3, sequence_parallel=True, recompute_granularity="selective", **MODERN),
        dict(tp=2, pp=2, m=2, recompute_granularity="full", num_query_groups=2),
    ],
    8: [
        # TP=2 x PP=2 x DP=2 through the data-parallel engineer's DDP (overlapped, no_sync).
        dict(tp=2, pp=2, m=4, ddp=True, sequence_parallel=True, **MODERN),
        dict(tp=2, pp=2, vpp=2, m=2, ddp=True),  # and interleaved, tied, GeLU
    ],
}


@pytest.mark.parametrize("world", sorted(CASES))
def test_gpt_layouts_match_single_process(world):
    # world size 2, 4 and 8: every case in CASES[world] on one pool call (see CASES).
    results = run_distributed(world, _run_cases, CASES[world])
    for i, case in enumerate(CASES[world]):
        covered = set().union(*(set(rank_result[i][0]) for rank_result in results))
        assert covered == _serial_names(case), case
