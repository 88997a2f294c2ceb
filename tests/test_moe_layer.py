"""The one-process MoE layer against a token-by-token loop, and the MoE config checks."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from megalite.config import ConfigError
from megalite.moe import (
    MoEConfig,
    MoEGroups,
    expert_bias_routers,
    moe_layers,
    update_expert_bias,
)
from megalite.moe.router import Router
from tests.moe_parity import B, E, H, S, gpt_config, make_layer, moe_config


def _naive(layer, x, keep_fn=None):
    """Loop over tokens: top-k softmax routing, each chosen expert's SwiGLU MLP, weighted sum."""
    tokens = x.reshape(-1, H)
    w1, w2 = layer.experts.linear_fc1.weight, layer.experts.linear_fc2.weight
    logits = tokens @ layer.router.weight.t()
    top = logits.topk(layer.moe.moe_router_topk, dim=-1)
    weights = torch.softmax(top.values, dim=-1)
    keep = keep_fn(logits, top.indices) if keep_fn else torch.ones_like(top.indices, dtype=bool)
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j, e in enumerate(top.indices[t].tolist()):
            if keep[t, j]:
                gate, up = (w1[e] @ tokens[t]).chunk(2)
                out[t] += weights[t, j] * (w2[e] @ (F.silu(gate) * up))
    probs = torch.softmax(logits, dim=-1)
    counts = torch.zeros(E).index_add_(0, top.indices.reshape(-1), torch.ones(top.indices.numel()))
    k, T = layer.moe.moe_router_topk, tokens.shape[0]
    aux = layer.moe.moe_aux_loss_coeff * E * ((counts / (T * k)) * probs.mean(0)).sum()
    z = layer.moe.moe_z_loss_coeff * torch.logsumexp(logits, -1).square().mean()
    return out.view_as(x), aux, z


def test_layer_equals_token_loop():
    layer = make_layer(gpt_config(), moe_config(), MoEGroups())
    x = torch.randn(S, B, H)
    want, aux, z = _naive(layer, x)
    assert_close(layer(x), want)
    assert_close(layer.last_stats["load_balancing_loss"], aux)
    assert_close(layer.last_stats["z_loss"], z)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drops_the_right_pairs(policy):
    moe = moe_config(moe_expert_capacity_factor=0.5, moe_token_drop_policy=policy)
    layer = make_layer(gpt_config(), moe, MoEGroups())
    x = torch.randn(S, B, H)
    T, k = S * B, moe.moe_router_topk
    capacity = math.ceil(T * k / E * 0.5)

    def keep_fn(logits, idx):
        keep = torch.zeros_like(idx, dtype=bool)
        applied = torch.softmax(logits.gather(1, idx), -1)  # the weights the layer applies
        for e in range(E):
            rows = [(t, j) for t in range(T) for j in range(k) if idx[t, j] == e]
            if policy == "probs":
                rows.sort(key=lambda tj: -applied[tj].item())
            for t, j in rows[:capacity]:
                keep[t, j] = True
        return keep

    want, _, _ = _naive(layer, x, keep_fn)
    assert_close(layer(x), want)


@pytest.mark.parametrize(
    "kw",
    [{}, {"moe_router_topk_scaling_factor": 2.5}, {"moe_router_pre_softmax": True},
     {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True}],
)  # fmt: skip
def test_probs_drop_policy_ranks_by_the_applied_probability(kw):
    """Megatron's ``probs`` policy: per expert, keep the `capacity` tokens routed to it with the
    largest routing probability actually applied (after top-k renormalisation and scaling).
    At E=8, k=2, capacity factor 0.5 and 256 tokens, ranking by the pre-top-k softmax instead
    keeps a different set of pairs."""
    num_experts, k, T, h = 8, 2, 256, 16
    moe = MoEConfig(num_experts=num_experts, moe_router_topk=k, moe_expert_capacity_factor=0.5,
                    moe_token_drop_policy="probs", moe_aux_loss_coeff=0.0, **kw)  # fmt: skip
    torch.manual_seed(0)
    router = Router(moe, h, lambda w: torch.nn.init.normal_(w, std=0.5), torch.float32)
    if router.expert_bias is not None:
        router.expert_bias.copy_(torch.linspace(-0.2, 0.2, num_experts))
    tokens = torch.randn(T, h)
    experts, weights, keep, _, _ = router(tokens, batch=1)

    # The applied probabilities, from the definitions, independently of the router's code.
    logits = tokens @ router.weight.t()
    if moe.moe_router_score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        choice = (scores + router.expert_bias).topk(k, -1).indices
        applied = scores.gather(1, choice)
        applied = applied / applied.sum(-1, keepdim=True)
    elif moe.moe_router_pre_softmax:
        choice = torch.softmax(logits, -1).topk(k, -1).indices
        applied = torch.softmax(logits, -1).gather(1, choice)
    else:
        choice = logits.topk(k, -1).indices
        applied = torch.softmax(logits.gather(1, choice), -1)
    applied = applied * (moe.moe_router_topk_scaling_factor or 1.0)
    assert torch.equal(experts, choice)
    assert_close(weights, applied)
    capacity = math.ceil(T * k / num_experts * 0.5)
    want = torch.zeros(T, k, dtype=torch.bool)
    for e in range(num_experts):
        pairs = [(t, j) for t in range(T) for j in range(k) if choice[t, j] == e]
        pairs.sort(key=lambda tj: -applied[tj].item())
        for t, j in pairs[:capacity]:
            want[t, j] = True
    assert torch.equal(keep, want), f"{(keep != want).sum()} of {T * k} pairs differ"


def test_grouped_gemm_equals_the_loop():
    torch.manual_seed(0)
    x = torch.randn(S, B, H)
    results = []
    for grouped in (False, True):
        layer = make_layer(gpt_config(), moe_config(moe_grouped_gemm=grouped), MoEGroups())
        xi = x.clone().requires_grad_(True)
        layer(xi).square().sum().backward()
        results.append([xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        assert_close(a, b)


def test_expert_bias_update_follows_the_load():
    moe = moe_config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                     moe_router_bias_update_rate=0.01)  # fmt: skip
    layer = make_layer(gpt_config(), moe, MoEGroups())
    layer(torch.randn(S, B, H, requires_grad=True)).sum().backward()
    load = layer.router.local_tokens_per_expert.clone()
    assert load.sum() == S * B * 2
    update_expert_bias([layer.router])
    assert_close(layer.router.expert_bias, 0.01 * torch.sign(load.mean() - load))
    assert layer.router.local_tokens_per_expert.sum() == 0


def test_config_checks_and_layer_pattern():
    assert MoEConfig(num_experts=4, moe_layer_freq="([0]*1+[1]*3)").is_moe_layer(0, 4) is False
    assert MoEConfig(num_experts=4, moe_layer_freq=2).is_moe_layer(2, 4)
    assert MoEConfig(num_experts=4, moe_layer_freq=[0, 1]).is_moe_layer(1, 2)
    assert not MoEConfig().is_moe_layer(0, 4)
    with pytest.raises(
        ConfigError, match=r"--moe-router-topk \(5\) must be in \[1, --num-experts \(4\)\]"
    ):
        MoEConfig(num_experts=4, moe_router_topk=5)
    with pytest.raises(
        ConfigError,
        match=r"--num-experts \(6\) is not divisible by --expert-model-parallel-size \(4\)",
    ):
        MoEConfig(num_experts=6, expert_model_parallel_size=4)
    with pytest.raises(ConfigError, match="only lists of 0/1"):
        MoEConfig(num_experts=4, moe_layer_freq="__import__('os')")
    with pytest.raises(ConfigError, match="has 3 entries for 4 layers"):
        MoEConfig(num_experts=4, moe_layer_freq="[1,0,1]").is_moe_layer(0, 4)


@pytest.mark.parametrize("freq,gate", [(1, False), ("[0,1]", False), (1, True)])
def test_flops_count_active_parameters(freq, gate):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megalite.model import build_model, num_floating_point_operations

    cfg = gpt_config()
    moe = moe_config(moe_shared_expert_intermediate_size=32, moe_layer_freq=freq,
                     moe_shared_expert_gate=gate)  # fmt: skip
    (model,) = build_model(cfg, 1, use_parallel_state=False, moe=moe)
    tokens = torch.randint(0, cfg.vocab_size, (3, S))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens, tokens).mean().backward()
    assert counter.get_total_flops() == num_floating_point_operations(cfg, 3, moe=moe)


def test_setup_checks_name_the_flags():
    from megalite.moe.training import check_moe_setup

    moe = MoEConfig(num_experts=8, expert_model_parallel_size=4)
    with pytest.raises(ConfigError, match="--deepspeed: use megalite's own ZeRO .*--zero-stage"):
        check_moe_setup(moe, world_size=8, deepspeed=True)
    with pytest.raises(ConfigError, match=r"\(4\) x expert-tensor-parallel size \(2\) = 8 does"):
        check_moe_setup(
            moe, world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2
        )
    with pytest.raises(ConfigError, match=r"--seq-length \(6\) must be divisible by 4"):
        check_moe_setup(MoEConfig(num_experts=4), world_size=4, tensor_model_parallel_size=4,
                        seq_length=6)  # fmt: skip
    with pytest.raises(ConfigError, match="--expert-model-parallel-size needs --num-experts"):
        check_moe_setup(MoEConfig(expert_model_parallel_size=2), world_size=2)
    check_moe_setup(moe, world_size=8, tensor_model_parallel_size=2, sequence_parallel=True)


def test_full_recompute_same_grads_and_metrics_recorded_once():
    from megalite.model import build_model
    from megalite.moe import moe_metrics

    tokens = torch.randint(0, 64, (2, S + 1))
    moe = moe_config(moe_router_enable_expert_bias=True)
    results = []
    for recompute in ("none", "full"):
        cfg = dataclasses.replace(gpt_config(), recompute_granularity=recompute)
        (model,) = build_model(cfg, 1, use_parallel_state=False, moe=moe)
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
        counts = [r.local_tokens_per_expert.sum().item() for r in expert_bias_routers([model])]
        calls = [m.metrics["calls"] for m in moe_layers([model])]
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((grads, counts, calls, moe_metrics([model])))
    (g0, c0, n0, m0), (g1, c1, n1, m1) = results
    assert c0 == c1 == [S * 2 * 2] * 2 and n0 == n1 == [1, 1]
    assert m0 == m1
    for name in g0:
        assert_close(g1[name], g0[name], msg=name)


def test_bf16_grouped_gemm_runs():
    cfg = dataclasses.replace(gpt_config(), params_dtype=torch.bfloat16)
    layer = make_layer(cfg, moe_config(moe_grouped_gemm=True), MoEGroups())
    x = torch.randn(S, B, H, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().square().sum().backward()
    assert (
        y.dtype == torch.bfloat16 and layer.experts.linear_fc1.weight.grad.dtype == torch.bfloat16
    )
    ref = make_layer(gpt_config(), moe_config(), MoEGroups())
    assert_close(y.float(), ref(x.detach().float()), rtol=0.05, atol=0.02)
