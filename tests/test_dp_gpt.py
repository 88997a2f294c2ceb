"""megalite's GPT through the real pipeline schedules, DDP, ZeRO and the optimizer, vs one process.

The trainer's composition: `get_forward_backward_func()` with ``no_sync_func`` (every chunk's
DDP), ``finalize_model_grads_func`` and ``grad_scale_func`` from this package, then
``optimizer.step()``. Three AdamW steps with clipping must give the parameters, losses and grad
norms of the unsplit GPT trained by torch's AdamW on the whole global batch.
"""

import dataclasses
import functools

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
from megalite.pipeline_parallel import get_forward_backward_func
from tests.harness import run_distributed

SEED, MB, M, STEPS = 4321, 2, 4, 3  # init seed, micro-batch size, micro-batches per DP rank
LR, WD, CLIP = 3e-3, 0.1, 0.5
BASE = dict(
    num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=96,
    make_vocab_size_divisible_by=16, seq_length=16, ffn_hidden_size=64,
    hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip


def _pp_sizes() -> tuple[int, int]:
    """(PP, model chunks per stage) of the live parallel state: the schedule to use."""
    return (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    )


def batches(step: int, dp: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randint(0, vocab, (dp * M * MB, BASE["seq_length"] + 1), generator=g)


def serial(cfg: GPTConfig, dp: int):
    """The whole GPT in one process on the whole global batch; losses, norms, params."""
    ref_cfg = dataclasses.replace(
        cfg, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        num_layers_per_virtual_pipeline_stage=None, sequence_parallel=False,
    )  # fmt: skip
    (ref,) = build_model(ref_cfg, SEED, use_parallel_state=False)
    opt = torch.optim.AdamW(get_param_groups([ref], WD), lr=LR)
    losses, norms = [], []
    for step in range(STEPS):
        b = batches(step, dp, cfg.vocab_size)
        loss = ref(b[:, :-1], b[:, 1:]).mean()
        loss.backward()
        losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
    return losses, norms, dict(ref.named_parameters())


def tp_shard(full: torch.Tensor, p) -> torch.Tensor:
    """This TP rank's piece of `full`, following the parameter's partition attributes."""
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if tp == 1 or not getattr(p, "tensor_model_parallel", False):
        return full
    dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
    blocks = full.chunk(tp * stride, dim)
    return torch.cat([blocks[j * tp + r] for j in range(stride)], dim)


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    inner = model.module
    out = model(tokens if inner.pre_process else None, labels if inner.post_process else None)
    return out, lambda per_token: (per_token.mean(), {"lm_loss": per_token.mean().detach()})


def gpt_config(case: dict) -> GPTConfig:
    """Initialize parallel_state for `case` and return its GPTConfig (case keys popped)."""
    tp, pp, vpp = case.pop("tp"), case.pop("pp"), case.pop("vpp", None)
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp)
    return GPTConfig(
        **{**BASE, **case}, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        num_layers_per_virtual_pipeline_stage=BASE["num_layers"] // (pp * vpp) if vpp else None,
    )  # fmt: skip


def micro_batches(step: int, cfg: GPTConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This DP rank's M micro-batches of (tokens, labels) from global batch `step`."""
    dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = batches(step, dp, cfg.vocab_size)[d * M * MB : (d + 1) * M * MB]
    return [(mine[i * MB : (i + 1) * MB, :-1], mine[i * MB : (i + 1) * MB, 1:]) for i in range(M)]


def train_gpt(cfg: GPTConfig, zero: int, overlap: bool = True, steps: int = STEPS):
    """megalite's own path (schedule + DDP + optimizer); (chunks, DP-mean losses, grad norms).

    Losses are returned on the last pipeline stage only (empty elsewhere).
    """
    vpp = cfg.num_layers_per_virtual_pipeline_stage is not None
    chunks = [
        DistributedDataParallel(c, ps.get_data_parallel_group(), 2000, overlap, zero)
        for c in build_model(cfg, SEED)
    ]
    opt = build_optimizer(
        OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=CLIP, zero_stage=zero),
        chunks,
        ps.get_model_parallel_groups(),
    )
    tp = cfg.tensor_model_parallel_size
    s = cfg.seq_length // tp if cfg.sequence_parallel else cfg.seq_length
    losses, norms = [], []
    for step in range(steps):
        micro = micro_batches(step, cfg)
        out = get_forward_backward_func(
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        )(
            _forward_step,
            [iter(micro) for _ in chunks] if vpp else iter(micro),
            chunks if vpp else chunks[0],
            M,
            tensor_shape=(s, MB, cfg.hidden_size),
            no_sync_func=[c.no_sync for c in chunks],
            finalize_model_grads_func=functools.partial(
                finalize_model_grads, groups=ps.get_model_parallel_groups()
            ),
            grad_scale_func=opt.scale_loss,
        )
        updated, norm, _ = opt.step()
        assert updated
        opt.zero_grad()
        norms.append(norm)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            loss = torch.stack([o["lm_loss"] for o in out]).mean()
            dist.all_reduce(loss, group=ps.get_data_parallel_group())
            losses.append(loss.item() / ps.get_data_parallel_world_size())
    return chunks, losses, norms


def _run(case: dict):
    case = dict(case)
    zero, overlap = case.pop("zero"), case.pop("overlap", True)
    cfg = gpt_config(case)
    ref_losses, ref_norms, ref_params = serial(cfg, ps.get_data_parallel_world_size())
    chunks, losses, norms = train_gpt(cfg, zero, overlap)
    assert_close(torch.tensor(norms), torch.tensor(ref_norms), msg=f"norms {case}")
    if losses:
        assert_close(torch.tensor(losses), torch.tensor(ref_losses), msg=f"losses {case}")
    tied = not cfg.untie_embeddings_and_output_weights
    for chunk in chunks:
        for name, p in chunk.module.named_parameters():
            ref_name = WORD_EMBEDDING if tied and name == "output_layer.weight" else name
            want = tp_shard(ref_params[ref_name].detach(), p)
            # Adam divides by sqrt(v): where a gradient is ~0, fp32 summation-order noise
            # (micro-batches, DP averaging vs one big batch) moves a weight by up to ~lr * 1e-2.
            assert_close(p.detach(), want, rtol=1e-4, atol=1e-4, msg=lambda e, n=name: f"{n}: {e}")
    return ref_losses


def _cases(cases):
    out = []
    for case in cases:
        out.append(_run(case))
        ps.destroy_model_parallel()
    return out


CASES_4 = [
    dict(tp=1, pp=2, zero=2),  # 1F1B x DP=2, tied embedding across stages, ZeRO-2
    dict(tp=2, pp=2, zero=1, sequence_parallel=True, swiglu=True,
         normalization="RMSNorm", position_embedding_type="rope"),  # TP x PP, SP, stride-2 fc1
    dict(tp=1, pp=2, vpp=2, zero=1),  # interleaved x DP=2, overlapped reduction, ZeRO-1
    dict(tp=2, pp=1, zero=0, sequence_parallel=True, overlap=False),  # TP x DP, no pipelining
]  # fmt: skip


def test_gpt_schedules_ddp_zero_match_one_process():
    """World 4: GPT 3 steps under 1F1B / interleaved / no pipelining with ZeRO 0/1/2."""
    results = run_distributed(4, _cases, CASES_4)
    assert [len(run) for run in results[0]] == [STEPS] * len(CASES_4)
