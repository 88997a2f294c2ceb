"""What the planner is asked about: a parallel layout and the run settings memory depends on.

`Layout` is the planner's own small record (short names: it is not a flag dataclass; the CLI
reads the training flags and converts them in `megalite.planner.cli.settings_from_run_config`).
Context parallelism (`cp`, `cp_comm_type`) splits each sequence; expert parallelism (`ep`,
`etp`) refolds each pipeline stage's TP x CP x DP block as ETP x EP x expert-DP for the MoE
layers, as `megalite.parallel_state.validate_expert_layout` does. The MoE settings themselves
(`megalite.moe.MoEConfig`) are part of the model, passed next to the `GPTConfig`; `apply_moe`
gives them this layout's EP / ETP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from megalite.model.config import GPTConfig

DEFAULT_BUCKET_SIZE = 40_000_000  # elements, megalite's DDP default (data_parallel/ddp.py)


@dataclass(frozen=True)
class Layout:
    """One way to split a run over GPUs: world = tp x cp x dp x pp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int = 1
    """Model chunks per pipeline stage (interleaved 1F1B when > 1)."""
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    num_microbatches: int = 1
    zero_stage: int = 0
    """megalite's own ZeRO (0, 1, 2) over its DDP buckets."""
    deepspeed_stage: Optional[int] = None
    """DeepSpeed ZeRO stage 1/2/3 instead of megalite's DDP + optimizer (model states only)."""
    recompute: str = "none"
    cp: int = 1
    """Context-parallel size: ranks each sequence is split across."""
    cp_comm_type: str = "p2p"
    """CP attention: "p2p" (ring) or "a2a" (all-to-all, Ulysses)."""
    ep: int = 1
    """Expert-model-parallel size (MoE): ranks the experts are split across."""
    etp: Optional[int] = None
    """Expert-tensor-parallel size (None: TP, as Megatron)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "vp", "micro_batch_size", "num_microbatches", "cp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"layout: {name} must be an integer >= 1, got {value!r}")
        if self.etp is not None and (not isinstance(self.etp, int) or self.etp < 1):
            raise ValueError(f"layout: etp must be an integer >= 1, got {self.etp!r}")
        if self.cp_comm_type not in ("p2p", "a2a"):
            raise ValueError(f"layout: cp_comm_type must be p2p or a2a, got {self.cp_comm_type!r}")
        block = self.tp * self.cp * self.dp
        if block % (self.ep * self.expert_tp) != 0:
            raise ValueError(
                f"layout: ep ({self.ep}) x etp ({self.expert_tp}) does not divide a pipeline "
                f"stage's tp ({self.tp}) x cp ({self.cp}) x dp ({self.dp}) = {block} ranks"
            )
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"layout: zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.deepspeed_stage not in (None, 1, 2, 3):
            raise ValueError(
                f"layout: deepspeed_stage must be 1, 2 or 3, got {self.deepspeed_stage}"
            )
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"layout: recompute must be none/selective/full, got {self.recompute}")
        if self.vp > 1 and self.pp < 2:
            raise ValueError(f"layout: {self.vp} model chunks per stage need pp > 1")
        if self.vp > 1 and self.num_microbatches % self.pp != 0:
            raise ValueError(
                f"layout: the interleaved schedule needs num_microbatches "
                f"({self.num_microbatches}) to be a multiple of pp ({self.pp})"
            )

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def grad_dp(self) -> int:
        """Ranks dense gradients are reduced (and ZeRO-sharded) over: DP x CP."""
        return self.dp * self.cp

    @property
    def expert_dp(self) -> int:
        """Ranks expert gradients are reduced (and ZeRO-sharded) over."""
        return self.tp * self.cp * self.dp // (self.ep * self.expert_tp)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp

    def describe(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}", f"DP{self.dp}"]
        if self.cp > 1:
            parts.insert(1, f"CP{self.cp}" + ("a2a" if self.cp_comm_type == "a2a" else ""))
        if self.vp > 1:
            parts.append(f"VP{self.vp}")
        if self.ep > 1 or self.etp is not None:
            parts.append(f"EP{self.ep}" + (f"ETP{self.etp}" if self.etp is not None else ""))
        text = "x".join(parts)
        text += f" mbs{self.micro_batch_size} m{self.num_microbatches}"
        text += " sp" if self.sequence_parallel else ""
        if self.deepspeed_stage:
            text += f" ds{self.deepspeed_stage}"
        else:
            text += f" zero{self.zero_stage}"
        return text + ("" if self.recompute == "none" else f" rc-{self.recompute}")


@dataclass(frozen=True)
class Runtime:
    """Settings of the run that change bytes but not the layout."""

    params_dtype: torch.dtype = torch.bfloat16
    device_kind: str = "cuda"
    """"cuda": flash attention, foreach AdamW, bool dropout masks; "cpu": torch's CPU kernels
    (math attention when attention dropout is on, single-tensor AdamW, dtype dropout masks)."""
    bucket_size: int = DEFAULT_BUCKET_SIZE
    overlap_grad_reduce: bool = False

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.params_dtype).element_size()


def apply_layout(config: GPTConfig, layout: Layout, runtime: Runtime) -> GPTConfig:
    """The model config split as `layout` says (raises the model's own divisibility errors)."""
    per_stage = config.num_layers // layout.pp if config.num_layers % layout.pp == 0 else None
    vpl = None
    if layout.vp > 1:
        if per_stage is None or per_stage % layout.vp != 0:
            raise ValueError(
                f"num_layers ({config.num_layers}) is not divisible by pp ({layout.pp}) x "
                f"model chunks ({layout.vp})"
            )
        vpl = per_stage // layout.vp
    return dataclasses.replace(
        config,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        num_layers_per_virtual_pipeline_stage=vpl,
        sequence_parallel=layout.sequence_parallel and layout.tp > 1,
        recompute_granularity=layout.recompute,
        params_dtype=runtime.params_dtype,
        context_parallel_size=layout.cp,
        cp_comm_type=layout.cp_comm_type,
    )


def apply_moe(moe, layout: Layout):
    """The MoE settings with this layout's EP / ETP (None for a dense model); raises ValueError
    naming the numbers when the experts do not split."""
    if moe is None or not moe.enabled:
        if layout.ep != 1 or layout.etp is not None:
            raise ValueError(f"layout: ep={layout.ep} / etp={layout.etp} need an MoE model")
        return None
    if moe.num_experts % layout.ep != 0:
        raise ValueError(
            f"num_experts ({moe.num_experts}) is not divisible by expert-model-parallel size "
            f"({layout.ep})"
        )
    f = moe.moe_ffn_hidden_size
    if f is not None and f % layout.expert_tp != 0:
        raise ValueError(
            f"moe_ffn_hidden_size ({f}) is not divisible by expert-tensor-parallel size "
            f"({layout.expert_tp})"
        )
    return dataclasses.replace(
        moe, expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp
    )


def moe_key(moe) -> tuple:
    """A hashable key of the MoE settings (MoEConfig is a mutable dataclass)."""
    if moe is None:
        return ()
    return tuple(getattr(moe, f.name) for f in dataclasses.fields(moe))
