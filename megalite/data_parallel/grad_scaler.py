"""Loss scaling for fp16: constant (``--loss-scale``) or dynamic (Megatron's rules).

Dynamic scaling: on an inf/nan gradient the step is skipped and, once ``hysteresis`` such steps
have been seen, the scale is multiplied by ``backoff_factor`` (never below ``min_scale``); after
``growth_interval`` (``--loss-scale-window``) steps in a row without overflow it is multiplied by
``growth_factor`` and the hysteresis budget is refilled. Whether an overflow happened is decided
by the optimizer over *every* rank (`found_inf_anywhere`), so all replicas and model-parallel
peers skip the same steps and keep the same scale.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megalite.data_parallel.clip_grads import comm_device


def found_inf_anywhere(grads: Iterable[torch.Tensor], group=None) -> bool:
    """True when any of `grads` on any rank of `group` (default: the world) is inf or nan.

    Each rank checks its own gradients (its TP/PP part, its ZeRO shard); a MAX all-reduce makes
    the answer the same everywhere, so no rank steps while another skips.
    """
    found = torch.zeros(1, dtype=torch.float32, device=comm_device(group))
    for g in grads:
        if g.numel() and not torch.isfinite(g).all():
            found.fill_(1.0)
            break
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
    return bool(found.item() > 0)


class ConstantGradScaler:
    """A fixed loss scale: overflowing steps are still skipped, the scale never moves."""

    def __init__(self, scale: float):
        if scale <= 0:
            raise ValueError(f"loss scale must be > 0, got {scale}")
        self._scale = float(scale)

    @property
    def scale(self) -> float:
        return self._scale

    @property
    def inv_scale(self) -> float:
        return 1.0 / self._scale

    def update(self, found_inf: bool) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"scale": self._scale}

    def load_state_dict(self, state: dict) -> None:
        self._scale = float(state["scale"])


class DynamicGradScaler(ConstantGradScaler):
    """Scale that halves on overflow (after `hysteresis` overflows) and grows after a window."""

    def __init__(
        self,
        initial_scale: float = 2.0**32,
        min_scale: float = 1.0,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
    ):
        super().__init__(initial_scale)
        if not 0 < min_scale <= initial_scale:
            raise ValueError(
                f"min loss scale must be in (0, initial scale {initial_scale}], got {min_scale}"
            )
        if growth_factor <= 1.0 or not 0.0 < backoff_factor < 1.0:
            raise ValueError(
                f"need growth factor > 1 and backoff factor in (0, 1), got "
                f"{growth_factor} and {backoff_factor}"
            )
        if growth_interval < 1 or hysteresis < 1:
            raise ValueError(
                f"loss scale window and hysteresis must be >= 1, got {growth_interval} "
                f"and {hysteresis}"
            )
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self._hysteresis_left = hysteresis
        self._growth_tracker = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_left = self.hysteresis
                self._scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_left": self._hysteresis_left,
        }

    def load_state_dict(self, state: dict) -> None:
        self._scale = float(state["scale"])
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_left = int(state["hysteresis_left"])
