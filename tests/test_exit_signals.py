"""Exit signals and wall-clock budgets: every rank reaches the same decision (gloo, world 2).

The signal is delivered to one rank only (as srun or a torchrun agent may do, at different
times): after `should_exit()` both ranks must stop, with the same reason. SIGUSR1 is checked in
the test process itself, because the harness's workers use SIGUSR1 for their stack dumps.
"""

import os
import signal
import time

import pytest

from megalite.config import ConfigError
from megalite.training.exit_signals import ExitConfig, ExitWatch, SignalRecorder
from tests.harness import run_distributed


def _agree(signame, signalled_rank, budget, late_rank):
    import torch.distributed as dist

    rank = dist.get_rank()
    start = time.monotonic() - (120.0 if rank == late_rank else 0.0)  # 2 minutes "elapsed"
    config = ExitConfig(
        exit_signal_handler=signame is not None,
        exit_signal=signame or "SIGTERM",
        exit_duration_in_mins=budget,
    )
    with ExitWatch(config, start_time=start) as watch:
        before = watch.should_exit()
        if rank == signalled_rank:
            os.kill(os.getpid(), getattr(signal, signame))
        after = watch.should_exit()
        local = watch.local_flags()
    # the handler is gone again: the previous disposition is back
    restored = signal.getsignal(getattr(signal, signame or "SIGTERM"))
    return before, after, local, restored is not watch.recorder


def test_a_signal_on_one_rank_stops_every_rank():
    results = run_distributed(2, _agree, "SIGTERM", 1, None, None)
    befores, afters, locals_, restored = zip(*results)
    # the first call must not stop: the budget is off and no signal came yet
    assert befores == (None, None)
    assert afters[0] == afters[1] == "received SIGTERM (--exit-signal-handler)"
    assert locals_ == ((False, False), (True, False))  # only rank 1 saw it itself
    assert all(restored)


def test_the_time_budget_of_one_rank_stops_every_rank():
    # rank 0 started "2 minutes ago", the budget is 1 minute; rank 1 is within budget
    results = run_distributed(2, _agree, None, None, 1.0, 0)
    befores, afters, locals_, _ = zip(*results)
    assert befores[0] == befores[1] and befores[0].startswith("wall-clock budget of 1 minutes")
    assert afters[0] == afters[1]
    assert locals_ == ((False, True), (False, False))


def test_no_signal_and_time_left_goes_on():
    results = run_distributed(2, _agree, None, None, 60.0, None)
    assert [r[1] for r in results] == [None, None]


def test_sigusr1_is_recorded_and_the_previous_handler_restored():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with SignalRecorder("SIGUSR1") as rec:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert rec.received and rec.count == 2
        assert seen == []  # caught by the recorder, not by the handler it replaced
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_inactive_watch_is_free_and_never_stops():
    watch = ExitWatch(ExitConfig())
    assert not watch.active and watch.should_exit() is None


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(exit_signal="SIGKILL"), "--exit-signal 'SIGKILL'"),
        (dict(exit_duration_in_mins=0), "--exit-duration-in-mins must be > 0 minutes, got 0"),
        (dict(exit_duration_in_mins=-5.0), "got -5.0"),
    ],
)
def test_bad_settings_name_the_flag(kwargs, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        ExitConfig(**kwargs)
