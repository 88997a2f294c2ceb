"""Mixture of experts with context parallelism vs one process: 8 AdamW steps, losses, grad
norms and every trained weight.

Under CP a micro-batch's tokens are spread over the CP ranks (each holds its load-balanced part
of every sequence), so the router's load statistics are summed over TP x CP and each CP rank's
aux-loss gradient reaches only its own tokens: the CP ranks' gradients together are the whole
aux-loss gradient, which DDP's average over DP x CP must not shrink. The serial twin is
`tests.test_moe_model.serial` (the unsplit model, micro-batch by micro-batch).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.context_parallel import split
from megalite.data_parallel import (
    DistributedDataParallel,
    OptimizerConfig,
    build_optimizer,
    finalize_model_grads,
)
from megalite.model import GPTConfig, build_model, pipeline_tensor_shape
from megalite.moe import MoEConfig
from megalite.moe import training as moe_training
from megalite.pipeline_parallel import get_forward_backward_func
from tests.harness import run_distributed
from tests.test_dp_gpt import BASE, CLIP, LR, MB, SEED, WD, M, _forward_step, batches
from tests.test_moe_model import MOE, STEPS, assert_matches_serial, serial


def _train(tp=1, pp=1, cp=2, ep=2, etp=1, zero=0, comm="p2p", moe=None, **kw):
    ps.initialize_model_parallel(tp, pp, context_parallel_size=cp, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=etp)  # fmt: skip
    cfg = GPTConfig(**{**BASE, **kw}, tensor_model_parallel_size=tp,
                    pipeline_model_parallel_size=pp, sequence_parallel=tp > 1,
                    context_parallel_size=cp, cp_comm_type=comm)  # fmt: skip
    mcfg = MoEConfig(**{**MOE, **(moe or {})}, expert_model_parallel_size=ep,
                     expert_tensor_parallel_size=etp)  # fmt: skip
    dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ref_cfg = dataclasses.replace(cfg, context_parallel_size=1, cp_comm_type="p2p")
    ref_losses, ref_norms, ref_params = serial(ref_cfg, mcfg, dp)
    dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    chunks = [
        DistributedDataParallel(c, dp_cp, 2000, True, zero,
                                expert_data_parallel_group=ps.get_expert_data_parallel_group())
        for c in build_model(cfg, SEED, moe=mcfg)
    ]  # fmt: skip
    groups = ps.get_model_parallel_groups()
    opt = build_optimizer(OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=CLIP, zero_stage=zero),
                          chunks, groups)  # fmt: skip
    cp_rank = ps.get_context_parallel_rank()
    losses, norms = [], []
    for step in range(STEPS):
        mine = batches(step, dp, cfg.vocab_size)[d * M * MB : (d + 1) * M * MB]
        tokens, labels = split(mine[:, :-1], cp, cp_rank), split(mine[:, 1:], cp, cp_rank)
        micro = [(tokens[i * MB : (i + 1) * MB], labels[i * MB : (i + 1) * MB]) for i in range(M)]
        moe_training.before_step(chunks, M, context_parallel_size=cp)
        out = get_forward_backward_func(pp)(
            _forward_step, iter(micro), chunks[0], M, tensor_shape=pipeline_tensor_shape(cfg, MB),
            no_sync_func=[c.no_sync for c in chunks],
            finalize_model_grads_func=functools.partial(finalize_model_grads, groups=groups),
        )  # fmt: skip
        updated, norm, _ = opt.step()
        assert updated
        opt.zero_grad()
        norms.append(norm)
        if ps.is_pipeline_last_stage():
            loss = torch.stack([o["lm_loss"] for o in out]).mean()
            dist.all_reduce(loss, group=dp_cp)
            losses.append(loss.item() / dist.get_world_size(dp_cp))
    tag = f"{tp=} {pp=} {cp=} {ep=} {etp=} {zero=} {comm=} {moe} {kw}"
    assert_matches_serial(cfg, chunks, (losses, norms), (ref_losses, ref_norms, ref_params), tag)
    return len(losses)


def _cases(cases):
    out = []
    for case in cases:
        try:
            out.append(_train(**case))
        finally:
            ps.destroy_model_parallel()
    return out


@pytest.mark.slow
def test_moe_with_context_parallel_matches_one_process():
    """World 4: CP2 x DP2 (EP2 over CP x DP, ZeRO-1, all-to-all dispatch, seq_aux_loss), CP4 x
    EP4 (top-1, Ulysses attention), CP2 x TP2 + SP x EP2 (shared experts, ZeRO-2), CP2 x PP2."""
    cases = [
        dict(cp=2, ep=2, zero=1, moe=dict(moe_token_dispatcher_type="alltoall",
                                          moe_router_load_balancing_type="seq_aux_loss")),
        dict(cp=4, ep=4, comm="a2a", moe=dict(moe_router_topk=1)),
        dict(cp=2, tp=2, ep=2, zero=2, swiglu=True,
             moe=dict(moe_shared_expert_intermediate_size=32)),
        dict(cp=2, pp=2, ep=2, moe=dict(moe_token_dispatcher_type="alltoall")),
    ]  # fmt: skip
    results = run_distributed(4, _cases, cases, timeout=400)
    assert results[-1] == [STEPS] * len(cases)  # the last rank is a last stage everywhere


@pytest.mark.extended
@pytest.mark.slow
def test_moe_pretrain_with_context_parallel_matches_one_process(tmp_path):
    """`megalite-pretrain` at CP2 x DP2 with EP2 (and CP2 x TP2 + SP with EP2, all-to-all
    dispatch): 8 iterations equal one process on lm_loss, grad norm, aux and z-loss."""
    from tests.test_moe_e2e import _run, assert_metrics_equal

    ref = _run(1, "", tmp_path / "ref.jsonl")
    layouts = [
        "--context-parallel-size 2 --expert-model-parallel-size 2 --zero-stage 1",
        "--context-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel "
        "--expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall",
    ]
    for i, layout in enumerate(layouts):
        assert_metrics_equal(ref, _run(4, layout, tmp_path / f"l{i}.jsonl"), layout)
