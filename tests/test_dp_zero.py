"""DDP + ZeRO 0/1/2 against one process stepping the same global batch (torch AdamW), on gloo.

Each distributed task loops over several configurations inside one multi-process call so the
worker pools are paid for once.
"""

import contextlib
import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.data_parallel import (
    DistributedDataParallel,
    OptimizerConfig,
    build_optimizer,
    finalize_model_grads,
    get_param_groups,
)
from tests.harness import run_distributed

GLOBAL_BATCH, MICRO_BATCHES, STEPS = 16, 2, 3
LR, WD, CLIP = 1e-2, 0.1, 0.05  # CLIP small enough that clipping is active every step


class TinyMLP(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)
        # non-zero norm params so that weight-decay grouping matters
        nn.init.normal_(self.norm.weight, 1.0, 0.2)
        nn.init.normal_(self.norm.bias, 0.0, 0.2)

    def forward(self, x):
        return self.fc2(self.norm(torch.nn.functional.gelu(self.fc1(x))))


def global_batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)


def serial_reference(steps: int = STEPS, clip: float = CLIP):
    """One process, the whole batch at once, torch's own AdamW and clip_grad_norm_."""
    model = TinyMLP()
    opt = torch.optim.AdamW(get_param_groups([model], WD), lr=LR)
    norms = []
    for step in range(steps):
        x, y = global_batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
    return model, norms


def train_dp(zero_stage, overlap, bucket_size, steps=STEPS, use_no_sync=True):
    """This rank's slice of each global batch, in MICRO_BATCHES micro-batches, no_sync between.

    Without `use_no_sync` every micro-batch's backward may reduce (overlap reopens buckets).
    """
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ddp = DistributedDataParallel(
        TinyMLP(),
        data_parallel_group=ps.get_data_parallel_group(),
        bucket_size=bucket_size,
        overlap_grad_reduce=overlap,
        zero_stage=zero_stage,
    )
    config = OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=CLIP, zero_stage=zero_stage)
    opt = build_optimizer(config, [ddp], ps.get_model_parallel_groups())
    norms = []
    per_rank = GLOBAL_BATCH // dp
    for step in range(steps):
        x, y = global_batch(step)
        xs = x[rank * per_rank : (rank + 1) * per_rank].chunk(MICRO_BATCHES)
        ys = y[rank * per_rank : (rank + 1) * per_rank].chunk(MICRO_BATCHES)
        for i, (xm, ym) in enumerate(zip(xs, ys)):
            last = i == MICRO_BATCHES - 1
            ctx = ddp.no_sync() if use_no_sync and not last else contextlib.nullcontext()
            with ctx:
                loss = nn.functional.mse_loss(ddp(xm), ym) / MICRO_BATCHES
                loss.backward()
        finalize_model_grads([ddp], groups=ps.get_model_parallel_groups())
        updated, norm, _ = opt.step()
        assert updated
        norms.append(norm)
        opt.zero_grad()
    return ddp, opt, norms


def _dp_matches_serial():
    ps.initialize_model_parallel(1, 1)
    ref, ref_norms = serial_reference()
    checked = []
    # bucket sizes: 40 elements (many buckets, params straddling shard borders) and one bucket
    configs = list(itertools.product((0, 1, 2), (False, True), (40, None), (True,)))
    # accumulation outside no_sync: buckets launched after micro-batch 1 are reopened
    configs += [(zero, True, 40, False) for zero in (0, 1, 2)]
    for zero, overlap, bucket, use_no_sync in configs:
        ddp, opt, norms = train_dp(zero, overlap, bucket, use_no_sync=use_no_sync)
        for (name, p), q in zip(ddp.module.named_parameters(), ref.parameters()):
            assert_close(p, q, msg=lambda m, n=name, z=zero: f"{n} ZeRO-{z}: {m}")
        assert_close(torch.tensor(norms), torch.tensor(ref_norms))
        checked.append((zero, overlap, bucket, len(ddp.buckets)))
    return checked


@pytest.mark.parametrize("world", [2, 4])
def test_dp_zero_stages_match_one_process(world):
    """World 2 / 4 (DP = world): ZeRO 0/1/2 x overlap x bucket size, 3 AdamW steps."""
    results = run_distributed(world, _dp_matches_serial)
    assert len(results[0]) == 15
    assert max(r[3] for r in results[0]) >= 3  # the small bucket size really made many buckets


def _zero_memory_and_guards():
    """ZeRO-1/2 hold 1/DP of the Adam state; ZeRO-2 frees full grad buffers after backward."""
    ps.initialize_model_parallel(1, 1)
    dp = ps.get_data_parallel_world_size()
    numel = sum(p.numel() for p in TinyMLP().parameters())
    out = {}
    for zero in (0, 1, 2):
        ddp, opt, _ = train_dp(zero, overlap=True, bucket_size=40, steps=1)
        state = sum(
            t.numel() for s in opt.optimizer.state.values() for k, t in s.items() if k != "step"
        )
        out[zero] = state
        # state tensors: exp_avg + exp_avg_sq over the owned pieces
        expected = 2 * numel if zero == 0 else 2 * sum(b.numel // dp for b in ddp.buckets)
        assert state == expected, (zero, state, expected)
        if zero == 2:
            x, y = global_batch(0)
            nn.functional.mse_loss(ddp(x[:2]), y[:2]).backward()
            # the callback at the end of backward reduce-scattered and released every bucket
            assert all(not b.materialized for b in ddp.buckets)
    dist.barrier()
    return out


def test_zero_shards_optimizer_state_and_grads():
    """World 2: Adam state per rank is 1/2 under ZeRO 1/2 (up to padding)."""
    r0, r1 = run_distributed(2, _zero_memory_and_guards)
    assert r0[1] == r1[1] < r0[0] // 2 + 8
    assert r0[2] == r0[1]


def test_optimizer_config_validation():
    with pytest.raises(ValueError, match="mutually exclusive"):
        OptimizerConfig(bf16=True, fp16=True)
    with pytest.raises(ValueError, match="zero stage must be 0, 1 or 2, got 3"):
        OptimizerConfig(zero_stage=3)
    with pytest.raises(ValueError, match="min loss scale"):
        OptimizerConfig(fp16=True, min_loss_scale=8.0, initial_loss_scale=4.0)
    with pytest.raises(ValueError, match="adam_beta2"):
        OptimizerConfig(adam_beta2=1.0)
    with pytest.raises(TypeError, match="wrapped in megalite's DistributedDataParallel"):
        build_optimizer(OptimizerConfig(), [TinyMLP()])


def test_param_groups_skip_decay_on_bias_and_norm():
    groups = get_param_groups([TinyMLP()], 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [p.dim() for p in groups[0]["params"]] == [2, 2]
    assert len(groups[1]["params"]) == 4  # fc1.bias, norm.weight, norm.bias, fc2.bias


def test_norm_helpers_single_process():
    from megalite.data_parallel import clip_grads

    a, b = torch.tensor([3.0, -4.0]), torch.tensor([12.0])
    assert clip_grads.global_grad_norm([a, b]) == pytest.approx(13.0)
    assert clip_grads.global_grad_norm([a, b], norm_type=float("inf")) == 12.0
    assert clip_grads.clip_grads_by_norm_([a, b], 6.5, 13.0) == pytest.approx(0.5, rel=1e-6)
    assert torch.allclose(a, torch.tensor([1.5, -2.0]))
    assert clip_grads.count_zeros([torch.tensor([0.0, 1.0, 0.0])]) == 2
    p = nn.Parameter(torch.zeros(2))
    assert clip_grads.counts_in_norm(p, tp_rank=0, is_first_stage=False)
    assert not clip_grads.counts_in_norm(p, tp_rank=1, is_first_stage=True)  # TP-replicated
    p.tensor_model_parallel = True
    assert clip_grads.counts_in_norm(p, tp_rank=1, is_first_stage=True)
    p.shared_embedding = True
    assert not clip_grads.counts_in_norm(p, tp_rank=0, is_first_stage=False)  # last-stage copy
