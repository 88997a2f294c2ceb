"""Cross-entropy over vocab-sharded logits, without ever gathering the full vocabulary.

Each TP rank holds logits ``[.., V/tp]`` for its slice of the (padded) vocabulary. The softmax
needs three numbers per token that span all shards, and only those are all-reduced:
the max logit (for stability), the sum of exponentials, and the target's logit (owned by one
rank, zero elsewhere). Memory and traffic are ``O(tokens)``, not ``O(tokens x V)``.

Semantics match ``F.cross_entropy(logits, target, reduction="none", ignore_index=-100,
label_smoothing=eps)`` on the gathered logits: per-token loss of `target`'s shape, 0 (and no
gradient) where ``target == ignore_index``. Label smoothing uses torch's definition (mix with the
uniform distribution over all V padded entries), not Megatron's ``eps * V / (V - 1)`` rescaling.
Reduction (mean over unmasked tokens, loss masks) is the caller's: ``(loss * mask).sum() /
mask.sum()``. Targets must lie in ``[0, V)`` or equal `ignore_index`; as on GPU in torch, other
values are not checked (that would need a host sync).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megalite.tensor_parallel.utils import group_rank_and_size, vocab_range


def _all_reduce(x: torch.Tensor, group: Optional[dist.ProcessGroup], op=dist.ReduceOp.SUM):
    if group_rank_and_size(group)[1] > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: per-token loss from ``[.., V/tp]`` logits (3 all-reduces of ``[..]``).

    Backward: ``softmax - (1 - eps) * onehot - eps / V`` on the local shard, times the incoming
    per-token gradient; no communication.
    """

    @staticmethod
    def forward(ctx, logits, target, group, label_smoothing, ignore_index):
        rank, world = group_rank_and_size(group)
        ctx.logits_dtype = logits.dtype
        # Softmax statistics in fp32 whatever the logits' dtype: bf16 sums over 50k entries lose
        # most of their bits. (The input itself is never modified.)
        logits = logits.float()
        logits_max = _all_reduce(logits.amax(dim=-1), group, dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)

        partition_vocab = shifted.shape[-1]
        first, last = vocab_range(partition_vocab, rank)
        vocab_size = partition_vocab * world
        ignored = target == ignore_index
        outside = (target < first) | (target >= last)
        local_target = (target - first).masked_fill(outside, 0).long()  # gather needs int64
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = _all_reduce(target_logit.masked_fill(outside, 0.0), group)

        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - target_logit
        if label_smoothing > 0:
            # -mean_j log p_j = log_sum_exp - mean_j shifted_j (mean over all V entries).
            mean_logit = _all_reduce(shifted.sum(dim=-1), group) / vocab_size
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_sum_exp - mean_logit)
        loss = loss.masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))  # reuse the exp buffer: it is not needed again
        ctx.save_for_backward(softmax, local_target, outside, ignored)
        ctx.label_smoothing, ctx.vocab_size = label_smoothing, vocab_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside, ignored = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = softmax  # saved for this backward only: safe to overwrite
        on_rank = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(1.0 - eps) * on_rank)
        if eps > 0:
            grad.sub_(eps / ctx.vocab_size)
        scale = grad_loss.float().masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad.mul_(scale).to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    group: Optional[dist.ProcessGroup],
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross-entropy from vocab-sharded logits: ``[s, b, V/tp], [s, b] -> [s, b]``.

    Any leading shape works (``[b, s, V/tp], [b, s] -> [b, s]``). The loss is fp32; the
    gradient has the logits' dtype. ``target == ignore_index`` gives loss 0 and zero gradient.
    """
    if vocab_parallel_logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits shape {tuple(vocab_parallel_logits.shape)} does not match target shape "
            f"{tuple(target.shape)} (expected target = logits without the vocab dim)"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    loss = _VocabParallelCrossEntropy.apply(
        vocab_parallel_logits, target, group, float(label_smoothing), ignore_index
    )
    return loss
