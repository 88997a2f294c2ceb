"""Tensor-parallel layers against their serial twins (nn.Linear / nn.Embedding), on gloo.

World size 4: each task runs at TP=2 (two TP groups, so group ranks that do not start at 0 are
exercised) and at TP=4. Every rank builds the same full weights and inputs from fixed seeds,
computes the serial reference itself and compares its shard of outputs and gradients.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from tests.harness import run_distributed

S, B, H_IN, H_OUT, VOCAB = 8, 2, 6, 8, 16


def _init(seed):
    def init(w):
        w.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))

    return init


def _full(shape, seed):
    w = torch.empty(shape)
    _init(seed)(w)
    return w


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _serial_linear(weight, bias):
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return lin


def _column_checks(group, tp, r, done):
    x, dy = _randn(S, B, H_IN, seed=10), _randn(S, B, H_OUT, seed=11)
    W, bias = _full((H_OUT, H_IN), 1), _randn(H_OUT, seed=12)
    for gather, sp, skip in [
        (False, False, False),
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (False, True, True),
    ]:
        layer = ColumnParallelLinear(
            H_IN, H_OUT, group=group, init_method=_init(1), gather_output=gather,
            sequence_parallel=sp, skip_bias_add=skip,
        )  # fmt: skip
        # Layout-invariant init: the weight is exactly this rank's slice of the TP=1 weight.
        assert torch.equal(layer.weight, W.chunk(tp, 0)[r])
        assert layer.weight.untyped_storage().nbytes() == layer.weight.numel() * 4
        assert (layer.weight.tensor_model_parallel, layer.weight.partition_dim) == (True, 0)
        assert (layer.bias.tensor_model_parallel, layer.bias.partition_dim) == (True, 0)
        with torch.no_grad():
            layer.bias.copy_(bias.chunk(tp)[r])
        xin = (x.chunk(tp, 0)[r] if sp else x).clone().requires_grad_()
        out, out_bias = layer(xin)
        assert (out_bias is not None) == skip
        if skip:
            out = out + out_bias
        xr = x.clone().requires_grad_()
        ref = _serial_linear(W, bias)
        yr = ref(xr)
        assert_close(out, yr if gather else yr.chunk(tp, -1)[r])
        out.backward(dy if gather else dy.chunk(tp, -1)[r])
        yr.backward(dy)
        assert_close(xin.grad, xr.grad.chunk(tp, 0)[r] if sp else xr.grad)
        assert_close(layer.weight.grad, ref.weight.grad.chunk(tp, 0)[r])
        assert_close(layer.bias.grad, ref.bias.grad.chunk(tp)[r])
        done.append(f"column gather={gather} sp={sp} skip_bias_add={skip}")


def _row_checks(group, tp, r, done):
    x, dy = _randn(S, B, H_OUT, seed=20), _randn(S, B, H_IN, seed=21)
    W, bias = _full((H_IN, H_OUT), 2), _randn(H_IN, seed=22)
    for parallel_in, sp, skip in [
        (True, False, False),
        (False, False, False),
        (True, True, False),
        (True, False, True),
    ]:
        layer = RowParallelLinear(
            H_OUT, H_IN, group=group, init_method=_init(2), input_is_parallel=parallel_in,
            sequence_parallel=sp, skip_bias_add=skip,
        )  # fmt: skip
        assert torch.equal(layer.weight, W.chunk(tp, 1)[r])
        assert (layer.weight.tensor_model_parallel, layer.weight.partition_dim) == (True, 1)
        assert not layer.bias.tensor_model_parallel
        assert layer.bias.sequence_parallel == sp
        with torch.no_grad():
            layer.bias.copy_(bias)
        xin = (x.chunk(tp, -1)[r] if parallel_in else x).clone().requires_grad_()
        out, out_bias = layer(xin)
        if skip:
            out = out + out_bias
        xr = x.clone().requires_grad_()
        ref = _serial_linear(W, bias)
        yr = ref(xr)
        assert_close(out, yr.chunk(tp, 0)[r] if sp else yr)
        out.backward(dy.chunk(tp, 0)[r] if sp else dy)
        yr.backward(dy)
        assert_close(xin.grad, xr.grad.chunk(tp, -1)[r] if parallel_in else xr.grad)
        assert_close(layer.weight.grad, ref.weight.grad.chunk(tp, 1)[r])
        bias_grad = layer.bias.grad.clone()
        if sp:
            # Sequence-parallel replicated params hold partial grads: DP code all-reduces them.
            dist.all_reduce(bias_grad, group=group)
        assert_close(bias_grad, ref.bias.grad)
        done.append(f"row input_is_parallel={parallel_in} sp={sp} skip_bias_add={skip}")


def _mlp_checks(group, tp, r, done):
    """Column in, row out: a GeLU MLP and a SwiGLU MLP (stride-2 fused [gate; up])."""
    h, ffn = H_IN * 2, 8
    x, dy = _randn(S, B, h, seed=30), _randn(S, B, h, seed=31)
    W1, W1s, W2 = _full((ffn, h), 3), _full((2 * ffn, h), 4), _full((h, ffn), 5)
    gate, up = W1s[:ffn], W1s[ffn:]
    # The stride-2 shard is this rank's slice of gate followed by its slice of up.
    expected_shard = torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
    for swiglu in (False, True):
        for sp in (False, True):
            fc1 = ColumnParallelLinear(
                h, 2 * ffn if swiglu else ffn, group=group, bias=False, sequence_parallel=sp,
                init_method=_init(4 if swiglu else 3), partition_stride=2 if swiglu else 1,
            )  # fmt: skip
            fc2 = RowParallelLinear(
                ffn, h, group=group, init_method=_init(5), bias=False, sequence_parallel=sp
            )
            if swiglu:
                assert torch.equal(fc1.weight, expected_shard)
                assert fc1.weight.partition_stride == 2
            xin = (x.chunk(tp, 0)[r] if sp else x).clone().requires_grad_()
            a = fc1(xin)[0]
            a = F.silu(a.chunk(2, -1)[0]) * a.chunk(2, -1)[1] if swiglu else F.gelu(a)
            out = fc2(a)[0]
            xr = x.clone().requires_grad_()
            w1r, w2r = (W1s if swiglu else W1).clone().requires_grad_(), W2.clone().requires_grad_()
            ar = xr @ w1r.T
            ar = F.silu(ar[..., :ffn]) * ar[..., ffn:] if swiglu else F.gelu(ar)
            yr = ar @ w2r.T
            assert_close(out, yr.chunk(tp, 0)[r] if sp else yr)
            out.backward(dy.chunk(tp, 0)[r] if sp else dy)
            yr.backward(dy)
            assert_close(xin.grad, xr.grad.chunk(tp, 0)[r] if sp else xr.grad)
            if swiglu:
                g = w1r.grad
                w1_grad = torch.cat([g[:ffn].chunk(tp)[r], g[ffn:].chunk(tp)[r]])
            else:
                w1_grad = w1r.grad.chunk(tp)[r]
            assert_close(fc1.weight.grad, w1_grad)
            assert_close(fc2.weight.grad, w2r.grad.chunk(tp, 1)[r])
            done.append(f"mlp swiglu={swiglu} sp={sp}")


def _embedding_checks(group, tp, r, done):
    h = H_IN
    ids = torch.randint(0, VOCAB, (S, B), generator=torch.Generator().manual_seed(40))
    ids[0, 0], ids[1, 0] = 0, VOCAB - 1  # both ends of the vocabulary
    ids[2, 0] = VOCAB // tp  # first id of the second shard
    E, dy, dlogits = _full((VOCAB, h), 6), _randn(S, B, h, seed=41), _randn(S, B, VOCAB, seed=42)
    for sp in (False, True):
        emb = VocabParallelEmbedding(
            VOCAB, h, group=group, init_method=_init(6), reduce_scatter_embeddings=sp
        )
        assert torch.equal(emb.weight, E.chunk(tp)[r])
        assert (emb.weight.tensor_model_parallel, emb.weight.partition_dim) == (True, 0)
        # Tied output layer: the column-parallel linear borrows the embedding's shard.
        head = ColumnParallelLinear(
            h, VOCAB, group=group, init_method=None, bias=False, sequence_parallel=sp,
            skip_weight_param_allocation=True,
        )  # fmt: skip
        assert head.weight is None
        hidden = emb(ids)
        logits = head(hidden, weight=emb.weight)[0]
        Er = E.clone().requires_grad_()
        hr = F.embedding(ids, Er)
        lr = hr @ Er.T
        assert_close(hidden, hr.chunk(tp, 0)[r] if sp else hr)
        assert_close(logits, lr.chunk(tp, -1)[r])
        loss = (hidden * (dy.chunk(tp, 0)[r] if sp else dy)).sum()
        loss = loss + (logits * dlogits.chunk(tp, -1)[r]).sum()
        loss.backward()
        ((hr * dy).sum() + (lr * dlogits).sum()).backward()
        assert_close(emb.weight.grad, Er.grad.chunk(tp)[r])
        done.append(f"embedding + tied head sp={sp}")


def _error_checks(group, tp, done):
    bad = 6 if tp == 4 else 3  # not a multiple of tp
    with pytest.raises(ValueError, match=f"output_size {bad} is not divisible by .* size {tp}$"):
        ColumnParallelLinear(4, bad, group=group, init_method=_init(0))
    with pytest.raises(ValueError, match=f"size {tp} x partition_stride 2"):
        ColumnParallelLinear(4, 3 * tp, group=group, init_method=_init(0), partition_stride=2)
    with pytest.raises(ValueError, match=f"input_size {bad} is not divisible by .* size {tp}"):
        RowParallelLinear(bad, 4, group=group, init_method=_init(0))
    with pytest.raises(ValueError, match=f"\\(vocab size\\) {bad} is not divisible.* size {tp}"):
        VocabParallelEmbedding(bad, 4, group=group, init_method=_init(0))
    row = RowParallelLinear(4 * tp, 4, group=group, init_method=_init(0), sequence_parallel=True)
    with pytest.raises(ValueError, match=f"sequence length 7 .* not divisible by .* size {tp}"):
        row(torch.zeros(7, 1, 4))
    done.append("errors")


def _all_layer_checks(tps):
    out = {}
    for tp in tps:
        ps.initialize_model_parallel(tp)
        group, r = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
        done = []
        _column_checks(group, tp, r, done)
        _row_checks(group, tp, r, done)
        _mlp_checks(group, tp, r, done)
        _embedding_checks(group, tp, r, done)
        _error_checks(group, tp, done)
        out[tp] = done
        ps.destroy_model_parallel()
    return out


def test_layers_match_serial_tp2_and_tp4():
    """World size 4: TP=2 (x DP=2) and TP=4, every layer with and without sequence parallel."""
    results = run_distributed(4, _all_layer_checks, (2, 4))
    for per_tp in results:
        assert sorted(per_tp) == [2, 4]
        assert all(len(done) == 5 + 4 + 4 + 2 + 1 for done in per_tp.values())


def test_serial_layers_without_group():
    """group=None is a plain serial layer (no torch.distributed needed)."""
    W, x = _full((H_OUT, H_IN), 1), _randn(S, B, H_IN, seed=3)
    col = ColumnParallelLinear(H_IN, H_OUT, group=None, init_method=_init(1), gather_output=True)
    row = RowParallelLinear(H_OUT, H_IN, group=None, init_method=_init(2), input_is_parallel=False)
    assert torch.equal(col.weight, W)
    assert col.weight.tensor_model_parallel  # marked as splittable even at TP=1
    y = row(col(x)[0])[0]
    assert_close(y, x @ W.T @ _full((H_IN, H_OUT), 2).T)
    emb = VocabParallelEmbedding(VOCAB, H_IN, group=None, init_method=_init(6))
    ids = torch.tensor([[0, 15], [3, 4]])
    assert_close(emb(ids), F.embedding(ids, _full((VOCAB, H_IN), 6)))


def test_params_dtype_and_one_full_weight_at_a_time():
    calls = []

    def init(w):
        calls.append((tuple(w.shape), w.dtype))
        _init(1)(w)

    col = ColumnParallelLinear(
        H_IN, H_OUT, group=None, init_method=init, params_dtype=torch.bfloat16
    )
    assert calls == [((H_OUT, H_IN), torch.float32)]  # full fp32 weight, once
    assert col.weight.dtype == torch.bfloat16 and col.bias.dtype == torch.bfloat16
    assert torch.equal(col.weight, _full((H_OUT, H_IN), 1).to(torch.bfloat16))
