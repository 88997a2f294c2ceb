"""Pipeline parallelism: point-to-point exchange between stages and the micro-batch schedules."""

from typing import Callable

from megalite.pipeline_parallel.interleaved import (
    check_interleaving,
    forward_backward_pipelining_with_interleaving,
)
from megalite.pipeline_parallel.p2p import PipelineLinks, StageP2P
from megalite.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_without_interleaving,
)


def get_forward_backward_func(pipeline_size: int, virtual_size: int = 1) -> Callable[..., list]:
    """The schedule for a layout: PP=1: no pipelining; PP>1: 1F1B, or the interleaved 1F1B
    when each stage holds `virtual_size` > 1 model chunks."""
    if pipeline_size == 1:
        return forward_backward_no_pipelining
    if virtual_size > 1:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving


__all__ = [
    "PipelineLinks",
    "StageP2P",
    "check_interleaving",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "get_forward_backward_func",
]
