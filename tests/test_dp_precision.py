"""Mixed precision (fp16 loss scaling, bf16), optimizer checkpoints, on gloo."""

import io

import pytest
import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.data_parallel import (
    DistributedDataParallel,
    OptimizerConfig,
    build_optimizer,
    finalize_model_grads,
)
from megalite.data_parallel.grad_scaler import DynamicGradScaler
from tests.harness import run_distributed
from tests.test_dp_3d import TinyLM, micro_batches, pipeline_step


def _build(tp, zero, dtype, **opt_kwargs):
    ps.initialize_model_parallel(tp, 1)
    model = TinyLM(ps.get_tensor_model_parallel_group(), dtype=dtype)
    ddp = DistributedDataParallel(model, ps.get_data_parallel_group(), 64, True, zero)
    config = OptimizerConfig(lr=1e-2, zero_stage=zero, **opt_kwargs)
    return ddp, build_optimizer(config, [ddp], ps.get_model_parallel_groups())


def _snapshot(ddp):
    return [p.detach().clone() for p in ddp.module.parameters()]


def _fp16_inf_skips():
    """Rank 1 alone gets an inf in its own grad shard: every rank skips, the scale halves."""
    out = []
    for zero in (0, 1, 2):
        ddp, opt = _build(1, zero, torch.float16, fp16=True, initial_loss_scale=1024.0,
                          hysteresis=1, loss_scale_window=2)  # fmt: skip
        scaled = []
        for step in range(4):
            pipeline_step(ddp, micro_batches(step), opt.scale_loss)
            finalize_model_grads([ddp], groups=ps.get_model_parallel_groups())
            if step == 1 and dist.get_rank() == 1:
                opt.pieces[-1].grad()[0] = float("inf")
            before, scale = _snapshot(ddp), opt.get_loss_scale()
            updated, norm, _ = opt.step()
            opt.zero_grad()
            after = _snapshot(ddp)
            same = all(torch.equal(a, b) for a, b in zip(before, after))
            scaled.append((updated, scale, opt.get_loss_scale(), same, norm is None))
        assert all(p.dtype == torch.float16 for p in ddp.module.parameters())
        assert all(piece.main.dtype == torch.float32 for piece in opt.pieces)
        out.append(scaled)
        ps.destroy_model_parallel()
    return out


def test_fp16_inf_on_one_rank_skips_step_everywhere_and_halves_scale():
    """World 2 (DP=2), ZeRO 0/1/2: step 1 skipped on both ranks, params untouched."""
    results = run_distributed(2, _fp16_inf_skips)
    assert results[0] == results[1]
    for per_step in results[0]:
        assert per_step == [
            (True, 1024.0, 1024.0, False, False),
            (False, 1024.0, 512.0, True, True),  # inf: skipped, halved, untouched
            (True, 512.0, 512.0, False, False),
            (True, 512.0, 1024.0, False, False),  # 2 clean steps in a row: doubled
        ]


def test_dynamic_scaler_hysteresis_and_floor():
    s = DynamicGradScaler(initial_scale=8.0, min_scale=2.0, growth_interval=3, hysteresis=2)
    s.update(True)
    assert s.scale == 8.0  # first overflow absorbed by hysteresis
    s.update(True)
    assert s.scale == 4.0
    s.update(True)
    s.update(True)
    assert s.scale == 2.0  # never below min
    for _ in range(3):
        s.update(False)
    assert s.scale == 4.0
    with pytest.raises(ValueError, match="hysteresis must be >= 1"):
        DynamicGradScaler(hysteresis=0)


def _bf16_loss_decreases():
    ddp, opt = _build(2, 1, torch.bfloat16, bf16=True)
    losses = []
    for _ in range(15):
        losses.append(pipeline_step(ddp, micro_batches(0)))
        finalize_model_grads([ddp], groups=ps.get_model_parallel_groups())
        assert opt.step()[0]
        opt.zero_grad()
    assert all(p.dtype == torch.bfloat16 for p in ddp.module.parameters())
    return losses


def test_bf16_training_decreases_loss():
    """World 4 (TP=2 x DP=2, ZeRO-1): bf16 params, fp32 main params; the loss goes down."""
    losses = run_distributed(4, _bf16_loss_decreases)[0]
    assert losses[-1] < 0.7 * losses[0], losses


def _train(ddp, opt, steps, start=0):
    for step in range(start, start + steps):
        pipeline_step(ddp, micro_batches(step))
        finalize_model_grads([ddp], groups=ps.get_model_parallel_groups())
        opt.step()
        opt.zero_grad()


def _checkpoint_resume():
    """bf16 + ZeRO-2: save after 2 steps, reload into fresh objects, step 3 is bit-identical."""
    ddp, opt = _build(1, 2, torch.bfloat16, bf16=True)
    _train(ddp, opt, 2)
    buf = io.BytesIO()
    torch.save({"model": ddp.state_dict(), "opt": opt.state_dict()}, buf)
    _train(ddp, opt, 1, start=2)
    ps.destroy_model_parallel()

    ddp2, opt2 = _build(1, 2, torch.bfloat16, bf16=True)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    ddp2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    _train(ddp2, opt2, 1, start=2)
    for a, b in zip(ddp.module.parameters(), ddp2.module.parameters()):
        assert torch.equal(a, b)
    # a checkpoint from another DP rank's shard is refused, not misread
    bad = dict(state["opt"], dp_rank=1 - state["opt"]["dp_rank"])
    with pytest.raises(ValueError, match="dp_rank is"):
        opt2.load_state_dict(bad)
    return state["opt"]["dp_size"], len(state["opt"]["pieces"])


def test_sharded_optimizer_checkpoint_resumes_exactly():
    """World 2 (DP=2): per-rank ZeRO-2 optimizer shards load with weights_only=True."""
    (dp, n0), (_, n1) = run_distributed(2, _checkpoint_resume)
    assert dp == 2 and n0 > 0 and n1 > 0
