"""MoE layer at EP 1/2/4 x TP 1/2 (with and without SP) x ETP, both dispatchers, on gloo, equal
to the one-process layer: output, input grads, parameter grads, aux-loss values. Plus the edge
cases of issue #14: an EP rank whose experts get no token, every token to one expert, top-k =
number of experts, EP = number of experts."""

import pytest
from torch.testing import assert_close

from tests.harness import run_distributed
from tests.moe_parity import check_layout

DISPATCHERS = ("allgather", "alltoall")
# (tp, ep, etp, sp) on 4 ranks
LAYOUTS_4 = [
    (1, 1, 1, False), (1, 2, 1, False), (1, 4, 1, False), (2, 2, 1, True), (2, 2, 2, True),
    (2, 1, 2, True), (2, 2, 1, False), (2, 4, 1, True), (2, 2, 2, False),
]  # fmt: skip


def _many(layouts, cases):
    out = []
    for moe_kw, bias, activation in cases:
        for tp, ep, etp, sp in layouts:
            tensors = []
            for kind in DISPATCHERS:
                kw = dict(moe_kw, moe_token_dispatcher_type=kind)
                stats, result = check_layout(tp, ep, etp, sp, kw, bias, activation)
                out.append(stats)
                tensors.append(result)
            # The two dispatchers give the same output, input grads and parameter grads.
            assert_close(tensors[0], tensors[1], msg=f"dispatchers differ at {tp} {ep} {etp} {sp}")
    return out


def test_layouts_on_two_ranks():
    gate = {"moe_shared_expert_intermediate_size": 32, "moe_shared_expert_gate": True}
    cases = [({}, None, "swiglu"), ({"moe_router_topk": 1}, None, "gelu"), (gate, None, "swiglu")]
    run_distributed(2, _many, [(1, 2, 1, False), (2, 2, 1, True), (2, 1, 2, True)], cases)


@pytest.mark.slow
def test_layouts_on_four_ranks():
    cases = [
        ({}, None, "swiglu"),
        ({"moe_shared_expert_intermediate_size": 32, "moe_router_topk": 1}, None, "gelu"),
        ({"moe_router_load_balancing_type": "seq_aux_loss", "moe_grouped_gemm": True}, None,
         "swiglu"),
        ({"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True},
         [0.1, -0.2, 0.0, 0.3], "swiglu"),
    ]  # fmt: skip
    run_distributed(4, _many, LAYOUTS_4, cases)


def test_edge_cases_on_four_ranks():
    bias = dict(moe_router_enable_expert_bias=True)
    cases = [
        # experts 2, 3 (EP rank 1 of 2) never chosen: that rank computes on zero tokens
        (dict(bias), [0.0, 0.0, -100.0, -100.0], "swiglu"),
        # every token to expert 0
        (dict(bias, moe_router_topk=1), [100.0, 0.0, 0.0, 0.0], "swiglu"),
        # top-k = number of experts
        ({"moe_router_topk": 4, "moe_shared_expert_intermediate_size": 32}, None, "swiglu"),
    ]
    layouts = [(1, 2, 1, False), (2, 2, 1, True), (1, 4, 1, False), (2, 2, 2, True)]
    stats = run_distributed(4, _many, layouts, cases)
    loads = [s["tokens_per_expert"] for s in stats[0]]
    n = len(layouts) * len(DISPATCHERS)
    assert all(load[2] == load[3] == 0 for load in loads[:n])  # truly no token on EP rank 1
    assert all(load[1:] == [0, 0, 0] for load in loads[n : 2 * n])
