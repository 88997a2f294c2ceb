"""Host and accelerator memory housekeeping: ``--manual-gc`` and ``--empty-unused-memory-level``.

``--manual-gc`` (Megatron's): Python's automatic garbage collector is off for the run, so no
rank pauses for a collection at a random step (one slow rank stalls every collective). It then
collects where every rank is at the same point: at the start, every ``--manual-gc-interval``
iterations (when > 0), before each evaluation (fully) and after it (the youngest generation:
what the evaluation made), and after each checkpoint save. The collector's previous state comes
back when the run ends.

``--empty-unused-memory-level`` (Megatron's): the caching allocator hands its unused blocks back
to the device. Level 1 does it after each training step's forward-backward (before the optimizer
step) and after each evaluation iteration; level 2 also after each optimizer step. Only a CUDA
device has such a cache; elsewhere the levels cost nothing.
"""

from __future__ import annotations

import gc

import torch


def release_cached_memory(device: torch.device) -> None:
    """Return the caching allocator's unused blocks on `device` to the driver (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ManualGC:
    """``with ManualGC(on, interval):`` around the training loop; its hooks collect on cue.

    Every hook is a no-op when `on` is False (the automatic collector then runs as usual)."""

    def __init__(self, on: bool, interval: int = 0):
        self.on, self.interval = on, interval
        self._was_enabled = True

    def __enter__(self) -> ManualGC:
        if self.on:
            self._was_enabled = gc.isenabled()
            gc.collect()  # start clean: what model building left behind
            gc.disable()
        return self

    def __exit__(self, *exc) -> None:
        if self.on and self._was_enabled:
            gc.enable()

    def after_iteration(self, iteration: int) -> None:
        if self.on and self.interval and iteration % self.interval == 0:
            gc.collect()

    def before_eval(self) -> None:
        if self.on:
            gc.collect()

    def after_eval(self) -> None:
        if self.on:
            gc.collect(generation=0)  # only the objects the evaluation created

    def after_save(self) -> None:
        if self.on:
            gc.collect()
