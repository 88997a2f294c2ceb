"""Shared by the MoE parity tests: one MoE layer at a layout vs the one-process layer.

The global batch is DP micro-batches ``[s, b, h]``; the reference runs each through the
one-process layer (EP = ETP = TP = 1) and sums ``(y * w).sum()`` over them. A rank at (dp d,
tp t) feeds micro-batch d (its sequence slice t under SP). Compared with `assert_close`: the
output, the input gradient, every parameter gradient (reduced the way the trainer reduces it:
dense over DP, expert over expert-DP, router and SP params over TP first) and the aux-loss
values of each micro-batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.testing import assert_close

from megalite import parallel_state as ps
from megalite.model.config import GPTConfig
from megalite.model.transformer import ParamInit
from megalite.moe import MoEConfig, MoEGroups, MoELayer, update_expert_bias

S, B, H, E = 8, 2, 32, 4
PREFIX = "decoder.layers.0.mlp."


def gpt_config(tp=1, sp=False, activation="swiglu") -> GPTConfig:
    return GPTConfig(
        num_layers=2, hidden_size=H, num_attention_heads=4, vocab_size=64, seq_length=S,
        ffn_hidden_size=64, swiglu=activation == "swiglu", disable_bias_linear=True,
        tensor_model_parallel_size=tp, sequence_parallel=sp, hidden_dropout=0.0,
        attention_dropout=0.0,
    )  # fmt: skip


def moe_config(**kw) -> MoEConfig:
    base = dict(num_experts=E, moe_router_topk=2, moe_ffn_hidden_size=16,
                moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)  # fmt: skip
    base.update(kw)
    return MoEConfig(**base)


def make_layer(config, moe, groups, bias=None) -> MoELayer:
    layer = MoELayer(config, moe, PREFIX, ParamInit(1234, 0.02, config.num_layers), groups)
    if bias is not None:
        layer.router.expert_bias.copy_(torch.tensor(bias))
    return layer


def micro_batch(d: int):
    g = torch.Generator().manual_seed(50 + d)
    return torch.randn(S, B, H, generator=g), torch.randn(S, B, H, generator=g)


def reference(moe_kw: dict, dp: int, bias=None, activation="swiglu"):
    layer = make_layer(gpt_config(activation=activation), moe_config(**moe_kw), MoEGroups(), bias)
    outs, xgrads, stats = [], [], []
    for d in range(dp):
        x, w = micro_batch(d)
        x.requires_grad_(True)
        y = layer(x)
        (y * w).sum().backward()
        outs.append(y.detach())
        xgrads.append(x.grad)
        stats.append(dict(layer.last_stats))
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    if layer.router.expert_bias is not None:  # the bias after one update from all the tokens
        update_expert_bias([layer.router])
        stats.append(layer.router.expert_bias.clone())
    return outs, xgrads, stats, grads


def _sum(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def check_layout(tp, ep, etp, sp, moe_kw, bias=None, activation="swiglu"):
    """Build the layout, run it, compare with the reference; return this rank's stats."""
    ps.initialize_model_parallel(tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    try:
        dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        t = ps.get_tensor_model_parallel_rank()
        kw = dict(moe_kw, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        cfg = gpt_config(tp, sp, activation)
        layer = make_layer(cfg, moe_config(**kw), MoEGroups.from_parallel_state(), bias)
        ref_out, ref_xgrad, ref_stats, ref_grads = reference(moe_kw, dp, bias, activation)
        x, w = micro_batch(d)
        sl = slice(None)
        if sp and tp > 1:
            sl = slice(t * S // tp, (t + 1) * S // tp)
        x = x[sl].clone().requires_grad_(True)
        y = layer(x)
        (y * w[sl]).sum().backward()
        tag = f"TP{tp} EP{ep} ETP{etp} SP{sp} {moe_kw}"
        assert_close(y, ref_out[d][sl], msg=lambda m: f"output {tag}: {m}")
        assert_close(x.grad, ref_xgrad[d][sl], msg=lambda m: f"input grad {tag}: {m}")
        for key, value in layer.last_stats.items():
            assert_close(value, ref_stats[d][key], msg=lambda m, k=key: f"{k} {tag}: {m}")
        _check_grads(layer, ref_grads, tag)
        if layer.router.expert_bias is not None:
            update_expert_bias([layer.router], ps.get_tensor_context_and_data_parallel_group())
            assert_close(layer.router.expert_bias, ref_stats[-1], msg=f"expert bias {tag}")
        grads = [p.grad.clone() for p in layer.parameters()]
        stats = {k: v.tolist() for k, v in layer.last_stats.items()}
        return stats, (y.detach(), x.grad, grads)
    finally:
        ps.destroy_model_parallel()


def _check_grads(layer, ref_grads, tag):
    etp_rank, etp = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    ep_rank, ep = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name} got no gradient ({tag})"
        want = ref_grads[name]
        if getattr(p, "expert", False):
            got = _sum(p.grad, ps.get_expert_data_parallel_group())
            n = want.shape[0] // ep
            want = want[ep_rank * n : (ep_rank + 1) * n]
            if etp > 1:
                dim = p.partition_dim
                if getattr(p, "partition_stride", 1) == 2:
                    halves = [h.chunk(etp, dim)[etp_rank] for h in want.chunk(2, dim)]
                    want = torch.cat(halves, dim)
                else:
                    want = want.chunk(etp, dim)[etp_rank]
        else:
            got = p.grad
            if getattr(p, "sequence_parallel", False):
                got = _sum(got, ps.get_tensor_model_parallel_group())
            got = _sum(got, ps.get_data_parallel_group())
            if getattr(p, "tensor_model_parallel", False):
                want = _tp_slice(want, p, tp, tp_rank)
        assert_close(got, want, msg=lambda m, n=name: f"grad {n} ({tag}): {m}")


def _tp_slice(full, p, tp, rank):
    dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
    if stride == 2:
        return torch.cat([h.chunk(tp, dim)[rank] for h in full.chunk(2, dim)], dim)
    return full.chunk(tp, dim)[rank]
