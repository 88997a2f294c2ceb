"""Global gradient norm over every rank, each parameter counted exactly once, and clipping.

Which rank contributes which gradient (attributes from docs/CONTRACTS.md):

- TP-sharded (``tensor_model_parallel``): every TP rank adds its shard; shards are disjoint.
- replicated over TP (norm weights, row-parallel biases, ...): only TP rank 0 adds it.
- tied embedding (``shared_embedding``, PP > 1): only the first pipeline stage adds it; the last
  stage's output weight is the same parameter after finalize's all-reduce.
- ZeRO 1/2: a rank holds only its DP shard of each gradient; shards are summed over DP.
  ZeRO 0: every DP replica holds the same gradient, so DP is not summed at all.
- PP: every stage adds its own layers.
- MoE expert parameters (``expert``): every rank adds its shard; the expert norm is summed
  over expert-DP (ZeRO) and PP x EP x ETP instead (see the optimizer), which holds each once.

Squares are summed locally, then all-reduced over the given groups (the DP group under ZeRO,
then the model-parallel group TP x PP), so the result is the norm of the one full gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist


def comm_device(group=None) -> torch.device:
    """Where a small tensor must live to go through `group`'s backend (NCCL: the current GPU)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def counts_in_norm(param: torch.nn.Parameter, tp_rank: int, is_first_stage: bool) -> bool:
    """Whether this rank's copy of `param` is the one that counts in the global norm."""
    if getattr(param, "shared_embedding", False) and not is_first_stage:
        return False
    if getattr(param, "expert", False):
        return True
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def global_grad_norm(
    grads: Iterable[torch.Tensor], groups: Sequence = (), norm_type: float = 2.0
) -> float:
    """The `norm_type` norm of `grads` taken together over every rank of `groups`.

    `grads` must already be de-duplicated (see `counts_in_norm`); `groups` are all-reduced in
    turn (SUM, or MAX for the inf-norm), e.g. ``[dp_group, model_parallel_group]`` under ZeRO.
    """
    grads = [g for g in grads if g.numel()]
    # One scalar per rank goes over the wire; it lives where the groups' backend wants it.
    total = torch.zeros(1, dtype=torch.float32, device=comm_device(groups[0] if groups else None))
    if norm_type == float("inf"):
        for g in grads:
            total = torch.maximum(total, g.detach().abs().max().float().to(total.device))
        op = dist.ReduceOp.MAX
    else:
        for g in grads:
            total += g.detach().float().norm(norm_type).to(total.device) ** norm_type
        op = dist.ReduceOp.SUM
    if dist.is_available() and dist.is_initialized():
        for group in groups:
            if group is not None:
                dist.all_reduce(total, op=op, group=group)
    if norm_type == float("inf"):
        return float(total.item())
    return float(total.item() ** (1.0 / norm_type))


def clip_grads_by_norm_(grads: Iterable[torch.Tensor], max_norm: float, total_norm: float) -> float:
    """Scale `grads` in place so that their global norm is at most `max_norm`.

    Returns the coefficient used (1.0 when no clipping was needed). Every rank passes the same
    `total_norm`, so every shard is scaled by the same factor.
    """
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for g in grads:
            g.mul_(coeff)
        return coeff
    return 1.0


def count_zeros(grads: Iterable[torch.Tensor], groups: Sequence = ()) -> int:
    """Number of exactly-zero gradient entries over every rank of `groups`."""
    total = torch.zeros(1, dtype=torch.float64, device=comm_device(groups[0] if groups else None))
    for g in grads:
        total += float(g.numel() - torch.count_nonzero(g).item())
    if dist.is_available() and dist.is_initialized():
        for group in groups:
            if group is not None:
                dist.all_reduce(total, group=group)
    return int(total.item())
