"""DeepSpeed ZeRO 1/2/3 over megalite's parallel_state: same losses as megalite's own path.

The configs are the shipped examples/ds_zero{1,2,3}.json, completed by `deepspeed_config_for`.
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
from tests.harness import run_distributed
from tests.test_dp_3d import CLIP, GB, LR, MICRO, WD, TinyLM, micro_batches, train_3d

pytest.importorskip("deepspeed")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS = 5


def ds_config(stage: int) -> dict:
    return ds_config_from(load_deepspeed_config(EXAMPLES / f"ds_zero{stage}.json"))


def ds_config_from(cfg: dict) -> dict:
    """Complete a DeepSpeed config for TinyLM's batch sizes and optimizer settings."""
    stage = cfg["zero_optimization"]["stage"]
    if stage == 3:
        # partition even this tiny model's parameters (the example keeps small ones whole)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    oc = OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=CLIP)
    dp = ps.get_data_parallel_world_size()
    return deepspeed_config_for(cfg, GB // dp // MICRO, GB, oc)


def ds_losses(tp: int, stage: int, steps: int = STEPS, config=None):
    """Train TinyLM through the DeepSpeed engine; DP-averaged loss per step."""
    ps.initialize_model_parallel(tp, 1)
    dp = ps.get_data_parallel_world_size()
    model = TinyLM(ps.get_tensor_model_parallel_group())
    numels = [p.numel() for p in model.parameters()]
    config = config if config is not None else ds_config(stage)
    engine = initialize_deepspeed(model, config, OptimizerConfig(lr=LR, weight_decay=WD))
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
        for ids, labels in micro_batches(step):
            loss = engine(ids, labels)
            engine.backward(loss)
            engine.step()
            total += loss.item() / MICRO
        t = torch.tensor([total])
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        losses.append(t.item() / dp)
    ps.destroy_model_parallel()
    return losses


def _ds_matches_megalite(tp, stages):
    _, _, ref, _ = train_3d(tp, 1, zero=1, steps=STEPS)
    ps.destroy_model_parallel()
    for stage in stages:
        losses = ds_losses(tp, stage)
        assert_close(torch.tensor(losses), torch.tensor(ref), msg=lambda m, s=stage: f"{s}: {m}")
    return ref


def test_deepspeed_zero_1_2_3_dp2_match_megalite():
    """World 2 (DP=2): DeepSpeed ZeRO 1, 2, 3 losses over 5 steps = megalite's ZeRO-1 path."""
    ref = run_distributed(2, _ds_matches_megalite, 1, (1, 2, 3))[0]
    assert ref[-1] < ref[0]


def _tp_and_refusals():
    ref = _ds_matches_megalite(2, (1,))
    ps.initialize_model_parallel(1, 2)
    with pytest.raises(DeepSpeedLayoutError, match="got pipeline-model-parallel size 2"):
        initialize_deepspeed(TinyLM(None), {"zero_optimization": {"stage": 1}})
    with pytest.raises(DeepSpeedLayoutError, match="train_batch_size is 99"):
        deepspeed_config_for({"train_batch_size": 99}, 1, GB)
    return ref


def test_deepspeed_zero1_tp2_dp2_and_pipeline_refused():
    """World 4 (TP=2 x DP=2): ZeRO-1 matches megalite; PP=2 is refused with the reason."""
    run_distributed(4, _tp_and_refusals)
