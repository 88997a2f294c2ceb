"""vocab_parallel_cross_entropy against F.cross_entropy on the gathered logits (loss and grad).

World size 4, at TP=2 (x DP=2) and TP=4; plus a serial (group=None) check in one process.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.tensor_parallel import vocab_parallel_cross_entropy
from tests.harness import run_distributed

S, B, V = 6, 3, 16


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(S, B, V, generator=g) * 3.0
    target = torch.randint(0, V, (S, B), generator=g)
    target[0, 0], target[0, 1], target[1, 0] = 0, V - 1, V // 2  # shard boundaries
    target[2, 1] = target[4, 2] = -100  # ignored tokens
    mask = torch.rand(S, B, generator=g) > 0.3
    return logits, target, mask, torch.randn(S, B, generator=g)


def _reference(logits, target, eps):
    flat = F.cross_entropy(
        logits.reshape(-1, V), target.reshape(-1), reduction="none", label_smoothing=eps
    )
    return flat.view(target.shape)


def _check(group, tp, r, eps, done):
    logits, target, mask, dloss = _data()
    # Per-token loss and gradient, with ignore_index.
    local = logits.chunk(tp, -1)[r].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, group, label_smoothing=eps)
    full = logits.clone().requires_grad_()
    ref = _reference(full, target, eps)
    assert loss.shape == target.shape
    assert_close(loss, ref)
    assert torch.all(loss[target == -100] == 0)
    loss.backward(dloss)
    ref.backward(dloss)
    assert_close(local.grad, full.grad.chunk(tp, -1)[r])
    # Loss mask as the training loop applies it == F.cross_entropy's mean with ignore_index.
    local.grad = full.grad = None
    loss = vocab_parallel_cross_entropy(local, target, group, label_smoothing=eps)
    keep = mask & (target != -100)
    masked_mean = (loss * keep).sum() / keep.sum()
    masked_mean.backward()
    ref = F.cross_entropy(
        full.reshape(-1, V), target.masked_fill(~mask, -100).reshape(-1), label_smoothing=eps
    )
    ref.backward()
    assert_close(masked_mean, ref)
    assert_close(local.grad, full.grad.chunk(tp, -1)[r])
    # [b, s] layout and bf16 logits: fp32 loss, bf16 gradient.
    local16 = logits.transpose(0, 1).chunk(tp, -1)[r].bfloat16().requires_grad_()
    loss16 = vocab_parallel_cross_entropy(local16, target.T, group, label_smoothing=eps)
    assert loss16.dtype == torch.float32
    ref16 = _reference(logits.transpose(0, 1).bfloat16().float(), target.T, eps)
    assert_close(loss16, ref16)
    loss16.sum().backward()
    assert local16.grad.dtype == torch.bfloat16
    done.append(f"eps={eps}")


def _all_checks(tps):
    out = {}
    for tp in tps:
        ps.initialize_model_parallel(tp)
        group, r = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
        done = []
        for eps in (0.0, 0.1):
            _check(group, tp, r, eps, done)
        out[tp] = done
        ps.destroy_model_parallel()
    return out


def test_vocab_parallel_cross_entropy_tp2_tp4():
    """World size 4: TP=2 and TP=4, label smoothing 0 and 0.1, ignore index and loss mask."""
    for per_rank in run_distributed(4, _all_checks, (2, 4)):
        assert per_rank == {2: ["eps=0.0", "eps=0.1"], 4: ["eps=0.0", "eps=0.1"]}


def test_serial_cross_entropy_and_shape_errors():
    done = []
    for eps in (0.0, 0.1):
        _check(None, 1, 0, eps, done)
    assert len(done) == 2
    logits, target, _, _ = _data()
    int32_loss = vocab_parallel_cross_entropy(logits, target.int(), None)  # int32 ids work too
    assert_close(int32_loss, _reference(logits, target, 0.0))
    with pytest.raises(ValueError, match=r"logits shape \(6, 3, 16\) does not match target"):
        vocab_parallel_cross_entropy(logits, target.T, None)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        vocab_parallel_cross_entropy(logits, target, None, label_smoothing=1.0)


def test_large_logits_are_stable():
    logits = torch.tensor([[1000.0, -1000.0, 999.0, 0.0]])
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([2]), None)
    assert_close(loss, F.cross_entropy(logits, torch.tensor([2]), reduction="none"))
    assert torch.isfinite(loss).all()
