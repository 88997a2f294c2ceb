"""Interleaved 1F1B over virtual pipeline stages (Narayanan et al., 2021, section 2.2).

Each of the p ranks holds v model chunks; chunk c of rank r is virtual stage ``c * p + r``, so
an activation visits rank 0, 1, ..., p-1 and then wraps around to rank 0's next chunk. The
bubble shrinks from ``(p-1)/(m+p-1)`` to ``(p-1)/(v*m+p-1)`` of the step at the price of v times
more point-to-point traffic.

Work is numbered by *virtual micro-batch* k = 0 .. v*m-1: micro-batches go through in groups
of p, and each group visits every chunk before the next group starts (`chunk_id`, `microbatch_id`).
Every rank runs the same sequence of forwards (and the mirror sequence of backwards, chunks in
reverse); rank r does ``2 * (p - r - 1) + (v - 1) * p`` warm-up forwards so that the first
backward's gradient has arrived when it starts, then alternates one forward and one backward.
This needs m to be a multiple of p (the groups), which is checked before any work.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from torch import nn

from megalite.pipeline_parallel.p2p import PipelineLinks, Shape, StageP2P
from megalite.pipeline_parallel.schedules import (
    ForwardStepFunc,
    GradSyncControl,
    Model,
    as_chunks,
    backward_step,
    deallocate_output_tensor,
    forward_step,
    model_device,
)


def check_interleaving(num_microbatches: int, num_stages: int, num_chunks: int) -> None:
    """Raise ValueError when the interleaved schedule cannot run this many micro-batches."""
    if num_stages < 2:
        raise ValueError(f"the interleaved schedule needs PP > 1, got PP={num_stages}")
    if num_chunks < 2:
        raise ValueError(
            f"the interleaved schedule needs >= 2 model chunks per stage, got {num_chunks}"
        )
    if num_microbatches % num_stages != 0:
        raise ValueError(
            f"the interleaved schedule needs the number of micro-batches ({num_microbatches}) "
            f"to be a multiple of the pipeline-model-parallel size ({num_stages})"
        )


def chunk_id(k: int, p: int, v: int, forward: bool) -> int:
    """Model chunk that virtual micro-batch `k` runs on (backwards visit chunks in reverse)."""
    c = (k % (p * v)) // p
    return c if forward else v - 1 - c


def microbatch_id(k: int, p: int, v: int) -> int:
    """Micro-batch that virtual micro-batch `k` carries."""
    return (k // (p * v)) * p + k % p


def forward_backward_pipelining_with_interleaving(
    forward_step_func: ForwardStepFunc,
    data_iterator: Any,
    model: Model,
    num_microbatches: int,
    *,
    tensor_shape: Optional[Shape] = None,
    dtype: torch.dtype = torch.float32,
    forward_only: bool = False,
    no_sync_func=None,
    finalize_model_grads_func: Optional[Callable[[list[nn.Module]], None]] = None,
    grad_scale_func: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    links: Optional[PipelineLinks] = None,
) -> list[dict]:
    """Interleaved 1F1B; `model` and `data_iterator` are lists, one entry per model chunk.

    Same contract as the other schedules (see `schedules`); chunk c reads `data_iterator[c]`.
    No global state is set: a chunk knows its own place in the pipeline.
    """
    chunks = as_chunks(model)
    links = links if links is not None else PipelineLinks.from_parallel_state()
    p, v, m, rank = links.num_stages, len(chunks), num_microbatches, links.stage
    check_interleaving(m, p, v)
    if tensor_shape is None:
        raise ValueError("pipelined schedules need tensor_shape, the [s, b, h] between stages")
    iterators = list(data_iterator) if isinstance(data_iterator, (list, tuple)) else None
    if iterators is not None and len(iterators) != v:
        raise ValueError(f"got {len(iterators)} data iterators for {v} model chunks")
    p2p = StageP2P(links, tensor_shape, dtype, model_device(chunks[0]))
    total = m * v
    if forward_only:
        num_warmup = total
    elif m == p:
        # Every micro-batch is in the pipeline at once: all forwards, then all backwards.
        num_warmup = total
    else:
        num_warmup = min(2 * (p - rank - 1) + (v - 1) * p, total)
    all_warmup = num_warmup == total
    num_steady = total - num_warmup

    inputs: list[list] = [[] for _ in range(v)]
    outputs: list[list] = [[] for _ in range(v)]
    output_grads: list[list] = [[] for _ in range(v)]
    losses: list[dict] = []
    sync = GradSyncControl(no_sync_func, enabled=not forward_only, num_chunks=v)

    def is_first(c: int) -> bool:  # the very first virtual stage
        return links.is_first and c == 0

    def is_last(c: int) -> bool:  # the very last virtual stage: it computes the loss
        return links.is_last and c == v - 1

    def run_forward(k: int) -> torch.Tensor:
        c = chunk_id(k, p, v, forward=True)
        if is_first(c):
            inputs[c].append(None)
        it = iterators[c] if iterators is not None else data_iterator
        out = forward_step(forward_step_func, it, chunks[c], m, inputs[c][-1], losses, is_last(c))
        outputs[c].append(out)
        if forward_only:
            inputs[c].pop()
            outputs[c].pop()
        return out

    def run_backward(k: int) -> Optional[torch.Tensor]:
        c = chunk_id(k, p, v, forward=False)
        if microbatch_id(k, p, v) == m - 1:
            sync.enable_sync(c)  # chunk c's last micro-batch: its DDP may reduce from here on
        if is_last(c):
            output_grads[c].append(None)
        return backward_step(
            inputs[c].pop(0), outputs[c].pop(0), output_grads[c].pop(0), grad_scale_func
        )

    grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
    with grad_mode:
        sync.disable_sync()
        # Warm-up. Rank 0 chunk 0 reads data; everyone else starts by receiving.
        if not links.is_first:
            inputs[0].append(p2p.exchange(recv_prev=True)[0])
        for k in range(num_warmup):
            out = run_forward(k)
            next_c = chunk_id(k + 1, p, v, forward=True)
            recv_prev = not (links.is_first and next_c == 0) and k != total - 1
            send = None if is_last(chunk_id(k, p, v, forward=True)) else out
            if k == num_warmup - 1 and not forward_only and not all_warmup:
                # The first backward comes next: also ask for its output gradient.
                recv_next = not links.is_last
                inp, grad = p2p.exchange(send_next=send, recv_prev=recv_prev, recv_next=recv_next)
                if recv_next:
                    output_grads[v - 1].append(grad)
            else:
                inp, _ = p2p.exchange(send_next=send, recv_prev=recv_prev)
            if recv_prev:
                inputs[next_c].append(inp)
            if not forward_only and send is not None:
                deallocate_output_tensor(out)

        # Steady state: forward of virtual micro-batch k + num_warmup, backward of k.
        for k in range(num_steady):
            fk = k + num_warmup
            out = run_forward(fk)
            input_grad = run_backward(k)
            f_c, b_c = chunk_id(fk, p, v, forward=True), chunk_id(k, p, v, forward=False)
            send_next = None if is_last(f_c) else out
            send_prev = None if is_first(b_c) else input_grad
            # Which chunk the next received activation / gradient belongs to. On the first rank
            # the activation arriving now left the last rank p-1 virtual micro-batches ago.
            if links.is_first:
                prev_c = chunk_id(fk - (p - 1), p, v, forward=True)
                recv_prev = prev_c != v - 1
                next_fc = prev_c + 1
            else:
                recv_prev, next_fc = True, chunk_id(fk + 1, p, v, forward=True)
            if links.is_last:
                prev_bc = chunk_id(k - (p - 1), p, v, forward=False)
                recv_next = prev_bc != 0
                next_bc = prev_bc - 1
            else:
                recv_next, next_bc = True, chunk_id(k + 1, p, v, forward=False)
            if k == num_steady - 1:
                recv_prev = False
            inp, grad = p2p.exchange(
                send_next=send_next, send_prev=send_prev, recv_prev=recv_prev, recv_next=recv_next
            )
            if send_next is not None:
                deallocate_output_tensor(out)
            if recv_prev:
                inputs[next_fc].append(inp)
            if recv_next:
                output_grads[next_bc].append(grad)

        # Cool-down: the remaining backwards.
        if not forward_only:
            if all_warmup and not links.is_last:
                output_grads[v - 1].append(p2p.exchange(recv_next=True)[1])
            for k in range(num_steady, total):
                input_grad = run_backward(k)
                b_c = chunk_id(k, p, v, forward=False)
                next_bc = chunk_id(k + 1, p, v, forward=False)
                recv_next = not (links.is_last and next_bc == v - 1) and k != total - 1
                send_prev = None if is_first(b_c) else input_grad
                _, grad = p2p.exchange(send_prev=send_prev, recv_next=recv_next)
                if recv_next:
                    output_grads[next_bc].append(grad)
            sync.enable_sync()
    if not forward_only and finalize_model_grads_func is not None:
        finalize_model_grads_func(chunks)
    return losses
