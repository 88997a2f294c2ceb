"""The schedules' own bubble, in virtual time: the real schedule code on threads (one per stage)
over an in-process network, stage work advancing virtual clocks (`pipeline_parallel.timeline`).
With equal-cost stages and no overhead, every rank must be idle exactly the theory's fraction:
1F1B (p-1)/(m+p-1), interleaved (p-1)/(v*m+p-1) (Narayanan et al., 2021)."""

from __future__ import annotations

import math

import pytest

from megalite.pipeline_parallel import (
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
)
from megalite.pipeline_parallel.timeline import simulate


@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 16)])
def test_1f1b_bubble_is_the_theory(p, m):
    idle = simulate(forward_backward_pipelining_without_interleaving, p, m)
    assert all(math.isclose(x, (p - 1) / (m + p - 1), abs_tol=1e-12) for x in idle), idle


@pytest.mark.parametrize("p, m, v", [(2, 4, 2), (4, 4, 2), (4, 16, 2), (4, 8, 4)])
def test_interleaved_bubble_is_the_theory(p, m, v):
    idle = simulate(forward_backward_pipelining_with_interleaving, p, m, num_chunks=v)
    assert all(math.isclose(x, (p - 1) / (v * m + p - 1), abs_tol=1e-12) for x in idle), idle


def test_latency_adds_to_the_bubble():
    # Latency on every hop: the fill alone crosses p - 1 hops forward and the drain p - 1 back.
    p, m, f, b = 4, 8, 1.0, 2.0
    idle = simulate(forward_backward_pipelining_without_interleaving, p, m, latency=1.0)
    step = m * (f + b) / (1.0 - idle[0])
    assert step >= (m + p - 1) * (f + b) + 2 * (p - 1) * 1.0
