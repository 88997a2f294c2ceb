"""megalite-plan: counts, schedules and model states against their sources (single process).

The measured side (predicted vs real peaks on gloo ranks) is tests/test_planner_measured.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megalite.model.config import GPTConfig
from megalite.model.gpt import build_model
from megalite.planner import Layout, Runtime, apply_layout, plan_memory
from megalite.planner.counts import stage_params, total_params
from megalite.planner.memory import deepspeed_states, inflight, megalite_states
from megalite.planner.steptime import bubble_fraction

TINY = dict(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=100, seq_length=16)


@pytest.mark.parametrize(
    "kw",
    [
        dict(pipeline_model_parallel_size=1),
        dict(pipeline_model_parallel_size=2),
        dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1),
        dict(pipeline_model_parallel_size=4, untie_embeddings_and_output_weights=True),
        dict(pipeline_model_parallel_size=2, swiglu=True, position_embedding_type="rope",
             normalization="RMSNorm", num_query_groups=2, disable_bias_linear=True),
    ],
)  # fmt: skip
def test_stage_params_equal_the_built_model(kw):
    config = GPTConfig(**TINY, **kw)
    for r in range(config.pipeline_model_parallel_size):
        chunks = build_model(config, 0, pp_rank=r, use_parallel_state=False)
        planned = stage_params(config, r)
        assert len(planned) == len(chunks)
        for chunk, params in zip(chunks, planned):
            assert [p.numel for p in params] == [p.numel() for p in chunk.parameters()]


def test_total_params_of_gpt3_175b():
    c = GPTConfig(num_layers=96, hidden_size=12288, num_attention_heads=96, vocab_size=51200,
                  seq_length=2048)  # fmt: skip
    assert total_params(c) == pytest.approx(175e9, rel=0.01)


@pytest.mark.parametrize("p,m,v", [(2, 2, 1), (2, 5, 1), (4, 4, 1), (4, 7, 1), (2, 4, 2),
                                   (4, 8, 2), (4, 4, 3)])  # fmt: skip
def test_timeline_bubble_equals_closed_form(p, m, v):
    """The closed form used past SIMULATE_LIMIT is what the schedules' timeline gives."""
    assert bubble_fraction(p, m, v) == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-9)


def _max_live_per_stage(p: int, m: int, v: int) -> list[int]:
    """Run the real schedule in virtual time; count micro-batch chunks alive per stage."""
    import threading

    from megalite.pipeline_parallel.interleaved import (
        forward_backward_pipelining_with_interleaving,
    )
    from megalite.pipeline_parallel.schedules import (
        forward_backward_pipelining_without_interleaving,
    )
    from megalite.pipeline_parallel.timeline import SHAPE, VirtualNetwork

    net = VirtualNetwork(p)
    live, peak = [0] * p, [0] * p

    class Track(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, r):
            ctx.r = r
            live[r] += 1
            peak[r] = max(peak[r], live[r])
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            live[ctx.r] -= 1
            return g, None

    class Stage(torch.nn.Module):
        def __init__(self, r, pre):
            super().__init__()
            self.w, self.r, self.pre_process, self.input_tensor = (
                torch.nn.Parameter(torch.ones(())), r, pre, None)  # fmt: skip

        def set_input_tensor(self, t):
            self.input_tensor = t

        def forward(self, x):
            return Track.apply((x if self.pre_process else self.input_tensor) * self.w, self.r)

    def step(data_iterator, model):
        out = model(next(data_iterator))
        return out, lambda o: (o.mean(), {})

    def rank(r):
        chunks = [Stage(r, r == 0 and c == 0) for c in range(v)]
        data = [iter([torch.ones(SHAPE)] * m) for _ in chunks]
        schedule = (forward_backward_pipelining_with_interleaving if v > 1
                    else forward_backward_pipelining_without_interleaving)  # fmt: skip
        schedule(step, data if v > 1 else data[0], chunks if v > 1 else chunks[0], m,
                 tensor_shape=SHAPE, links=net.links(r))  # fmt: skip

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(p)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return peak


@pytest.mark.parametrize("p,m,v", [(2, 4, 1), (4, 3, 1), (4, 8, 1), (2, 4, 2), (4, 8, 2),
                                   (4, 4, 2), (2, 6, 3)])  # fmt: skip
def test_inflight_equals_the_schedules(p, m, v):
    layout = Layout(pp=p, vp=v, num_microbatches=m)
    assert [len(inflight(layout, r)) for r in range(p)] == _max_live_per_stage(p, m, v)


def _params(n_layers=4, width=64):
    from megalite.planner.counts import Param

    return [[Param(width * width, False, 2) for _ in range(n_layers)]]


@pytest.mark.parametrize("dp", [1, 2, 4, 8])
def test_megalite_model_states_are_the_zero_formulas(dp):
    """bf16 + Adam: params 2 Psi; fp32 grad buckets 4 Psi (ZeRO-2: 4 Psi / N kept, the full
    buckets only inside a backward); optimizer K = 12 bytes/param (fp32 main + 2 moments) over
    N ranks for ZeRO 1/2 (the paper's K Psi / N), over 1 for ZeRO 0."""
    chunks = _params()
    psi = sum(p.numel for c in chunks for p in c)
    rt = Runtime(torch.bfloat16, "cuda")
    for zero in (0, 1, 2):
        s = megalite_states(chunks, Layout(dp=dp, zero_stage=zero), rt)
        assert s.param_bytes == 2 * psi
        assert s.optimizer_bytes == 12 * psi // (dp if zero else 1)
        assert s.grad_bytes_at_step == (4 * psi // dp if zero == 2 else 4 * psi)
    # The paper's totals with megalite's fp32 gradients: 18, 6 + 12/N, 2 + 16/N bytes/param.
    for zero, (a, b) in {0: (18, 0), 1: (6, 12), 2: (2, 16)}.items():
        s = megalite_states(chunks, Layout(dp=dp, zero_stage=zero), rt)
        assert s.param_bytes + s.grad_bytes_at_step + s.optimizer_bytes == a * psi + b * psi // dp


@pytest.mark.parametrize("gpus", [1, 4, 8, 64])
def test_deepspeed_states_equal_its_estimator(gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    chunks = _params(n_layers=8, width=128)
    psi = sum(p.numel for c in chunks for p in c)
    rt = Runtime(torch.float16, "cuda")
    layout = Layout(dp=gpus, deepspeed_stage=2)
    s = deepspeed_states(chunks, layout, rt)
    _, gpu2 = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=gpus, cpu_offload=False)
    assert s.param_bytes + s.grad_bytes + s.optimizer_bytes == gpu2
    s = deepspeed_states(chunks, Layout(dp=gpus, deepspeed_stage=3), rt)
    _, gpu3, _ = estimate_zero3_model_states_mem_needs(
        psi, 128 * 128, num_gpus_per_node=gpus, cpu_offload=False, cpu_offload_params=False
    )
    assert s.param_bytes + s.grad_bytes + s.optimizer_bytes == gpu3
    # Stage 1 = the paper's 4 Psi + 12 Psi / N (16-bit params and grads, K = 12), plus
    # DeepSpeed's fp32 gradient partition 4 Psi / N.
    s = deepspeed_states(chunks, Layout(dp=gpus, deepspeed_stage=1), rt)
    assert s.param_bytes + s.grad_bytes + s.optimizer_bytes == 4 * psi + 16 * psi // gpus


def test_first_stage_holds_the_most_activations():
    config = GPTConfig(**TINY)
    layout = Layout(pp=4, num_microbatches=8)
    rt = Runtime(torch.bfloat16, "cuda")
    ranks = plan_memory(apply_layout(config, layout, rt), layout, rt)
    acts = [r.activation_bytes for r in ranks[:-1]]
    assert acts == sorted(acts, reverse=True) and acts[0] > acts[-1]
    assert [r.detail["microbatches_in_flight"] for r in ranks] == [4, 3, 2, 1]


def test_layout_refuses_bad_cp_and_ep_with_the_reason():
    with pytest.raises(ValueError, match=r"ep \(3\) x etp \(1\) does not divide"):
        Layout(dp=4, ep=3)
    with pytest.raises(ValueError, match="cp_comm_type"):
        Layout(cp=2, cp_comm_type="ring")
    with pytest.raises(ValueError, match="multiple of pp"):
        Layout(pp=2, vp=2, num_microbatches=3)
    assert Layout(tp=2, cp=2, dp=2, ep=4, etp=1).expert_dp == 2
    assert Layout(tp=2, cp=2, dp=2).grad_dp == 4


# --- context parallelism and MoE ---------------------------------------------------------------
def _moe(**kw):
    from megalite.moe import MoEConfig

    return MoEConfig(**({"num_experts": 8, "moe_router_topk": 2} | kw))


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(moe_layer_freq=2, moe_shared_expert_intermediate_size=48),
     dict(moe_layer_freq="[0,1,1,0]", moe_ffn_hidden_size=96)],
)  # fmt: skip
def test_moe_stage_params_equal_the_built_model(kw):
    moe = _moe(**kw)
    config = GPTConfig(**TINY, pipeline_model_parallel_size=2, swiglu=True)
    for r in range(2):
        (chunk,) = build_model(config, 0, pp_rank=r, use_parallel_state=False, moe=moe)
        (planned,) = stage_params(config, r, moe)
        assert [p.numel for p in planned] == [p.numel() for p in chunk.parameters()]
        expert = [getattr(p, "expert", False) for p in chunk.parameters()]
        assert [p.expert for p in planned] == expert


def test_expert_weights_split_over_ep_and_etp_and_shard_over_expert_dp():
    """EP 4 holds a quarter of each MoE layer's experts, ETP 2 half of each; ZeRO-1 shards the
    expert optimizer over expert-DP = TP x CP x DP / (EP x ETP), the dense one over DP x CP."""
    from megalite.planner.layout import apply_moe

    config, moe, rt = GPTConfig(**TINY, tensor_model_parallel_size=2), _moe(), Runtime()
    experts = {}
    for ep, etp in ((1, 1), (4, 1), (2, 2)):
        layout = Layout(tp=2, dp=4, ep=ep, etp=etp)
        (chunk,) = stage_params(config, 0, apply_moe(moe, layout))
        experts[ep, etp] = sum(p.numel for p in chunk if p.expert)
        dense = sum(p.numel for p in chunk if not p.expert)
        states = megalite_states([chunk], dataclasses.replace(layout, zero_stage=1), rt)
        edp = 8 // (ep * etp)
        assert states.optimizer_bytes == pytest.approx(
            12 * (dense / 4 + experts[ep, etp] / edp), abs=12 * 64
        )
    assert experts[4, 1] * 4 == experts[1, 1] == experts[2, 2] * 4


def test_context_parallel_splits_the_activations():
    config = GPTConfig(**TINY | {"seq_length": 64})
    rt = Runtime(torch.bfloat16, "cuda")
    acts = {}
    for cp, comm in ((1, "p2p"), (2, "p2p"), (4, "p2p"), (4, "a2a")):
        layout = Layout(cp=cp, cp_comm_type=comm, micro_batch_size=2)
        (rank,) = plan_memory(apply_layout(config, layout, rt), layout, rt)
        acts[cp, comm] = rank.detail["activation_bytes_per_layer_microbatch"]
    # a rank keeps 1/cp of the tokens; CP attention keeps one more copy of the output
    h = 32
    extra = 64 * 2 * h * 2
    assert acts[2, "p2p"] == pytest.approx((acts[1, "p2p"] + extra) / 2, rel=0.01)
    assert acts[4, "p2p"] == pytest.approx((acts[1, "p2p"] + extra) / 4, rel=0.01)
    assert acts[4, "a2a"] == pytest.approx(acts[4, "p2p"], rel=0.01)


def test_moe_step_time_counts_active_parameters():
    """Top-1 of 8 experts computes about the dense model's FLOPs; top-2 about one more MLP."""
    from megalite.planner import cpu_device, estimate_step_time
    from megalite.planner.layout import apply_moe

    config = GPTConfig(**TINY | {"hidden_size": 256, "seq_length": 64})
    layout, rt = Layout(), Runtime()
    dev = cpu_device().with_overrides(op_overhead_s=0.0)
    split = apply_layout(config, layout, rt)
    dense = estimate_step_time(split, layout, rt, dev, 8).compute_s
    top1 = estimate_step_time(split, layout, rt, dev, 8, apply_moe(_moe(moe_router_topk=1), layout))
    top2 = estimate_step_time(split, layout, rt, dev, 8, apply_moe(_moe(), layout))
    assert dense < top1.compute_s < 1.05 * dense < top2.compute_s
    assert top1.ep_comm_s == 0.0
    ep = Layout(dp=4, ep=4)
    assert estimate_step_time(split, ep, rt, dev, 8, apply_moe(_moe(), ep)).ep_comm_s > 0


# --- CLI --------------------------------------------------------------------------------------
LLAMA_8B = (
    "--num-layers 32 --hidden-size 4096 --num-attention-heads 32 --group-query-attention "
    "--num-query-groups 8 --ffn-hidden-size 14336 --seq-length 8192 --swiglu "
    "--normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights "
    "--disable-bias-linear --hidden-dropout 0 --attention-dropout 0 --vocab-size 128256 "
    "--micro-batch-size 1 --global-batch-size 128 --bf16"
).split()


def test_cli_json_ranks(capsys):
    from megalite.planner.cli import main

    argv = LLAMA_8B + ["--num-gpus", "8", "--tensor-model-parallel-size", "2",
                       "--pipeline-model-parallel-size", "2", "--sequence-parallel",
                       "--use-distributed-optimizer", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    keys = {"num_params", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
            "other_bytes", "peak_bytes"}  # fmt: skip
    assert len(out["ranks"]) == 2 and all(keys <= set(r) for r in out["ranks"])
    for r in out["ranks"]:
        parts = sum(r[k] for k in keys - {"num_params", "peak_bytes"})
        assert r["peak_bytes"] == parts
    # two stages x TP 2 hold the whole model once
    assert sum(r["num_params"] for r in out["ranks"]) * 2 == pytest.approx(8.03e9, rel=0.01)


def test_cli_search_ranks_by_tokens_per_second(capsys):
    from megalite.planner.cli import main

    assert main(LLAMA_8B + ["--num-gpus", "8", "--search", "--json", "--top", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    rates = [p["tokens_per_s"] for p in out["layouts"]]
    assert len(rates) == 5 and rates == sorted(rates, reverse=True)
    assert all(p["fits"] and p["layout"]["tp"] <= 8 for p in out["layouts"])


def test_cli_search_ranges_over_cp_for_long_sequences_and_ep_for_moe(capsys):
    from megalite.planner.cli import main

    assert main(LLAMA_8B + ["--num-gpus", "8", "--search", "--json", "--top", "400"]) == 0
    layouts = [p["layout"] for p in json.loads(capsys.readouterr().out)["layouts"]]
    assert {lay["cp"] for lay in layouts} >= {1, 2, 4} and {"p2p", "a2a"} <= {
        lay["cp_comm_type"] for lay in layouts
    }
    moe = ["--num-experts", "8", "--moe-router-topk", "2", "--seq-length", "4096"]
    assert main(LLAMA_8B + moe + ["--num-gpus", "16", "--search", "--json", "--top", "50"]) == 0
    layouts = [p["layout"] for p in json.loads(capsys.readouterr().out)["layouts"]]
    assert {lay["cp"] for lay in layouts} == {1} and max(lay["ep"] for lay in layouts) > 1


def test_cli_plans_cp_and_moe_layouts(capsys):
    from megalite.planner.cli import main

    base = LLAMA_8B + ["--num-gpus", "8", "--json", "--use-distributed-optimizer",
                       "--tensor-model-parallel-size", "2", "--sequence-parallel"]  # fmt: skip
    peaks = {}
    for cp in (1, 2):
        assert main(base + ["--context-parallel-size", str(cp)]) == 0
        peaks[cp] = json.loads(capsys.readouterr().out)["ranks"][0]["peak_bytes"]
    assert peaks[2] < peaks[1]
    moe = ["--num-experts", "8", "--expert-model-parallel-size", "4", "--gpu-memory", "400"]
    assert main(base + moe) == 0
    out = json.loads(capsys.readouterr().out)
    # 8B's MLPs become 8 experts: 8 x 32 x 3 x 4096 x 14336 expert weights; a rank holds
    # 1/EP of the experts, each split over ETP = TP = 2, and half of the dense rest
    experts = 8 * 32 * 3 * 4096 * 14336
    dense = 8.03e9 - experts / 8
    assert out["ranks"][0]["num_params"] == pytest.approx(dense / 2 + experts / 8, rel=0.01)
    assert out["step"]["ep_comm_s"] > 0


def test_cli_unsatisfiable_says_the_smallest_memory(capsys):
    from megalite.planner.cli import main

    assert main(LLAMA_8B + ["--num-gpus", "1", "--search", "--gpu-memory", "24"]) == 1
    text = capsys.readouterr().out
    assert "no layout fits" in text and "smallest peak" in text and "GiB" in text


def test_cli_bad_device(capsys):
    from megalite.planner.cli import main

    assert main(LLAMA_8B + ["--device", "tpu9"]) == 2
    assert "--device 'tpu9'" in capsys.readouterr().err


def test_pretrain_dry_run_prints_the_plan_as_yaml_comments(capsys, monkeypatch):
    import yaml

    from megalite.pretrain import pretrain

    monkeypatch.setenv("WORLD_SIZE", "8")
    argv = LLAMA_8B + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--lr", "1e-4",
                       "--train-iters", "10", "--mock-data", "--dry-run"]  # fmt: skip
    assert pretrain(argv) == 0
    out = capsys.readouterr().out
    assert "# layout TP2xPP1xDP4" in out and "# only stage" in out
    yaml.safe_load(out)  # still a config file --config reads back


def test_layer_activations_match_korthikanti_without_the_score_term():
    """Korthikanti et al. 2022: a GPT layer keeps s b h (34 + 5 a s / h) bytes in 16-bit with
    dropout; flash attention keeps no s x s scores, leaving 34 s b h (+ its fp32 log-sum-exp
    and the norms' fp32 statistics, which the paper leaves out)."""
    from megalite.planner.memory import activation_model

    c = GPTConfig(num_layers=4, hidden_size=1024, num_attention_heads=16, vocab_size=1000,
                  seq_length=512, hidden_dropout=0.1, attention_dropout=0.1)  # fmt: skip
    layout, rt = Layout(micro_batch_size=2), Runtime(torch.bfloat16, "cuda")
    act = activation_model(apply_layout(c, layout, rt), layout, rt)
    s, b, h, n = 512, 2, 1024, 16
    assert act.layer == 34 * s * b * h + 4 * n * s * b + 2 * 8 * s * b
