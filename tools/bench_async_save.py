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
background write costs the training thread is left out. Prints the medians and the ratio, in
wall time and in CPU time of the training thread (less sensitive to other load on a shared
machine), its page faults and the writer's CPU time::

    .venv/bin/python tools/bench_async_save.py --rounds 12 --steps-between 3   # goal: <= 0.20
    .venv/bin/python tools/bench_async_save.py --hidden-size 1024 --save-dir /fast/disk
"""

from __future__ import annotations

import argparse
import os
import resource
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
    p.add_argument(
        "--priority",
        choices=("idle", "low", "normal"),
        default="idle",
        help="the writer's CPU priority (idle: SCHED_IDLE, low: nice 19)",
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

    def clock() -> tuple[float, float, int]:
        """(wall s, CPU s of this thread, its minor page faults so far)"""
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        return time.perf_counter(), time.thread_time(), usage.ru_minflt

    def since(t0: tuple[float, float, int]) -> tuple[float, float, int]:
        t1 = clock()
        return t1[0] - t0[0], t1[1] - t0[1], t1[2] - t0[2]

    baseline: list[float] = []
    for _ in range(a.steps_between):
        t = time.perf_counter()
        step()
        baseline.append(time.perf_counter() - t)
    base = statistics.median(baseline)

    saver = AsyncCheckpointSaver(mode=a.mode, priority=a.priority)
    rows: dict[str, list] = {"sync": [], "async": []}  # per round: (call, steps, wait) triples
    writer_cpu: list[float] = []
    iteration = 0
    try:
        for _ in range(a.rounds):
            for kind in ("sync", "async"):
                iteration += 1
                t = clock()
                if kind == "sync":
                    ckpt.save_checkpoint(root, iteration, **kwargs)
                else:
                    saver.save(root, iteration, **kwargs)
                call = since(t)
                t = clock()
                for _ in range(a.steps_between):
                    step()
                    if kind == "async":
                        saver.poll()
                steps = since(t)
                t = clock()
                if kind == "async":
                    saver.finalize()
                    writer_cpu.append(saver.last_writer_cpu_s or 0.0)
                wait = since(t)
                rows[kind].append((call, steps, wait))
                assert ckpt.read_tracker(root) == iteration
    finally:
        if a.save_dir is None:
            shutil.rmtree(root, ignore_errors=True)

    def cost(j: int) -> tuple[list[float], list[float], list[float], list[float]]:
        """Per round, measure j (0 wall, 1 CPU, 2 faults): sync stall, async call, async
        slowdown of the following steps (against the same steps after the sync save), wait."""
        sync = [r[0][j] for r in rows["sync"]]
        call = [r[0][j] for r in rows["async"]]
        slow = [ra[1][j] - rs[1][j] for ra, rs in zip(rows["async"], rows["sync"])]
        wait = [r[2][j] for r in rows["async"]]
        return sync, call, slow, wait

    med = statistics.median
    print(
        f"checkpoint {mb:.0f} MB ({a.num_layers} layers, hidden {a.hidden_size}, vocab "
        f"{a.vocab_size}); median step {base * 1e3:.0f} ms; {a.rounds} saves of each kind, "
        f"{a.steps_between} steps between saves; {torch.get_num_threads()} thread(s); "
        f"writer: {saver.mode}, priority {saver.priority}; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    ratios = []
    for j, unit in ((0, "wall"), (1, "CPU of the training thread")):
        sync, call, slow, wait = cost(j)
        total = [c + s + w for c, s, w in zip(call, slow, wait)]
        ratios.append(med(total) / med(sync))
        print(f"-- {unit}, ms (median of {a.rounds}):")
        print(f"   sync save stall:           {med(sync) * 1e3:9.1f}")
        print(
            f"   async save cost:           {med(total) * 1e3:9.1f}  (in the call "
            f"{med(call) * 1e3:.1f}, slower steps {med(slow) * 1e3:.1f}, waiting at the next "
            f"save {med(wait) * 1e3:.1f})"
        )
        print(f"   ratio async / sync:        {ratios[-1]:9.3f}   (call alone: "
              f"{med(call) / med(sync):.3f})")  # fmt: skip
        print("   per round, sync / async:   " + ", ".join(
            f"{a_ * 1e3:.0f}/{b_ * 1e3:.0f}" for a_, b_ in zip(sync, total)))  # fmt: skip
    sync, call, slow, wait = cost(2)
    print(
        f"-- training thread's minor page faults: sync save {med(sync):.0f}, async call "
        f"{med(call):.0f}, extra in the steps after it {med(slow):.0f}"
    )
    print(f"-- background writer CPU: {med(writer_cpu) * 1e3:.1f} ms per save (median)")
    return ratios[0]


if __name__ == "__main__":
    main()
