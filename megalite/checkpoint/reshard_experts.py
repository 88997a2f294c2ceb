"""MoE experts in checkpoints: where each expert shard lives, and how the shards join and split.

An MoE layer's experts are stacked tensors (`megalite.moe.experts`): ``...mlp.experts.
linear_fc1.weight [E/ep, F1/etp, h]`` and ``linear_fc2.weight [E/ep, h, F/etp]``, where rank
(ep, etp) holds experts ``[ep * E/ep, (ep + 1) * E/ep)`` and its ETP slice of the inner dim
(fc1's ``[gate; up]`` with stride 2 under SwiGLU). The full tensor is ``[E, F1, h]`` /
``[E, h, F]``: EP splits dim 0, ETP dim 1 (fc1) or 2 (fc2).

Which rank holds which shard: in each pipeline stage the block of TP x CP x DP ranks is refolded
as expert-DP x EP x ETP (`megalite.parallel_state.expert_rank_grid`), so block rank
``j = tp_rank + tp * ckpt_dp`` (``ckpt_dp``: the DP rank counting CP, the checkpoint's DP index)
holds ``(ep, etp) = ((j // etp) % ep, j % etp)``.

Files of one (TP, PP) shard folder ``mp_rank_TT_PPP``:

- ``model.pt`` (DP rank 0, ``j = tp_rank``): every parameter, experts of its (ep, etp);
- ``experts_dpDDD.pt`` (trainer, when DP ranks hold different experts): DP rank DDD's experts;
- ``experts_epEEE_etpXXX.pt`` and ``optim_params_epEEE_etpXXX.pt`` (written by the reshard
  tool, which cannot know the DP size the checkpoint will be resumed at): the experts of
  (ep, etp) and their per-parameter optimizer state, for every (ep, etp) a rank of this TP rank
  can hold at any DP size. A rank loads the pair of its own expert coordinates
  (`megalite.checkpoint.format.load_shard_files`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megalite.checkpoint import format as ckpt
from megalite.checkpoint import layout as L
from megalite.checkpoint.streaming import read_lazy

MOMENTS = ("main", "exp_avg", "exp_avg_sq")
# Persistent buffers saved with the model that have no optimizer state.
BUFFER_SUFFIXES = (".expert_bias",)


class ExpertReshardError(ckpt.CheckpointError):
    """An MoE checkpoint's experts cannot be read or placed as asked."""


def is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def is_buffer(name: str) -> bool:
    return name.endswith(BUFFER_SUFFIXES)


def moe_settings(meta: dict):
    """The `MoEConfig` a checkpoint was trained with (None for a dense model)."""
    from megalite.moe.config import MoEConfig

    settings = meta.get("settings", {})
    fields = {f.name for f in dataclasses.fields(MoEConfig)}
    moe = MoEConfig(**{k: v for k, v in settings.items() if k in fields})
    return moe if moe.enabled else None


@dataclass(frozen=True)
class ExpertLayout:
    """How the experts of a model are split: E experts over EP x ETP, at dense TP `tp`."""

    num_experts: int
    ep: int
    etp: int
    tp: int
    swiglu: bool

    @classmethod
    def of_meta(cls, meta: dict) -> Optional[ExpertLayout]:
        saved = meta.get("expert_layout")
        if not saved:
            return None
        return cls(
            saved["num_experts"], saved["expert_model_parallel_size"],
            saved["expert_tensor_parallel_size"], meta["model"]["tensor_model_parallel_size"],
            bool(meta["model"].get("swiglu")),
        )  # fmt: skip

    def to_meta(self) -> dict:
        return {"num_experts": self.num_experts, "expert_model_parallel_size": self.ep,
                "expert_tensor_parallel_size": self.etp}  # fmt: skip

    @property
    def split_over_dp(self) -> bool:
        """DP ranks of one (TP, PP) shard hold different experts (as the trainer decides)."""
        return self.ep > 1 or self.etp not in (1, self.tp)

    def coords(self, block_rank: int) -> tuple[int, int]:
        """(ep, etp) of block rank ``j = tp_rank + tp * ckpt_dp``."""
        return (block_rank // self.etp) % self.ep, block_rank % self.etp

    def reachable(self, tp_rank: int) -> list[tuple[int, int]]:
        """Every (ep, etp) a rank of TP rank `tp_rank` holds at some DP size."""
        period = self.ep * self.etp
        return sorted({self.coords(tp_rank + self.tp * d) for d in range(period)})

    def rule(self, name: str) -> L.Split:
        """The ETP split of an expert tensor (dims of the stacked ``[E, ...]`` tensor)."""
        if name.endswith(".linear_fc1.weight"):
            return L.Split(1, 2 if self.swiglu else 1)
        return L.Split(2)

    def local_shape(self, name: str, full: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(full)
        shape[0] //= self.ep
        shape[self.rule(name).dim] //= self.etp
        return tuple(shape)

    def full_shape(self, name: str, local: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(local)
        shape[0] *= self.ep
        shape[self.rule(name).dim] *= self.etp
        return tuple(shape)

    def split(self, name: str, full: torch.Tensor, ep: int, etp: int) -> torch.Tensor:
        per = full.shape[0] // self.ep
        return L.split_full(full[ep * per : (ep + 1) * per], self.rule(name), self.etp, etp)

    def merge(self, name: str, shards: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        rule = self.rule(name)
        return torch.cat(
            [L.merge_shards([shards[(e, x)] for x in range(self.etp)], rule)
             for e in range(self.ep)], dim=0,
        )  # fmt: skip

    def check(self, moe, model) -> None:
        """Refuse a target split the experts cannot take, naming the numbers."""
        ffn = moe.moe_ffn_hidden_size or model.ffn_hidden_size
        if self.num_experts % self.ep != 0:
            raise ExpertReshardError(
                f"--num-experts ({self.num_experts}) is not divisible by the target "
                f"expert-model-parallel size ({self.ep})"
            )
        if ffn % self.etp != 0:
            raise ExpertReshardError(
                f"--moe-ffn-hidden-size ({ffn}) is not divisible by the target "
                f"expert-tensor-parallel size ({self.etp})"
            )


def rank_file(kind: str, ep: int, etp: int) -> str:
    """``experts_ep000_etp001.pt`` (kind "experts") or ``optim_params_ep000_etp001.pt``."""
    return f"{kind}_ep{ep:03d}_etp{etp:03d}.pt"


def _flat(tree: dict) -> dict[str, torch.Tensor]:
    return {n: t for chunk in tree.values() for n, t in chunk.items()}


def read_experts(
    folder: Path, layout: ExpertLayout, pp: int, names: list[str], optim: Optional[str]
) -> dict[str, dict[str, Any]]:
    """Full expert tensors of `names` (all on stage `pp`) of checkpoint `folder`:
    {name: {"weight"[, "main", "exp_avg", "exp_avg_sq", "step"]}} (optimizer state when
    `optim` is "params" or "v1", the source's optimizer format)."""
    weights: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    states: dict[tuple[int, int], dict[str, dict]] = {}
    v1: dict[tuple[int, int], list] = {}  # (ep, etp) -> [(optimizer file, that rank's weights)]
    for t in range(layout.tp):
        shard = ckpt.shard_dir(folder, t, pp)
        model = read_lazy(shard / "model.pt")
        every = _flat(model)
        found = [(layout.coords(t), every, shard / ckpt.PARAMS_OPTIM_FILE, None)]
        ranks = {int(p.stem.rsplit("dp", 1)[1]) for p in shard.glob("optim_dp*.pt")}
        ranks |= {int(p.stem.rsplit("dp", 1)[1]) for p in shard.glob("experts_dp*.pt")}
        for d in sorted(ranks):  # trainer-saved: DP rank d's experts and optimizer file
            path = shard / f"experts_dp{d:03d}.pt"
            if path.exists():
                tensors = {**every, **_flat(read_lazy(path))}
            elif layout.split_over_dp and d > 0:
                continue  # its experts file is missing: reported below if nothing else has them
            else:  # experts the same on every DP rank: model.pt's
                tensors = every
            found.append((layout.coords(t + layout.tp * d), tensors, None,
                          shard / f"optim_dp{d:03d}.pt"))  # fmt: skip
        for e, x in layout.reachable(t):
            path = shard / rank_file("experts", e, x)
            if path.exists():
                found.append(((e, x), {**every, **_flat(read_lazy(path))},
                              shard / rank_file("optim_params", e, x), None))  # fmt: skip
        for coords, tensors, params_file, v1_file in found:
            if coords not in weights:
                weights[coords] = {n: tensors[n] for n in names}
            if optim == "params" and params_file is not None and coords not in states:
                if params_file.exists():
                    params = read_lazy(params_file)["params"]
                    states[coords] = {n: params[n] for n in names}
            if optim == "v1" and v1_file is not None and v1_file.exists():
                v1.setdefault(coords, []).append((v1_file, tensors))
    wanted = [(e, x) for e in range(layout.ep) for x in range(layout.etp)]
    missing = [c for c in wanted if c not in weights or (optim == "params" and c not in states)]
    if missing:
        raise ExpertReshardError(
            f"{folder}: no file holds the experts (or their optimizer state) of expert-parallel "
            f"rank, expert-tensor-parallel rank {missing} on pipeline stage {pp} (a DP rank's "
            "experts or optimizer file is missing?)"
        )
    if optim == "v1":
        for coords in wanted:
            states[coords] = _regather_v1(v1.get(coords, []), weights[coords], folder, coords)
    out = {}
    for n in names:
        full = {"weight": layout.merge(n, {c: weights[c][n] for c in wanted})}
        if optim is not None:
            for k in MOMENTS:
                full[k] = layout.merge(n, {c: states[c][n][k] for c in wanted})
            full["step"] = states[wanted[0]][n]["step"].clone()
        out[n] = full
    return out


def _regather_v1(files: list, weights: dict[str, torch.Tensor], folder: Path, coords) -> dict:
    """One (ep, etp)'s expert optimizer state from the ZeRO pieces of its expert-DP ranks'
    files (the same state repeated in several files without ZeRO: any copy will do)."""
    from megalite.checkpoint.reshard import gather_zero_pieces

    flat, steps, covered = gather_zero_pieces(files, weights)
    out = {}
    for name, w in weights.items():
        if not bool(covered[name].all()):
            raise ExpertReshardError(
                f"{folder}: the optimizer files {sorted({p.name for p, _ in files})} cover "
                f"{int(covered[name].sum())} of {w.numel()} elements of {name} at (ep, etp) "
                f"{coords} (a DP rank's file is missing?)"
            )
        out[name] = {k: flat[name][k].view(w.shape) for k in MOMENTS}
        out[name]["step"] = steps[name]
    return out


def plan_experts(meta: dict, dst, ep: Optional[int], etp: Optional[int]) -> Optional[ExpertLayout]:
    """The target's expert split (None for a dense model). `ep` None keeps the source's EP;
    `etp` None follows the target TP where the source's ETP was its TP (Megatron's default),
    else keeps the source's ETP. Refuses a split the experts cannot take."""
    src = ExpertLayout.of_meta(meta)
    if src is None:
        if (ep or 1) != 1 or (etp or 1) != 1:
            raise ExpertReshardError(
                f"the checkpoint is a dense model (no experts): expert-model-parallel size {ep} "
                f"and expert-tensor-parallel size {etp} do not apply"
            )
        return None
    tp = dst.tensor_model_parallel_size
    ep = src.ep if ep is None else ep
    if etp is None:
        etp = tp if src.etp == src.tp else src.etp
    for name, value in (("expert-model-parallel", ep), ("expert-tensor-parallel", etp)):
        if not isinstance(value, int) or value < 1:
            raise ExpertReshardError(f"target {name} size must be an integer >= 1, got {value!r}")
    out = ExpertLayout(src.num_experts, ep, etp, tp, dst.activation == "swiglu")
    out.check(moe_settings(meta), dst)
    return out
