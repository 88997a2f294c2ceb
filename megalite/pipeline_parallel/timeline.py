"""Run a schedule's real code in virtual time: its exact timeline and bubble, no overheads.

Each simulated pipeline rank is a thread running the schedule function unchanged. The
point-to-point layer is a `VirtualNetwork` (plugged in through `PipelineLinks.transport`), and
stage work advances the rank's virtual clock instead of taking time. Sends are eager (done when
posted); a receive completes at ``max(its posting time, the matching send's time) + latency``.
What comes out is the idle fraction the schedule itself implies, to put beside the theory
(``(p-1)/(m+p-1)``, ``(p-1)/(v*m+p-1)``) and beside wall-clock measurements, whose extra idle
time is then overhead and jitter rather than the schedule.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from megalite.pipeline_parallel.p2p import P2POp, PipelineLinks

SHAPE = (2, 1, 4)  # boundary tensor of the simulated stages: the values do not matter


class VirtualClock:
    """One rank's virtual time and how much of it was stage work."""

    def __init__(self) -> None:
        self.now = self.busy = 0.0

    def work(self, duration: float) -> None:
        self.now += duration
        self.busy += duration


class VirtualNetwork:
    """Mailboxes between simulated ranks, keyed by (source, destination, tag)."""

    def __init__(self, num_stages: int, latency: float = 0.0, timeout: float = 60.0):
        self.num_stages, self.latency, self.timeout = num_stages, latency, timeout
        self.clocks = [VirtualClock() for _ in range(num_stages)]
        self._lock = threading.Lock()
        self._boxes: dict[tuple[int, int, int], queue.Queue] = defaultdict(queue.Queue)

    def _box(self, key: tuple[int, int, int]) -> queue.Queue:
        with self._lock:
            return self._boxes[key]

    def links(self, stage: int) -> PipelineLinks:
        p = self.num_stages
        return PipelineLinks(
            group=None,
            prev_rank=(stage - 1) % p,
            next_rank=(stage + 1) % p,
            stage=stage,
            num_stages=p,
            transport=lambda ops: self._transport(stage, ops),
        )

    def _transport(self, rank: int, ops: list[P2POp]) -> None:
        clock = self.clocks[rank]
        done = clock.now
        for op in ops:
            if op.is_send:
                self._box((rank, op.peer, op.tag)).put((clock.now, op.tensor.clone()))
        for op in ops:
            if op.is_send:
                continue
            try:
                sent_at, data = self._box((op.peer, rank, op.tag)).get(timeout=self.timeout)
            except queue.Empty:
                raise RuntimeError(
                    f"rank {rank} waited {self.timeout}s for tag {op.tag} from rank {op.peer}: "
                    "the schedule deadlocks"
                ) from None
            with torch.no_grad():
                op.tensor.copy_(data)
            done = max(done, sent_at + self.latency)
        clock.now = done


class _Work(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, stage):
        ctx.stage = stage
        stage.clock.work(stage.t_forward)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        ctx.stage.clock.work(ctx.stage.t_backward)
        return grad, None


class CostStage(nn.Module):
    """A model chunk whose forward and backward cost fixed virtual times."""

    def __init__(self, clock: VirtualClock, t_forward: float, t_backward: float, pre: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.clock, self.t_forward, self.t_backward = clock, t_forward, t_backward
        self.pre_process, self.input_tensor = pre, None

    def set_input_tensor(self, t):
        self.input_tensor = t

    def forward(self, x):
        h = x if self.pre_process else self.input_tensor
        return _Work.apply(h * self.weight, self)


def _forward_step(data_iterator, model):
    out = model(next(data_iterator))
    return out, lambda o: (o.mean(), {"lm_loss": o.mean().detach()})


def simulate(
    schedule: Callable,
    num_stages: int,
    num_microbatches: int,
    num_chunks: int = 1,
    t_forward: float = 1.0,
    t_backward: float = 2.0,
    latency: float = 0.0,
) -> list[float]:
    """Idle fraction of each rank for one step of `schedule`, every stage (the whole rank's
    share: t_forward / num_chunks per chunk) costing the same."""
    net = VirtualNetwork(num_stages, latency)
    errors: list[BaseException] = []

    def rank_main(r: int) -> None:
        try:
            v, clock = num_chunks, net.clocks[r]
            chunks = [
                CostStage(clock, t_forward / v, t_backward / v, pre=r == 0 and c == 0)
                for c in range(v)
            ]
            data = [iter([torch.ones(SHAPE)] * num_microbatches) for _ in chunks]
            schedule(
                _forward_step,
                data if v > 1 else data[0],
                chunks if v > 1 else chunks[0],
                num_microbatches,
                tensor_shape=SHAPE,
                links=net.links(r),
            )
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(num_stages)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    step = max(c.now for c in net.clocks)  # the step ends when the last rank is done
    return [1.0 - c.busy / step for c in net.clocks]
