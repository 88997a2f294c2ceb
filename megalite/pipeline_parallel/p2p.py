"""Point-to-point exchange of activations and their gradients between neighbouring stages.

Shapes are known in advance (every stage boundary carries ``[s, b, h]``, or ``[s/tp, b, h]``
under sequence parallelism), so a receiver allocates its buffer from the schedule's
`tensor_shape` and no shape is ever exchanged at run time.

Every exchange is one `torch.distributed.batch_isend_irecv` of up to four operations, waited for
in full before returning (so a tensor that was sent may be freed right after). Two rules make the
same code correct on NCCL and gloo, including PP=2 where the previous and the next stage are the
same rank (interleaved schedules wrap around from the last stage to the first):

* **Fixed order**: every rank posts ``send next, recv prev, send prev, recv next``: the
  "forward-direction" pair (activations flowing to higher stages) before the "backward-direction"
  pair (gradients flowing down). Two ranks that talk both ways then issue their operations to
  each other in matching order, which NCCL requires (it matches per peer, in issue order).
* **Tags**: activations travel with tag `FORWARD_TAG` and gradients with `BACKWARD_TAG`; gloo
  matches on (peer, tag), so an activation can never land in a gradient buffer.

All operations are non-blocking and posted before any is waited on, so no pair of ranks can
deadlock on send-before-receive ordering (the trap of blocking gloo ``send``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

FORWARD_TAG = 1
BACKWARD_TAG = 2

Shape = tuple[int, ...]


class P2POp(NamedTuple):
    """One send (`is_send`) or receive of `tensor` to / from global rank `peer`."""

    is_send: bool
    tensor: torch.Tensor
    peer: int
    tag: int


@dataclass
class PipelineLinks:
    """This rank's place in its pipeline: the group, the neighbours' global ranks, its stage."""

    group: object
    prev_rank: int
    next_rank: int
    stage: int
    num_stages: int
    transport: Optional[Callable[[list[P2POp]], None]] = None
    """Stand-in for torch.distributed (in-process simulation, see `timeline`): performs a list
    of `P2POp` (sends, and receives that it fills in place) and returns when all are done."""

    @classmethod
    def from_parallel_state(cls) -> PipelineLinks:
        from megalite import parallel_state as ps

        return cls(
            group=ps.get_pipeline_model_parallel_group(),
            prev_rank=ps.get_pipeline_model_parallel_prev_rank(),
            next_rank=ps.get_pipeline_model_parallel_next_rank(),
            stage=ps.get_pipeline_model_parallel_rank(),
            num_stages=ps.get_pipeline_model_parallel_world_size(),
        )

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


class StageP2P:
    """The exchanges of one pipeline stage, for boundary tensors of one shape and dtype.

    Megatron's vocabulary: `recv_forward`, `send_backward_recv_forward`, ... . The non-interleaved
    helpers do nothing at the ends of the pipeline (the first stage receives no activation, the
    last sends none); `exchange` is the raw call the interleaved schedule uses, where the last
    stage does send on to the first (the next model chunk).
    """

    def __init__(
        self,
        links: PipelineLinks,
        tensor_shape: Shape,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ):
        self.links, self.tensor_shape, self.dtype = links, tuple(tensor_shape), dtype
        self.device = device if device is not None else torch.device("cpu")
        _warm_up(links.group)

    def exchange(
        self,
        *,
        send_next: Optional[torch.Tensor] = None,
        send_prev: Optional[torch.Tensor] = None,
        recv_prev: bool = False,
        recv_next: bool = False,
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """One batched exchange with the neighbours; returns ``(from_prev, from_next)``.

        `send_next` is an activation for the next stage, `send_prev` a gradient for the previous
        one; `recv_prev` asks for an activation from the previous stage (returned as a leaf with
        ``requires_grad=True``: it is the next forward's input), `recv_next` for a gradient from
        the next stage. Received tensors have `tensor_shape` and `dtype`.
        """
        links = self.links
        from_prev = from_next = None
        ops = []
        if send_next is not None:
            # A stage output may be a non-contiguous view; the wire needs contiguous memory.
            ops.append(P2POp(True, send_next.detach().contiguous(), links.next_rank, FORWARD_TAG))
        if recv_prev:
            from_prev = self._buffer(requires_grad=True)
            ops.append(P2POp(False, from_prev, links.prev_rank, FORWARD_TAG))
        if send_prev is not None:
            ops.append(P2POp(True, send_prev.detach().contiguous(), links.prev_rank, BACKWARD_TAG))
        if recv_next:
            from_next = self._buffer(requires_grad=False)
            ops.append(P2POp(False, from_next, links.next_rank, BACKWARD_TAG))
        if ops and links.transport is not None:
            links.transport(ops)
        elif ops:
            batch = [
                dist.P2POp(dist.isend if op.is_send else dist.irecv, op.tensor, op.peer,
                           links.group, op.tag)
                for op in ops
            ]  # fmt: skip
            for req in dist.batch_isend_irecv(batch):
                req.wait()
        return from_prev, from_next

    def _buffer(self, requires_grad: bool) -> torch.Tensor:
        return torch.empty(
            self.tensor_shape, dtype=self.dtype, device=self.device, requires_grad=requires_grad
        )

    # --- non-interleaved 1F1B: nothing crosses the ends of the pipeline ------------------------
    def recv_forward(self) -> Optional[torch.Tensor]:
        """First stage: None. Else the activation from the previous stage."""
        return None if self.links.is_first else self.exchange(recv_prev=True)[0]

    def recv_backward(self) -> Optional[torch.Tensor]:
        """Last stage: None. Else the gradient of this stage's output, from the next stage."""
        return None if self.links.is_last else self.exchange(recv_next=True)[1]

    def send_forward(self, output: Optional[torch.Tensor]) -> None:
        """Send this stage's output to the next stage (nothing on the last stage)."""
        if not self.links.is_last:
            self.exchange(send_next=output)

    def send_backward(self, input_grad: Optional[torch.Tensor]) -> None:
        """Send the gradient of this stage's input to the previous stage (nothing on the first)."""
        if not self.links.is_first:
            self.exchange(send_prev=input_grad)

    def send_forward_recv_backward(self, output: Optional[torch.Tensor]):
        """Steady 1F1B: send an output on and get the gradient of the oldest output back."""
        if self.links.is_last:
            return None
        return self.exchange(send_next=output, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad: Optional[torch.Tensor]):
        """Steady 1F1B: send an input gradient back and get the next micro-batch's activation."""
        if self.links.is_first:
            return None
        return self.exchange(send_prev=input_grad, recv_prev=True)[0]


def _warm_up(group) -> None:
    """NCCL: the first batched p2p call on a group must involve all its ranks, which pipeline
    stages never do (stage 0 sends while stage 1 receives); a barrier first creates the
    communicator collectively. Every stage builds its StageP2P at the start of the same
    schedule call, so the barrier lines up. It runs once per schedule call (microseconds next
    to a step) so that no module-level record of warmed groups is kept. Gloo needs nothing."""
    if group is not None and dist.get_backend(group) == "nccl":
        dist.barrier(group=group)
