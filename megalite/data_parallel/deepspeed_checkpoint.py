"""DeepSpeed engines (ZeRO 0-3) saved and resumed in megalite's own checkpoint format.

DeepSpeed's own ``engine.save_checkpoint`` pickles Python objects (its config, argparse
namespaces, optimizer wrappers) and its loader calls ``torch.load(weights_only=False)``: loading
one runs whatever code the file names. Rather than allow-listing the classes a given DeepSpeed
version happens to write (a list that changes between versions and still trusts the file), the
engine's state is *converted* at save time into the files megalite already reads with
``torch.load(weights_only=True)``::

    iter_NNNNNNN/mp_rank_TT_000/model.pt          {"chunk0": full state_dict of this TP shard}
    iter_NNNNNNN/mp_rank_TT_000/optim_params.pt   megalite-optimizer-params-v1: per parameter
                                                  {"main", "exp_avg", "exp_avg_sq", "step"}
    iter_NNNNNNN/mp_rank_TT_000/rng_dpDDD.pt      RNG states of each rank

Each parameter's fp32 master weight and AdamW moments are gathered from their ZeRO partitions
one parameter at a time (DeepSpeed's ``safe_get_full_*`` API, a collective over the DP group)
and written by DP rank 0. Because the file is per parameter and layout-free, the same
checkpoint resumes on DeepSpeed at another DP size or ZeRO stage, on megalite's own optimizer
(``--zero-stage 0|1|2``, which reads ``optim_params.pt``), and ``megalite-reshard`` changes its
TP like any other megalite checkpoint.

Loading: the trainer loads ``model.pt`` into the module *before* ``deepspeed.initialize`` (so
ZeRO partitions the restored weights), then `load_engine_optimizer` writes masters, moments and
step counts into the engine's partitions. The engine's AdamW state is created (zeros) first if
it does not exist yet, exactly as torch creates it at the first step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from megalite.checkpoint import format as ckpt
from megalite.checkpoint.async_save import AsyncCheckpointSaver, to_host
from megalite.data_parallel.optimizer import PARAMS_FORMAT

MOMENTS = ("exp_avg", "exp_avg_sq")


class DeepSpeedCheckpointError(RuntimeError):
    """A DeepSpeed engine state that cannot be saved or loaded; says which and why."""


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def _inner_optimizer(engine):
    """The torch optimizer that holds the AdamW state (inside DeepSpeed's ZeRO wrapper)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt) if _zero_stage(engine) > 0 else _unwrap(opt)


def _unwrap(opt):
    # stage 0: torch's optimizer itself, or DeepSpeed's bf16/fp16 wrapper around it
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _step_count(engine) -> torch.Tensor:
    """AdamW's step counter (one value: every partition steps together)."""
    inner = _inner_optimizer(engine)
    steps = {float(inner.state[p]["step"]) for p in _flat_partitions(engine)}
    if len(steps) > 1:
        raise DeepSpeedCheckpointError(f"the engine's AdamW partitions disagree on step: {steps}")
    return torch.tensor(steps.pop() if steps else 0.0, dtype=torch.float32)


def _flat_partitions(engine) -> list[torch.Tensor]:
    """The tensors AdamW steps on this rank (its state is keyed by them)."""
    z3 = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if z3 is not None:  # ZeRO-3 puts them in the param groups only while it steps
        return list(z3)
    return [p for group in _inner_optimizer(engine).param_groups for p in group["params"]]


def ensure_optimizer_state(engine) -> None:
    """Create AdamW's state (zeros, step 0) where the engine has none yet, as torch does lazily
    at the first step, and let DeepSpeed link its per-parameter views onto it."""
    inner = _inner_optimizer(engine)
    for p in _flat_partitions(engine):
        state = inner.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in MOMENTS:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2: per-parameter views into the flat partitions
        # DeepSpeed links them once, after the first group's first step, when the later
        # groups' state does not exist yet (their views stay empty): link again, now that
        # every group has its state.
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def _full(param, key: Optional[str], engine) -> torch.Tensor:
    """This parameter's whole fp32 master (key None) or AdamW moment; collective over DP."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _zero_stage(engine) == 0 and not hasattr(param, "_hp_mapping"):
        if key is None:
            return param.detach().float()
        return _inner_optimizer(engine).state[param][key]
    value = (
        safe_get_full_fp32_param(param)
        if key is None
        else safe_get_full_optimizer_state(param, key)
    )
    if value is None:
        raise DeepSpeedCheckpointError(
            f"DeepSpeed returned no {key or 'fp32 master'} for a parameter of shape "
            f"{tuple(param.shape)} (frozen parameters are not supported)"
        )
    return value


def engine_state(engine, module: torch.nn.Module, *, keep: bool) -> tuple[dict, dict]:
    """(model state_dict, megalite-optimizer-params-v1 dict) of this TP shard, on the host.

    Collective over the engine's DP group (every DP rank must call it); the tensors are kept
    only where `keep` (DP rank 0, the writer), so other ranks hold nothing. Model weights are
    the masters cast to each parameter's dtype: what DeepSpeed itself keeps after a step.
    """
    ensure_optimizer_state(engine)
    step = _step_count(engine)
    names = {id(p): n for n, p in module.named_parameters()}
    params: dict[str, dict[str, Any]] = {}
    weights: dict[str, torch.Tensor] = {}
    for p in module.parameters():
        name = names[id(p)]
        main = _full(p, None, engine)
        moments = {k: _full(p, k, engine) for k in MOMENTS}
        if keep:
            shape = tuple(getattr(p, "ds_shape", p.shape))
            entry = {"main": main.detach().float().cpu().clone().reshape(shape)}
            for k, v in moments.items():
                entry[k] = v.detach().float().cpu().clone().reshape(shape)
            entry["step"] = step.clone()
            params[name] = entry
            weights[name] = entry["main"].to(p.dtype)
    model: dict[str, torch.Tensor] = {}
    if keep:
        for name, value in module.state_dict().items():  # buffers, in state_dict order
            model[name] = weights[name] if name in weights else value.detach().cpu().clone()
    return model, {"format": PARAMS_FORMAT, "params": params, "grad_scaler": None}


def load_engine_optimizer(engine, module: torch.nn.Module, state: dict) -> None:
    """Write a megalite-optimizer-params-v1 dict into the engine: fp32 masters, AdamW moments
    and step counters of every parameter (each rank keeps its own ZeRO partition of them)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if state.get("format") != PARAMS_FORMAT:
        raise DeepSpeedCheckpointError(
            f"--deepspeed reads optimizer states in the per-parameter format {PARAMS_FORMAT!r}; "
            f"this one is {state.get('format')!r} (a native ZeRO checkpoint): convert it first "
            f"with tools/checkpoint_reshard.py, or load it with --no-load-optim"
        )
    params = state["params"]
    names = {id(p): n for n, p in module.named_parameters()}
    missing = sorted(n for n in names.values() if n not in params)
    if missing:
        raise DeepSpeedCheckpointError(
            f"optimizer checkpoint has no state for {len(missing)} parameter(s), e.g. "
            f"{missing[0]!r}"
        )
    ensure_optimizer_state(engine)
    stage = _zero_stage(engine)
    inner = _inner_optimizer(engine)
    steps = set()
    with torch.no_grad():
        for p in module.parameters():
            entry = params[names[id(p)]]
            numel = int(getattr(p, "ds_numel", p.numel()))
            if entry["main"].numel() != numel:
                raise DeepSpeedCheckpointError(
                    f"optimizer checkpoint: {names[id(p)]} has {entry['main'].numel()} "
                    f"elements, the model's has {numel}"
                )
            steps.add(float(entry["step"]))
            if stage == 0 and not hasattr(p, "_hp_mapping"):  # fp32: the param is the master
                p.copy_(entry["main"].to(p.dtype).reshape(p.shape))
                for k in MOMENTS:
                    inner.state[p][k].copy_(entry[k].reshape(p.shape))
                continue
            # each rank copies its own partition out of the whole tensor (copy_ moves devices)
            safe_set_full_fp32_param(p, entry["main"])
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, entry[k], k)
    if len(steps) > 1:
        raise DeepSpeedCheckpointError(f"optimizer checkpoint: parameters disagree on step {steps}")
    step = steps.pop() if steps else 0.0
    for flat in _flat_partitions(engine):
        inner.state[flat]["step"].fill_(step)


# --- whole checkpoints ----------------------------------------------------------------------
def save_deepspeed_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    engine,
    module: torch.nn.Module,
    *,
    coords: dict[str, int],
    rng_state: dict,
    meta: dict,
    saver: Optional[AsyncCheckpointSaver] = None,
    extra_files: Optional[dict[str, str]] = None,
) -> None:
    """Save `engine` (wrapping `module`) as iteration `iteration` of `root`. Collective.

    With `saver` (``--async-save``) the files are written in the background and published by a
    later ``saver.poll()`` / ``saver.finalize()``; without, this returns once the tracker names
    the new iteration. The gather itself (one collective per parameter) always happens now.
    """
    dp = coords["dp"]
    model, optim = engine_state(engine, module, keep=dp == 0)
    files: list[tuple[str, Any]] = []
    if dp == 0:
        files += [("model.pt", {"chunk0": model}), (ckpt.PARAMS_OPTIM_FILE, optim)]
    files.append((f"rng_dp{dp:03d}.pt", to_host(rng_state)))
    meta = dict(meta, optimizer_format=PARAMS_FORMAT, deepspeed_zero_stage=_zero_stage(engine))
    background = saver is not None
    saver = saver or AsyncCheckpointSaver()
    saver.save_files(
        root, iteration, coords=coords, files=files, meta=meta, extra_files=extra_files
    )
    if not background:
        saver.finalize()


def read_optimizer_state(folder: Path, coords: dict[str, int]) -> dict:
    """The per-parameter optimizer state a --deepspeed run resumes from (weights_only load)."""
    shard = ckpt.shard_dir(folder, coords["tp"], coords["pp"])
    path = shard / ckpt.PARAMS_OPTIM_FILE
    if not path.exists():
        if any(shard.glob("optim_dp*.pt")):
            raise DeepSpeedCheckpointError(
                f"{shard} holds a native megalite optimizer state (optim_dp*.pt); --deepspeed "
                f"resumes from the per-parameter form: convert it with tools/checkpoint_reshard.py "
                f"or load with --no-load-optim"
            )
        raise ckpt.CheckpointError(
            f"{shard} holds no optimizer state: load it with --finetune or --no-load-optim"
        )
    return ckpt.safe_load(path)
