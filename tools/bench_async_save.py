"""How long a checkpoint save stalls training: ``--async-save`` against the synchronous save.

One process, one run: a GPT whose checkpoint (weights + fp32 AdamW moments) is at least
``--min-checkpoint-mb``, trained step after step with megalite's DDP wrapper and optimizer. The
run alternates a synchronous save (`checkpointing.save_checkpoint`) and a background save
(`AsyncCheckpointSaver`), ``--rounds`` of each, and measures for each save:

* stall: the time the training loop spends inside the save call;
* slowdown: how much longer the ``--steps-between`` steps after the async save take than the
  same steps after the sync save of the same round (the writer competes for CPU and memory
  bandwidth; a forked writer's copy-on-write pages cost the training process page faults);
* wait: the time `finalize()` blocks when the next save (or the end) comes before the write
  finished (normally 0: the steps between saves are enough).

The async figure compared with the sync stall is stall + slowdown + wait, so nothing the
background write costs the training thread is left out. Prints the medians and the ratio::

    .venv/bin/python tools/bench_async_save.py                      # goal: ratio <= 0.20
    .venv/bin/python tools/bench_async_save.py --hidden-size 1024 --save-dir /fast/disk
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(a: argparse.Namespace):
    """(model chunk, optimizer, step function, checkpoint bytes) of one process."""
    from megalite import parallel_state as ps
    from megalite.data_parallel import (
        DistributedDataParallel,
        OptimizerConfig,
        build_optimizer,
        finalize_model_grads,
    )
    from megalite.model import GPTConfig, build_model

    ps.initialize_model_parallel(1, 1)
    config = GPTConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=8,
        vocab_size=a.vocab_size, seq_length=a.seq_length, hidden_dropout=0.0,
        attention_dropout=0.0,
    )  # fmt: skip
    (chunk,) = build_model(config, 1234)
    ddp = DistributedDataParallel(chunk, ps.get_data_parallel_group())
    opt = build_optimizer(OptimizerConfig(lr=1e-4), [ddp])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab_size, (a.batch, a.seq_length), generator=g)
    labels = torch.randint(0, a.vocab_size, (a.batch, a.seq_length), generator=g)

    def step() -> float:
        opt.zero_grad()
        loss = ddp(tokens, labels).float().mean()
        loss.backward()
        finalize_model_grads([ddp])
        opt.step()
        return loss.item()

    step()  # creates the AdamW state, so the checkpoint has its full size
    nbytes = sum(t.numel() * t.element_size() for t in chunk.state_dict().values())
    nbytes += sum(
        v.numel() * v.element_size()
        for s in opt.state_dict()["optimizer"]["state"].values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return ddp, opt, step, nbytes


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="saves of each kind")
    p.add_argument("--steps-between", type=int, default=8, help="training steps between saves")
    p.add_argument("--min-checkpoint-mb", type=float, default=200.0)
    p.add_argument(
        "--mode",
        choices=("process", "thread"),
        default=None,
        help="the background writer (default: a forked process where available)",
    )
    p.add_argument("--save-dir", default=None, help="where to write (default: a temp dir)")
    a = p.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from megalite.checkpoint import format as ckpt
    from megalite.checkpoint.async_save import AsyncCheckpointSaver
    from megalite.distributed import free_port, init_distributed

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    init_distributed(backend="gloo")
    ddp, opt, step, nbytes = build(a)
    mb = nbytes / 2**20
    if mb < a.min_checkpoint_mb:
        raise SystemExit(
            f"the checkpoint is {mb:.0f} MB < --min-checkpoint-mb {a.min_checkpoint_mb:g}: "
            f"raise --hidden-size / --num-layers / --vocab-size"
        )
    root = Path(a.save_dir or tempfile.mkdtemp(prefix="megalite-bench-save-"))
    kwargs = dict(
        coords={"tp": 0, "pp": 0, "dp": 0},
        model_state=lambda: {"chunk0": ddp.module.state_dict()},
        optimizer_state=opt.state_dict,
        optimizer_sharded=False,
        rng_state=ckpt.get_rng_state(),
        meta={"settings": {}, "model": {}, "consumed_train_samples": 0},
    )
    baseline: list[float] = []
    for _ in range(a.steps_between):
        t = time.perf_counter()
        step()
        baseline.append(time.perf_counter() - t)
    base = statistics.median(baseline)

    saver = AsyncCheckpointSaver(mode=a.mode)
    sync_stalls, async_costs, parts = [], [], []
    iteration = 0
    try:
        for _ in range(a.rounds):
            after = {}
            for kind in ("sync", "async"):
                iteration += 1
                t = time.perf_counter()
                if kind == "sync":
                    ckpt.save_checkpoint(root, iteration, **kwargs)
                    sync_stalls.append(time.perf_counter() - t)
                else:
                    saver.save(root, iteration, **kwargs)
                    stall = time.perf_counter() - t
                t = time.perf_counter()
                for _ in range(a.steps_between):
                    step()
                    if kind == "async":
                        saver.poll()
                after[kind] = time.perf_counter() - t
                if kind == "async":
                    t = time.perf_counter()
                    saver.finalize()
                    wait = time.perf_counter() - t
                    # the steps after the async save against the same steps after the sync one
                    slow = after["async"] - after["sync"]
                    async_costs.append(stall + slow + wait)
                    parts.append((stall, slow, wait))
                assert ckpt.read_tracker(root) == iteration
    finally:
        if a.save_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    s, c = statistics.median(sync_stalls), statistics.median(async_costs)
    stall, slow, wait = (statistics.median(x) for x in zip(*parts))
    print(
        f"checkpoint {mb:.0f} MB ({a.num_layers} layers, hidden {a.hidden_size}, vocab "
        f"{a.vocab_size}); median step {base * 1e3:.0f} ms; {a.rounds} saves of each kind, "
        f"{a.steps_between} steps between saves; {torch.get_num_threads()} thread(s); "
        f"writer: {saver.mode}"
    )
    print(f"sync save stall (median):       {s * 1e3:9.1f} ms")
    print(
        f"async save cost (median):       {c * 1e3:9.1f} ms  (in the call {stall * 1e3:.1f}, "
        f"slower steps {slow * 1e3:.1f}, waiting at the next save {wait * 1e3:.1f})"
    )
    print(f"ratio async / sync:             {c / s:9.3f}")
    return c / s


if __name__ == "__main__":
    main()
