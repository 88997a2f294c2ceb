"""Stopping a run cleanly: an exit signal or a wall-clock budget, agreed on by every rank.

A cluster ends jobs with a signal (Slurm: SIGTERM at the time limit or on preemption, or
``--signal=B:USR1@SECONDS`` as a warning before it). The handler here only *records* the signal;
the trainer asks `ExitWatch.should_exit()` at each iteration boundary, which all-reduces one
small tensor so that every rank gets the same answer at the same iteration, even when the signal
reached only some of them (srun forwards it to each task; a torchrun agent forwards it to its
workers, at slightly different times). The run then saves and exits 0.

Why record and decide later rather than save from inside the handler: a handler runs between
two Python bytecodes of the main thread, possibly in the middle of a collective or of a save.
Saving there would deadlock or write a half-updated model; a recorded signal instead lets a save
in progress finish first and the decision happen where every rank is at the same point.

`--exit-duration-in-mins` works the same way: each rank compares its own elapsed time with the
budget and the all-reduce takes the maximum, so the first rank over budget stops everyone.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

from megalite.config import ConfigError, option

# The signals a cluster uses to warn or stop a job (SIGKILL cannot be caught). SIGINT is accepted
# too; without the handler it stays Python's KeyboardInterrupt, which stops at once.
EXIT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


@dataclass
class ExitConfig:
    """When a run stops before --train-iters: on a signal or after a wall-clock budget."""

    exit_signal_handler: bool = option(
        False,
        "on --exit-signal, every rank agrees at the next iteration boundary to save a "
        "checkpoint (when --save is set) and exit 0",
    )
    exit_signal: str = option(
        "SIGTERM",
        "the signal --exit-signal-handler catches (Slurm: SIGTERM at the time limit, or the "
        "one named in --signal=B:USR1@SECONDS)",
        choices=EXIT_SIGNALS,
    )
    exit_duration_in_mins: Optional[float] = option(
        None,
        "save (when --save is set) and exit 0 once the run has used this many minutes of "
        "wall-clock time, counted from the start of the trainer (before the model is built "
        "or loaded)",
    )

    def __post_init__(self):
        if self.exit_signal not in EXIT_SIGNALS:
            raise ConfigError(
                f"--exit-signal {self.exit_signal!r}: expected one of {', '.join(EXIT_SIGNALS)}"
            )
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ConfigError(
                f"--exit-duration-in-mins must be > 0 minutes, got {self.exit_duration_in_mins}"
            )


class SignalRecorder:
    """Installs a handler for one signal that only records its arrival.

    Use as a context manager (or `install` / `uninstall`); the previous handler is restored on
    exit. Must be installed from the main thread (a Python rule for signal handlers).
    """

    def __init__(self, signame: str = "SIGTERM"):
        if signame not in EXIT_SIGNALS:
            raise ConfigError(f"--exit-signal {signame!r}: expected one of {EXIT_SIGNALS}")
        self.signame = signame
        self.signum = getattr(signal, signame)
        self.count = 0
        self.first_at: Optional[float] = None
        self._previous = None
        self._installed = False

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.count += 1
        if self.first_at is None:
            self.first_at = time.monotonic()

    @property
    def received(self) -> bool:
        return self.count > 0

    def install(self) -> SignalRecorder:
        self._previous = signal.signal(self.signum, self._handle)
        self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous)
            self._installed = False

    __enter__ = install

    def __exit__(self, *exc) -> None:
        self.uninstall()


class ExitWatch:
    """Decides, identically on every rank, whether the run must stop at this iteration boundary.

    `should_exit()` is a collective over `group` (default: the whole world) whenever a signal
    handler or a time budget is configured; without either it returns None at no cost, so the
    trainer may call it unconditionally. It returns the reason as a sentence for the log.
    """

    def __init__(
        self,
        config: ExitConfig,
        *,
        group: Optional[dist.ProcessGroup] = None,
        start_time: Optional[float] = None,
        device: Optional[torch.device] = None,
    ):
        self.config = config
        self.group = group
        self.start_time = time.monotonic() if start_time is None else start_time
        self.device = device or torch.device("cpu")
        self.recorder: Optional[SignalRecorder] = (
            SignalRecorder(config.exit_signal) if config.exit_signal_handler else None
        )
        self.reason: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.recorder is not None or self.config.exit_duration_in_mins is not None

    def install(self) -> ExitWatch:
        if self.recorder is not None:
            self.recorder.install()
        return self

    def uninstall(self) -> None:
        if self.recorder is not None:
            self.recorder.uninstall()

    __enter__ = install

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self.start_time) / 60.0

    def local_flags(self) -> tuple[bool, bool]:
        """(signal received, over the time budget) as this rank alone sees it."""
        got_signal = self.recorder is not None and self.recorder.received
        budget = self.config.exit_duration_in_mins
        over_time = budget is not None and self.elapsed_minutes() >= budget
        return got_signal, over_time

    def should_exit(self) -> Optional[str]:
        """Collective: why every rank stops now, or None to go on. Same answer on every rank."""
        if not self.active:
            return None
        # one all-reduce (MAX): any rank's signal, any rank over budget, the longest elapsed time
        local = [float(f) for f in self.local_flags()] + [self.elapsed_minutes()]
        flags = torch.tensor(local, dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        got_signal, over_time, elapsed = flags.tolist()
        if got_signal:
            self.reason = f"received {self.config.exit_signal} (--exit-signal-handler)"
        elif over_time:
            self.reason = (
                f"wall-clock budget of {self.config.exit_duration_in_mins:g} minutes reached "
                f"(--exit-duration-in-mins; {elapsed:.2f} minutes elapsed)"
            )
        else:
            return None
        return self.reason
