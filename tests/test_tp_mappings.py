"""Each autograd collective's forward and backward against its definition, on gloo.

World size 4, at TP=2 (x DP=2) and TP=4. Rank-dependent inputs and gradients make sums visible.
"""

import torch
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.tensor_parallel import mappings as m
from tests.harness import run_distributed


def _run(fn, x, grad):
    """fn(x) and the gradient that reaches x when `grad` flows back; x itself stays unchanged."""
    x = x.clone().requires_grad_()
    before = x.detach().clone()
    y = fn(x)
    y.backward(grad)
    assert torch.equal(x.detach(), before)
    return y.detach(), x.grad


def _checks(g, tp, r):
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(8, 2, 8, generator=gen), torch.randn(8, 2, 8, generator=gen)
    k, total = r + 1.0, sum(range(1, tp + 1))  # rank-dependent factor and its sum over TP
    done = []

    y, dx = _run(lambda t: m.copy_to_tensor_model_parallel_region(t, g), x, dy * k)
    assert_close(y, x)
    assert_close(dx, dy * total)
    done.append("copy: identity / all-reduce")

    y, dx = _run(lambda t: m.reduce_from_tensor_model_parallel_region(t * k, g), x, dy)
    assert_close(y, x * total)
    assert_close(dx, dy * k)
    done.append("reduce: all-reduce / identity")

    y, dx = _run(lambda t: m.scatter_to_tensor_model_parallel_region(t, g), x, dy.chunk(tp, -1)[r])
    assert_close(y, x.chunk(tp, -1)[r])
    assert_close(dx, dy)
    done.append("scatter last: split / all-gather")

    y, dx = _run(lambda t: m.gather_from_tensor_model_parallel_region(t, g), x.chunk(tp, -1)[r], dy)
    assert_close(y, x)
    assert_close(dx, dy.chunk(tp, -1)[r])
    done.append("gather last: all-gather / split")

    y, dx = _run(lambda t: m.scatter_to_sequence_parallel_region(t, g), x, dy.chunk(tp)[r])
    assert_close(y, x.chunk(tp)[r])
    assert_close(dx, dy)
    done.append("scatter seq: split / all-gather")

    for tp_grad in (True, False):
        y, dx = _run(
            lambda t, tg=tp_grad: m.gather_from_sequence_parallel_region(t, g, tg),
            x.chunk(tp)[r],
            dy * k if tp_grad else dy,
        )
        assert_close(y, x)
        assert_close(dx, (dy * total if tp_grad else dy).chunk(tp)[r])
        done.append(f"gather seq: all-gather / {'reduce-scatter' if tp_grad else 'split'}")

    y, dx = _run(
        lambda t: m.reduce_scatter_to_sequence_parallel_region(t * k, g), x, dy.chunk(tp)[r]
    )
    assert_close(y, (x * total).chunk(tp)[r])
    assert_close(dx, dy * k)
    done.append("reduce-scatter seq: reduce-scatter / all-gather")
    return done


def _mapping_checks(tps):
    out = {}
    for tp in tps:
        ps.initialize_model_parallel(tp)
        group, r = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
        out[tp] = _checks(group, tp, r)
        ps.destroy_model_parallel()
    return out


def test_mappings_forward_and_backward_tp2_tp4():
    for per_rank in run_distributed(4, _mapping_checks, (2, 4)):
        assert sorted(per_rank) == [2, 4] and all(len(d) == 8 for d in per_rank.values())


def test_no_group_is_identity():
    x = torch.randn(4, 3, requires_grad=True)
    for fn in (
        m.copy_to_tensor_model_parallel_region,
        m.reduce_from_tensor_model_parallel_region,
        m.scatter_to_tensor_model_parallel_region,
        m.gather_from_tensor_model_parallel_region,
        m.scatter_to_sequence_parallel_region,
        m.gather_from_sequence_parallel_region,
        m.reduce_scatter_to_sequence_parallel_region,
    ):
        y = fn(x, None)
        assert torch.equal(y, x)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.equal(g, torch.ones_like(x))
