"""GPT training with context parallelism vs one process: 8 AdamW steps, losses and grad norms.

megalite's own composition (as the trainer does it): the pipeline schedules, DDP over DP x CP
(`get_data_parallel_group(with_context_parallel=True)`, so ZeRO shards over DP x CP too),
`finalize_model_grads` and the optimizer with clipping. Each DP rank takes its micro-batches of
the global batch, each CP rank its load-balanced part of every sequence; the per-token loss is
averaged over the rank's tokens, and DDP's average over DP x CP makes it the mean over every
token of the global batch. The serial twin trains the unsplit GPT with torch's AdamW on the whole
global batch; the trained weights must be its weights too. Layouts on world 4: CP4, CP2 x DP2
ZeRO-1, CP2 x TP2 + SP, CP2 x PP2 (1F1B and interleaved); on world 2: CP2 with ring and with
all-to-all attention, full recompute.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.context_parallel import split
from megalite.data_parallel import (
    DistributedDataParallel,
    OptimizerConfig,
    build_optimizer,
    finalize_model_grads,
    get_param_groups,
)
from megalite.model import GPTConfig, build_model, pipeline_tensor_shape
from megalite.pipeline_parallel import get_forward_backward_func
from megalite.tensor_parallel.utils import shard_tensor
from tests.harness import run_distributed

SEED, MB, M, STEPS = 99, 2, 2, 8  # init seed, micro-batch size, micro-batches per DP rank
LR, WD, CLIP = 3e-3, 0.1, 0.5
BASE = dict(
    num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=96,
    make_vocab_size_divisible_by=16, seq_length=32, ffn_hidden_size=64, hidden_dropout=0.0,
    attention_dropout=0.0, position_embedding_type="rope", swiglu=True,
    normalization="RMSNorm",
)  # fmt: skip


def _global_batch(step: int, dp: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(700 + step)
    return torch.randint(0, BASE["vocab_size"], (dp * M * MB, BASE["seq_length"] + 1), generator=g)


def _serial(dp: int, kw: dict):
    (ref,) = build_model(GPTConfig(**{**BASE, **kw}), SEED, use_parallel_state=False)
    opt = torch.optim.AdamW(get_param_groups([ref], WD), lr=LR)
    losses, norms = [], []
    for step in range(STEPS):
        b = _global_batch(step, dp)
        loss = ref(b[:, :-1], b[:, 1:]).mean()
        loss.backward()
        losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
    return losses, norms, dict(ref.named_parameters())


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    inner = model.module
    out = model(tokens if inner.pre_process else None, labels if inner.post_process else None)
    return out, lambda per_token: (per_token.mean(), {"lm_loss": per_token.mean().detach()})


def _train(tp=1, pp=1, cp=2, vpp=None, zero=0, comm="p2p", **kw):
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp,
                                 context_parallel_size=cp)  # fmt: skip
    cfg = GPTConfig(
        **{**BASE, **kw}, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=tp > 1, context_parallel_size=cp, cp_comm_type=comm,
        num_layers_per_virtual_pipeline_stage=BASE["num_layers"] // (pp * vpp) if vpp else None,
    )  # fmt: skip
    dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ref_losses, ref_norms, ref_params = _serial(dp, kw)
    dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    chunks = [DistributedDataParallel(c, dp_cp, 2000, True, zero)
              for c in build_model(cfg, SEED)]  # fmt: skip
    groups = ps.get_model_parallel_groups()
    opt = build_optimizer(
        OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=CLIP, zero_stage=zero), chunks, groups
    )
    cp_rank = ps.get_context_parallel_rank()
    losses, norms = [], []
    for step in range(STEPS):
        mine = _global_batch(step, dp)[d * M * MB : (d + 1) * M * MB]
        tokens, labels = split(mine[:, :-1], cp, cp_rank), split(mine[:, 1:], cp, cp_rank)
        micro = [(tokens[i * MB : (i + 1) * MB], labels[i * MB : (i + 1) * MB]) for i in range(M)]
        out = get_forward_backward_func(pp, vpp or 1)(
            _forward_step,
            [iter(micro) for _ in chunks] if vpp else iter(micro),
            chunks if vpp else chunks[0],
            M,
            tensor_shape=pipeline_tensor_shape(cfg, MB),
            no_sync_func=[c.no_sync for c in chunks],
            finalize_model_grads_func=functools.partial(finalize_model_grads, groups=groups),
            grad_scale_func=opt.scale_loss,
        )
        updated, norm, _ = opt.step()
        assert updated
        opt.zero_grad()
        norms.append(norm)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            loss = torch.stack([o["lm_loss"] for o in out]).mean()
            dist.all_reduce(loss, group=dp_cp)
            losses.append(loss.item() / dist.get_world_size(dp_cp))
    assert_close(torch.tensor(norms), torch.tensor(ref_norms), msg="grad norms")
    if losses:
        assert_close(torch.tensor(losses), torch.tensor(ref_losses), msg="losses")
    # The trained weights are the serial ones (what a checkpoint holds does not depend on CP).
    tp_rank = ps.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for name, p in chunk.module.named_parameters():
            want = ref_params["embedding.word_embeddings.weight" if name == "output_layer.weight"
                              else name].detach()  # fmt: skip
            if getattr(p, "tensor_model_parallel", False):
                want = shard_tensor(want, p.partition_dim, tp, tp_rank, p.partition_stride)
            # Adam divides by sqrt(v): summation-order noise moves near-zero-grad weights a bit.
            assert_close(p.detach(), want, rtol=1e-4, atol=1e-4, msg=lambda e, n=name: f"{n}: {e}")
    return len(losses)


def _cases(cases):
    out = []
    for case in cases:
        out.append(_train(**case))
        ps.destroy_model_parallel()
    return out


@pytest.mark.slow
def test_cp_layouts_on_world4_match_one_process():
    cases = [
        dict(cp=4),
        dict(cp=2, zero=1),  # CP2 x DP2, ZeRO-1 sharded over DP x CP
        dict(cp=2, tp=2),  # CP2 x TP2 + SP
        dict(cp=2, pp=2),  # CP2 x PP2, 1F1B
        dict(cp=2, pp=2, vpp=2, comm="a2a"),  # CP2 x PP2 interleaved, all-to-all attention
    ]
    results = run_distributed(4, _cases, cases, timeout=400)
    assert results[-1] == [STEPS] * len(cases)  # the last rank is a last stage everywhere


def test_cp2_ring_and_all_to_all_match_one_process():
    cases = [dict(cp=2), dict(cp=2, comm="a2a", recompute_granularity="full")]
    assert run_distributed(2, _cases, cases)[0] == [STEPS] * 2
