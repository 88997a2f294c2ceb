"""Mixed-precision AdamW with fp32 main params, and its ZeRO-1/2 distributed form.

The optimizer works on *pieces*: for every DDP bucket, the part of each parameter that this rank
owns, as a flat fp32 "main" tensor whose gradient is a view of the DDP buffer:

- ZeRO 0 (`MixedPrecisionOptimizer`): a rank owns whole buckets, i.e. every parameter;
- ZeRO 1/2 (`DistributedOptimizer`): a rank owns shard ``dp_rank`` of every bucket (the range
  the DDP reduce-scatter leaves averaged on it), so fp32 main params and Adam moments exist for
  1/DP of the model per rank; after the step the updated shards are all-gathered per bucket.

For fp32 models the main piece *is* a view of the parameter (no extra copy); for bf16/fp16 it is
an fp32 clone, copied back (rounded) after each step.

``step()`` does: unscale (fp16) -> inf/nan check over every rank (skip + lower the scale) ->
global grad norm (each parameter counted once, see clip_grads; MoE expert parameters are summed
over their own groups, expert-DP under ZeRO then PP x EP x ETP) -> clip -> AdamW on the pieces
-> copy back / all-gather, and returns ``(updated, grad_norm, num_zeros)``.

Checkpoint format (``state_dict()``; tensors and plain Python only, so
``torch.load(weights_only=True)`` reads it). Under ZeRO 1/2 every DP rank saves its own file::

    {"format": "megalite-optimizer-v1", "zero_stage": int, "dp_rank": int, "dp_size": int,
     "pieces": [[chunk_index, param_name, start, end], ...],   # flat range of the param owned
     "main_params": [fp32 tensor or None, ...],  # None where the piece is the fp32 param itself
     "optimizer": torch AdamW state_dict over the pieces (state keyed by piece index),
     "grad_scaler": {"scale": ..., ...} or None}

Loading checks format, stage, DP size and the piece list, so a checkpoint taken at another
DP size or bucket layout is refused rather than misread. ``"state_index"`` (one int per piece)
names each piece's entry in ``"optimizer"["state"]``, so offline tools need not rebuild torch's
param-group order.

Layout-independent form (written by ``tools/checkpoint_reshard.py``, one file per TP/PP shard;
`load_state_dict` accepts it at any DP size and ZeRO stage, each rank slicing its own pieces)::

    {"format": "megalite-optimizer-params-v1",
     "params": {param_name: {"main": fp32 [shard shape], "exp_avg": fp32 [shard shape],
                             "exp_avg_sq": fp32 [shard shape], "step": fp32 scalar tensor}},
     "grad_scaler": {...} or None}

Hyperparameters (lr, betas, eps, weight decay) then come from this run's flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megalite.config import ConfigError, option
from megalite.data_parallel import clip_grads
from megalite.data_parallel.ddp import DistributedDataParallel, all_gather_flat, is_expert_param
from megalite.data_parallel.grad_scaler import (
    ConstantGradScaler,
    DynamicGradScaler,
    found_inf_anywhere,
)
from megalite.parallel_state import ModelParallelGroups

STATE_FORMAT = "megalite-optimizer-v1"
# Parameters that --decoupled-lr applies to (Megatron: the input embedding and the output layer).
DECOUPLED_LR_PARAMS = ("embedding.word_embeddings.", "output_layer.")
PARAMS_FORMAT = "megalite-optimizer-params-v1"  # per parameter, any DP / ZeRO stage


@dataclass
class OptimizerConfig:
    """AdamW, clipping, mixed precision and ZeRO settings; each field is the flag of its name."""

    lr: float = option(help="peak learning rate", required=True)
    min_lr: float = option(0.0, "learning-rate floor at the end of decay")
    decoupled_lr: Optional[float] = option(
        None, "separate peak lr for the input embedding and output layer"
    )
    decoupled_min_lr: Optional[float] = option(
        None, "lr floor for the input embedding and output layer (with --decoupled-lr)"
    )
    weight_decay: float = option(0.01, "decoupled weight decay; never on biases and norms")
    adam_beta1: float = option(0.9, "Adam first-moment decay")
    adam_beta2: float = option(0.999, "Adam second-moment decay")
    adam_eps: float = option(1.0e-8, "Adam denominator epsilon")
    clip_grad: float = option(1.0, "global grad-norm clip; 0 turns clipping off")
    zero_stage: Optional[int] = option(
        None, "megalite's own ZeRO (1: optimizer state, 2: + gradients)", choices=(0, 1, 2)
    )
    use_distributed_optimizer: bool = option(False, "shard the optimizer over DP (= ZeRO-1)")
    bf16: bool = option(False, "bf16 model; fp32 main params and grads in the optimizer")
    fp16: bool = option(False, "fp16 model with loss scaling")
    loss_scale: Optional[float] = option(None, "constant loss scale (fp16); default dynamic")
    initial_loss_scale: float = option(2.0**32, "starting dynamic loss scale (fp16)")
    min_loss_scale: float = option(1.0, "floor of the dynamic loss scale (fp16)")
    loss_scale_window: int = option(1000, "clean steps before the dynamic scale doubles")
    hysteresis: int = option(2, "overflowing steps tolerated before the scale halves")
    log_num_zeros_in_grad: bool = option(
        False, "count the zero gradient entries of each step; logged as num_zeros_in_grad"
    )

    def __post_init__(self):
        if self.use_distributed_optimizer:
            if self.zero_stage == 0:
                raise ConfigError("--use-distributed-optimizer conflicts with --zero-stage 0")
            self.zero_stage = self.zero_stage or 1
        self.zero_stage = self.zero_stage or 0
        if self.decoupled_min_lr is not None and self.decoupled_lr is None:
            raise ConfigError("--decoupled-min-lr needs --decoupled-lr")
        if self.lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} exceeds --lr {self.lr}")
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 are mutually exclusive")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"zero stage must be 0, 1 or 2, got {self.zero_stage}")
        if (self.lr or 0) < 0 or self.min_lr < 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ConfigError(
                f"lr, weight decay and clip grad must be >= 0, got {self.lr}, "
                f"{self.weight_decay}, {self.clip_grad}"
            )
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"adam eps must be > 0, got {self.adam_eps}")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise ConfigError(f"loss scale must be > 0, got {self.loss_scale}")
        if not 0 < self.min_loss_scale <= self.initial_loss_scale:
            raise ConfigError(
                f"need 0 < min loss scale ({self.min_loss_scale}) <= initial loss scale "
                f"({self.initial_loss_scale})"
            )
        if self.loss_scale_window < 1 or self.hysteresis < 1:
            raise ConfigError(
                f"loss scale window and hysteresis must be >= 1, got "
                f"{self.loss_scale_window}, {self.hysteresis}"
            )

    @property
    def params_dtype(self) -> torch.dtype:
        """The dtype the model's parameters should be built in."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and norm weights (any 1-D parameter) are not decayed, as in Megatron."""
    return name.endswith(".bias") or param.dim() == 1


def get_param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """Two param groups, decayed and not, over the trainable parameters of `modules`."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


class _Piece:
    """The range [start, end) of flattened `param` that this rank steps, and its fp32 copy."""

    def __init__(self, chunk: int, name: str, param, bucket, start: int, end: int, lo: int):
        self.chunk, self.name, self.param, self.bucket = chunk, name, param, bucket
        self.start, self.end = start, end  # in the flattened parameter
        self.lo = lo  # start in bucket coordinates
        flat = param.data.view(-1)[start:end]
        self.is_view = param.dtype == torch.float32
        self.main = flat if self.is_view else flat.detach().float().clone()

    def grad(self) -> torch.Tensor:
        b, n = self.bucket, self.end - self.start
        if b.zero_stage == 2:
            off = self.lo - b.shard[0]
            return b.grad_shard[off : off + n]
        return b.data[self.lo : self.lo + n]


class MixedPrecisionOptimizer:
    """AdamW over fp32 main pieces of DDP-wrapped `model_chunks` (ZeRO 0: every piece)."""

    sharded = False

    def __init__(
        self,
        config: OptimizerConfig,
        model_chunks: list[DistributedDataParallel],
        groups: Optional[ModelParallelGroups] = None,
    ):
        for c in model_chunks:
            if not isinstance(c, DistributedDataParallel):
                raise TypeError(
                    f"the optimizer needs model chunks wrapped in megalite's "
                    f"DistributedDataParallel (for main_grad buffers), got {type(c).__name__}"
                )
            if (c.zero_stage > 0) != self.sharded or c.zero_stage != config.zero_stage:
                raise ValueError(
                    f"DDP was built with zero_stage={c.zero_stage} but the optimizer config "
                    f"says zero_stage={config.zero_stage}"
                )
        self.config = config
        self.chunks = model_chunks
        self.dp_group = model_chunks[0].data_parallel_group if model_chunks else None
        self.dp_size = model_chunks[0].dp_size if model_chunks else 1
        self.dp_rank = model_chunks[0].dp_rank if model_chunks else 0
        self._init_parallel_groups(groups or ModelParallelGroups())
        self.pieces = self._build_pieces()
        # Collective: every rank must agree whether an expert norm is taken (a ZeRO rank may own
        # no expert piece), so ask the modules, not the pieces.
        self.has_experts = _any_rank(
            any(is_expert_param(p) for c in model_chunks for p in c.module.parameters())
        )
        wd = {
            id(p): g["weight_decay"]
            for g in get_param_groups([c.module for c in model_chunks], config.weight_decay)
            for p in g["params"]
        }
        # --decoupled-lr: the embedding and output layer get groups of their own, so the trainer
        # can give them their own schedule (without it the groups are as before: old optimizer
        # checkpoints keep their order).
        decoupled = set()
        if config.decoupled_lr is not None:
            for c in model_chunks:
                for name, p in c.module.named_parameters():
                    if name.startswith(DECOUPLED_LR_PARAMS):
                        decoupled.add(id(p))
        groups: dict[tuple[float, bool], list[torch.Tensor]] = {}
        for piece in self.pieces:
            key = (wd[id(piece.param)], id(piece.param) in decoupled)
            groups.setdefault(key, []).append(piece.main)
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "weight_decay": w, "decoupled_lr": d} for (w, d), ps in groups.items()],
            lr=config.lr or 0.0,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
        )
        self.grad_scaler: Optional[ConstantGradScaler] = None
        if config.fp16:
            self.grad_scaler = (
                ConstantGradScaler(config.loss_scale)
                if config.loss_scale is not None
                else DynamicGradScaler(
                    initial_scale=config.initial_loss_scale,
                    min_scale=config.min_loss_scale,
                    growth_interval=config.loss_scale_window,
                    hysteresis=config.hysteresis,
                )
            )

    def _init_parallel_groups(self, mp: ModelParallelGroups) -> None:
        """What the norm and inf checks need, from the groups handed in."""
        self.tp_rank, self.is_first_stage = mp.tp_rank, mp.is_first_stage
        mp_group, mp_size = mp.model_parallel_group, mp.model_parallel_size
        groups = [self.dp_group] if self.sharded and self.dp_size > 1 else []
        if mp_size > 1:
            groups.append(mp_group)
        self.norm_groups = groups
        # Expert shards: one copy of each over PP x EP x ETP, sharded over expert-DP under ZeRO.
        self.expert_norm_groups = []
        edp = self.chunks[0].expert_data_parallel_group if self.chunks else None
        if self.sharded and edp is not None and dist.get_world_size(edp) > 1:
            self.expert_norm_groups.append(edp)
        emp = mp.expert_model_parallel_group
        if emp is not None and dist.get_world_size(emp) > 1:
            self.expert_norm_groups.append(emp)
        # inf/nan anywhere must skip the step everywhere: every DP replica, every TP/PP rank.
        self.inf_group = dist.group.WORLD if dist.is_initialized() else None

    def _owned_range(self, bucket) -> tuple[int, int]:
        return (0, bucket.numel)

    def _build_pieces(self) -> list[_Piece]:
        pieces = []
        for ci, chunk in enumerate(self.chunks):
            names = {id(p): n for n, p in chunk.module.named_parameters()}
            for bucket in chunk.buckets:
                s0, s1 = self._owned_range(bucket)
                for p in bucket.params:
                    a, b = bucket.ranges[p]
                    lo, hi = max(a, s0), min(b, s1)
                    if lo < hi:
                        pieces.append(_Piece(ci, names[id(p)], p, bucket, lo - a, hi - a, lo))
        return pieces

    # -- what the trainer calls ---------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        """The AdamW param groups: the LR scheduler writes ``group["lr"]`` here."""
        return self.optimizer.param_groups

    def get_loss_scale(self) -> float:
        return self.grad_scaler.scale if self.grad_scaler else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The schedules' ``grad_scale_func``: multiply the loss by the current loss scale."""
        return loss * self.get_loss_scale() if self.grad_scaler else loss

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()

    def _grads_for_norm(
        self, grads: list[torch.Tensor], expert: bool = False
    ) -> list[torch.Tensor]:
        return [
            g
            for piece, g in zip(self.pieces, grads)
            if is_expert_param(piece.param) == expert
            and clip_grads.counts_in_norm(piece.param, self.tp_rank, self.is_first_stage)
        ]

    def _grad_norm(self, grads: list[torch.Tensor]) -> float:
        """Dense and expert parts, each summed over the groups holding it once, combined."""
        norm = clip_grads.global_grad_norm(self._grads_for_norm(grads), self.norm_groups)
        if not self.has_experts:
            return norm
        expert = clip_grads.global_grad_norm(
            self._grads_for_norm(grads, expert=True), self.expert_norm_groups
        )
        return (norm**2 + expert**2) ** 0.5

    @torch.no_grad()
    def step(self) -> tuple[bool, Optional[float], Optional[int]]:
        """One update from the reduced grads: ``(updated, grad_norm, num_zeros)``.

        ``updated`` is False when fp16 found an inf/nan anywhere (nothing changes but the loss
        scale; grad_norm and num_zeros are then None).
        """
        grads = [piece.grad() for piece in self.pieces]
        if self.grad_scaler is not None:
            inv = self.grad_scaler.inv_scale
            for g in grads:
                g.mul_(inv)
            found_inf = found_inf_anywhere(grads, self.inf_group)
            self.grad_scaler.update(found_inf)
            if found_inf:
                return False, None, None
        grad_norm = self._grad_norm(grads)
        if self.config.clip_grad > 0:
            clip_grads.clip_grads_by_norm_(grads, self.config.clip_grad, grad_norm)
        num_zeros = None
        if self.config.log_num_zeros_in_grad:
            num_zeros = clip_grads.count_zeros(self._grads_for_norm(grads), self.norm_groups)
            if self.has_experts:
                expert = self._grads_for_norm(grads, expert=True)
                num_zeros += clip_grads.count_zeros(expert, self.expert_norm_groups)
        for piece, g in zip(self.pieces, grads):
            piece.main.grad = g
        self.optimizer.step()
        for piece in self.pieces:
            piece.main.grad = None
            if not piece.is_view:
                piece.param.data.view(-1)[piece.start : piece.end].copy_(piece.main)
        self._gather_params()
        return True, grad_norm, num_zeros

    def _gather_params(self) -> None:
        """Every rank stepped every parameter: nothing to gather."""

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "zero_stage": self.config.zero_stage,
            "dp_rank": self.dp_rank if self.sharded else 0,
            "dp_size": self.dp_size if self.sharded else 1,
            "pieces": [[p.chunk, p.name, p.start, p.end] for p in self.pieces],
            "main_params": [None if p.is_view else p.main.clone() for p in self.pieces],
            "optimizer": self.optimizer.state_dict(),
            "state_index": self._state_index(),
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler else None,
        }

    def _state_index(self) -> list[int]:
        """Each piece's key in torch's optimizer state_dict (params numbered group by group)."""
        order = [p for g in self.optimizer.param_groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(order)}
        return [index[id(piece.main)] for piece in self.pieces]

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") == PARAMS_FORMAT:
            self._load_per_parameter(state)
            return
        mine = self.state_dict()
        for key in ("format", "zero_stage", "dp_rank", "dp_size", "pieces"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"optimizer checkpoint does not match this run: {key} is "
                    f"{_short(state.get(key))} in the checkpoint, {_short(mine[key])} here"
                )
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for piece, main in zip(self.pieces, state["main_params"]):
                if main is not None and not piece.is_view:
                    piece.main.copy_(main)
        if self.grad_scaler is not None and state["grad_scaler"] is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])

    def _load_per_parameter(self, state: dict) -> None:
        """Load the layout-independent form: each piece is sliced out of its whole parameter.

        Torch's AdamW state is rebuilt piece by piece and loaded through
        ``optimizer.load_state_dict`` (which casts and places it), keeping this run's
        hyperparameters.
        """
        params = state["params"]
        missing = sorted({p.name for p in self.pieces} - set(params))
        if missing:
            raise ValueError(
                f"optimizer checkpoint has no state for {len(missing)} parameter(s) of this "
                f"model, e.g. {missing[0]!r}"
            )
        torch_state = {}
        with torch.no_grad():
            for piece, index in zip(self.pieces, self._state_index()):
                entry = params[piece.name]
                if entry["main"].numel() != piece.param.numel():
                    raise ValueError(
                        f"optimizer checkpoint: {piece.name} has {entry['main'].numel()} "
                        f"elements, the model's shard has {piece.param.numel()}"
                    )
                cut = slice(piece.start, piece.end)
                piece.main.copy_(entry["main"].reshape(-1)[cut])
                if not piece.is_view:  # the model weight follows its fp32 main copy
                    piece.param.data.view(-1)[cut].copy_(piece.main)
                torch_state[index] = {
                    "step": entry["step"].detach().clone().float().reshape(()),
                    "exp_avg": entry["exp_avg"].reshape(-1)[cut].clone(),
                    "exp_avg_sq": entry["exp_avg_sq"].reshape(-1)[cut].clone(),
                }
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": torch_state, "param_groups": groups})
        if self.grad_scaler is not None and state.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])


def _any_rank(flag: bool) -> bool:
    """`flag` OR-ed over every rank (a pipeline stage without MoE layers still joins the expert
    norm's collectives)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)], device=clip_grads.comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."


class DistributedOptimizer(MixedPrecisionOptimizer):
    """ZeRO 1/2: this rank steps only its DP shard of every bucket, then params are gathered."""

    sharded = True

    def _owned_range(self, bucket) -> tuple[int, int]:
        return bucket.shard

    def _gather_params(self) -> None:
        for chunk in self.chunks:
            for bucket in chunk.buckets:
                dtypes = {p.dtype for p in bucket.params}
                # Gather in the model's dtype (bf16 halves the traffic); fp32 if a bucket mixes.
                dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
                full = torch.zeros(bucket.numel, dtype=dtype, device=bucket.data.device)
                s0, s1 = bucket.shard
                for p in bucket.params:
                    a, b = bucket.ranges[p]
                    lo, hi = max(a, s0), min(b, s1)
                    if lo < hi:
                        full[lo:hi].copy_(p.data.view(-1)[lo - a : hi - a])
                if bucket.dp_size > 1:  # DP, or expert-DP for expert buckets
                    mine = full[s0:s1].clone()
                    all_gather_flat(full, mine, group=bucket.group)
                for p in bucket.params:
                    a, b = bucket.ranges[p]
                    p.data.view(-1).copy_(full[a:b])


def build_optimizer(
    config: OptimizerConfig,
    model_chunks: list[DistributedDataParallel],
    groups: Optional[ModelParallelGroups] = None,
) -> MixedPrecisionOptimizer:
    """The optimizer the trainer uses: `DistributedOptimizer` for ZeRO 1/2, else replicated.

    `groups`: the model split (`parallel_state.get_model_parallel_groups()`); default unsplit.
    """
    cls = DistributedOptimizer if config.zero_stage > 0 else MixedPrecisionOptimizer
    return cls(config, model_chunks, groups)
