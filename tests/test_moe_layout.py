"""Expert groups: each pipeline stage's TP x CP x DP block refolded as ETP x EP x expert-DP."""

import itertools

import pytest

from megalite import parallel_state as ps
from tests.harness import run_distributed


def _partition(lines, world):
    flat = sorted(r for line in lines for r in line)
    assert flat == list(range(world))


@pytest.mark.parametrize(
    "world,tp,pp,cp,ep,etp",
    [
        (8, 2, 1, 1, 2, 2),
        (8, 2, 2, 1, 2, 1),
        (8, 1, 1, 2, 4, 1),
        (16, 2, 2, 2, 4, 1),
        (4, 2, 1, 1, 4, 1),
    ],
)
def test_every_kind_partitions_the_world_and_stays_in_its_stage(world, tp, pp, cp, ep, etp):
    groups = ps.expert_group_ranks(world, tp, pp, cp, ep, etp)
    dense = ps.group_ranks(world, tp, pp, cp)
    stage_of = {r: i for i, line in enumerate(_stage_blocks(dense, world, pp)) for r in line}
    sizes = {"etp": etp, "ep": ep, "edp": world // pp // (ep * etp), "etp_ep": ep * etp,
             "emp": pp * ep * etp, "tp_cp": tp * cp, "tp_cp_dp": world // pp}  # fmt: skip
    for kind, lines in groups.items():
        _partition(lines, world)
        assert {len(line) for line in lines} == {sizes[kind]}, kind
        if kind != "emp":  # every other kind lives inside one pipeline stage
            for line in lines:
                assert len({stage_of[r] for r in line}) == 1, (kind, line)
    assert groups["tp_cp_dp"] == sorted(_stage_blocks(dense, world, pp))


def _stage_blocks(dense, world, pp):
    per = world // pp
    return [list(range(s * per, (s + 1) * per)) for s in range(pp)]


def test_megatron_example_tp2_dp4_ep2_etp2():
    g = ps.expert_group_ranks(8, tp=2, ep=2, etp=2)
    assert g["etp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["etp_ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # ETP defaults to TP, and then the expert TP groups are the dense TP groups
    assert ps.expert_group_ranks(8, tp=2, ep=2)["etp"] == ps.group_ranks(8, tp=2)["tp"]


def test_etp1_folds_tp_into_ep():
    g = ps.expert_group_ranks(4, tp=2, ep=4, etp=1)
    assert g["ep"] == [[0, 1, 2, 3]] and g["etp"] == [[0], [1], [2], [3]] and g["edp"] == [
        [0], [1], [2], [3]
    ]  # fmt: skip
    g = ps.expert_group_ranks(8, tp=2, pp=2, ep=2, etp=1)
    assert g["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["edp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["emp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_refused_layouts_name_the_numbers():
    with pytest.raises(ps.LayoutError, match=r"\(4\) x expert-tensor-parallel size \(2\) = 8"):
        ps.validate_expert_layout(8, tp=2, pp=2, ep=4)
    with pytest.raises(
        ps.LayoutError, match=r"= 4 does not divide .*\(2\) x .*\(1\) x .*\(3\) = 6"
    ):
        ps.validate_expert_layout(6, tp=2, ep=4, etp=1)
    with pytest.raises(ps.LayoutError, match=r"num-experts \(6\) is not divisible by .* \(4\)"):
        ps.validate_expert_layout(4, ep=4, num_experts=6)
    with pytest.raises(ps.LayoutError, match="expert-model-parallel size must be"):
        ps.validate_expert_layout(4, ep=0)
    assert ps.validate_expert_layout(8, tp=2, ep=2, etp=1) == 4


def _getters(ep, etp):
    ps.initialize_model_parallel(2, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    import torch.distributed as dist

    out = {}
    for name in ("expert_model_parallel", "expert_tensor_parallel", "expert_data_parallel"):
        group = getattr(ps, f"get_{name}_group")()
        out[name] = (
            getattr(ps, f"get_{name}_world_size")(),
            getattr(ps, f"get_{name}_rank")(),
            dist.get_process_group_ranks(group),
        )
    return out


def test_getters_on_four_ranks():
    for ep, etp in itertools.product((1, 2), (1, 2)):
        want = ps.expert_group_ranks(4, tp=2, ep=ep, etp=etp)
        for rank, got in enumerate(run_distributed(4, _getters, ep, etp)):
            for name, kind in (("expert_model_parallel", "ep"), ("expert_tensor_parallel", "etp"),
                               ("expert_data_parallel", "edp")):  # fmt: skip
                (line,) = [line for line in want[kind] if rank in line]
                assert got[name] == (len(line), line.index(rank), line), (ep, etp, name)
