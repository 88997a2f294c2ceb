"""The load-balanced split of a sequence over the CP ranks, and its inverse.

Causal attention gives late tokens more work than early ones (token i attends to i + 1 keys), so
cutting the sequence into CP contiguous pieces leaves the last rank with most of the work. The
sequence is instead cut into ``2 x CP`` equal chunks and CP rank r holds chunks ``r`` and
``2CP-1-r`` (an early one and its mirror), so every rank gets the same amount of attention::

    CP = 2, chunks 0 1 2 3:    rank 0 holds [0, 3]    rank 1 holds [1, 2]

A rank's local sequence is its two chunks back to back, in that order; their global positions
are therefore increasing, and ``position_ids`` below give them (RoPE and learned positions need
each token's global position, not its local index).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def check_seq_length(seq_length: int, cp_size: int, tp_size: int = 1) -> None:
    """Raise `ValueError` naming the numbers unless ``2 * CP * TP`` divides `seq_length`.

    The load-balanced split needs ``2 * CP`` equal chunks; with sequence parallelism each CP
    rank's share is cut again over TP. `tp_size` 1 means no sequence parallelism.
    """
    need = 2 * cp_size * tp_size
    if cp_size < 1 or tp_size < 1 or seq_length % need != 0:
        by = f"2 x context-parallel size ({cp_size})"
        if tp_size > 1:
            by += f" x tensor-model-parallel size ({tp_size}, sequence parallel)"
        raise ValueError(
            f"seq_length ({seq_length}) must be divisible by {by} = {need} for the "
            f"load-balanced context-parallel split"
        )


def chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunks (of ``2 * cp_size``) that CP rank `cp_rank` holds: ``(r, 2CP-1-r)``."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"CP rank {cp_rank} is outside context-parallel size {cp_size}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def position_ids(seq_length: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions ``[seq_length / cp]`` of the tokens CP rank `cp_rank` holds."""
    check_seq_length(seq_length, cp_size)
    c = seq_length // (2 * cp_size)
    first, second = chunk_ids(cp_size, cp_rank)
    ar = torch.arange(c, device=device)
    return torch.cat([first * c + ar, second * c + ar])


def split(t: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> torch.Tensor:
    """This CP rank's part of `t` along `seq_dim`: chunks ``r`` and ``2CP-1-r``, concatenated.

    ``[b, s] -> [b, s/cp]`` for tokens, labels, loss mask and position ids (``seq_dim=1``);
    ``[s, b, h] -> [s/cp, b, h]`` for activations (``seq_dim=0``). Always a new tensor.
    """
    if cp_size == 1:
        return t.clone()
    s = t.shape[seq_dim]
    check_seq_length(s, cp_size)
    c = s // (2 * cp_size)
    first, second = chunk_ids(cp_size, cp_rank)
    return torch.cat([t.narrow(seq_dim, first * c, c), t.narrow(seq_dim, second * c, c)], seq_dim)


def split_batch(
    batch: dict[str, Optional[torch.Tensor]], cp_size: int, cp_rank: int, seq_dim: int = 1
) -> dict[str, Optional[torch.Tensor]]:
    """`split` every tensor of a batch (tokens, labels, loss_mask, position_ids, ...) alike.

    ``None`` entries stay ``None``; tensors with no sequence dimension are an error (they would
    silently be cut along the wrong axis).
    """
    out = {}
    for name, t in batch.items():
        if t is None:
            out[name] = None
            continue
        if t.dim() <= seq_dim:
            raise ValueError(f"batch entry {name!r} of shape {tuple(t.shape)} has no dim {seq_dim}")
        out[name] = split(t, cp_size, cp_rank, seq_dim)
    return out


def reorder_index(seq_length: int, cp_size: int, device=None) -> torch.Tensor:
    """Global position of each token in the CP ranks' parts concatenated in rank order.

    ``cat([split(x, cp, r) for r in range(cp)])[i]`` is ``x[reorder_index(s, cp)[i]]``; so
    ``full.index_copy(dim, idx, gathered)`` (or ``gathered[argsort(idx)]``) undoes the split.
    """
    return torch.cat([position_ids(seq_length, cp_size, r, device) for r in range(cp_size)])


def unsplit(parts: list[torch.Tensor], seq_dim: int = 1) -> torch.Tensor:
    """Inverse of `split`: the full tensor from every CP rank's part (in CP-rank order)."""
    cp = len(parts)
    gathered = torch.cat(parts, seq_dim)
    idx = reorder_index(gathered.shape[seq_dim], cp, gathered.device)
    return gathered.index_select(seq_dim, torch.argsort(idx))


def gather(local: torch.Tensor, group: Optional[dist.ProcessGroup], seq_dim: int = 1):
    """All-gather this rank's part over the CP `group` and return the full tensor, in order.

    Not differentiable (for metrics, logits and tests); ``group=None`` means CP = 1.
    """
    if group is None or dist.get_world_size(group) == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return unsplit(parts, seq_dim)
