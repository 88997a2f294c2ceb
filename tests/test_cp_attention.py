"""Context-parallel attention equals full causal attention (gloo, world 2 and 4).

Every rank builds the same full q, k, v and output gradient, computes full causal attention and
its input gradients in one piece (the serial twin), then its own load-balanced part through the
CP attention; the output and dq, dk, dv of its part must equal the reference's part at default
fp32 tolerances. CP 2 (alone, and twice beside DP 2 on world 4) and CP 4; GQA on and off;
ring (p2p) and all-to-all (a2a).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.context_parallel import context_parallel_attention, ring, split
from megalite.context_parallel.ring import ring_attention
from tests.harness import run_distributed

B, S, D = 2, 32, 8
DEFAULT_TILE = ring.TILE_ROWS


def _full(n, g, dtype=torch.float32, seed=0, seq=S):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (
        torch.randn(B, h, seq, D, generator=gen).to(dtype) for h in (n, g, g, n)
    )  # fmt: skip
    return q, k, v, dout


def _reference(q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True
    )
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check_parity(cp, configs, seq=S, tile=None):
    ps.initialize_model_parallel(context_parallel_size=cp)
    group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    if tile is not None:  # several query tiles per block (module default: one tile here)
        ring.TILE_ROWS = tile
    for comm, n, g in configs:
        q, k, v, dout = _full(n, g, seed=n * 10 + g, seq=seq)
        ref = _reference(q, k, v, dout)
        local = [split(t, cp, rank, seq_dim=2).requires_grad_() for t in (q, k, v)]
        out = context_parallel_attention(*local, group, comm)
        out.backward(split(dout, cp, rank, seq_dim=2))
        got = (out.detach(), *(t.grad for t in local))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            where = f"{comm} n={n} g={g} {name}"
            assert_close(a, split(b, cp, rank, seq_dim=2), msg=lambda m, w=where: f"{w}: {m}")
    ring.TILE_ROWS = DEFAULT_TILE
    return True


ALL = [(comm, n, g) for comm in ("p2p", "a2a") for n, g in ((4, 4), (8, 4), (8, 2))]


def test_cp2_equals_full_attention():
    assert all(run_distributed(2, _check_parity, 2, ALL))


def test_cp2_beside_dp2_and_cp4_equal_full_attention():
    assert all(run_distributed(4, _check_parity, 2, ALL))
    # a2a at CP 4 needs 4 | key/value heads: GQA 8 query over 4 kv heads.
    assert all(run_distributed(4, _check_parity, 4, [c for c in ALL if c[2] % 4 == 0]))
    assert all(run_distributed(4, _check_parity, 4, [c for c in ALL if c[0] == "p2p"]))


def test_ring_attention_in_query_tiles():
    # seq 128 at CP 2: blocks of 64 query rows, cut into tiles of 16 rows.
    p2p = [c for c in ALL if c[0] == "p2p"]
    assert all(run_distributed(2, _check_parity, 2, p2p, seq=128, tile=16))


def _bf16(cp):
    ps.initialize_model_parallel(context_parallel_size=cp)
    group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    q, k, v, dout = _full(8, 2)
    ref = _reference(q, k, v, dout)
    local = [split(t, cp, rank, seq_dim=2).bfloat16().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, group)
    out.backward(split(dout, cp, rank, seq_dim=2).bfloat16())
    assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in local)
    for a, b in zip((out, *(t.grad for t in local)), ref):
        assert_close(a.float(), split(b, cp, rank, seq_dim=2), rtol=0.05, atol=0.05)
    return True


def test_ring_attention_in_bf16_is_close():
    assert all(run_distributed(2, _bf16, 2))


def _refusals(cp):
    ps.initialize_model_parallel(context_parallel_size=cp)
    group = ps.get_context_parallel_group()
    q, k, v, _ = _full(6, 6)
    local = [t[:, :, : S // cp] for t in (q, k, v)]
    with pytest.raises(ValueError, match=r"num_attention_heads \(6\) divisible by .* = 4"):
        context_parallel_attention(*local, group, "a2a")
    return True


def _dropout_gradients(cp):
    """Ring attention with dropout, in fp64: analytic input gradients equal central finite
    differences of L = sum over ranks of <out_r, w_r> (the same masks every call: the seed is
    drawn from a torch stream reset before each call), and dropout does drop."""
    ps.initialize_model_parallel(context_parallel_size=cp)
    group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    q, k, v, w = (t.double() for t in _full(4, 2, seed=3, seq=16))
    local = [split(t, cp, rank, seq_dim=2).requires_grad_() for t in (q, k, v)]
    w = split(w, cp, rank, seq_dim=2)

    def loss(inputs, p=0.3):
        torch.manual_seed(11)
        out = ring_attention(*inputs, group, dropout_p=p)
        total = (out * w).sum()
        whole = total.detach().clone()
        torch.distributed.all_reduce(whole, group=group)
        return total, whole, out

    total, _, out = loss(local)
    total.backward()
    assert not torch.allclose(out, loss(local, p=0.0)[2])  # something was dropped
    assert_close(out, loss(local)[2], rtol=0, atol=0)  # same seed, same masks
    eps = 1e-6
    for src in range(cp):  # perturb one element of q, k, v on CP rank `src`
        for which, idx in ((0, (0, 1, 3, 2)), (1, (0, 1, 5, 0)), (2, (0, 0, 7, 3))):
            got = torch.tensor(local[which].grad[idx].item() if rank == src else 0.0).double()
            torch.distributed.all_reduce(got, group=group)
            diffs = []
            for sign in (1, -1):
                moved = [t.detach().clone() for t in local]
                if rank == src:
                    moved[which][idx] += sign * eps
                diffs.append(loss(moved)[1])
            assert_close(got, (diffs[0] - diffs[1]) / (2 * eps), rtol=1e-6, atol=1e-8)
    return True


def test_ring_attention_dropout_gradients_are_exact():
    assert all(run_distributed(2, _dropout_gradients, 2))


def test_a2a_refuses_heads_not_divisible_by_cp():
    assert all(run_distributed(4, _refusals, 4))
