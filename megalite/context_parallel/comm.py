"""The collectives context parallelism uses: ring send/recv and an autograd all-to-all.

Both take the CP process group explicitly. Point-to-point peers are addressed by their global
rank (what torch.distributed wants), looked up once in the group; nothing here computes ranks
from the layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class Ring:
    """This rank's neighbours in the CP `group`: sends go to the next rank, receives come from
    the previous one, so a block posted by every rank moves one step round the ring."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def shift(self, tensor: torch.Tensor, tag: int = 0) -> Pending:
        """Post: send `tensor` to the next rank, receive the previous rank's into a new buffer.

        Returns at once (the transfer overlaps whatever runs before `Pending.wait`); `tensor`
        must not be modified until then.
        """
        tensor = tensor.contiguous()
        buffer = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, self.next, self.group, tag),
            dist.P2POp(dist.irecv, buffer, self.prev, self.group, tag),
        ]
        return Pending(dist.batch_isend_irecv(ops), buffer, tensor)


class Pending:
    """An in-flight `Ring.shift`: `wait` returns the received tensor."""

    def __init__(self, works: list, buffer: torch.Tensor, sent: torch.Tensor):
        self.works, self.buffer, self._sent = works, buffer, sent  # keep the send alive

    def wait(self) -> torch.Tensor:
        for w in self.works:
            w.wait()
        self._sent = None
        return self.buffer


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Cut `x` in `cp` pieces along `scatter_dim`, send piece j to CP rank j, and concatenate
    what arrives (in CP-rank order) along `gather_dim`. Not differentiable; see `AllToAll`."""
    cp = dist.get_world_size(group)
    if x.shape[scatter_dim] % cp != 0:
        raise ValueError(
            f"all-to-all: dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by "
            f"context-parallel size {cp}"
        )
    send = torch.stack(x.chunk(cp, dim=scatter_dim)).contiguous()  # [cp, ...piece]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class AllToAll(torch.autograd.Function):
    """Forward: all-to-all scattering `scatter_dim` and gathering `gather_dim`.
    Backward: the reverse all-to-all (scatter `gather_dim`, gather `scatter_dim`)."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Size of the CP group; ``None`` means no context parallelism (1)."""
    return 1 if group is None else dist.get_world_size(group)
