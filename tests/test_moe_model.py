"""The MoE GPT through schedules, DDP (experts over expert-DP), ZeRO and the optimizer, vs one
process: losses, grad norms and every parameter after a few AdamW steps with clipping.

The reference runs the same micro-batches one by one (the load-balancing loss is a per
micro-batch quantity), each weighted 1 / (all micro-batches), aux losses included.
"""

import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.data_parallel import (
    DistributedDataParallel,
    OptimizerConfig,
    build_optimizer,
    finalize_model_grads,
    get_param_groups,
)
from megalite.model import GPTConfig, build_model
from megalite.model.gpt import WORD_EMBEDDING
from megalite.moe import MoEConfig, set_aux_loss_scale
from megalite.pipeline_parallel import get_forward_backward_func
from tests.harness import run_distributed
from tests.test_dp_gpt import BASE, CLIP, LR, MB, SEED, WD, M, _forward_step, batches, tp_shard

STEPS = 8
MOE = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=1e-2,
           moe_z_loss_coeff=1e-3)  # fmt: skip


def serial(cfg: GPTConfig, moe: MoEConfig, dp: int):
    ref_cfg = dataclasses.replace(
        cfg, tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False
    )
    ref_moe = dataclasses.replace(moe, expert_model_parallel_size=1, expert_tensor_parallel_size=1)
    (ref,) = build_model(ref_cfg, SEED, use_parallel_state=False, moe=ref_moe)
    set_aux_loss_scale([ref], 1.0 / (dp * M))
    opt = torch.optim.AdamW(get_param_groups([ref], WD), lr=LR)
    losses, norms = [], []
    for step in range(STEPS):
        b = batches(step, dp, cfg.vocab_size)
        total = 0.0
        for i in range(dp * M):
            mb = b[i * MB : (i + 1) * MB]
            loss = ref(mb[:, :-1], mb[:, 1:]).mean()
            (loss / (dp * M)).backward()
            total += loss.item() / (dp * M)
        losses.append(total)
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
    return losses, norms, dict(ref.named_parameters())


def expert_shard(full: torch.Tensor, p) -> torch.Tensor:
    ep, e = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    etp, t = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    full = full.chunk(ep, 0)[e]
    dim, stride = p.partition_dim, p.partition_stride
    blocks = full.chunk(etp * stride, dim)
    return torch.cat([blocks[j * etp + t] for j in range(stride)], dim)


def assert_matches_serial(cfg: GPTConfig, chunks, got: tuple, ref: tuple, tag: str) -> None:
    """Grad norms, LM losses (last stage) and every trained weight (this rank's TP / expert
    shard) equal the serial run's."""
    (losses, norms), (ref_losses, ref_norms, ref_params) = got, ref
    assert_close(torch.tensor(norms), torch.tensor(ref_norms), msg=lambda m: f"norms {tag}: {m}")
    if losses:
        # the LM loss alone (aux losses are not part of the reported lm_loss)
        assert_close(torch.tensor(losses), torch.tensor(ref_losses), msg=f"losses {tag}")
    for chunk in chunks:
        for name, p in chunk.module.named_parameters():
            tied = not cfg.untie_embeddings_and_output_weights
            full = ref_params[WORD_EMBEDDING if tied and name == "output_layer.weight" else name]
            want = expert_shard(full.detach(), p) if getattr(p, "expert", False) else tp_shard(
                full.detach(), p)  # fmt: skip
            assert_close(p.detach(), want, rtol=1e-4, atol=1e-4, msg=lambda e, n=name: f"{n}: {e}")


def _run(case: dict):
    case = dict(case)
    tp, pp, ep, etp = case.pop("tp"), case.pop("pp"), case.pop("ep"), case.pop("etp")
    zero, moe_kw = case.pop("zero"), case.pop("moe", {})
    ps.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=etp)  # fmt: skip
    cfg = GPTConfig(**{**BASE, **case}, tensor_model_parallel_size=tp,
                    pipeline_model_parallel_size=pp)  # fmt: skip
    moe = MoEConfig(**{**MOE, **moe_kw}, expert_model_parallel_size=ep,
                    expert_tensor_parallel_size=etp)  # fmt: skip
    dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ref_losses, ref_norms, ref_params = serial(cfg, moe, dp)
    chunks = [
        DistributedDataParallel(c, ps.get_data_parallel_group(), 2000, True, zero,
                                expert_data_parallel_group=ps.get_expert_data_parallel_group())
        for c in build_model(cfg, SEED, moe=moe)
    ]  # fmt: skip
    set_aux_loss_scale(chunks, 1.0 / M)
    groups = ps.get_model_parallel_groups()
    opt = build_optimizer(OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=CLIP, zero_stage=zero),
                          chunks, groups)  # fmt: skip
    s = cfg.seq_length // tp if cfg.sequence_parallel else cfg.seq_length
    losses, norms = [], []
    for step in range(STEPS):
        mine = batches(step, dp, cfg.vocab_size)[d * M * MB : (d + 1) * M * MB]
        micro = [(mine[i * MB : (i + 1) * MB, :-1], mine[i * MB : (i + 1) * MB, 1:])
                 for i in range(M)]  # fmt: skip
        out = get_forward_backward_func(pp)(
            _forward_step, iter(micro), chunks[0], M, tensor_shape=(s, MB, cfg.hidden_size),
            no_sync_func=[c.no_sync for c in chunks],
            finalize_model_grads_func=functools.partial(finalize_model_grads, groups=groups),
        )  # fmt: skip
        updated, norm, _ = opt.step()
        assert updated
        opt.zero_grad()
        norms.append(norm)
        if ps.is_pipeline_last_stage():
            loss = torch.stack([o["lm_loss"] for o in out]).mean()
            dist.all_reduce(loss, group=ps.get_data_parallel_group())
            losses.append(loss.item() / dp)
    tag = f"{tp=} {pp=} {ep=} {etp=} {zero=} {moe_kw} {case}"
    assert_matches_serial(cfg, chunks, (losses, norms), (ref_losses, ref_norms, ref_params), tag)
    return losses


def _cases(cases):
    out = []
    for case in cases:
        try:
            out.append(_run(case))
        finally:
            ps.destroy_model_parallel()
    return out


CASES_4 = [
    dict(tp=2, pp=1, ep=2, etp=1, zero=1, sequence_parallel=True, swiglu=True,
         moe=dict(moe_token_dispatcher_type="alltoall", moe_shared_expert_intermediate_size=32)),
    dict(tp=2, pp=1, ep=2, etp=2, zero=0, sequence_parallel=True, moe=dict(moe_router_topk=1)),
    dict(tp=1, pp=2, ep=2, etp=1, zero=2, moe=dict(moe_token_dispatcher_type="alltoall",
                                                   moe_layer_freq="[0,0,1,1]")),
    dict(tp=1, pp=1, ep=4, etp=1, zero=1, moe=dict(moe_router_topk=4)),
    dict(tp=2, pp=2, ep=1, etp=2, zero=0, sequence_parallel=True, swiglu=True,
         moe=dict(moe_router_topk=1, moe_shared_expert_intermediate_size=32)),
    dict(tp=2, pp=2, ep=2, etp=1, zero=2, sequence_parallel=True,
         moe=dict(moe_token_dispatcher_type="alltoall", moe_router_score_function="sigmoid",
                  moe_router_load_balancing_type="seq_aux_loss")),
]  # fmt: skip


@pytest.mark.slow
def test_moe_gpt_ep2_tp2_matches_one_process():
    """8 steps: EP2 x TP2 (SP, ETP 1 and 2), EP2 x PP2 with a stage holding no expert, EP4,
    TP2 x PP2 at EP1 and EP2; both dispatchers, top-1/2/4, shared experts, ZeRO 0/1/2."""
    results = run_distributed(4, _cases, CASES_4)
    assert any(len(r) == STEPS for r in results[-1])
