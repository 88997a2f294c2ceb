"""A tiny GPT at CP 2 equals the same GPT at CP 1: per-token loss and every gradient (gloo).

Each rank feeds its load-balanced part of the batch (`split`); the per-token losses gathered
over CP (`gather`) must equal one process's on the whole batch, and each parameter's gradient,
summed over CP (what the DP x CP reduction does; SP norms summed over TP as in training), must
equal the serial gradient (or its TP shard). Layouts: CP2 (world 2), TP2 + SP x CP2 (world 4);
RoPE with GQA and learned positions; ring and all-to-all.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.context_parallel import gather, split
from megalite.model import GPTConfig, build_model
from megalite.model.grads import allreduce_sequence_parallel_grads
from megalite.tensor_parallel.utils import shard_tensor
from tests.harness import run_distributed

SEED = 77
TINY = dict(
    num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=90,
    make_vocab_size_divisible_by=16, seq_length=16, ffn_hidden_size=64,
    hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip
ROPE_GQA = dict(TINY, position_embedding_type="rope", num_query_groups=2, swiglu=True,
                normalization="RMSNorm")  # fmt: skip
ROPE_MHA = dict(TINY, position_embedding_type="rope")


def _batch(cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(0, cfg.vocab_size, (3, cfg.seq_length + 1),
                      generator=torch.Generator().manual_seed(5))  # fmt: skip
    return t[:, :-1], t[:, 1:]


def _serial(cfg: GPTConfig):
    ref_cfg = dataclasses.replace(
        cfg, tensor_model_parallel_size=1, sequence_parallel=False, context_parallel_size=1
    )
    (model,) = build_model(ref_cfg, SEED, use_parallel_state=False)
    tokens, labels = _batch(cfg)
    loss = model(tokens, labels)
    loss.sum().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check_model(tp, cp, comm, kw):
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    cfg = GPTConfig(**kw, tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                    context_parallel_size=cp, cp_comm_type=comm)  # fmt: skip
    ref_loss, ref_grads = _serial(cfg)
    (model,) = build_model(cfg, SEED)
    cp_group, cp_rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    tokens, labels = (split(t, cp, cp_rank) for t in _batch(cfg))
    loss = model(tokens, labels)  # [b, s/cp]: this rank's tokens
    assert loss.shape == (3, cfg.seq_length // cp)
    loss.sum().backward()
    assert_close(gather(loss.detach(), cp_group), ref_loss)
    allreduce_sequence_parallel_grads([model], ps.get_tensor_model_parallel_group())
    tp_rank = ps.get_tensor_model_parallel_rank()
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=cp_group)
        want = ref_grads[name]
        if getattr(p, "tensor_model_parallel", False):
            want = shard_tensor(want, p.partition_dim, tp, tp_rank, p.partition_stride)
        assert_close(grad, want, msg=lambda m, n=name: f"{comm} grad of {n}: {m}")
    return True


@pytest.mark.parametrize(
    "comm, kw",
    [("p2p", ROPE_GQA), ("p2p", TINY), ("a2a", ROPE_GQA),
     ("p2p", dict(ROPE_GQA, recompute_granularity="selective"))],
    ids=["p2p-rope-gqa", "p2p-learned", "a2a-rope-gqa", "p2p-selective-recompute"],
)  # fmt: skip
def test_gpt_at_cp2_equals_cp1(comm, kw):
    assert all(run_distributed(2, _check_model, 1, 2, comm, kw))


@pytest.mark.parametrize("comm, kw", [("p2p", ROPE_GQA), ("a2a", ROPE_MHA)], ids=["p2p", "a2a"])
def test_gpt_at_tp2_sp_cp2_equals_serial(comm, kw):
    assert all(run_distributed(4, _check_model, 2, 2, comm, kw))


def _refusals():
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    sp = dict(tensor_model_parallel_size=2, sequence_parallel=True, context_parallel_size=2)
    with pytest.raises(ValueError, match=r"seq_length \(20\) must be divisible by 2 x context-"
                       r"parallel size \(2\) x tensor-model-parallel size \(2, sequence "
                       r"parallel\) = 8"):  # fmt: skip
        GPTConfig(**dict(TINY, seq_length=20), **sp)
    with pytest.raises(ValueError, match=r"num_query_groups \(2\) divisible by tensor-model-"
                       r"parallel size \(2\) x context-parallel size \(2\) = 4"):  # fmt: skip
        GPTConfig(**ROPE_GQA, **sp, cp_comm_type="a2a")
    # The model checks too when built by hand (a CP group without a config that says so).
    cfg = GPTConfig(**dict(TINY, seq_length=18, attention_dropout=0.1))
    group = ps.get_context_parallel_group()
    with pytest.raises(ValueError, match=r"seq_length \(18\) must be divisible by 2 x context-"):
        build_model(cfg, SEED, use_parallel_state=False, cp_group=group)
    with pytest.raises(ValueError, match=r"split for context-parallel size 1 but the parallel "
                       r"state has 2"):  # fmt: skip
        build_model(GPTConfig(**TINY, tensor_model_parallel_size=2), SEED)
    return True


def test_model_refuses_cp_layouts_it_cannot_split():
    assert all(run_distributed(4, _refusals))


def _bf16(comm):
    ps.initialize_model_parallel(context_parallel_size=2)
    cfg = GPTConfig(**ROPE_GQA, params_dtype=torch.bfloat16)
    (ref,) = build_model(cfg, SEED, use_parallel_state=False)
    cp_cfg = dataclasses.replace(cfg, context_parallel_size=2, cp_comm_type=comm)
    (model,) = build_model(cp_cfg, SEED)
    tokens, labels = _batch(cfg)
    rank, group = ps.get_context_parallel_rank(), ps.get_context_parallel_group()
    loss = model(split(tokens, 2, rank), split(labels, 2, rank))
    loss.sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
    # bf16 rounds differently along the two paths: close, not equal.
    assert_close(gather(loss.detach(), group), ref(tokens, labels), rtol=2e-2, atol=2e-2)
    return True


@pytest.mark.parametrize("comm", ["p2p", "a2a"])
def test_bf16_gpt_at_cp2_is_close_to_cp1(comm):
    assert all(run_distributed(2, _bf16, comm))
