"""DeepSpeed ZeRO 1/2/3 over megalite's parallel_state: same losses as megalite's own path.

The model is megalite's GPT (TP layers, vocab-parallel cross-entropy); the configs are the
shipped examples/ds_zero{1,2,3}.json completed by `deepspeed_config_for`. megalite's own path is
the pipeline schedule + DDP + distributed optimizer of tests/test_dp_gpt.py.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.data_parallel import OptimizerConfig
from megalite.data_parallel.deepspeed_bridge import (
    DeepSpeedLayoutError,
    deepspeed_config_for,
    initialize_deepspeed,
    load_deepspeed_config,
)
from megalite.model import build_model
from tests.harness import run_distributed
from tests.test_dp_gpt import CLIP, LR, MB, SEED, WD, M, gpt_config, micro_batches, train_gpt

pytest.importorskip("deepspeed")
from deepspeed.accelerator import get_accelerator  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS = 5


def complete_config(cfg: dict, micro_batch: int, global_batch: int) -> dict:
    """An example config filled in for these tests' batch sizes and optimizer settings."""
    if cfg["zero_optimization"]["stage"] == 3:
        # partition even this tiny model's parameters (the example keeps small ones whole)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    oc = OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=CLIP)
    return deepspeed_config_for(cfg, micro_batch, global_batch, oc)


def ds_gpt_losses(cfg, stage: int, steps: int = STEPS) -> list[float]:
    """Train megalite's GPT through the DeepSpeed engine; DP-averaged loss per step."""
    dp = ps.get_data_parallel_world_size()
    (model,) = build_model(cfg, SEED)
    numels = [p.numel() for p in model.parameters()]
    ds_cfg = load_deepspeed_config(EXAMPLES / f"ds_zero{stage}.json")
    ds_cfg = complete_config(ds_cfg, MB, MB * M * dp)
    engine = initialize_deepspeed(model, ds_cfg, OptimizerConfig(lr=LR, weight_decay=WD))
    # sharded over megalite's DP group, not the world
    assert engine.dp_world_size == dp
    if stage == 3:
        shards = [p.ds_tensor.numel() for p in model.parameters()]
        assert shards == [-(-n // dp) for n in numels], (shards, numels)
    else:
        assert engine.optimizer.partition_count == [dp] * len(engine.optimizer.partition_count)
    losses = []
    for step in range(steps):
        total = 0.0
        for tokens, labels in micro_batches(step, cfg):
            loss = engine(tokens, labels).mean()
            engine.backward(loss)
            engine.step()
            total += loss.item() / M
        t = torch.tensor([total])
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        losses.append(t.item() / dp)
    return losses


def _ds_matches_megalite(tp: int, stages):
    cfg = gpt_config(dict(tp=tp, pp=1))
    _, ref, _ = train_gpt(cfg, zero=1, steps=STEPS)
    for stage in stages:
        losses = ds_gpt_losses(cfg, stage)
        assert_close(torch.tensor(losses), torch.tensor(ref), msg=lambda m, s=stage: f"{s}: {m}")
    return ref


def test_deepspeed_zero_1_2_3_dp2_match_megalite():
    """World 2 (DP=2): DeepSpeed ZeRO 1, 2, 3 losses over 5 steps = megalite's ZeRO-1 path."""
    ref = run_distributed(2, _ds_matches_megalite, 1, (1, 2, 3))[0]
    assert len(ref) == STEPS


def _tp_and_refusals():
    ref = _ds_matches_megalite(2, (1,))
    ps.destroy_model_parallel()
    cfg = gpt_config(dict(tp=1, pp=2))
    with pytest.raises(DeepSpeedLayoutError, match="got pipeline-model-parallel size 2"):
        initialize_deepspeed(build_model(cfg, SEED)[0], {"zero_optimization": {"stage": 1}})
    ps.destroy_model_parallel()
    model = build_model(gpt_config(dict(tp=1, pp=1)), SEED)[0]
    if not get_accelerator().is_fp16_supported():  # DS_ACCELERATOR=cpu
        fp16 = {"zero_optimization": {"stage": 1}, "fp16": {"enabled": True}}
        with pytest.raises(DeepSpeedLayoutError, match="does not support fp16: use --bf16"):
            initialize_deepspeed(model, fp16)
    with pytest.raises(DeepSpeedLayoutError, match="train_batch_size is 99"):
        deepspeed_config_for({"train_batch_size": 99}, 1, 8)
    return ref


def test_deepspeed_zero1_tp2_dp2_and_pipeline_refused():
    """World 4 (TP=2 x DP=2): ZeRO-1 matches megalite; PP=2 is refused with the reason."""
    assert len(run_distributed(4, _tp_and_refusals)[0]) == STEPS
