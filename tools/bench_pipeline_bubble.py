"""Measure the pipeline bubble of megalite's 1F1B and interleaved schedules on CPU (gloo).

    .venv/bin/python tools/bench_pipeline_bubble.py            # p=4, m=16, v=2

Every stage (model chunk) costs the same: its forward sleeps `--tf-ms`, its backward
`--tb-ms` (split evenly over the v chunks of a rank when interleaving). Sleeping instead of
computing keeps the measurement about the schedule, not about 4 processes sharing a few cores.
Each rank records how long it spent in stage work (busy); the step time T runs from a barrier
before the schedule to a barrier after it (so every rank waits for the slowest), and

    measured idle fraction = 1 - busy / T        (averaged over ranks)

Theory (Narayanan et al., 2021): per rank the work is m (t_f + t_b) and the pipeline fill and
drain add (p - 1)(t_f + t_b) for 1F1B and (p - 1)(t_f + t_b) / v interleaved, so the idle
fraction of the step is (p - 1) / (m + p - 1) and (p - 1) / (v m + p - 1). The "simulated"
column runs the same schedule code in virtual time (`megalite.pipeline_parallel.timeline`: no
overhead at all) and lands on the theory, so the schedules add no bubble of their own; the
measured value also holds what the theory leaves out (each hop's latency, printed, process
wake-ups, Python, and jitter between stages that should cost the same), so it sits above.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megalite import parallel_state as ps
from megalite.pipeline_parallel import (
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
)
from megalite.pipeline_parallel.timeline import simulate


def _pp_sizes() -> tuple[int, int]:
    """(PP, model chunks per stage) of the live parallel state: the schedule to use."""
    return (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    )


SHAPE = (8, 2, 16)  # [s, b, h] between stages: small, the messages should not dominate


class _Work(torch.autograd.Function):
    """Identity that spends `tf` seconds in forward and `tb` in backward, recording it."""

    @staticmethod
    def forward(ctx, x, stage):
        ctx.stage = stage
        stage.work(stage.tf)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        ctx.stage.work(ctx.stage.tb)
        return grad, None


class SleepStage(nn.Module):
    """A model chunk of fixed cost; one scalar weight so that backward reaches every stage."""

    def __init__(self, tf: float, tb: float, pre_process: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.tf, self.tb, self.pre_process = tf, tb, pre_process
        self.busy, self.input_tensor = 0.0, None

    def work(self, seconds: float) -> None:
        start = time.perf_counter()
        time.sleep(seconds)
        self.busy += time.perf_counter() - start

    def set_input_tensor(self, t):
        self.input_tensor = t

    def forward(self, x):
        h = x if self.pre_process else self.input_tensor
        return _Work.apply(h * self.weight, self)


def _forward_step(data_iterator, model):
    x = next(data_iterator)
    out = model(x)
    return out, lambda o: (o.mean(), {"lm_loss": o.mean().detach()})


def _one_way_latency(rank: int, rounds: int = 50) -> float:
    """Half the median ping-pong time of one boundary tensor between ranks 0 and 1."""
    buf, times = torch.zeros(SHAPE), []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        times.append((time.perf_counter() - start) / 2)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {"latency": _one_way_latency(rank)}
    for v in (1, args.v):
        ps.initialize_model_parallel(1, world, virtual_pipeline_model_parallel_size=v)
        tf, tb = args.tf_ms / 1000 / v, args.tb_ms / 1000 / v
        chunks = [SleepStage(tf, tb, pre_process=rank == 0 and c == 0) for c in range(v)]
        fb = get_forward_backward_func(
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        )
        fractions = []
        for _ in range(args.iters):
            data = [iter([torch.ones(SHAPE)] * args.m) for _ in chunks]
            for c in chunks:
                c.busy = 0.0
            dist.barrier()
            start = time.perf_counter()
            fb(
                _forward_step,
                data if v > 1 else data[0],
                chunks if v > 1 else chunks[0],
                args.m,
                tensor_shape=SHAPE,
            )
            dist.barrier()
            step = time.perf_counter() - start
            fractions.append(1.0 - sum(c.busy for c in chunks) / step)
        results[v] = statistics.median(fractions)
        ps.destroy_model_parallel()
    queue.put((rank, results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--p", type=int, default=4, help="pipeline stages (processes)")
    parser.add_argument("--m", type=int, default=16, help="micro-batches per step")
    parser.add_argument("--v", type=int, default=2, help="model chunks per stage (interleaved)")
    parser.add_argument("--tf-ms", type=float, default=40.0, help="forward time of one stage")
    parser.add_argument("--tb-ms", type=float, default=80.0, help="backward time of one stage")
    parser.add_argument("--iters", type=int, default=3, help="steps measured (median kept)")
    args = parser.parse_args()
    if args.m % args.p != 0:
        parser.error(f"the interleaved schedule needs m ({args.m}) to be a multiple of p")

    from megalite.distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, args.p, port, args, queue)) for r in range(args.p)
    ]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join()

    p, m, v = args.p, args.m, args.v
    print(f"p={p} m={m}, stage forward {args.tf_ms} ms / backward {args.tb_ms} ms, CPU gloo")
    print(f"one-way p2p latency between stages: {results[0]['latency'] * 1000:.2f} ms")
    print(f"{'schedule':<22}{'measured idle':>15}{'simulated':>11}{'theory':>8}   formula")
    for label, vv, formula, fb in (
        ("1F1B", 1, "(p-1)/(m+p-1)", forward_backward_pipelining_without_interleaving),
        (f"interleaved v={v}", v, "(p-1)/(v*m+p-1)", forward_backward_pipelining_with_interleaving),
    ):
        measured = statistics.mean(results[r][vv] for r in range(p))
        simulated = statistics.mean(simulate(fb, p, m, vv, args.tf_ms, args.tb_ms))
        theory = (p - 1) / (vv * m + p - 1)
        print(f"{label:<22}{measured:>15.3f}{simulated:>11.3f}{theory:>8.3f}   {formula}")


if __name__ == "__main__":
    main()
