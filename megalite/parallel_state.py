"""The one parallel-state manager: builds every process group from one rank grid.

The world is a 4-D grid of ranks, TP fastest, then CP, DP, PP slowest::

    grid = torch.arange(world).view(pp, dp, cp, tp)      # grid[p, d, c, t] = global rank

so ranks 0..tp-1 form the first tensor-parallel group (TP groups should sit inside a node), and
the pipeline stages are the slowest-varying index. Every group of one kind is a line of the grid
along that kind's axis; `group_ranks` computes them with no process group at all, so the layout
is testable in one process, and `initialize_model_parallel` then creates them on every rank in the
same order (``torch.distributed.new_group`` must be called collectively).

Layers never read this module's state on their own at run time: they take the group they need
(usually asked of this manager once, at construction). The Megatron-style getters below exist
for the training front end and for DeepSpeed, which accepts this module as its ``mpu``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megalite.errors import UserError

# Axis order of the rank grid, slowest first (the view shape), and the public name of each axis.
GRID_AXES = ("pp", "dp", "cp", "tp")


class LayoutError(UserError, ValueError):
    """A parallel layout that the world size or the sizes themselves cannot satisfy."""


def validate_layout(
    world_size: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
) -> int:
    """Check a layout and return the derived data-parallel size.

    Raises `LayoutError` naming the numbers that disagree.
    """
    sizes = {
        "world size": world_size,
        "tensor-model-parallel size": tensor_model_parallel_size,
        "pipeline-model-parallel size": pipeline_model_parallel_size,
        "context-parallel size": context_parallel_size,
    }
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise LayoutError(f"{name} must be an integer >= 1, got {value!r}")
    if virtual_pipeline_model_parallel_size is not None:
        v = virtual_pipeline_model_parallel_size
        if not isinstance(v, int) or v < 1:
            raise LayoutError(f"virtual-pipeline-model-parallel size must be >= 1, got {v!r}")
        if v > 1 and pipeline_model_parallel_size < 2:
            raise LayoutError(
                f"virtual pipeline size {v} needs pipeline-model-parallel size > 1, "
                f"got {pipeline_model_parallel_size}"
            )
    model = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world_size % model != 0:
        raise LayoutError(
            f"world size {world_size} is not divisible by tensor-model-parallel size "
            f"({tensor_model_parallel_size}) x pipeline-model-parallel size "
            f"({pipeline_model_parallel_size}) x context-parallel size ({context_parallel_size})"
            f" = {model}"
        )
    return world_size // model


def rank_grid(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1) -> torch.Tensor:
    """The rank grid ``[pp, dp, cp, tp]``: ``grid[p, d, c, t]`` is a global rank."""
    dp = validate_layout(world_size, tp, pp, cp)
    return torch.arange(world_size).view(pp, dp, cp, tp)


def _lines(grid: torch.Tensor, *axes: str) -> list[list[int]]:
    """All lines of the grid that vary along `axes` (in that order, last fastest)."""
    dims = [GRID_AXES.index(a) for a in axes]
    rest = [d for d in range(grid.dim()) if d not in dims]
    size = 1
    for d in dims:
        size *= grid.shape[d]
    return grid.permute(*rest, *dims).reshape(-1, size).tolist()


def group_ranks(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1) -> dict[str, list]:
    """Every group of every kind, as lists of global ranks, computed from the grid alone.

    Kinds: ``tp``, ``cp``, ``dp``, ``pp``, ``dp_cp`` (gradient reduction when CP > 1),
    ``mp`` (model parallel: the ranks holding different pieces of one replica's parameters, TP x
    PP; CP ranks hold the same parameters, so norms summed over ``mp`` must not include them,
    as in Megatron), ``embedding`` (first and last
    pipeline stage, for tied input/output embeddings) and ``position_embedding`` (first stage).
    """
    grid = rank_grid(world_size, tp, pp, cp)
    pp_groups = _lines(grid, "pp")
    embedding = [sorted({g[0], g[-1]}) for g in pp_groups]
    return {
        "tp": _lines(grid, "tp"),
        "cp": _lines(grid, "cp"),
        "dp": _lines(grid, "dp"),
        "pp": pp_groups,
        "dp_cp": _lines(grid, "dp", "cp"),
        "mp": _lines(grid, "pp", "tp"),
        "embedding": embedding,
        "position_embedding": [[g[0]] for g in pp_groups],
    }


# --- expert parallelism: the same ranks, each stage's block refolded -------------------------
# Axis order of the expert grid, slowest first: the block of TP x CP x DP ranks of one pipeline
# stage (contiguous in the dense grid, since PP is slowest) read as expert-DP x EP x ETP.
EXPERT_GRID_AXES = ("pp", "edp", "ep", "etp")


def validate_expert_layout(
    world_size: int,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    num_experts: Optional[int] = None,
) -> int:
    """Check that EP x ETP folds into each stage's TP x CP x DP block; return expert-DP size.

    `etp` None means ETP = TP (Megatron's default). With `num_experts`, the experts must split
    evenly over EP. Raises `LayoutError` naming the numbers.
    """
    dp = validate_layout(world_size, tp, pp, cp)
    etp = tp if etp is None else etp
    for name, value in (("expert-model-parallel size", ep), ("expert-tensor-parallel size", etp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LayoutError(f"{name} must be an integer >= 1, got {value!r}")
    block = tp * cp * dp
    if block % (ep * etp) != 0:
        raise LayoutError(
            f"expert-model-parallel size ({ep}) x expert-tensor-parallel size ({etp}) = "
            f"{ep * etp} does not divide the ranks of one pipeline stage: tensor-model-parallel "
            f"size ({tp}) x context-parallel size ({cp}) x data-parallel size ({dp}) = {block}"
        )
    if num_experts is not None and (num_experts < 1 or num_experts % ep != 0):
        raise LayoutError(
            f"num-experts ({num_experts}) is not divisible by expert-model-parallel size ({ep})"
        )
    return block // (ep * etp)


def expert_rank_grid(
    world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, etp: Optional[int] = None
) -> torch.Tensor:
    """The expert grid ``[pp, edp, ep, etp]`` over the same global ranks as `rank_grid`."""
    edp = validate_expert_layout(world_size, tp, pp, cp, ep, etp)
    etp = tp if etp is None else etp
    return torch.arange(world_size).view(pp, edp, ep, etp)


def _expert_lines(grid: torch.Tensor, *axes: str) -> list[list[int]]:
    dims = [EXPERT_GRID_AXES.index(a) for a in axes]
    rest = [d for d in range(grid.dim()) if d not in dims]
    size = 1
    for d in dims:
        size *= grid.shape[d]
    return grid.permute(*rest, *dims).reshape(-1, size).tolist()


def expert_group_ranks(
    world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, etp: Optional[int] = None
) -> dict[str, list]:
    """The MoE groups, as lists of global ranks, computed from the two grids alone.

    Kinds: ``etp`` (one expert's tensor shards), ``ep`` (ranks holding different experts),
    ``edp`` (expert data parallel: replicas of the same expert shard, where expert gradients are
    reduced), ``etp_ep`` (ETP x EP: the all-gather dispatcher's group), ``emp`` (expert model
    parallel, PP x EP x ETP: one copy of every expert parameter, for the gradient norm),
    ``tp_cp`` (the ranks sharing one micro-batch's tokens: MoE load statistics) and
    ``tp_cp_dp`` (one pipeline stage's block: the expert-bias token counts).
    """
    grid = expert_rank_grid(world_size, tp, pp, cp, ep, etp)
    dense = rank_grid(world_size, tp, pp, cp)
    return {
        "etp": _expert_lines(grid, "etp"),
        "ep": _expert_lines(grid, "ep"),
        "edp": _expert_lines(grid, "edp"),
        "etp_ep": _expert_lines(grid, "ep", "etp"),
        "emp": _expert_lines(grid, "pp", "ep", "etp"),
        "tp_cp": _lines(dense, "cp", "tp"),
        "tp_cp_dp": _lines(dense, "dp", "cp", "tp"),
    }


@dataclass
class ParallelState:
    """Sizes, this rank's coordinates in the grid, and its group of every kind."""

    tp: int
    pp: int
    dp: int
    cp: int
    vpp: Optional[int]
    rank: int
    world_size: int
    coords: dict[str, int]
    groups: dict[str, object] = field(repr=False)
    ranks: dict[str, list[int]]
    virtual_pipeline_rank: Optional[int] = None
    ep: int = 1
    etp: int = 1
    edp: int = 1
    expert_coords: dict[str, int] = field(default_factory=dict)


_STATE: Optional[ParallelState] = None
# The collective timeout of `megalite.distributed.init_distributed`, given to every group.
_DEFAULT_TIMEOUT: Optional[datetime.timedelta] = None


def set_default_timeout(timeout: Optional[datetime.timedelta]) -> None:
    """Record the collective timeout the groups built later get (set by `init_distributed`)."""
    global _DEFAULT_TIMEOUT
    _DEFAULT_TIMEOUT = timeout


def get_default_timeout() -> Optional[datetime.timedelta]:
    return _DEFAULT_TIMEOUT


@dataclass(frozen=True)
class ModelParallelGroups:
    """What gradient finalization and the optimizer need to know of the model split, handed to
    them explicitly (`get_model_parallel_groups()`; the default is one unsplit model)."""

    tp_group: object = None
    tp_rank: int = 0
    model_parallel_group: object = None  # TP x PP: the grad norm sums over it
    model_parallel_size: int = 1
    is_first_stage: bool = True
    embedding_group: object = None  # first + last stage, on the ranks that belong to it
    expert_model_parallel_group: object = None  # PP x EP x ETP: one copy of each expert param


def get_model_parallel_groups() -> ModelParallelGroups:
    """This rank's `ModelParallelGroups` from the live layout."""
    return ModelParallelGroups(
        tp_group=get_tensor_model_parallel_group(),
        tp_rank=get_tensor_model_parallel_rank(),
        model_parallel_group=get_model_parallel_group(),
        model_parallel_size=get_model_parallel_world_size(),
        is_first_stage=is_pipeline_first_stage(ignore_virtual=True),
        embedding_group=get_embedding_group()
        if is_rank_in_embedding_group(ignore_virtual=True)
        else None,
        expert_model_parallel_group=get_expert_model_parallel_full_group(),
    )


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    timeout: Optional[datetime.timedelta] = None,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
) -> ParallelState:
    """Build every process group for this layout; DP size is derived from the world size.

    Must be called on every rank after ``torch.distributed`` is initialized. `timeout` (default:
    the one given to `megalite.distributed.init_distributed`, else torch's) is passed to every
    group, so a collective on any of them fails instead of hanging when a peer dies.
    `expert_model_parallel_size` (EP) and `expert_tensor_parallel_size` (ETP, default TP) add
    the MoE groups of `expert_group_ranks`.
    """
    global _STATE
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call megalite.distributed.init_distributed() "
            "before initialize_model_parallel()"
        )
    if _STATE is not None:
        raise RuntimeError(
            f"model parallel state is already initialized (TP={_STATE.tp}, PP={_STATE.pp}, "
            f"DP={_STATE.dp}); call destroy_model_parallel() first"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    vpp = virtual_pipeline_model_parallel_size
    if vpp == 1:
        vpp = None
    dp = validate_layout(world, tp, pp, cp, vpp)
    ep, etp = expert_model_parallel_size, expert_tensor_parallel_size
    etp = tp if etp is None else etp
    edp = validate_expert_layout(world, tp, pp, cp, ep, etp)
    if timeout is None:
        timeout = _DEFAULT_TIMEOUT

    groups, ranks = {}, {}
    for kind, all_lines in group_ranks(world, tp, pp, cp).items():
        for line in all_lines:
            # Every rank creates every group, in the same order: new_group is collective.
            group = dist.new_group(line, timeout=timeout)
            if rank in line:
                groups[kind], ranks[kind] = group, line
    for kind, all_lines in expert_group_ranks(world, tp, pp, cp, ep, etp).items():
        for line in all_lines:
            group = dist.new_group(line, timeout=timeout)
            if rank in line:
                groups[kind], ranks[kind] = group, line
    expert_where = (expert_rank_grid(world, tp, pp, cp, ep, etp) == rank).nonzero()[0].tolist()
    grid = rank_grid(world, tp, pp, cp)
    where = (grid == rank).nonzero()[0].tolist()
    coords = dict(zip(GRID_AXES, where))
    _STATE = ParallelState(
        tp=tp,
        pp=pp,
        dp=dp,
        cp=cp,
        vpp=vpp,
        rank=rank,
        world_size=world,
        coords=coords,
        groups=groups,
        ranks=ranks,
        virtual_pipeline_rank=0 if vpp else None,
        ep=ep,
        etp=etp,
        edp=edp,
        expert_coords=dict(zip(EXPERT_GRID_AXES, expert_where)),
    )
    return _STATE


def destroy_model_parallel() -> None:
    """Forget every group (and destroy them) so that another layout can be initialized."""
    global _STATE
    if _STATE is None:
        return
    seen = set()
    for group in _STATE.groups.values():
        if id(group) in seen or group is None:
            continue
        seen.add(id(group))
        try:
            dist.destroy_process_group(group)
        except (ValueError, RuntimeError):
            pass  # already gone with the default group
    _STATE = None


def model_parallel_is_initialized() -> bool:
    return _STATE is not None


def get_parallel_state() -> ParallelState:
    """The current state; raises a clear error before `initialize_model_parallel`."""
    if _STATE is None:
        raise RuntimeError(
            "model parallel state is not initialized: call initialize_model_parallel"
        )
    return _STATE


def _group(kind: str):
    state = get_parallel_state()
    if kind not in state.groups:
        raise RuntimeError(f"rank {state.rank} belongs to no {kind} group (a middle stage?)")
    return state.groups[kind]


# --- tensor parallel ---------------------------------------------------------------------------
def get_tensor_model_parallel_group():
    return _group("tp")


def get_tensor_model_parallel_world_size() -> int:
    return get_parallel_state().tp


def get_tensor_model_parallel_rank() -> int:
    return get_parallel_state().coords["tp"]


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP-rank 0 in this rank's TP group."""
    return get_parallel_state().ranks["tp"][0]


# --- pipeline parallel -------------------------------------------------------------------------
def get_pipeline_model_parallel_group():
    return _group("pp")


def get_pipeline_model_parallel_world_size() -> int:
    return get_parallel_state().pp


def get_pipeline_model_parallel_rank() -> int:
    return get_parallel_state().coords["pp"]


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (wrapping around, as interleaved schedules need)."""
    s = get_parallel_state()
    return s.ranks["pp"][(s.coords["pp"] + 1) % s.pp]


def get_pipeline_model_parallel_prev_rank() -> int:
    s = get_parallel_state()
    return s.ranks["pp"][(s.coords["pp"] - 1) % s.pp]


def get_pipeline_model_parallel_first_rank() -> int:
    return get_parallel_state().ranks["pp"][0]


def get_pipeline_model_parallel_last_rank() -> int:
    return get_parallel_state().ranks["pp"][-1]


def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    return get_parallel_state().vpp


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    return get_parallel_state().virtual_pipeline_rank


def set_virtual_pipeline_model_parallel_rank(rank: Optional[int]) -> None:
    get_parallel_state().virtual_pipeline_rank = rank


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """First stage; with virtual stages, also the first model chunk unless `ignore_virtual`."""
    s = get_parallel_state()
    if not ignore_virtual and s.vpp and s.virtual_pipeline_rank != 0:
        return False
    return s.coords["pp"] == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """Last stage; with virtual stages, also the last model chunk unless `ignore_virtual`."""
    s = get_parallel_state()
    if not ignore_virtual and s.vpp and s.virtual_pipeline_rank != s.vpp - 1:
        return False
    return s.coords["pp"] == s.pp - 1


def get_embedding_group():
    """First + last pipeline stage of this pipeline (only meaningful on those stages)."""
    return _group("embedding")


def is_rank_in_embedding_group(ignore_virtual: bool = True) -> bool:
    s = get_parallel_state()
    if s.rank not in s.ranks.get("embedding", ()):  # middle stages hold no embedding group
        return False
    if ignore_virtual:
        return True
    return is_pipeline_first_stage() or is_pipeline_last_stage()


def get_position_embedding_group():
    return _group("position_embedding")


# --- data / context parallel -------------------------------------------------------------------
def get_data_parallel_group(with_context_parallel: bool = False):
    return _group("dp_cp" if with_context_parallel else "dp")


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    s = get_parallel_state()
    return s.dp * s.cp if with_context_parallel else s.dp


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    s = get_parallel_state()
    if with_context_parallel:
        return s.ranks["dp_cp"].index(s.rank)
    return s.coords["dp"]


def get_data_parallel_src_rank() -> int:
    return get_parallel_state().ranks["dp"][0]


def get_context_parallel_group():
    return _group("cp")


def get_context_parallel_world_size() -> int:
    return get_parallel_state().cp


def get_context_parallel_rank() -> int:
    return get_parallel_state().coords["cp"]


# --- model parallel (TP x PP: one replica) -----------------------------------------------------
def get_model_parallel_group():
    return _group("mp")


def get_model_parallel_world_size() -> int:
    s = get_parallel_state()
    return s.tp * s.pp


def get_model_parallel_rank() -> int:
    s = get_parallel_state()
    return s.ranks["mp"].index(s.rank)


# --- expert parallel (MoE) ---------------------------------------------------------------------
def get_expert_model_parallel_group():
    return _group("ep")


def get_expert_model_parallel_world_size() -> int:
    return get_parallel_state().ep


def get_expert_model_parallel_rank() -> int:
    return get_parallel_state().expert_coords["ep"]


def get_expert_tensor_parallel_group():
    return _group("etp")


def get_expert_tensor_parallel_world_size() -> int:
    return get_parallel_state().etp


def get_expert_tensor_parallel_rank() -> int:
    return get_parallel_state().expert_coords["etp"]


def get_expert_data_parallel_group():
    """Replicas of this rank's expert shards: expert gradients are averaged here."""
    return _group("edp")


def get_expert_data_parallel_world_size() -> int:
    return get_parallel_state().edp


def get_expert_data_parallel_rank() -> int:
    return get_parallel_state().expert_coords["edp"]


def get_expert_tensor_and_model_parallel_group():
    """ETP x EP of this stage (the all-gather token dispatcher's group)."""
    return _group("etp_ep")


def get_expert_model_parallel_full_group():
    """PP x EP x ETP: together these ranks hold every expert parameter exactly once."""
    return _group("emp")


def get_tensor_and_context_parallel_group():
    """TP x CP: the ranks that share one micro-batch's tokens."""
    return _group("tp_cp")


def get_tensor_context_and_data_parallel_group():
    """TP x CP x DP: every rank of this pipeline stage."""
    return _group("tp_cp_dp")
