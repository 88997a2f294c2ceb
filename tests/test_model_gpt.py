"""GPT model in one process: config checks, layout-invariant init, GQA layout, recompute, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megalite.model import GPTConfig, build_model, num_floating_point_operations
from megalite.model.gpt import WORD_EMBEDDING
from megalite.model.transformer import apply_rope, rope_cache
from megalite.tensor_parallel import model_parallel_manual_seed

TINY = dict(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    vocab_size=90,
    make_vocab_size_divisible_by=16,
    seq_length=16,
    ffn_hidden_size=64,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)
MODERN = dict(
    swiglu=True, position_embedding_type="rope", normalization="RMSNorm", num_query_groups=2
)


def _serial(seed=0, **kw):
    (model,) = build_model(GPTConfig(**{**TINY, **kw}), seed, use_parallel_state=False)
    return model


def _batch(b=2, s=16, vocab=90):
    t = torch.randint(0, vocab, (b, s + 1), generator=torch.Generator().manual_seed(3))
    return t[:, :-1], t[:, 1:]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(hidden_size=30), r"--hidden-size 30 is not divisible by --num-attention-heads 4"),
        (dict(tensor_model_parallel_size=8), r"--num-attention-heads 4 is not divisible by "
         r"--tensor-model-parallel-size 8"),  # fmt: skip
        (dict(num_query_groups=2, tensor_model_parallel_size=4), r"--num-query-groups 2 is not "
         r"divisible by --tensor-model-parallel-size 4"),  # fmt: skip
        (dict(num_query_groups=3), r"--num-attention-heads 4 is not divisible by --num-query-gr"),
        (dict(pipeline_model_parallel_size=3), r"--num-layers 4 is not divisible by --pipeline"),
        (dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=3),
         r"--pipeline-model-parallel-size 2 = 2\) are not divisible by --num-layers-per-virtual"),
        (dict(num_layers_per_virtual_pipeline_stage=1), r"needs --pipeline-model-parallel-size"),
        (dict(sequence_parallel=True, tensor_model_parallel_size=4, seq_length=18),
         r"--seq-length 18 divisible by --tensor-model-parallel-size 4"),
        (dict(normalization="BatchNorm"), r"--normalization must be one of"),
        (dict(recompute_granularity="some"), r"--recompute-granularity must be one of"),
        (dict(num_layers=0), r"--num-layers must be an integer >= 1, got 0"),
        (dict(hidden_dropout=1.0), r"--hidden-dropout must be in \[0, 1\)"),
    ],
)  # fmt: skip
def test_config_refuses_layouts_with_the_numbers(kw, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **kw})


def test_build_model_refuses_a_layout_other_than_the_config():
    cfg = GPTConfig(**{**TINY, "tensor_model_parallel_size": 2})
    with pytest.raises(ValueError, match=r"split for \(TP, PP, virtual chunks\) = \(2, 1, 1\)"):
        build_model(cfg, 0, use_parallel_state=False)


def test_stages_and_chunks_hold_global_layers_with_the_serial_weights():
    full = dict(_serial(seed=5).named_parameters())
    cfg = GPTConfig(
        **{**TINY, "pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 1}
    )
    seen = set()
    for stage in (0, 1):
        chunks = build_model(cfg, 5, pp_rank=stage, use_parallel_state=False)
        assert [list(c.layer_ids) for c in chunks] == [[stage], [stage + 2]]
        assert [c.pre_process for c in chunks] == [stage == 0, False]
        assert [c.post_process for c in chunks] == [False, stage == 1]
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                ref = WORD_EMBEDDING if name == "output_layer.weight" else name
                torch.testing.assert_close(p, full[ref], rtol=0, atol=0)
                seen.add(ref)
                # Tied copies across stages are marked for the embedding-group all-reduce.
                assert getattr(p, "shared_embedding", False) == (ref == WORD_EMBEDDING)
    assert seen == set(full)
    assert "output_layer.weight" not in full  # one stage: the head uses the embedding itself
    other = dict(_serial(seed=6).named_parameters())
    assert not torch.equal(other[WORD_EMBEDDING], full[WORD_EMBEDDING])


def test_output_shapes():
    model = _serial(**MODERN, untie_embeddings_and_output_weights=True)
    tokens, labels = _batch()
    assert model(tokens, labels).shape == (2, 16)  # per-token loss [b, s]
    assert model(tokens).shape == (2, 16, 96)  # logits [b, s, padded V]
    torch.testing.assert_close(
        model(tokens, labels),
        F.cross_entropy(model(tokens).transpose(1, 2), labels, reduction="none"),
    )


@pytest.mark.parametrize("kw", [{}, MODERN])
def test_bf16_parameters_train_in_bf16(kw):
    model = _serial(**kw, params_dtype=torch.bfloat16)
    tokens, labels = _batch()
    loss = model(tokens, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()  # fp32 cross-entropy
    loss.mean().backward()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_fused_qkv_follows_the_documented_gqa_layout():
    # Rebuild attention by hand from the fused weight, read with the layout in transformer.py:
    # per query group g: [q(g, 0..n/g-1), k(g), v(g)]; query head j uses group j // (n/g).
    model = _serial(**{**MODERN, "num_attention_heads": 8, "num_query_groups": 2})
    attn = model.decoder.layers["0"].self_attention
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(1))
    n, g, d = 8, 2, 4
    w = attn.linear_qkv.weight.view(g, n // g + 2, d, 32)
    b = attn.linear_qkv.bias.view(g, n // g + 2, d)
    cos, sin = rope_cache(model.config)
    heads = []
    for j in range(n):
        grp, i = divmod(j, n // g)
        q = x @ w[grp, i].T + b[grp, i]
        k = x @ w[grp, n // g].T + b[grp, n // g]
        v = x @ w[grp, n // g + 1].T + b[grp, n // g + 1]
        q, k = (apply_rope(t.unsqueeze(2), cos[:16], sin[:16]).squeeze(2) for t in (q, k))
        scores = torch.einsum("sbd,tbd->bst", q, k) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(16, 16).triu(1).bool(), float("-inf"))
        heads.append(torch.einsum("bst,tbd->sbd", scores.softmax(-1), v))
    expected, _ = attn.linear_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x, (cos, sin)), expected)


def _loss_and_grads(model, tokens, labels):
    model.zero_grad()
    model_parallel_manual_seed(42, 0, 0)  # same dropout masks in every run
    loss = model(tokens, labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [{}, MODERN])
def test_recompute_full_and_selective_give_the_same_gradients(kw):
    # With dropout on: recomputation must replay the same masks (RNG tracker + torch state).
    tokens, labels = _batch()
    results = {}
    for granularity in ("none", "full", "selective"):
        model = _serial(
            **kw, recompute_granularity=granularity, hidden_dropout=0.1, attention_dropout=0.1
        ).train()
        results[granularity] = _loss_and_grads(model, tokens, labels)
    loss, grads = results["none"]
    for granularity in ("full", "selective"):
        torch.testing.assert_close(results[granularity][0], loss)
        for name, grad in results[granularity][1].items():
            torch.testing.assert_close(grad, grads[name], msg=f"{granularity}: {name}")
    # ...and dropout really is on: another seed gives another loss.
    model_parallel_manual_seed(7, 0, 0)
    assert not torch.equal(model(tokens, labels).mean().detach(), loss)


def test_flops_formula_matches_megatron_and_narayanan():
    # MHA, GeLU, f = 4h: Narayanan et al. 72 B s L h^2 (1 + s/(6h) + V/(12 h L)).
    cfg = GPTConfig(**{**TINY, "ffn_hidden_size": None})
    B, s, L, h, V = 8, cfg.seq_length, cfg.num_layers, cfg.hidden_size, cfg.padded_vocab_size
    narayanan = 72 * B * s * L * h**2 * (1 + s / (6 * h) + V / (12 * h * L))
    assert math.isclose(num_floating_point_operations(cfg, B), narayanan, rel_tol=1e-12)
    # GQA + SwiGLU: Megatron-LM's num_floating_point_operations.
    cfg = GPTConfig(**{**TINY, **MODERN, "num_attention_heads": 8})
    n, g, f = 8, cfg.num_query_groups, cfg.ffn_hidden_size
    megatron = 12 * B * s * L * h * h * ((1 + g / n + s / h) + (f / h) * 1.5 + V / (2 * L * h))
    assert math.isclose(num_floating_point_operations(cfg, B), megatron, rel_tol=1e-12)


@pytest.mark.parametrize("kw", [{}, MODERN])
def test_flops_formula_counts_every_matmul_of_a_training_step(kw):
    # torch's FLOP counter on forward + backward of the real model. SDPA's math backend is
    # plain matmuls over the full s x s scores (as the formula assumes) that the counter sees;
    # the fused CPU kernel would be invisible to it.
    model = _serial(**kw, untie_embeddings_and_output_weights=True)
    tokens, labels = _batch(b=3)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens, labels).mean().backward()
    assert counter.get_total_flops() == num_floating_point_operations(model.config, 3)
