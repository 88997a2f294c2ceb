"""Checkpoints that resume exactly and survive a crash mid-save.

On disk (``DIR`` = --save / --load)::

    DIR/latest_checkpointed_iteration.txt      "20": the newest COMPLETE checkpoint, written last
    DIR/iter_0000020/meta.json                 iteration, consumed samples, layout, the arguments
                                               that shape the model, LR schedule, format version
    DIR/iter_0000020/mp_rank_TT_PPP/model.pt   this (TP, PP) shard: {"chunk0": state_dict, ...}
    DIR/iter_0000020/mp_rank_TT_PPP/optim_dpDDD.pt   optimizer state of DP rank DDD (every DP
                                               rank under ZeRO; only DP rank 0 otherwise)
    DIR/iter_0000020/mp_rank_TT_PPP/rng_dpDDD.pt     RNG states of that rank

Every rank writes into ``iter_0000020.tmp``; the ranks agree (all-gather of each rank's error,
if any) that every file is on disk and fsynced; rank 0 then renames the folder and, last,
replaces the tracker file through a temporary name. A crash or a full disk at any point leaves
the previous checkpoint and the tracker that names it untouched.

Files hold only tensors and plain Python values and are read with
``torch.load(weights_only=True)``: a checkpoint is data, never code. A file that holds a pickled
object is refused with its name.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megalite.errors import UserError

try:  # torch >= 2.6
    from torch.utils.serialization import config as _serialization_config
except ImportError:  # pragma: no cover
    _serialization_config = None

TRACKER = "latest_checkpointed_iteration.txt"
# 1: meta.json held the flat argparse namespace ("args"). 2: the resolved settings ("settings",
# flat {field: value}) and the model config ("model"); format 1 is upgraded on load.
FORMAT_VERSION = 2
CONFIG_FILE = "config.yaml"  # the resolved settings, as `megalite-pretrain --config` reads them

# Model fields a resume must agree on (the shape of every weight and how it is split).
MODEL_SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "vocab_size",
    "max_position_embeddings",
    "normalization",
    "apply_layernorm_1p",
    "swiglu",
    "position_embedding_type",
    "no_position_embedding",
    "untie_embeddings_and_output_weights",
    "disable_bias_linear",
    "add_qkv_bias",
)
LAYOUT_FIELDS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage",
)
# How a mismatch of a field that is not a flag itself is named.
DERIVED_NAMES = {"vocab_size": "vocabulary size (of the tokenizer, or --vocab-size)"}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or must not be loaded; says which and why."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def shard_dir(iter_dir: Path, tp_rank: int, pp_rank: int) -> Path:
    return iter_dir / f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def read_tracker(root: str | os.PathLike) -> Optional[int]:
    """The newest complete iteration in `root`, or None when there is no checkpoint."""
    path = Path(root) / TRACKER
    if not path.exists():
        return None
    text = path.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None


# --- RNG ---------------------------------------------------------------------------------------
def get_rng_state(tracker_states: Optional[dict] = None) -> dict:
    """Every RNG this rank uses, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "tracker": tracker_states or {},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> Optional[dict]:
    """Restore what `get_rng_state` captured; returns the TP tracker's states for the caller."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return state.get("tracker")


# --- low-level safe IO ------------------------------------------------------------------------
def _no_crc32():
    if _serialization_config is None:
        return contextlib.nullcontext()
    return _serialization_config.patch({"save.compute_crc32": False})


def _write(obj: Any, path: Path, sync: bool = False) -> None:
    """torch.save `obj` to `path`; fsynced only with `sync` (else the caller fsyncs later,
    `fsync_file`: Linux reports a writeback error to an fd opened after it, if unseen)."""
    # torch.load never checks the zip records' CRC-32 (a flipped byte loads silently), and
    # computing it took about 2/3 of torch.save's CPU time: left out (the field is written 0)
    with open(path, "wb") as f, _no_crc32():
        torch.save(obj, f)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def _save(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` and fsync it."""
    _write(obj, path, sync=True)


def fsync_file(path: Path) -> None:
    """Flush `path` (pages written through shared mappings included) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_load(path: Path) -> Any:
    """torch.load with weights_only=True, errors naming the file."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: never fall back to full unpickling
        raise CheckpointError(
            f"refusing to load {path}: it is not plain tensors/values "
            f"(torch.load(weights_only=True) said: {str(e).splitlines()[0]})"
        ) from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def agree_on_errors(error: Optional[str]) -> list[tuple[int, str]]:
    """All-gather each rank's error (None when fine): every rank learns who failed."""
    if not (dist.is_available() and dist.is_initialized()):
        return [(0, error)] if error else []
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, error)
    return [(r, e) for r, e in enumerate(everyone) if e]


# --- save --------------------------------------------------------------------------------------
def prepare_tmp(root: Path, iteration: int, rank: int) -> tuple[Path, Optional[str]]:
    """(the folder iteration `iteration` is written into before it is renamed, rank 0's error
    making it or None). Rank 0 creates it afresh; other ranks only learn its name."""
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if rank != 0:
        return tmp, None
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a crash: never complete, never referenced
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        return tmp, f"{type(e).__name__}: {e}"
    return tmp, None


def rank_files(
    dp: int,
    model_state: Callable[[], dict],
    optimizer_state: Optional[Callable[[], dict]],
    optimizer_sharded: bool,
    rng_state: dict,
    expert_state: Optional[Callable[[], dict]] = None,
) -> list[tuple[str, Callable[[], Any]]]:
    """[(file name, state getter)] that DP rank `dp` writes into its (TP, PP) shard folder: the
    model on DP rank 0, the optimizer on every DP rank under ZeRO (else DP rank 0), MoE experts
    that differ across DP ranks, and the RNG states. Shared by the sync and async savers."""
    files: list[tuple[str, Callable[[], Any]]] = []
    if dp == 0:
        files.append(("model.pt", model_state))
    if expert_state is not None:
        files.append((f"experts_dp{dp:03d}.pt", expert_state))
    if optimizer_state is not None and (optimizer_sharded or dp == 0):
        files.append((f"optim_dp{dp:03d}.pt", optimizer_state))
    files.append((f"rng_dp{dp:03d}.pt", lambda: rng_state))
    return files


def write_meta_files(tmp: Path, meta: dict, extra_files: Optional[dict[str, str]]) -> None:
    """meta.json and `extra_files` ({name: text}) into `tmp`, each fsynced (global rank 0)."""
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for name, text in (extra_files or {}).items():
        with open(tmp / name, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    *,
    coords: dict[str, int],
    model_state: Callable[[], dict],
    optimizer_state: Optional[Callable[[], dict]],
    optimizer_sharded: bool,
    rng_state: dict,
    meta: dict,
    extra_files: Optional[dict[str, str]] = None,
    expert_state: Optional[Callable[[], dict]] = None,
) -> Path:
    """Write iteration `iteration` collectively from every rank; returns its folder.

    `coords` is this rank's {"tp", "pp", "dp"}; `model_state()` / `optimizer_state()` are called
    only on the ranks that write them (DP rank 0 for the model; every DP rank when
    `optimizer_sharded`). `meta` (JSON-able) and `extra_files` ({name: text}, e.g. the
    resolved config.yaml) are written by global rank 0. `expert_state()` (MoE with experts
    split over DP ranks) is this rank's expert parameters, written by every DP rank as
    ``experts_dp{dp}.pt`` and laid over ``model.pt`` on load.
    """
    root = Path(root)
    final = iteration_dir(root, iteration)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp, error = prepare_tmp(root, iteration, rank)
    failures = agree_on_errors(error)
    if not failures:
        error = None
        try:
            shard = shard_dir(tmp, coords["tp"], coords["pp"])
            shard.mkdir(parents=True, exist_ok=True)
            files = rank_files(
                coords["dp"], model_state, optimizer_state, optimizer_sharded, rng_state,
                expert_state,
            )  # fmt: skip
            for name, state in files:
                _save(state(), shard / name)
            if rank == 0:
                meta = dict(meta, iteration=iteration, format_version=FORMAT_VERSION)
                write_meta_files(tmp, meta, extra_files)
            _fsync_dir(shard)
        except Exception as e:  # noqa: BLE001 - any failure must reach every rank
            error = f"{type(e).__name__}: {e}"
        failures = agree_on_errors(error)
    if failures:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = read_tracker(root) if root.exists() else None
        who = "; ".join(f"rank {r}: {e}" for r, e in failures)
        kept = f"iteration {previous} is intact" if previous is not None else "no earlier one"
        raise CheckpointError(f"saving iteration {iteration} to {root} failed ({who}); {kept}")

    if rank == 0:
        publish_iteration(root, iteration, tmp)
    if dist.is_initialized():
        dist.barrier()
    return final


def publish_iteration(root: Path, iteration: int, tmp: Path) -> Path:
    """Rename the complete folder `tmp` to iteration `iteration` of `root`, then the tracker.

    One process only (rank 0, or an offline tool). Re-saving an iteration keeps the old folder
    until the new one is in place; the tracker is replaced last, through a temporary name.
    """
    root, final = Path(root), iteration_dir(root, iteration)
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(root)
    tracker_tmp = root / (TRACKER + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, root / TRACKER)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- load --------------------------------------------------------------------------------------
def check_compatible(meta: dict, model: Any, path: Path, settings: Optional[dict] = None) -> None:
    """Refuse a checkpoint whose model shape or TP/PP differ from this run's `model`
    (a GPTConfig), naming each differing flag. `settings`: this run's flat settings; with them
    a vocabulary that differs is explained (which tokenizer flags, which token ids, what to
    add to read the data it was trained on: ``megalite.data.config.vocabulary_change``)."""
    saved = meta["model"]
    diffs = []
    for name in MODEL_SHAPE_FIELDS + LAYOUT_FIELDS:
        if saved.get(name) is not None and getattr(model, name) != saved[name]:
            flag = DERIVED_NAMES.get(name, "--" + name.replace("_", "-"))
            diff = f"{flag}: checkpoint {saved[name]!r}, this run {getattr(model, name)!r}"
            if name == "vocab_size" and settings is not None:
                from megalite.data.config import vocabulary_change

                why = vocabulary_change(
                    meta.get("settings", {}), settings, int(saved[name]), int(model.vocab_size)
                )
                diff += f" ({why})"
            diffs.append(diff)
    if diffs:
        hint = ""
        if any(
            d.split(":")[0] in ["--" + n.replace("_", "-") for n in LAYOUT_FIELDS] for d in diffs
        ):
            hint = (
                " To continue at another TP/PP layout, convert the checkpoint first with "
                "megalite-reshard (tools/checkpoint_reshard.py)."
            )
        raise CheckpointError(
            f"checkpoint {path} does not match this run: " + "; ".join(diffs) + "." + hint
        )


def upgrade_v1_meta(meta: dict) -> dict:
    """A format-1 meta (flat argparse ``args``) in format 2's terms, for every reader."""
    args = dict(meta["args"])
    from megalite.config.fields import to_dict
    from megalite.model.config import GPTConfig  # the model config is data, no loop involved

    fields = {f for f in GPTConfig.__dataclass_fields__}
    model = {k: v for k, v in args.items() if k in fields}
    model["rotary_base"] = int(model.get("rotary_base", 10000))
    if args.get("true_vocab_size"):
        model["vocab_size"] = int(args["true_vocab_size"])
    elif args.get("mock_data"):
        model["vocab_size"] = args.get("vocab_size")
    elif args.get("tokenizer_type", "NullTokenizer") == "NullTokenizer" and args.get("vocab_size"):
        model["vocab_size"] = int(args["vocab_size"]) + 1
    else:
        model["vocab_size"] = None  # only the padded size is known
    model["params_dtype"] = (
        "bfloat16" if args.get("bf16") else "float16" if args.get("fp16") else "float32"
    )
    derived = {"padded_vocab_size", "true_vocab_size", "world_size", "data_parallel_size",
               "num_microbatches", "virtual_pipeline_model_parallel_size"}  # fmt: skip
    settings = {k: v for k, v in args.items() if k not in derived}
    if settings.get("recompute_granularity") is None:
        settings["recompute_granularity"] = "none"
    out = {k: v for k, v in meta.items() if k != "args"}
    out.update(
        settings=settings,
        model=to_dict(GPTConfig(**model)),
        padded_vocab_size=args["padded_vocab_size"],
        optimizer_sharded=args.get("zero_stage", 0) > 0,
        upgraded_from_format=meta.get("format_version", 1),
    )
    return out


def saved_model_config(meta: dict, **changes: Any):
    """The GPTConfig a checkpoint was saved with (vocab = the tokenizer's, if known), with
    `changes` applied (another split, dropout off, ...)."""
    from megalite.model.config import GPTConfig

    return GPTConfig(**{**meta["model"], **changes})


def load_meta(root: str | os.PathLike) -> tuple[Optional[Path], Optional[dict]]:
    """(folder, meta) of the newest complete checkpoint in `root`, or (None, None)."""
    iteration = read_tracker(root)
    if iteration is None:
        return None, None
    folder = iteration_dir(root, iteration)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise CheckpointError(
            f"{Path(root) / TRACKER} names iteration {iteration} but {meta_path} is missing"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from None
    if "args" in meta and "model" not in meta:
        try:
            meta = upgrade_v1_meta(meta)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{meta_path}: cannot read this format-1 checkpoint: {e}"
            ) from None
    return folder, meta


def load_shard_files(
    folder: Path, coords: dict[str, int], *, optim: bool, optimizer_sharded: bool, rng: bool
) -> dict[str, Any]:
    """Read this rank's model (and optionally optimizer and RNG) files of one checkpoint.

    MoE: `coords` may also hold this rank's expert coordinates "ep" and "etp"; a resharded
    checkpoint keeps experts per (ep, etp) (`megalite.checkpoint.reshard_experts`)."""
    shard = shard_dir(folder, coords["tp"], coords["pp"])
    out: dict[str, Any] = {"model": safe_load(shard / "model.pt")}
    dp = coords["dp"]
    experts = shard / f"experts_dp{dp:03d}.pt"
    by_rank = f"_ep{coords.get('ep', 0):03d}_etp{coords.get('etp', 0):03d}.pt"
    if "ep" in coords and (shard / ("experts" + by_rank)).exists():
        experts = shard / ("experts" + by_rank)
    if experts.exists():  # MoE: this rank's own experts replace DP rank 0's
        for chunk, params in safe_load(experts).items():
            out["model"][chunk].update(params)
    if optim:
        out["optimizer"] = safe_load(optimizer_file(shard, dp, optimizer_sharded))
        expert_optim = shard / ("optim_params" + by_rank)
        if "ep" in coords and "params" in out["optimizer"] and expert_optim.exists():
            out["optimizer"]["params"].update(safe_load(expert_optim)["params"])
    if rng:
        path = shard / f"rng_dp{dp:03d}.pt"
        # a checkpoint saved at a smaller DP has no RNG file for the new DP ranks
        out["rng"] = safe_load(path) if path.exists() else None
    return out


# Written by tools/checkpoint_reshard.py: one layout-independent optimizer file per (TP, PP)
# shard that every DP rank reads at any DP size / ZeRO stage (megalite-optimizer-params-v1).
PARAMS_OPTIM_FILE = "optim_params.pt"


def optimizer_file(shard: Path, dp_rank: int, optimizer_sharded: bool) -> Path:
    """The optimizer file DP rank `dp_rank` reads in `shard`: the per-parameter file when the
    checkpoint has one, else its own ZeRO shard (or DP rank 0's replicated state)."""
    if (shard / PARAMS_OPTIM_FILE).exists():
        return shard / PARAMS_OPTIM_FILE
    path = shard / (f"optim_dp{dp_rank:03d}.pt" if optimizer_sharded else "optim_dp000.pt")
    if not path.exists() and not any(shard.glob("optim_*.pt")):
        raise CheckpointError(
            f"{shard} holds no optimizer state (a weights-only checkpoint, e.g. from "
            f"tools/import_hf.py): load it with --finetune or --no-load-optim"
        )
    return path
