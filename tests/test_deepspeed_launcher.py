"""Through the real `deepspeed` launcher: 2 CPU ranks, examples/ds_zero2.json, 5 steps.

This module is also the script the launcher starts (``--module tests.test_deepspeed_launcher``):
`main` initializes torch.distributed from the launcher's environment with megalite's own
`init_distributed`, trains TinyLM through `initialize_deepspeed` and writes the losses.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
STEPS = 5


def ds_losses(config_path: str, steps: int) -> list[float]:
    """TinyLM (megalite TP layers) through the DeepSpeed engine; DP-averaged loss per step."""
    import torch.distributed as dist

    from megalite import parallel_state as ps
    from megalite.data_parallel import OptimizerConfig
    from megalite.data_parallel.deepspeed_bridge import (
        deepspeed_config_for,
        initialize_deepspeed,
        load_deepspeed_config,
    )
    from tests.test_dp_3d import CLIP, GB, LR, MICRO, WD, TinyLM, micro_batches

    ps.initialize_model_parallel(1, 1)
    dp = ps.get_data_parallel_world_size()
    oc = OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=CLIP)
    cfg = deepspeed_config_for(load_deepspeed_config(config_path), GB // dp // MICRO, GB, oc)
    engine = initialize_deepspeed(TinyLM(ps.get_tensor_model_parallel_group()), cfg, oc)
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
    return losses


def main() -> None:
    from megalite.distributed import init_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", action="store_true")
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the launcher
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    assert args.deepspeed
    info = init_distributed(backend="gloo", timeout_minutes=2)
    losses = ds_losses(args.deepspeed_config, STEPS)
    if info.rank == 0:
        Path(args.out).write_text(
            json.dumps({"losses": losses, "world": info.world_size, "launcher": info.launcher})
        )


@pytest.mark.slow
def test_deepspeed_launcher_zero2_matches_one_process(tmp_path):
    """World 2 via `deepspeed --num_gpus 2` (DS_ACCELERATOR=cpu, gloo): losses = one process."""
    if not DEEPSPEED.exists():
        pytest.skip(f"{DEEPSPEED} not installed")
    from megalite.distributed import free_port
    from tests.test_dp_3d import serial_reference

    out = tmp_path / "losses.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()),
        "--module", "tests.test_deepspeed_launcher",
        "--deepspeed", "--deepspeed_config", str(ROOT / "examples" / "ds_zero2.json"),
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["launcher"] == "torchrun"
    _, ref, _ = serial_reference(STEPS)
    assert_close(torch.tensor(result["losses"]), torch.tensor(ref))


if __name__ == "__main__":
    main()
