"""parallel_state: group membership against the grid formula, at every factorization of 8."""

import itertools

import pytest
import torch
import torch.distributed as dist

from megalite import parallel_state as ps
from tests.harness import run_distributed


def _factorizations(world):
    for tp, pp in itertools.product(range(1, world + 1), repeat=2):
        if world % (tp * pp) == 0:
            yield tp, pp, world // (tp * pp)


def _formula_rank(t, c, d, p, tp, cp, dp):
    # TP fastest, then CP, DP, PP slowest.
    return t + tp * (c + cp * (d + dp * p))


def _expected(rank, tp, pp, dp, cp=1):
    t = rank % tp
    c = (rank // tp) % cp
    d = (rank // (tp * cp)) % dp
    p = rank // (tp * cp * dp)

    def f(t=t, c=c, d=d, p=p):
        return _formula_rank(t, c, d, p, tp, cp, dp)

    return {
        "coords": dict(tp=t, cp=c, dp=d, pp=p),
        "tp": [f(t=i) for i in range(tp)],
        "dp": [f(d=i) for i in range(dp)],
        "pp": [f(p=i) for i in range(pp)],
        "cp": [f(c=i) for i in range(cp)],
        "mp": sorted(f(t=i, p=j) for i in range(tp) for j in range(pp)),
        "embedding": sorted({f(p=0), f(p=pp - 1)}),
    }


@pytest.mark.parametrize("world", [1, 2, 4, 6, 8])
def test_group_ranks_match_grid_formula(world):
    for tp, pp, dp in _factorizations(world):
        groups = ps.group_ranks(world, tp, pp)
        for kind in ("tp", "dp", "pp", "mp", "embedding"):
            # the groups of one kind partition the world (embedding: first+last stages only)
            flat = sorted(r for g in groups[kind] for r in g)
            if kind != "embedding":
                assert flat == list(range(world)), (kind, tp, pp)
        for rank in range(world):
            exp = _expected(rank, tp, pp, dp)
            for kind in ("tp", "dp", "pp", "mp"):
                mine = [g for g in groups[kind] if rank in g]
                assert mine == [exp[kind]], (kind, rank, tp, pp, dp)


def test_context_parallel_axis_sits_between_tp_and_dp():
    groups = ps.group_ranks(16, tp=2, pp=2, cp=2)
    assert groups["tp"][0] == [0, 1]
    assert groups["cp"][0] == [0, 2]
    assert groups["dp"][0] == [0, 4]
    assert groups["pp"][0] == [0, 8]
    assert groups["dp_cp"][0] == [0, 2, 4, 6]


@pytest.mark.parametrize(
    "args, message",
    [
        ((8, 3, 1), "world size 8 is not divisible by tensor-model-parallel size (3)"),
        ((8, 2, 3), "pipeline-model-parallel size (3)"),
        ((6, 4, 1), "= 4"),
        ((8, 0, 1), "tensor-model-parallel size must be an integer >= 1, got 0"),
        ((8, 1, -2), "pipeline-model-parallel size must be an integer >= 1, got -2"),
        ((0, 1, 1), "world size must be an integer >= 1, got 0"),
    ],
)
def test_bad_layouts_name_the_numbers(args, message):
    with pytest.raises(ps.LayoutError) as e:
        ps.validate_layout(*args)
    assert message in str(e.value)


def test_virtual_pipeline_needs_a_pipeline():
    with pytest.raises(ps.LayoutError, match="virtual pipeline size 2 needs"):
        ps.validate_layout(4, 1, 1, 1, 2)


def test_getters_before_init_raise():
    with pytest.raises(RuntimeError, match="not initialized"):
        ps.get_tensor_model_parallel_rank()


def _all_layouts_live(world):
    """On every rank: build each layout, compare getters with the formula, run collectives."""
    rank = dist.get_rank()
    seen = []
    for tp, pp, dp in _factorizations(world):
        state = ps.initialize_model_parallel(tp, pp)
        exp = _expected(rank, tp, pp, dp)
        assert state.coords == exp["coords"]
        assert ps.get_tensor_model_parallel_world_size() == tp
        assert ps.get_pipeline_model_parallel_world_size() == pp
        assert ps.get_data_parallel_world_size() == dp
        assert ps.get_tensor_model_parallel_rank() == exp["coords"]["tp"]
        assert ps.get_pipeline_model_parallel_rank() == exp["coords"]["pp"]
        assert ps.get_data_parallel_rank() == exp["coords"]["dp"]
        assert ps.is_pipeline_first_stage() == (exp["coords"]["pp"] == 0)
        assert ps.is_pipeline_last_stage() == (exp["coords"]["pp"] == pp - 1)
        assert (
            ps.get_pipeline_model_parallel_next_rank() == exp["pp"][(exp["coords"]["pp"] + 1) % pp]
        )
        assert (
            ps.get_pipeline_model_parallel_prev_rank() == exp["pp"][(exp["coords"]["pp"] - 1) % pp]
        )
        assert ps.get_model_parallel_world_size() == tp * pp
        # The groups are real: a sum of global ranks over each group equals the formula's.
        for kind, getter in [
            ("tp", ps.get_tensor_model_parallel_group),
            ("dp", ps.get_data_parallel_group),
            ("pp", ps.get_pipeline_model_parallel_group),
            ("mp", ps.get_model_parallel_group),
        ]:
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=getter())
            assert t.item() == sum(exp[kind]), (kind, tp, pp)
        assert ps.is_rank_in_embedding_group() == (rank in exp["embedding"])
        if rank not in exp["embedding"]:
            with pytest.raises(RuntimeError, match="belongs to no embedding group"):
                ps.get_embedding_group()
        if rank in exp["embedding"]:
            t = torch.tensor([1.0])
            dist.all_reduce(t, group=ps.get_embedding_group())
            assert t.item() == len(exp["embedding"])
        seen.append((tp, pp, dp))
        ps.destroy_model_parallel()
    return seen


def test_every_factorization_of_8_live():
    results = run_distributed(8, _all_layouts_live, 8)
    assert results[0] == list(_factorizations(8))
    assert len(results[0]) == 10  # (tp, pp) pairs whose product divides 8


def _reinit_refused():
    ps.initialize_model_parallel(2, 1)
    with pytest.raises(RuntimeError, match=r"already initialized \(TP=2, PP=1, DP=1\)"):
        ps.initialize_model_parallel(1, 2)
    with pytest.raises(ps.LayoutError, match="world size 2 is not divisible"):
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(1, 4)
    return True


def test_reinitialization_and_bad_layout_live():
    assert run_distributed(2, _reinit_refused) == [True, True]


def _virtual_stages():
    ps.initialize_model_parallel(1, 2, virtual_pipeline_model_parallel_size=2)
    first = ps.get_pipeline_model_parallel_rank() == 0
    ps.set_virtual_pipeline_model_parallel_rank(0)
    a = (ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    ps.set_virtual_pipeline_model_parallel_rank(1)
    b = (ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    return first, a, b, ps.is_pipeline_first_stage(ignore_virtual=True)


def test_virtual_stage_first_last():
    r0, r1 = run_distributed(2, _virtual_stages)
    assert r0 == (True, (True, False), (False, False), True)
    assert r1 == (False, (False, False), (False, True), False)
