"""Ring attention (``--cp-comm-type p2p``): exact causal attention over the load-balanced split.

Each CP rank holds queries, keys and values of its two chunks (`split`). Key/value blocks travel
round the CP ring: at step i rank r attends its queries to the block of rank ``(r - i) mod CP``
while the next block is already in flight. Partial results are merged with the log-sum-exp
(online softmax) rule, ``lse = logaddexp(lse_a, lse_b)``,
``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``, which gives exactly softmax over
all keys.

Causal masking is decided per (query chunk, key chunk) pair from global chunk indices: a later
chunk sees an earlier one fully, a chunk sees itself causally, an earlier chunk sees nothing.
Under the load-balanced layout that leaves three shapes of work, all of the same size:

* step 0 (own block): both query chunks against both key chunks, causal;
* a block from a lower CP rank: both query chunks against its first key chunk only, unmasked;
* a block from a higher CP rank: the second query chunk only against both key chunks, unmasked.

Backward is the flash-attention backward, recomputing each block's probabilities from the saved
log-sum-exp (nothing quadratic is kept between forward and backward). Each block is computed a
tile of query rows at a time (`TILE_ROWS`), and a causal tile reads only the key columns it
can see, so the own block costs half a full one and no score matrix of the whole block exists.
Key/value blocks travel the ring again, and each block's dK/dV accumulator travels with it:
after CP steps plus one last send, every rank holds the full gradient of its own keys and values.

Grouped-query attention: only the ``g`` key/value heads travel; queries are viewed as
``[b, g, n/g, s, d]`` and broadcast against them, so keys are never repeated in memory.
Computation is in fp32 whatever the input dtype (bf16 in, bf16 out; fp64 stays fp64). Attention
dropout masks each tile from a generator seeded by (per-call seed, block, tile): no mask is kept.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megalite.context_parallel.comm import Ring
from megalite.context_parallel.split import chunk_ids


def block_plan(cp_size: int, rank: int, src: int) -> tuple[slice, slice, bool]:
    """Which local query rows attend which key columns of `src`'s block, and whether masked.

    Rows and columns are local halves (``slice(0, 2)`` both chunks, ``slice(1, 2)`` the second,
    ``slice(0, 1)`` the first), derived from the global chunk indices; ``causal`` means the
    selected rows and columns need the diagonal mask of the positions (only the own block).
    """
    q_chunks, k_chunks = chunk_ids(cp_size, rank), chunk_ids(cp_size, src)
    rows = [i for i, qc in enumerate(q_chunks) if any(kc <= qc for kc in k_chunks)]
    cols = [j for j, kc in enumerate(k_chunks) if any(kc <= qc for qc in q_chunks)]
    causal = any(qc < kc for i, qc in enumerate(q_chunks) if i in rows
                 for j, kc in enumerate(k_chunks) if j in cols)  # fmt: skip
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1), causal


def _halves(t: torch.Tensor, sel: slice, dim: int) -> torch.Tensor:
    c = t.shape[dim] // 2
    return t.narrow(dim, sel.start * c, (sel.stop - sel.start) * c)


# Scores are computed a tile of query rows at a time, 2 x head_dim rows by default (a tile's
# scores are then about 2 sk / sq times the tile's queries), so the transient memory of a block
# stays small beside the activations, like a flash kernel's. Tests set it lower.
TILE_ROWS: Optional[int] = None


def _tiles(q: torch.Tensor, sk: int, causal: bool):
    """Row ranges ``(i0, i1)`` of `q` and the key columns each needs (causal: up to ``i1``)."""
    sq, d = q.shape[-2:]
    rows = TILE_ROWS or max(16, 2 * d)
    for i0 in range(0, sq, rows):
        i1 = min(sq, i0 + rows)
        yield i0, i1, (i1 if causal else sk)


def _scores(q, k, scale: float, i0: int, causal: bool) -> torch.Tensor:
    """Rows ``i0..`` of `q [b, g, r, rows, d]` against ``k [b, g, cols, d]`` -> scaled scores
    ``[b, g, r, rows, cols]``; causal (the own block): column j > row i is masked."""
    s = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)).mul_(scale)
    if causal:
        rows, cols = s.shape[-2:]
        row = torch.arange(i0, i0 + rows, device=s.device).unsqueeze(1)
        s.masked_fill_(torch.arange(cols, device=s.device) > row, float("-inf"))
    return s


def _dropout_scale(drop, src: int, i0: int, p: torch.Tensor) -> Optional[torch.Tensor]:
    """Attention dropout of one tile: ``keep / (1 - rate)`` (None without dropout).

    `drop` is ``(rate, seed)``; the mask comes from a generator seeded by (seed, key/value block,
    first query row), so backward regenerates exactly the forward's mask.
    """
    if drop is None:
        return None
    rate, seed = drop
    g = torch.Generator(device=p.device)
    g.manual_seed(((seed * 1_000_003 + src) * 1_000_033 + i0) % 2**63)
    keep = torch.rand(p.shape, generator=g, device=p.device, dtype=p.dtype) >= rate
    return keep.to(p.dtype).mul_(1.0 / (1.0 - rate))


def _block_forward(q, k, v, scale, causal, drop=None, src=0):
    """``q [b, g, r, sq, d]``, ``k, v [b, g, sk, d]`` -> out ``[b, g, r, sq, d]``, lse.

    With dropout the block's output is ``dropout(P) @ v``; merging by the log-sum-exp rule is
    linear in it, so the result is dropout of the full softmax, as in a flash kernel."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)
    for i0, i1, cols in _tiles(q, k.shape[2], causal):
        s = _scores(q[..., i0:i1, :], k[:, :, :cols], scale, i0, causal)
        lse[..., i0:i1] = torch.logsumexp(s, dim=-1)
        p = s.sub_(lse[..., i0:i1].unsqueeze(-1)).exp_()  # in place: one score-sized buffer
        mask = _dropout_scale(drop, src, i0, p)
        if mask is not None:
            p.mul_(mask)
        out[..., i0:i1, :] = torch.matmul(p, v[:, :, :cols].unsqueeze(2))
    return out, lse


def _block_backward(q, k, v, dout, lse, delta, scale, causal, drop=None, src=0):
    """Gradients of one block given the final `lse` and ``delta = rowsum(dout * out)``.

    Dropout (mask D = keep / (1 - rate)): ``dv = (D P)^T dout``, ``dP = D (dout v^T)``, and
    ``delta`` is still ``rowsum(dout * out)`` since ``out = (D P) v``."""
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i0, i1, cols in _tiles(q, k.shape[2], causal):
        q_t, do_t = q[..., i0:i1, :], dout[..., i0:i1, :]
        k_t, v_t = k[:, :, :cols], v[:, :, :cols]
        p = _scores(q_t, k_t, scale, i0, causal).sub_(lse[..., i0:i1].unsqueeze(-1)).exp_()
        mask = _dropout_scale(drop, src, i0, p)
        p_used = p if mask is None else p * mask
        dv[:, :, :cols] += torch.matmul(p_used.transpose(-1, -2), do_t).sum(2)
        del p_used
        dp = torch.matmul(do_t, v_t.unsqueeze(2).transpose(-1, -2))
        if mask is not None:
            dp.mul_(mask)
            del mask
        ds = dp.sub_(delta[..., i0:i1].unsqueeze(-1)).mul_(p).mul_(scale)  # in dp's buffer
        del p
        dq[..., i0:i1, :] = torch.matmul(ds, k_t.unsqueeze(2))
        dk[:, :, :cols] += torch.matmul(ds.transpose(-1, -2), q_t).sum(2)
    return dq, dk, dv


class RingAttention(torch.autograd.Function):
    """Causal attention over the CP group: ``q [b, n, s/cp, d]``, ``k, v [b, g, s/cp, d]`` ->
    ``[b, n, s/cp, d]``. Forward: K/V blocks round the ring, LSE merge. Backward: K/V round the
    ring again with their dK/dV accumulators."""

    @staticmethod
    def forward(ctx, q, k, v, group, scale: float, dropout_p: float = 0.0):
        ring = Ring(group)
        b, n, s, d = q.shape
        g = k.shape[1]
        ct = _compute_dtype(q)
        # One seed per call from the caller's RNG stream (replayed by activation recompute).
        drop = (dropout_p, int(torch.randint(2**62, (1,)).item())) if dropout_p > 0 else None
        qf = q.to(ct).reshape(b, g, n // g, s, d)
        kv = torch.stack([k, v])  # what travels: only the g key/value heads
        out = lse = None
        for step in range(ring.size):
            pending = ring.shift(kv) if step + 1 < ring.size else None
            src = (ring.rank - step) % ring.size
            rows, cols, causal = block_plan(ring.size, ring.rank, src)
            kb, vb = (_halves(t.to(ct), cols, 2) for t in kv)
            o, l = _block_forward(_halves(qf, rows, 3), kb, vb, scale, causal, drop, src)
            if out is None:  # step 0 covers every row (each token sees itself)
                out, lse = o, l
            else:
                o_acc, l_acc = _halves(out, rows, 3), _halves(lse, rows, 3)
                new = torch.logaddexp(l_acc, l)
                merged = o_acc * torch.exp(l_acc - new).unsqueeze(-1)
                merged += o * torch.exp(l - new).unsqueeze(-1)
                o_acc.copy_(merged)
                l_acc.copy_(new)
            if pending is not None:
                kv = pending.wait()
        result = out.reshape(b, n, s, d).to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.group, ctx.scale, ctx.drop = group, scale, drop
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale = Ring(ctx.group), ctx.scale
        b, n, s, d = q.shape
        g = k.shape[1]
        ct = _compute_dtype(q)
        qf = q.to(ct).reshape(b, g, n // g, s, d)
        do = dout.to(ct).reshape(b, g, n // g, s, d)
        delta = (do * out.to(ct).reshape(b, g, n // g, s, d)).sum(-1)
        dq = torch.zeros_like(qf)
        kv = torch.stack([k, v])
        travelling: Optional[object] = None  # the dK/dV accumulator in flight
        for step in range(ring.size):
            pending_kv = ring.shift(kv, tag=1) if step + 1 < ring.size else None
            src = (ring.rank - step) % ring.size
            rows, cols, causal = block_plan(ring.size, ring.rank, src)
            kb, vb = (_halves(t.to(ct), cols, 2) for t in kv)
            args = (_halves(t, rows, 3) for t in (qf, do, lse, delta))
            q_r, do_r, lse_r, delta_r = args
            dq_b, dk_b, dv_b = _block_backward(
                q_r, kb, vb, do_r, lse_r, delta_r, scale, causal, ctx.drop, src
            )
            _halves(dq, rows, 3).add_(dq_b)
            if travelling is None:  # step 0: our own block starts its accumulator here
                dkv = torch.zeros(2, b, g, s, d, dtype=ct, device=q.device)
            else:  # what the previous ranks added to this block
                dkv = travelling.wait()
            _halves(dkv[0], cols, 2).add_(dk_b)
            _halves(dkv[1], cols, 2).add_(dv_b)
            travelling = ring.shift(dkv, tag=2)  # on to the next rank, who holds this block next
            if pending_kv is not None:
                kv = pending_kv.wait()
        dkv = travelling.wait()  # after CP steps, our own block's gradient comes home
        dq = dq.reshape(b, n, s, d).to(q.dtype)
        return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Exact causal attention of the load-balanced local sequences over the CP `group`.

    ``q [b, n, s/cp, d]``, ``k, v [b, g, s/cp, d]`` with ``g`` dividing ``n`` -> ``[b, n, s/cp,
    d]``; `scale` defaults to ``1/sqrt(d)``. `dropout_p`: attention dropout, its seed drawn from
    the caller's torch RNG stream.
    """
    n, g = q.shape[1], k.shape[1]
    if n % g != 0:
        raise ValueError(f"query heads ({n}) are not divisible by key/value heads ({g})")
    if q.shape[2] % 2 != 0:
        raise ValueError(f"local sequence ({q.shape[2]}) must be two equal chunks (even)")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if dist.get_world_size(group) == 1:
        raise ValueError("ring attention needs a CP group of 2 ranks or more")
    return RingAttention.apply(q, k, v, group, scale, dropout_p)
