"""Offline resharding of a megalite checkpoint to another TP / PP / virtual-pipeline layout
(and, for MoE, another expert split EP x ETP: `megalite.checkpoint.reshard_experts`).

``reshard(load, save, tp, pp, layers_per_virtual)`` reads the newest checkpoint of `load` and
writes the same iteration to `save` at the target layout, on CPU, one *unit* at a time (the
embedding, each transformer layer, the final norm + output layer):

1. every source shard of the unit is read lazily (``mmap``), the TP shards joined into full
   tensors (weights, and from the optimizer the fp32 main params and both Adam moments, the ZeRO
   pieces of every DP rank put back together), the vocabulary re-padded for the target TP;
2. the full tensors are cut for the target TP ranks and written into skeleton files in place
   (`megalite.checkpoint.streaming`), so memory holds about one layer, not the model.

The target's optimizer state is the layout-independent per-parameter form
(``optim_params.pt``, `megalite.data_parallel.optimizer.PARAMS_FORMAT`): the trainer's optimizer
slices its own pieces out of it at whatever DP size and ZeRO stage it runs. RNG files are not
carried over (they belong to ranks that no longer exist); a resumed run reseeds as a fresh one
does, which changes nothing with dropout off.

Everything is written under ``iter_N.tmp`` and renamed, then the tracker is replaced, as the
trainer saves: a crash leaves `save` as it was. A target layout that cannot hold the model is
refused before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from megalite.checkpoint import format as ckpt
from megalite.checkpoint import layout as L
from megalite.checkpoint import reshard_experts as X
from megalite.checkpoint.streaming import (
    empty_like_shape,
    filling,
    fsync_file,
    read_lazy,
    write_skeleton,
)
from megalite.data_parallel.optimizer import PARAMS_FORMAT, no_weight_decay
from megalite.model import GPTConfig

MOMENTS = ("main", "exp_avg", "exp_avg_sq")


class ReshardError(ckpt.CheckpointError):
    """The checkpoint cannot be resharded as asked; nothing was written."""


# --- reading the source ------------------------------------------------------------------------
class Source:
    """Lazy access to one checkpoint folder: its model shards and optimizer state per name."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta
        self.config = L.config_from_meta(meta)
        self.tp = self.config.tensor_model_parallel_size
        self.pp = self.config.pipeline_model_parallel_size
        self.experts = X.ExpertLayout.of_meta(meta)  # None: a dense model
        shard0 = ckpt.shard_dir(folder, 0, 0)
        if (shard0 / ckpt.PARAMS_OPTIM_FILE).exists():
            self.optim = "params"
        elif any(shard0.glob("optim_dp*.pt")):
            self.optim = "v1"
        else:
            self.optim = None  # weights only (e.g. imported from Hugging Face)

    def shard(self, tp: int, pp: int) -> Path:
        return ckpt.shard_dir(self.folder, tp, pp)

    def model_names(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every parameter of the model (global name) -> (full shape, dtype), structure only."""
        out = {}
        for pp in range(self.pp):
            model = read_lazy(self.shard(0, pp) / "model.pt")
            for chunk in model.values():
                for name, t in chunk.items():
                    if X.is_expert(name):
                        out[name] = (self.experts.full_shape(name, tuple(t.shape)), t.dtype)
                        continue
                    rule = L.split_rule(name, self.config.activation == "swiglu")
                    shape = list(t.shape)
                    if rule.dim is not None:
                        shape[rule.dim] *= self.tp
                    out[name] = (tuple(shape), t.dtype)
            del model
        return out

    def unit_weights(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(unit, {name: full weight}) for the embedding, each layer and the final unit in turn,
        one unit in memory at a time (a tied output-layer copy is skipped)."""
        tied = not self.config.untie_embeddings_and_output_weights
        for unit, unit_names in _units(list(self.model_names())):
            read = [n for n in unit_names if not (tied and n == L.OUTPUT_LAYER)]
            if read:
                stage = L.place(self.config, read[0])[0]
                full = self.read(stage, read, optim=False)
                yield unit, {n: v["weight"] for n, v in full.items()}

    def grad_scaler(self) -> Optional[dict]:
        if self.optim is None:
            return None
        shard = self.shard(0, 0)
        name = ckpt.PARAMS_OPTIM_FILE if self.optim == "params" else "optim_dp000.pt"
        return read_lazy(shard / name).get("grad_scaler")

    def read(self, pp: int, names: list[str], optim: bool = True) -> dict[str, dict[str, Any]]:
        """Full tensors of `names` (all on stage `pp`): {"weight", and "main", "exp_avg",
        "exp_avg_sq", "step" when the checkpoint has optimizer state and `optim`; buffers such as
        the router's expert bias have no optimizer state}."""
        swiglu = self.config.activation == "swiglu"
        expert_names = [n for n in names if X.is_expert(n)]
        out = {}
        if expert_names:
            out = X.read_experts(
                self.folder, self.experts, pp, expert_names, self.optim if optim else None
            )
            names = [n for n in names if not X.is_expert(n)]
        stateful = [n for n in names if not X.is_buffer(n)]
        per_rank: list[dict[str, dict[str, Any]]] = []
        for tp in range(self.tp):
            model = read_lazy(self.shard(tp, pp) / "model.pt")
            weights = {n: t for chunk in model.values() for n, t in chunk.items() if n in names}
            entry = {n: {"weight": weights[n]} for n in names}
            if optim and self.optim == "params":
                params = read_lazy(self.shard(tp, pp) / ckpt.PARAMS_OPTIM_FILE)["params"]
                for n in stateful:
                    entry[n].update({k: params[n][k] for k in (*MOMENTS, "step")})
            elif optim and self.optim == "v1":
                every = {n: t for chunk in model.values() for n, t in chunk.items()}
                dense = {n: weights[n] for n in stateful}
                self._regather(self.shard(tp, pp), dense, every, entry)
            per_rank.append(entry)
        for n in names:
            rule = L.split_rule(n, swiglu)
            full = {
                k: L.merge_shards([r[n][k] for r in per_rank], rule)
                for k in per_rank[0][n]
                if k != "step"
            }
            if "step" in per_rank[0][n]:
                full["step"] = per_rank[0][n]["step"].clone()
            out[n] = full
        return out

    def _regather(self, shard: Path, weights: dict, every: dict, entry: dict) -> None:
        """Put the ZeRO pieces of every DP rank's optimizer file back into whole TP shards
        (MoE without ZeRO: every DP rank's file repeats the dense state, any copy will do)."""
        files = sorted(shard.glob("optim_dp*.pt"))
        moments, steps, covered = gather_zero_pieces([(p, every) for p in files], weights)
        for name, w in weights.items():
            if not bool(covered[name].all()):
                raise ReshardError(
                    f"{shard}: the optimizer files {[p.name for p in files]} cover "
                    f"{int(covered[name].sum())} of {w.numel()} elements of {name} (a DP rank's "
                    "file is missing?)"
                )
            entry[name].update({k: moments[name][k].view(w.shape) for k in MOMENTS})
            entry[name]["step"] = steps[name]


def gather_zero_pieces(files: list[tuple[Path, dict]], weights: dict[str, torch.Tensor]):
    """The flat fp32 main weights and Adam moments of `weights` put back together from the ZeRO
    pieces in optimizer `files` (each with the shard's full parameter dict, for files saved
    before ``state_index``). Returns (moments, steps, covered): per name, the flat ``main`` /
    ``exp_avg`` / ``exp_avg_sq``, Adam's step, and which elements some piece held."""
    flat = {
        n: {k: torch.zeros(w.numel(), dtype=torch.float32) for k in MOMENTS}
        for n, w in weights.items()
    }
    covered = {n: torch.zeros(w.numel(), dtype=torch.bool) for n, w in weights.items()}
    steps: dict[str, torch.Tensor] = {}
    for path, every in files:
        state = read_lazy(path)
        index = state.get("state_index") or _rebuild_state_index(state, every)
        for i, (_, name, start, end) in enumerate(state["pieces"]):
            if name not in weights:
                continue
            main = state["main_params"][i]
            if main is None:  # fp32 model: the main piece was the parameter itself
                main = weights[name].reshape(-1)[start:end]
            adam = state["optimizer"]["state"].get(index[i])
            if adam is None:  # saved before the first step: torch's fresh state is zeros
                adam = {"exp_avg": 0.0, "exp_avg_sq": 0.0, "step": torch.tensor(0.0)}
            flat[name]["main"][start:end] = main.float()
            flat[name]["exp_avg"][start:end] = adam["exp_avg"]
            flat[name]["exp_avg_sq"][start:end] = adam["exp_avg_sq"]
            steps[name] = torch.as_tensor(adam["step"], dtype=torch.float32).reshape(())
            covered[name][start:end] = True
        del state
    return flat, steps, covered


def _rebuild_state_index(state: dict, weights: dict) -> list[int]:
    """Piece -> torch state key for files saved before ``state_index`` existed.

    The optimizer grouped pieces by weight decay (0 for biases and 1-D params: `weights` holds
    every parameter of the shard, read lazily, for their names and dims), groups in order of
    first appearance, pieces in order within a group; torch numbers params group by group.
    """
    by_decay = {g["weight_decay"]: list(g["params"]) for g in state["optimizer"]["param_groups"]}
    decayed = max(by_decay, default=0.0)
    taken: dict[float, int] = {}
    index = []
    for _, name, _, _ in state["pieces"]:
        wd = 0.0 if no_weight_decay(name, weights[name]) else decayed
        k = taken.get(wd, 0)
        index.append(by_decay[wd][k])
        taken[wd] = k + 1
    return index


# --- planning and writing the target -----------------------------------------------------------
def _units(names: list[str]) -> list[tuple[str, list[str]]]:
    units: dict[str, list[str]] = {}
    for n in names:
        units.setdefault(L.unit_of(n), []).append(n)
    return list(units.items())


def _target_names(src: Source, dst: GPTConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Full shapes of the target's parameters: the source's, with the tied output copy only
    where the target has PP > 1, and the vocabulary re-padded."""
    names = src.model_names()
    tied = not dst.untie_embeddings_and_output_weights
    if tied:
        names.pop(L.OUTPUT_LAYER, None)
        if dst.pipeline_model_parallel_size > 1:
            names[L.OUTPUT_LAYER] = names[L.WORD_EMBEDDING]
    return names


def write_skeletons(
    dst: GPTConfig,
    rows: int,
    names: dict,
    with_optim: bool,
    grad_scaler: Optional[dict],
    tmp: Path,
    experts: Optional[X.ExpertLayout] = None,
) -> list[tuple[int, int]]:
    """Write every target file without its tensor bytes; returns the (tp, pp) shards.

    MoE (`experts`, the target's expert split): model.pt and optim_params.pt hold the experts of
    DP rank 0; when DP ranks hold different experts, each (ep, etp) a rank of the folder's TP
    rank can hold gets its own pair of files (`megalite.checkpoint.reshard_experts`)."""
    swiglu = dst.activation == "swiglu"
    tp, pp = dst.tensor_model_parallel_size, dst.pipeline_model_parallel_size
    shards = [(t, p) for p in range(pp) for t in range(tp)]
    for t, p in shards:
        model: dict[str, dict] = {f"chunk{c}": {} for c in range(dst.virtual_pipeline_size)}
        optim: dict[str, dict] = {}
        expert_model: dict[str, dict] = {f"chunk{c}": {} for c in range(dst.virtual_pipeline_size)}
        expert_optim: dict[str, dict] = {}
        for name, (shape, dtype) in names.items():
            stage, chunk = L.place(dst, name)
            if stage != p:
                continue
            if X.is_expert(name):
                shape = experts.local_shape(name, shape)
                expert_model[f"chunk{chunk}"][name] = empty_like_shape(shape, dtype)
                expert_optim[name] = _optim_skeleton(shape)
            else:
                rule, shape = L.split_rule(name, swiglu), list(shape)
                if rule.vocab:
                    shape[0] = rows
                if rule.dim is not None:
                    shape[rule.dim] //= tp
                shape = tuple(shape)
            model[f"chunk{chunk}"][name] = empty_like_shape(shape, dtype)
            if not X.is_buffer(name):
                optim[name] = _optim_skeleton(shape)
        folder = ckpt.shard_dir(tmp, t, p)
        folder.mkdir(parents=True)
        write_skeleton(model, folder / "model.pt")
        if with_optim:
            tree = {"format": PARAMS_FORMAT, "params": optim, "grad_scaler": grad_scaler}
            write_skeleton(tree, folder / ckpt.PARAMS_OPTIM_FILE)
        if not (expert_optim and experts.split_over_dp):
            continue
        for e, x in experts.reachable(t):
            write_skeleton(expert_model, folder / X.rank_file("experts", e, x))
            if with_optim:
                write_skeleton({"params": expert_optim}, folder / X.rank_file("optim_params", e, x))
    return shards


def _optim_skeleton(shape: tuple[int, ...]) -> dict:
    entry = {k: empty_like_shape(shape, torch.float32) for k in MOMENTS}
    entry["step"] = empty_like_shape((), torch.float32)
    return entry


def fill_unit(
    dst: GPTConfig,
    tmp: Path,
    full: dict[str, dict],
    with_optim: bool,
    experts: Optional[X.ExpertLayout] = None,
) -> None:
    """Cut the unit's full tensors for every target TP rank (and expert rank) and write them
    in place."""
    tp = dst.tensor_model_parallel_size
    swiglu = dst.activation == "swiglu"
    stages = {L.place(dst, n)[0] for n in full}

    def cut(n: str, tensor: torch.Tensor, t: int, coords: Optional[tuple[int, int]] = None):
        if X.is_expert(n):
            return experts.split(n, tensor, *(coords or experts.coords(t)))
        return L.split_full(tensor, L.split_rule(n, swiglu), tp, t)

    for p in sorted(stages):
        names = [n for n in full if L.place(dst, n)[0] == p]
        for t in range(tp):
            folder = ckpt.shard_dir(tmp, t, p)
            with filling(folder / "model.pt") as model:
                flat = {n: w for chunk in model.values() for n, w in chunk.items()}
                for n in names:
                    flat[n].copy_(cut(n, full[n]["weight"], t))
                del flat
            del model  # unmap before the next file: only one unit's pages are ever resident
            if with_optim:
                with filling(folder / ckpt.PARAMS_OPTIM_FILE) as optim:
                    for n in names:
                        if X.is_buffer(n):
                            continue
                        for k in MOMENTS:
                            optim["params"][n][k].copy_(cut(n, full[n][k], t))
                        optim["params"][n]["step"].copy_(full[n]["step"])
                del optim
            expert_names = [n for n in names if X.is_expert(n)]
            if not (expert_names and experts.split_over_dp):
                continue
            for coords in experts.reachable(t):
                with filling(folder / X.rank_file("experts", *coords)) as model:
                    flat = {n: w for chunk in model.values() for n, w in chunk.items()}
                    for n in expert_names:
                        flat[n].copy_(cut(n, full[n]["weight"], t, coords))
                    del flat
                del model
                if not with_optim:
                    continue
                with filling(folder / X.rank_file("optim_params", *coords)) as optim:
                    for n in expert_names:
                        for k in MOMENTS:
                            optim["params"][n][k].copy_(cut(n, full[n][k], t, coords))
                        optim["params"][n]["step"].copy_(full[n]["step"])
                del optim


def plan_target(
    meta: dict,
    tp: int,
    pp: int,
    layers_per_virtual: Optional[int],
    true_vocab: Optional[int] = None,
) -> tuple[GPTConfig, int]:
    """(target config, target padded vocabulary), or ReshardError naming what does not fit."""
    if true_vocab is not None:
        meta = dict(meta, model=dict(meta["model"], vocab_size=true_vocab))
    try:
        dst = L.config_from_meta(meta, tp, pp, layers_per_virtual)
        rows = L.padded_vocab(meta, tp)
    except ValueError as e:
        raise ReshardError(
            f"cannot reshard to TP {tp} x PP {pp}"
            + (f" x {layers_per_virtual} layers per virtual stage" if layers_per_virtual else "")
            + f": {e}"
        ) from None
    return dst, rows


def reshard(
    load: str | os.PathLike,
    save: str | os.PathLike,
    tp: int,
    pp: int,
    layers_per_virtual: Optional[int] = None,
    *,
    true_vocab: Optional[int] = None,
    ep: Optional[int] = None,
    etp: Optional[int] = None,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Reshard the newest checkpoint of `load` to TP `tp` x PP `pp` (MoE: experts over EP `ep`
    x ETP `etp`, see `reshard_experts.plan_experts` for the defaults); returns the new folder."""
    folder, meta = ckpt.load_meta(load)
    if folder is None:
        raise ReshardError(f"no checkpoint in {load} ({ckpt.TRACKER} is missing)")
    if Path(save).resolve() == Path(load).resolve():
        raise ReshardError(f"--save {save} is --load itself: write the new layout elsewhere")
    dst, rows = plan_target(meta, tp, pp, layers_per_virtual, true_vocab)
    experts = X.plan_experts(meta, dst, ep, etp)
    src = Source(folder, meta)
    known_vocab = true_vocab or L.true_vocab_size(meta)
    names = _target_names(src, dst)
    iteration = meta["iteration"]
    root = Path(save)
    tmp = ckpt.iteration_dir(root, iteration).with_name(f"iter_{iteration:07d}.tmp")
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():  # left by a crashed run: never complete, never referenced
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _convert(src, dst, rows, names, known_vocab, tmp, log, experts)
        _write_meta(tmp / "meta.json", meta, dst, rows, folder, src.optim is not None, experts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never complete: leave `save` as it was
        raise
    return ckpt.publish_iteration(root, iteration, tmp)


def _convert(
    src: Source,
    dst: GPTConfig,
    rows: int,
    names: dict,
    known_vocab: Optional[int],
    tmp: Path,
    log: Callable[[str], None],
    experts: Optional[X.ExpertLayout] = None,
) -> None:
    """Write every target file under `tmp`, one unit at a time, and fsync them."""
    with_optim = src.optim is not None
    shards = write_skeletons(dst, rows, names, with_optim, src.grad_scaler(), tmp, experts)
    tied_copy = L.OUTPUT_LAYER in names and not dst.untie_embeddings_and_output_weights
    for unit, unit_names in _units(list(names)):
        read = [n for n in unit_names if not (tied_copy and n == L.OUTPUT_LAYER)]
        if not read:
            continue
        stage = L.place(src.config, read[0])[0]
        full = src.read(stage, read)
        for n in read:
            if L.split_rule(n, False).vocab:
                full[n] = {
                    k: v if k == "step" else L.resize_vocab(v, rows, known_vocab)
                    for k, v in full[n].items()
                }
        if tied_copy and L.WORD_EMBEDDING in full:  # the last stage's copy of the embedding
            full[L.OUTPUT_LAYER] = full[L.WORD_EMBEDDING]
        fill_unit(dst, tmp, full, with_optim, experts)
        log(f"  {unit}: {len(read)} tensor(s)")
        del full
    for t, p in shards:
        for path in ckpt.shard_dir(tmp, t, p).iterdir():
            fsync_file(path)


def _write_meta(
    path: Path,
    meta: dict,
    dst: GPTConfig,
    rows: int,
    source: Path,
    with_optim: bool,
    experts: Optional[X.ExpertLayout] = None,
) -> None:
    """The source's meta with the target layout in its model config and settings."""
    layout = {k: getattr(dst, k) for k in ckpt.LAYOUT_FIELDS}
    model = dict(meta["model"], **layout, sequence_parallel=dst.sequence_parallel)
    settings = dict(meta.get("settings", {}), **layout, sequence_parallel=dst.sequence_parallel)
    new = dict(meta, model=model, settings=settings, padded_vocab_size=rows)
    new["format_version"] = ckpt.FORMAT_VERSION
    new["optimizer_format"] = PARAMS_FORMAT if with_optim else None
    new["resharded_from"] = {
        "folder": str(source),
        **{k: meta["model"].get(k) for k in ckpt.LAYOUT_FIELDS},
        "padded_vocab_size": meta["padded_vocab_size"],
    }
    if experts is not None:
        new["resharded_from"]["expert_layout"] = meta["expert_layout"]
        new["expert_layout"] = experts.to_meta()
        settings["expert_model_parallel_size"] = experts.ep
        settings["expert_tensor_parallel_size"] = None if experts.etp == experts.tp else experts.etp
    with open(path, "w") as f:
        json.dump(new, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def load_full_model(load: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, {name: full tensor}) of the newest checkpoint in `load`, every shard joined (the
    single-process model's state_dict with padded vocabulary). For small models and tests."""
    folder, meta = ckpt.load_meta(load)
    if folder is None:
        raise ReshardError(f"no checkpoint in {load}")
    out: dict[str, torch.Tensor] = {}
    for _, weights in Source(folder, meta).unit_weights():
        out.update(weights)
    return meta, out
