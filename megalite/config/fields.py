"""Config fields that carry their own command-line flag: the one mapping from flags to settings.

Every setting of megalite is a field of a dataclass declared with `option(...)`. The field's name
*is* the flag's name (``tensor_model_parallel_size`` <-> ``--tensor-model-parallel-size``), and
its metadata holds the help text, choices and aliases, so the argparse front end, config files
(YAML/JSON, ``_`` or ``-`` in keys), checkpoint metadata and the offline tools all go through the
same table and cannot drift apart. A field declared with ``cli=False`` is derived (computed in
``__post_init__``) or filled by the builder (e.g. the tokenizer's vocabulary): it is saved with
the config but is not a flag.

This module imports nothing of megalite but `megalite.errors`, so every layer may declare its own
config with it.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from megalite.errors import UserError

MISSING = dataclasses.MISSING


class ConfigError(UserError, ValueError):
    """A setting that cannot work; the message names the flag, the file or the numbers."""


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    default_factory: Any = MISSING,
    choices: Optional[Iterable[Any]] = None,
    nargs: Optional[str] = None,
    aliases: Iterable[str] = (),
    required: bool = False,
    cli: bool = True,
    metavar: Optional[str] = None,
    repr: bool = True,
) -> Any:
    """A dataclass field that is also a command-line flag named after it.

    `help` doubles as the field's one-line doc. `required` fields have no default on the
    command line and must come from a flag or a config file. `aliases` are extra flag spellings
    (e.g. DeepSpeed's ``--deepspeed_config``).
    """
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "nargs": nargs,
        "aliases": tuple(aliases),
        "required": required,
        "cli": cli,
        "metavar": metavar,
    }
    if required and default is MISSING and default_factory is MISSING:
        default = None  # the dataclass may still be built empty; `resolve` enforces presence
    kwargs: dict[str, Any] = {"metadata": metadata, "repr": repr}
    if default_factory is not MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def flag_name(field_name: str) -> str:
    """``tensor_model_parallel_size`` -> ``--tensor-model-parallel-size``."""
    return "--" + field_name.replace("_", "-")


def key_name(key: str) -> str:
    """A config-file key or flag in any spelling -> the field name."""
    return key.strip().lstrip("-").replace("-", "_")


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line flags, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.init]


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _scalar_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) of an annotation such as Optional[int] or list[str]."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return (args[0] if args else str), True
    return tp, False


def add_arguments(group: Any, cls: type) -> None:
    """Add one flag per CLI field of `cls` to an argparse group; defaults are SUPPRESSed.

    Only flags the user typed appear in the namespace, which is what lets a config file sit
    under the command line (`resolve` fills in the rest).
    """
    import argparse

    hints = field_types(cls)
    for f in cli_fields(cls):
        md = f.metadata
        tp, is_list = _scalar_type(hints[f.name])
        names = [flag_name(f.name), *md.get("aliases", ())]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": md["help"]}
        if tp is bool and not is_list:
            kw["action"] = "store_true"
        else:
            kw["type"] = tp if tp in (int, float, str) else str
            if md.get("choices") is not None:
                kw["choices"] = md["choices"]
            if is_list or md.get("nargs"):
                kw["nargs"] = md.get("nargs") or "+"
            if md.get("metavar"):
                kw["metavar"] = md["metavar"]
        if md["help"] == "==SUPPRESS==":
            kw["help"] = argparse.SUPPRESS
        group.add_argument(*names, **kw)


def coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """Convert a config-file value to the field's type; `where` names the file for errors."""
    hints = field_types(cls)
    tp, is_list = _scalar_type(hints[name])
    if value is None:
        return None
    try:
        if is_list:
            items = value if isinstance(value, (list, tuple)) else str(value).split()
            return [tp(v) if tp in (int, float, str) else v for v in items]
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if tp is int and isinstance(value, bool):
            raise ValueError(value)
        return tp(value) if tp in (int, float, str) else value
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: {name} = {value!r} is not a valid {getattr(tp, '__name__', tp)}"
            f"{' list' if is_list else ''}"
        ) from None


def suggest(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def flatten(data: Mapping[str, Any], sections: Iterable[str], where: str) -> dict[str, Any]:
    """A config file's mapping as {field name: value}; section headers may group fields."""
    sections = set(sections)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = key_name(str(key))
        if name in sections and isinstance(value, Mapping):
            for k, v in value.items():
                flat[key_name(str(k))] = v
        else:
            flat[name] = value
    return flat


def to_dict(obj: Any, *, cli_only: bool = False) -> dict[str, Any]:
    """A config's fields as plain JSON/YAML values (dtypes become their names)."""
    out = {}
    for f in dataclasses.fields(obj):
        if cli_only and not f.metadata.get("cli", True):
            continue
        value = getattr(obj, f.name)
        if type(value).__name__ == "dtype":  # torch.bfloat16 -> "bfloat16"
            value = str(value).replace("torch.", "")
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out
