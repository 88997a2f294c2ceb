"""Hugging Face folders from megalite checkpoints and back, one layer in memory at a time.

`export_hf(load, output)` writes ``config.json``, ``model.safetensors`` (or numbered shards with
``model.safetensors.index.json`` past `max_shard_bytes`) and, when the run's tokenizer is a
Hugging Face ``tokenizer.json``, a SentencePiece ``.model`` or GPT-2 vocab/merges, the files
``AutoTokenizer.from_pretrained`` needs. `import_hf(hf_dir, save, tp, pp)` writes a megalite
checkpoint (iteration 0, weights only: no optimizer or RNG files, ``meta["optimizer_format"]``
None) at any TP/PP; train from it with ``--load DIR --finetune`` (or ``--no-load-optim``).
The tensor maps and what each HF class can represent are in `megalite.checkpoint.hf`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from megalite.checkpoint import format as ckpt
from megalite.checkpoint import hf as H
from megalite.checkpoint import hf_moe as HM
from megalite.checkpoint import layout as L
from megalite.checkpoint import reshard_experts as X
from megalite.checkpoint.reshard import ReshardError, Source, fill_unit, write_skeletons
from megalite.checkpoint.streaming import fsync_file
from megalite.config.fields import cli_fields, flag_name, to_dict
from megalite.model.config import GPTConfig

SAFETENSORS_INDEX = "model.safetensors.index.json"


# --- export ------------------------------------------------------------------------------------
def _tokenizer_files(args: dict, out: Path) -> tuple[list[str], dict]:
    """Copy the run's tokenizer for ``AutoTokenizer``; returns (files, special token ids)."""
    tok_type, model = args.get("tokenizer_type"), args.get("tokenizer_model")
    written: list[str] = []
    ids: dict = {}
    if tok_type == "HuggingFaceTokenizer" and model and os.path.exists(model):
        folder = Path(model) if os.path.isdir(model) else Path(model).parent
        src = folder / "tokenizer.json" if os.path.isdir(model) else Path(model)
        shutil.copyfile(src, out / "tokenizer.json")
        written.append("tokenizer.json")
        for extra in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / extra).exists():
                shutil.copyfile(folder / extra, out / extra)
                written.append(extra)
        if "tokenizer_config.json" not in written:
            _write_json(
                out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"}
            )
            written.append("tokenizer_config.json")
    elif tok_type in SENTENCEPIECE_TYPES and model and os.path.exists(model):
        import sentencepiece as spm

        shutil.copyfile(model, out / "tokenizer.model")
        sp = spm.SentencePieceProcessor(model_file=model)
        special = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id()}
        config = {
            # LlamaTokenizer reads tokenizer.model; megalite's data pipeline adds no BOS/EOS
            # inside a document, so neither does this tokenizer by default.
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": False,
            "add_eos_token": False,
            "legacy": True,
            **{k: sp.id_to_piece(i) for k, i in special.items() if i >= 0},
        }
        _write_json(out / "tokenizer_config.json", config)
        written += ["tokenizer.model", "tokenizer_config.json"]
        ids = H.tokens_from_ids(
            sp.bos_id() if sp.bos_id() >= 0 else None, sp.eos_id() if sp.eos_id() >= 0 else None
        )
    elif tok_type == "GPT2BPETokenizer" and args.get("vocab_file") and args.get("merge_file"):
        shutil.copyfile(args["vocab_file"], out / "vocab.json")
        shutil.copyfile(args["merge_file"], out / "merges.txt")
        _write_json(out / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer"})
        written += ["vocab.json", "merges.txt", "tokenizer_config.json"]
    return written, ids


SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def export_hf(
    load: str | os.PathLike,
    output: str | os.PathLike,
    *,
    true_vocab: Optional[int] = None,
    max_shard_bytes: int = 2 * 1024**3,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Write the newest checkpoint of `load` as a Hugging Face folder; returns config.json."""
    folder, meta = ckpt.load_meta(load)
    if folder is None:
        raise ReshardError(f"no checkpoint in {load}")
    src = Source(folder, meta)
    c = src.config
    moe = X.moe_settings(meta)
    # refuse what no class represents before writing anything
    HM.moe_kind(c, moe) if moe is not None else H.hf_kind(c)
    vocab = true_vocab or L.true_vocab_size(meta)
    if vocab is None:
        raise ReshardError("cannot tell the tokenizer's vocabulary size: pass --true-vocab-size")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ReshardError(f"--output {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write_hf(src, meta, out, vocab, max_shard_bytes, log)
    except BaseException:
        for path in out.iterdir():  # out was new or empty: leave it so
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise


def _write_hf(
    src: Source, meta: dict, out: Path, vocab: int, max_shard_bytes: int, log: Callable
) -> dict:
    """The weights (unit by unit), config.json and tokenizer files of an export."""
    from safetensors.torch import save_file

    c = src.config
    moe = X.moe_settings(meta)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, dtype = 0, None
    files: list[str] = []

    def flush() -> None:
        name = f"part-{len(files):05d}.safetensors"
        save_file(shards[0], str(out / name), metadata={"format": "pt"})
        files.append(name)
        shards[0] = {}

    index: dict[str, int] = {}
    for unit, weights in src.unit_weights():
        if moe is not None:
            tensors = HM.moe_to_hf(weights, c, moe, vocab)
        else:
            tensors = H.to_hf(weights, c, vocab)
        for name, t in tensors.items():
            dtype = dtype or t.dtype
            if size and size + t.numel() * t.element_size() > max_shard_bytes:
                flush()
                size = 0
            shards[0][name] = t
            index[name] = len(files)
            size += t.numel() * t.element_size()
        log(f"  {unit}: {len(tensors)} tensor(s)")
    flush()
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    for tmp, final in zip(files, names):
        os.replace(out / tmp, out / final)
    if len(files) > 1:
        total = sum((out / n).stat().st_size for n in names)
        weight_map = {k: names[i] for k, i in sorted(index.items())}
        _write_json(
            out / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
    tokenizer, ids = _tokenizer_files(meta.get("settings", {}), out)
    if moe is not None:
        config = HM.hf_moe_config(c, moe, vocab, dtype or torch.float32, ids)
    else:
        config = H.hf_config(c, vocab, dtype or torch.float32, ids)
    _write_json(out / "config.json", config)
    log(f"wrote {', '.join(names + tokenizer + ['config.json'])}")
    return config


# --- import ------------------------------------------------------------------------------------
class _Reader:
    """Lazy tensors of an HF folder: one safetensors file or an index of several."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / SAFETENSORS_INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").exists():
            weight_map = None
        else:
            raise ReshardError(f"{folder}: no model.safetensors or {SAFETENSORS_INDEX}")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.handles = {f: safe_open(str(folder / f), framework="pt") for f in files}
        self.where = {k: f for f, h in self.handles.items() for k in h.keys()}

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ReshardError(f"the Hugging Face weights have no tensor {name!r}")
        return self.handles[self.where[name]].get_tensor(name)

    def meta(self, name: str) -> torch.Tensor:
        """A meta-device stand-in with the tensor's shape and dtype (nothing is read)."""
        sl = self.handles[self.where[name]].get_slice(name)
        dtype = getattr(torch, _ST_DTYPES.get(sl.get_dtype(), "float32"))
        return torch.empty(sl.get_shape(), dtype=dtype, device="meta")


_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def imported_model(
    hf: dict, tp: int, pp: int, layers_per_virtual: Optional[int], divisible: int
) -> GPTConfig:
    """The megalite model an HF config.json describes, split at TP x PP (chunks); the
    GPTConfig refuses a layout that cannot hold it, naming the flags."""
    a = HM.moe_args_from_hf(hf)[0] if HM.is_moe_hf(hf) else H.megalite_args_from_hf(hf)
    fields = {f.name for f in cli_fields(GPTConfig)}
    model = {k: v for k, v in a.items() if k in fields}
    model["rotary_base"] = int(model.get("rotary_base", 10000))
    return GPTConfig(
        **model,
        seq_length=a["max_position_embeddings"],
        vocab_size=a["vocab_size"],
        make_vocab_size_divisible_by=divisible,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        num_layers_per_virtual_pipeline_stage=layers_per_virtual,
    )


def import_hf(
    hf_dir: str | os.PathLike,
    save: str | os.PathLike,
    tp: int,
    pp: int,
    layers_per_virtual: Optional[int] = None,
    *,
    divisible: int = 128,
    ep: int = 1,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Write the HF model in `hf_dir` as a weights-only megalite checkpoint at TP x PP (an MoE
    model's experts over EP `ep`, ETP = TP)."""
    folder = Path(hf_dir)
    hf = json.loads((folder / "config.json").read_text())
    moe, experts = None, None
    try:
        model = imported_model(hf, tp, pp, layers_per_virtual, divisible)
        rows = model.padded_vocab_size
        c = dataclasses.replace(model, vocab_size=rows, hidden_dropout=0.0, attention_dropout=0.0)
        if HM.is_moe_hf(hf):
            from megalite.moe.config import MoEConfig

            moe = MoEConfig(**HM.moe_args_from_hf(hf)[1], expert_model_parallel_size=ep)
            experts = X.ExpertLayout(moe.num_experts, ep, tp, tp, True)
            experts.check(moe, c)
    except ValueError as e:
        raise ReshardError(f"cannot import {folder} at TP {tp} x PP {pp} x EP {ep}: {e}") from None
    kind = hf["model_type"]
    reader = _Reader(folder)
    units = ["embedding", *(f"layer.{i}" for i in range(c.num_layers)), "final"]

    def tensors(get, unit: str) -> dict[str, torch.Tensor]:
        if moe is not None:
            return HM.moe_from_hf(get, reader.has, unit, c, moe, kind, rows)
        return H.from_hf(get, unit, c, kind, rows)

    names: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for unit in units:  # shapes only: the maps run on meta tensors
        for n, t in tensors(reader.meta, unit).items():
            names[n] = (tuple(t.shape), t.dtype)
    tied = not c.untie_embeddings_and_output_weights
    if tied and pp > 1:
        names[L.OUTPUT_LAYER] = names[L.WORD_EMBEDDING]
    root = Path(save)
    tmp = ckpt.iteration_dir(root, 0).with_name("iter_0000000.tmp")
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    shards = write_skeletons(c, rows, names, False, None, tmp, experts)
    for unit in units:
        full = {n: {"weight": t} for n, t in tensors(reader.get, unit).items()}
        if tied and pp > 1 and unit == "embedding":
            full[L.OUTPUT_LAYER] = full[L.WORD_EMBEDDING]
        fill_unit(c, tmp, full, False, experts)
        log(f"  {unit}: {len(full)} tensor(s)")
    for t, p in shards:
        for path in ckpt.shard_dir(tmp, t, p).iterdir():
            fsync_file(path)
    settings = {k: v for k, v in to_dict(model).items() if k in _flags(GPTConfig)}
    settings.update({k: getattr(model, k) for k in ckpt.LAYOUT_FIELDS})
    if moe is not None:
        settings.update({k: v for k, v in to_dict(moe).items() if k in _flags(type(moe))})
    meta = {
        "settings": settings,
        "model": to_dict(model),
        "padded_vocab_size": rows,
        "optimizer_sharded": False,
        "iteration": 0,
        "consumed_train_samples": 0,
        "consumed_valid_samples": 0,
        "format_version": ckpt.FORMAT_VERSION,
        "optimizer_format": None,
        "imported_from": {"folder": str(folder.resolve()), "model_type": kind},
    }
    if experts is not None:
        meta["expert_layout"] = experts.to_meta()
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return ckpt.publish_iteration(root, 0, tmp)


def _flags(cls) -> set[str]:
    return {f.name for f in cli_fields(cls)}


def pretrain_flags(meta: dict) -> str:
    """The megalite-pretrain model and layout flags that match a checkpoint's model."""
    from megalite.checkpoint.format import saved_model_config

    model = saved_model_config(meta)
    defaults = GPTConfig(num_layers=1, hidden_size=1, num_attention_heads=1, seq_length=1)
    out = []
    for f in cli_fields(GPTConfig):
        value = getattr(model, f.name)
        if f.name in ("seq_length", "hidden_dropout", "attention_dropout", "init_method_std"):
            continue
        if f.name not in ("num_layers", "hidden_size", "num_attention_heads") and value == getattr(
            defaults, f.name
        ):
            continue
        if isinstance(value, bool):
            out += [flag_name(f.name)] if value else []
        elif value is not None:
            out.append(f"{flag_name(f.name)} {value}")
    for k in ckpt.LAYOUT_FIELDS:
        if meta["model"].get(k) is not None:
            out.append(f"{flag_name(k)} {meta['model'][k]}")
    moe = X.moe_settings(meta)
    if moe is not None:
        defaults = type(moe)()
        for f in cli_fields(type(moe)):
            value = getattr(moe, f.name)
            if value == getattr(defaults, f.name):
                continue
            if isinstance(value, bool):
                out += [flag_name(f.name)] if value else []
            elif value is not None:
                text = str(value)
                out.append(f"{flag_name(f.name)} '{text}'" if " " in text else
                           f"{flag_name(f.name)} {text}")  # fmt: skip
    return " ".join(out)
