"""RNG streams for tensor parallelism, and activation checkpointing that replays them.

Two kinds of randomness coexist in a TP model (Megatron's scheme):

* the *default* stream (torch's global generators): identical on all TP ranks of a stage, so
  dropout on replicated activations (after a row-parallel linear, on the residual stream)
  matches across TP ranks, as the serial model would;
* the *model-parallel* stream, a tracked state forked around dropout on TP-sharded activations
  (attention probabilities of this rank's heads): different per TP rank, otherwise every rank
  would drop the same pattern in its shard.

`model_parallel_manual_seed(seed, tp_rank, pp_rank)` seeds them: default = ``seed + 100 *
pp_rank`` (stages differ, TP and DP ranks agree), model-parallel = default ``+ 2718 + tp_rank``.
A tracked state is the CPU generator state plus, when CUDA is available, the current CUDA
device's: `fork` swaps both, so the same code draws from the right stream on CPU and GPU.
`get_states()` / `set_states()` save and restore them for checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.utils.checkpoint

MODEL_PARALLEL_RNG = "model-parallel-rng"
RNGState = dict[str, torch.Tensor]  # {"cpu": ByteTensor, "cuda": ByteTensor (if CUDA)}


def _get_rng_state() -> RNGState:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: RNGState) -> None:
    torch.set_rng_state(state["cpu"])
    # A state saved on a CPU-only machine has no "cuda" entry (and vice versa): keep what is.
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGStatesTracker:
    """Named RNG states that code can `fork` into, leaving the default stream untouched."""

    def __init__(self) -> None:
        self._states: dict[str, RNGState] = {}
        self._seeds: set[int] = set()

    def reset(self) -> None:
        """Forget every tracked state."""
        self._states.clear()
        self._seeds.clear()

    def add(self, name: str, seed: int) -> None:
        """Track a new state `name` seeded with `seed` (names and seeds must be unique)."""
        if seed in self._seeds:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self._states:
            raise ValueError(f"RNG state {name!r} is already tracked")
        self._seeds.add(seed)
        outside = _get_rng_state()
        torch.default_generator.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed(seed)
        self._states[name] = _get_rng_state()
        _set_rng_state(outside)

    def get_states(self) -> dict[str, RNGState]:
        """A copy of every tracked state: ``{name: {"cpu": ByteTensor[, "cuda": ...]}}``."""
        return {name: {k: v.clone() for k, v in s.items()} for name, s in self._states.items()}

    def set_states(self, states: dict[str, RNGState]) -> None:
        """Replace the tracked states (e.g. from a checkpoint) with copies of `states`."""
        self._states = {name: {k: v.clone() for k, v in s.items()} for name, s in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Draw from state `name` inside the block; the default stream resumes after it."""
        if name not in self._states:
            raise KeyError(
                f"RNG state {name!r} is not tracked (tracked: {sorted(self._states)}); call "
                "model_parallel_manual_seed() first"
            )
        outside = _get_rng_state()
        _set_rng_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_rng_state()
            _set_rng_state(outside)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (one per process, like torch's own default generators)."""
    return _TRACKER


def model_parallel_manual_seed(seed: int, tp_rank: int, pp_rank: int = 0) -> None:
    """Seed the default stream and the tracker's model-parallel stream (Megatron's offsets).

    Default (CPU and every CUDA device): ``seed + 100 * pp_rank``, the same on all TP and DP
    ranks of a stage. Model-parallel stream: that ``+ 2718 + tp_rank``. Python's `random` and
    numpy are left to the caller.
    """
    base = seed + 100 * pp_rank
    torch.manual_seed(base)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, base + 2718 + tp_rank)


def _tracker_replay_contexts() -> tuple[contextlib.AbstractContextManager, Any]:
    """For torch.utils.checkpoint's `context_fn`: remember the tracker's states at forward time
    and put them back for the recomputation (then restore the states that follow the forward).
    """
    at_forward = _TRACKER.get_states()

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        after_forward = _TRACKER.get_states()
        _TRACKER.set_states(at_forward)
        try:
            yield
        finally:
            _TRACKER.set_states(after_forward)

    return contextlib.nullcontext(), recompute()


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` without keeping its activations; recomputed in backward.

    The recomputation sees the same randomness as the forward: torch restores the default CPU
    (and the inputs' CUDA device) generator states, and the tracker's named states are put back
    too, so dropout inside `fork` regions replays the same mask. Built on torch's non-reentrant
    checkpoint, so it works when no input requires grad and with any output structure.
    """
    return torch.utils.checkpoint.checkpoint(
        function,
        *args,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=_tracker_replay_contexts,
        **kwargs,
    )
