"""Learning-rate schedule: linear warm-up, then constant | linear | cosine decay to --min-lr.

Counted in iterations, or in samples for Megatron's sample-based flags (--lr-warmup-samples).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class LRSchedule:
    """lr(iteration) for one run; its state is the settings, checked on resume."""

    max_lr: float
    """peak learning rate (--lr), reached at the end of warm-up"""
    min_lr: float
    """floor (--min-lr), reached at `decay_iters` and kept after"""
    warmup_iters: int
    """linear warm-up from 0 over this many iterations (--lr-warmup-iters)"""
    decay_iters: int
    """iteration at which decay ends (--lr-decay-iters, default --train-iters)"""
    decay_style: str = "linear"
    """constant | linear | cosine (--lr-decay-style)"""

    def __post_init__(self) -> None:
        if self.decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown --lr-decay-style {self.decay_style!r}")
        if not 0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"need 0 <= --min-lr {self.min_lr} <= --lr {self.max_lr}")
        if self.warmup_iters < 0 or self.decay_iters < 0:
            raise ValueError("--lr-warmup-iters and --lr-decay-iters must be >= 0")

    def lr(self, iteration: int, increment: int = 1) -> float:
        """Learning rate for the step that produces iteration `iteration + 1` (0-based step).

        Sample-based schedules (--train-samples, --lr-*-samples) pass the consumed samples as
        `iteration` and the global batch as `increment`: the schedule then counts samples.
        """
        if self.warmup_iters > 0 and iteration < self.warmup_iters:
            if increment > 1:  # samples: the last warm-up batch may reach past the warm-up
                return (
                    self.max_lr * min(iteration + increment, self.warmup_iters) / self.warmup_iters
                )
            return self.max_lr * (iteration + 1) / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        if iteration >= self.decay_iters:
            return self.min_lr
        span = self.decay_iters - self.warmup_iters
        ratio = (iteration - self.warmup_iters) / span if span > 0 else 1.0
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def state_dict(self) -> dict:
        return asdict(self)
