"""DeepSpeed engines saved in megalite's per-parameter format and resumed (world size 2, gloo).

TinyLM (tests/test_dp_3d) through `initialize_deepspeed` at ZeRO 1, 2 and 3 (fp32, bf16, optimizer
offload, bf16 with offload): 4 steps straight must equal 2 steps + save + a fresh engine that
loads + 2 steps, bit for bit. The same checkpoint (ZeRO-3 at DP 2) also resumes at another ZeRO
stage and on megalite's own distributed optimizer (ZeRO-1), and every file loads with
torch.load(weights_only=True).
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.checkpoint import format as ckpt
from tests.harness import run_distributed

pytestmark = pytest.mark.extended

pytest.importorskip("deepspeed")

STEPS, SAVE_AT = 4, 2


def _engine(stage: int, module, variant: str = "fp32"):
    from megalite.data_parallel import OptimizerConfig
    from megalite.data_parallel.deepspeed_bridge import deepspeed_config_for, initialize_deepspeed
    from tests.test_dp_3d import CLIP, GB, LR, MICRO, WD

    dp = ps.get_data_parallel_world_size()
    oc = OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=CLIP)
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition even tiny parameters
    cfg = {"zero_optimization": zero, "steps_per_print": 10**9}
    if "offload" in variant:  # the optimizer states and step live in host memory
        zero["offload_optimizer"] = {"device": "cpu"}
        # DeepSpeed wants its own DeepSpeedCPUAdam (a C++ op built at run time) with offload;
        # megalite's torch AdamW is allowed explicitly
        cfg["zero_force_ds_cpu_optimizer"] = False
    if "bf16" in variant:
        cfg["bf16"] = {"enabled": True}
    return initialize_deepspeed(module, deepspeed_config_for(cfg, GB // dp // MICRO, GB, oc), oc)


def _ds_step(engine, step: int) -> float:
    from tests.test_dp_3d import MICRO, micro_batches

    total = 0.0
    for ids, labels in micro_batches(step):
        loss = engine(ids, labels)
        engine.backward(loss)
        engine.step()
        total += loss.item() / MICRO
    t = torch.tensor([total])
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.item() / ps.get_data_parallel_world_size()


def _coords() -> dict:
    return {"tp": 0, "pp": 0, "dp": ps.get_data_parallel_rank()}


def _save_and_resume(root: str, stage: int, resume_stage: int, variant: str = "fp32"):
    """Losses of 4 straight steps, and of 2 steps + save + load into a fresh engine + 2 steps."""
    from megalite.data_parallel.deepspeed_checkpoint import (
        load_engine_optimizer,
        read_optimizer_state,
        save_deepspeed_checkpoint,
    )
    from tests.test_dp_3d import TinyLM

    ps.initialize_model_parallel(1, 1)
    engine = _engine(stage, TinyLM(ps.get_tensor_model_parallel_group()), variant)
    straight = [_ds_step(engine, s) for s in range(STEPS)]

    module = TinyLM(ps.get_tensor_model_parallel_group())
    engine = _engine(stage, module, variant)
    first = [_ds_step(engine, s) for s in range(SAVE_AT)]
    meta = {"settings": {}, "model": {}, "consumed_train_samples": SAVE_AT}
    rng = ckpt.get_rng_state()
    save_deepspeed_checkpoint(root, SAVE_AT, engine, module, coords=_coords(), rng_state=rng,
                              meta=meta)  # fmt: skip
    del engine

    folder, meta = ckpt.load_meta(root)
    fresh = TinyLM(ps.get_tensor_model_parallel_group())  # a new init, then the saved weights
    files = ckpt.load_shard_files(folder, _coords(), optim=False, optimizer_sharded=False, rng=True)
    fresh.load_state_dict(files["model"]["chunk0"])
    engine = _engine(resume_stage, fresh, variant)
    load_engine_optimizer(engine, fresh, read_optimizer_state(folder, _coords()))
    resumed = first + [_ds_step(engine, s) for s in range(SAVE_AT, STEPS)]
    return straight, resumed, meta


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_resume_is_bit_exact(tmp_path, stage):
    results = run_distributed(2, _save_and_resume, str(tmp_path / "ck"), stage, stage, timeout=300)
    for straight, resumed, meta in results:
        assert straight == resumed, f"ZeRO-{stage}: straight {straight}, resumed {resumed}"
        assert straight[-1] < straight[0]
        assert meta["optimizer_format"] == "megalite-optimizer-params-v1"
        assert meta["deepspeed_zero_stage"] == stage
    # a plain data file: every tensor loads with weights_only=True
    shard = ckpt.shard_dir(tmp_path / "ck/iter_0000002", 0, 0)
    assert sorted(p.name for p in shard.iterdir()) == [
        "model.pt", "optim_params.pt", "rng_dp000.pt", "rng_dp001.pt"
    ]  # fmt: skip
    for f in shard.iterdir():
        torch.load(f, weights_only=True)


@pytest.mark.slow
def test_zero3_checkpoint_resumes_at_zero1(tmp_path):
    """Same DP, another stage: the per-parameter file does not depend on the partitioning."""
    results = run_distributed(2, _save_and_resume, str(tmp_path / "ck"), 3, 1, timeout=300)
    for straight, resumed, _ in results:
        assert_close(resumed, straight, rtol=1e-6, atol=0)


def _resume_on_megalite_zero1(root: str):
    """The ZeRO-3 checkpoint of a DeepSpeed run continues on megalite's own optimizer."""
    from megalite.data_parallel import (
        DistributedDataParallel,
        OptimizerConfig,
        build_optimizer,
        finalize_model_grads,
    )
    from tests.test_dp_3d import CLIP, LR, WD, TinyLM, micro_batches, pipeline_step

    ps.initialize_model_parallel(1, 1)
    folder, _ = ckpt.load_meta(root)
    files = ckpt.load_shard_files(folder, _coords(), optim=True, optimizer_sharded=True, rng=False)
    module = TinyLM(ps.get_tensor_model_parallel_group())
    module.load_state_dict(files["model"]["chunk0"])
    ddp = DistributedDataParallel(module, ps.get_data_parallel_group(), zero_stage=1)
    opt = build_optimizer(OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=CLIP, zero_stage=1),
                          [ddp])  # fmt: skip
    opt.load_state_dict(files["optimizer"])
    losses = []
    for step in range(SAVE_AT, STEPS):
        opt.zero_grad()
        loss = torch.tensor([pipeline_step(ddp, micro_batches(step))])
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        losses.append(loss.item() / ps.get_data_parallel_world_size())
        finalize_model_grads([ddp])
        opt.step()
    return losses


@pytest.mark.slow
def test_zero3_checkpoint_resumes_on_megalite_zero1(tmp_path):
    root = str(tmp_path / "ck")
    (straight, _, _), _ = run_distributed(2, _save_and_resume, root, 3, 3, timeout=300)
    for losses in run_distributed(2, _resume_on_megalite_zero1, root):
        assert_close(losses, straight[SAVE_AT:], rtol=1e-5, atol=0)


def test_a_native_zero_checkpoint_is_refused_with_the_way_out(tmp_path):
    from megalite.data_parallel.deepspeed_checkpoint import (
        DeepSpeedCheckpointError,
        read_optimizer_state,
    )

    shard = ckpt.shard_dir(Path(tmp_path), 0, 0)
    shard.mkdir(parents=True)
    torch.save({"format": "megalite-optimizer-v1"}, shard / "optim_dp000.pt")
    with pytest.raises(DeepSpeedCheckpointError, match="tools/checkpoint_reshard.py"):
        read_optimizer_state(Path(tmp_path), {"tp": 0, "pp": 0, "dp": 0})


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_bf16_resume_is_bit_exact(tmp_path, stage):
    """bf16 engines (bf16 weights, fp32 masters and moments): the checkpoint holds the fp32
    masters, so the resumed run continues bit for bit."""
    root = str(tmp_path / "ck")
    results = run_distributed(2, _save_and_resume, root, stage, stage, "bf16", timeout=300)
    for straight, resumed, _ in results:
        assert straight == resumed, f"bf16 ZeRO-{stage}: straight {straight}, resumed {resumed}"
        assert straight[-1] < straight[0]
    files = ckpt.load_shard_files(Path(root) / "iter_0000002", {"tp": 0, "pp": 0, "dp": 0},
                                  optim=True, optimizer_sharded=True, rng=False)  # fmt: skip
    weights = files["model"]["chunk0"]
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    for name, entry in files["optimizer"]["params"].items():
        assert entry["main"].dtype == torch.float32
        assert torch.equal(entry["main"].to(torch.bfloat16), weights[name])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["offload", "bf16-offload"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_offload_resume_is_bit_exact(tmp_path, stage, variant):
    """ZeRO-Offload (optimizer states on the host; on DeepSpeed's CPU accelerator the same
    memory, through the offload code path) saves and resumes bit for bit too."""
    root = str(tmp_path / "ck")
    results = run_distributed(2, _save_and_resume, root, stage, stage, variant, timeout=300)
    for straight, resumed, meta in results:
        assert straight == resumed, f"{variant} ZeRO-{stage}: {straight} vs {resumed}"
        assert straight[-1] < straight[0]
        assert meta["deepspeed_zero_stage"] == stage
