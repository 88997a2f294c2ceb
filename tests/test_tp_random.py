"""RNG tracker (streams per TP rank, save/restore) and the RNG-replaying checkpoint helper."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megalite.tensor_parallel.random import (
    checkpoint,
    get_rng_tracker,
    model_parallel_manual_seed,
)
from tests.harness import run_distributed


def _mask(n=64):
    return F.dropout(torch.ones(n), p=0.5)


def test_fork_uses_its_own_stream_and_restores_the_default():
    model_parallel_manual_seed(1234, tp_rank=0)
    tracker = get_rng_tracker()
    saved = tracker.get_states()
    default_state = torch.get_rng_state()
    with tracker.fork():
        inside = _mask()
    after = _mask()
    # The default stream continues as if the fork had not happened.
    torch.set_rng_state(default_state)
    assert torch.equal(_mask(), after)
    assert not torch.equal(inside, after)
    # The tracked state advanced; restoring it replays the same mask.
    with tracker.fork():
        assert not torch.equal(_mask(), inside)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(_mask(), inside)
    # States are plain tensors (weights_only-loadable) and copies, not references.
    states = tracker.get_states()
    assert set(states) == {"model-parallel-rng"} and states["model-parallel-rng"]["cpu"].dtype
    states["model-parallel-rng"]["cpu"].zero_()
    with tracker.fork():
        _mask()


def test_tracker_errors():
    tracker = get_rng_tracker()
    model_parallel_manual_seed(7, tp_rank=1)
    with pytest.raises(KeyError, match="'nope' is not tracked"):
        with tracker.fork("nope"):
            pass
    with pytest.raises(ValueError, match="seed 2726 is already tracked"):
        tracker.add("other", 7 + 2718 + 1)
    with pytest.raises(ValueError, match="'model-parallel-rng' is already tracked"):
        tracker.add("model-parallel-rng", 1)


def _block(x, w1, w2):
    """Linear -> dropout in the forked stream -> linear -> dropout in the default stream."""
    h = x @ w1
    with get_rng_tracker().fork():
        h = F.dropout(h, p=0.3)
    return F.dropout(torch.tanh(h) @ w2, p=0.3)


def _grads_with(run, x, w1, w2):
    model_parallel_manual_seed(99, tp_rank=0)
    for t in (x, w1, w2):
        t.grad = None
    y = run(x, w1, w2)
    y.square().sum().backward()
    # Randomness after the step must not depend on whether checkpointing replayed anything.
    with get_rng_tracker().fork():
        forked_after = _mask()
    return y.detach(), [t.grad.clone() for t in (x, w1, w2)], forked_after, _mask()


def test_checkpoint_replays_dropout_identically():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g, requires_grad=True)
    w1 = torch.randn(8, 16, generator=g, requires_grad=True)
    w2 = torch.randn(16, 8, generator=g, requires_grad=True)
    plain = _grads_with(_block, x, w1, w2)
    ckpt = _grads_with(lambda *a: checkpoint(_block, *a), x, w1, w2)
    assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    for a, b in zip(ckpt[1], plain[1]):
        assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(ckpt[2], plain[2]) and torch.equal(ckpt[3], plain[3])
    # Without the tracker replay the forked dropout would differ: make sure the test could tell.
    model_parallel_manual_seed(99, tp_rank=0)
    with get_rng_tracker().fork():
        first = _mask()
        second = _mask()
    assert not torch.equal(first, second)


def test_checkpoint_when_input_needs_no_grad():
    w = torch.randn(4, 4, requires_grad=True)
    model_parallel_manual_seed(5, tp_rank=0)
    checkpoint(lambda x: _block(x, w, w), torch.randn(3, 4)).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def _tp_streams_and_checkpointed_mlp():
    """World 4 as TP=2 x PP=2 (the PP ranks only differ in seed here)."""
    ps.initialize_model_parallel(2, 2)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    group = ps.get_tensor_model_parallel_group()
    model_parallel_manual_seed(42, tp_rank, pp_rank)
    with get_rng_tracker().fork():
        tp_mask = _mask()
    default_mask = _mask()
    masks = [torch.empty(2, 64) for _ in range(dist.get_world_size())]
    dist.all_gather(masks, torch.stack([tp_mask, default_mask]))

    # A TP MLP with dropout on the sharded hidden layer: checkpointed == plain, bitwise.
    def init(w):
        w.normal_(generator=torch.Generator().manual_seed(w.shape[0]))

    fc1 = ColumnParallelLinear(4, 8, group=group, init_method=init)
    fc2 = RowParallelLinear(8, 4, group=group, init_method=init)

    def mlp(x):
        h = fc1(x)[0]
        with get_rng_tracker().fork():
            h = F.dropout(F.gelu(h), p=0.5)
        return F.dropout(fc2(h)[0], p=0.2)

    results = []
    for use_ckpt in (False, True):
        model_parallel_manual_seed(42, tp_rank, pp_rank)
        x = torch.ones(6, 2, 4, requires_grad=True)
        y = checkpoint(mlp, x) if use_ckpt else mlp(x)
        y.sum().backward()
        results.append([y.detach(), x.grad, fc1.weight.grad.clone(), fc2.weight.grad.clone()])
        fc1.weight.grad = fc2.weight.grad = None
    for a, b in zip(*results):
        assert_close(a, b, rtol=0, atol=0)
    return tp_rank, pp_rank, masks


def test_dropout_streams_across_tp_and_pp_ranks():
    """World size 4 (TP=2 x PP=2): the model-parallel stream differs across TP ranks, the default
    stream matches across TP ranks, and both differ across pipeline stages."""
    results = run_distributed(4, _tp_streams_and_checkpointed_mlp)
    coords, masks = [r[:2] for r in results], results[0][2]
    assert coords == [(0, 0), (1, 0), (0, 1), (1, 1)]
    tp_masks, default_masks = [m[0] for m in masks], [m[1] for m in masks]
    assert not torch.equal(tp_masks[0], tp_masks[1])  # TP ranks: different in the TP region
    assert not torch.equal(tp_masks[2], tp_masks[3])
    assert torch.equal(default_masks[0], default_masks[1])  # ... and equal outside it
    assert torch.equal(default_masks[2], default_masks[3])
    assert not torch.equal(default_masks[0], default_masks[2])  # stages differ
    assert not torch.equal(tp_masks[0], tp_masks[2])
