"""Pipeline parallelism: point-to-point exchange between stages and the micro-batch schedules."""

from megalite.pipeline_parallel.interleaved import (
    check_interleaving,
    forward_backward_pipelining_with_interleaving,
)
from megalite.pipeline_parallel.p2p import PipelineLinks, StageP2P
from megalite.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
)

__all__ = [
    "PipelineLinks",
    "StageP2P",
    "check_interleaving",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "get_forward_backward_func",
]
