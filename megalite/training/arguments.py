"""The command line of `megalite-pretrain`, generated from the config dataclasses.

argparse lives only here. Every flag is a field of one section of `RunConfig` (Megatron-LM's
names); `--config FILE` (YAML or JSON, keys spelled like the fields or the flags, optionally
grouped under section names) is read first and the flags typed on the command line override it.
`load_config(argv)` returns the `RunConfig`; `RunConfig.resolve(world_size)` then checks what
needs the world size.

Precedence, lowest first: dataclass defaults < each --config file in order < command-line flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from megalite.config import ConfigError
from megalite.config.fields import (
    add_arguments,
    cli_fields,
    coerce,
    flatten,
    suggest,
)
from megalite.training.config import SECTIONS, RunConfig, section_of_field

# Extra flags of the front end itself (not settings of the run).
FRONT_END_FLAGS = ("config", "dry_run")

ArgumentError = ConfigError  # the name earlier code and tests know


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + exits 2; keep that, clearer
        if "unrecognized arguments" in message:
            message = message.replace("unrecognized arguments", "unknown flag(s)")
            message += " (see megalite-pretrain --help for the supported Megatron-LM flags)"
        super().error(message)


def build_parser(prog: str = "megalite-pretrain") -> argparse.ArgumentParser:
    """One argument group per config section, one flag per field."""
    p = _Parser(
        prog=prog,
        description="Pretrain a GPT model with tensor, pipeline and data (ZeRO) parallelism. "
        "Flags override the values of --config files.",
        allow_abbrev=False,
    )
    p.add_argument(
        "--config",
        action="append",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="YAML/JSON file of settings (keys as the flags); flags given here win",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the resolved config and the memory plan of this layout, then exit",
    )
    for name, cls in SECTIONS.items():
        add_arguments(p.add_argument_group(name), cls)
    return p


def read_config_file(path: str) -> dict[str, Any]:
    """{field: value} from a YAML/JSON file; unknown keys are errors naming file and key."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = file.read_text()
    try:
        if file.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml/json parse errors have many types
        raise ConfigError(f"--config {path}: not valid {file.suffix[1:] or 'YAML'}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(data)}")
    flat = flatten(data, SECTIONS, str(path))
    known = section_of_field()
    for key in flat:
        if key not in known:
            raise ConfigError(f"--config {path}: unknown setting {key!r}{suggest(key, known)}")
    return {k: coerce(SECTIONS[known[k]], k, v, f"--config {path}") for k, v in flat.items()}


def merged_settings(argv: Optional[Sequence[str]] = None) -> tuple[dict[str, Any], dict]:
    """(settings by field name, front-end options) from config files and the command line."""
    ns = build_parser().parse_args(sys.argv[1:] if argv is None else [str(a) for a in argv])
    given = vars(ns)
    settings: dict[str, Any] = {}
    for path in given.pop("config", []):
        settings.update(read_config_file(path))
    front = {k: given.pop(k) for k in FRONT_END_FLAGS if k in given}
    settings.update(given)  # flags win
    return settings, front


def config_from_settings(settings: dict[str, Any], where: str = "the command line") -> RunConfig:
    """Build every section from a flat {field: value} mapping; required fields must be there."""
    known = section_of_field()
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}{suggest(unknown[0], known)}")
    missing = [
        "--" + f.name.replace("_", "-")
        for cls in SECTIONS.values()
        for f in cli_fields(cls)
        if f.metadata.get("required") and settings.get(f.name) is None
    ]
    if missing:
        raise ConfigError(
            f"the following settings are required (on {where} or in --config FILE): "
            + ", ".join(missing)
        )
    sections = {}
    for name, cls in SECTIONS.items():
        names = {f.name for f in cli_fields(cls)}
        sections[name] = cls(**{k: v for k, v in settings.items() if k in names})
    return RunConfig(**sections)


def load_config(argv: Optional[Sequence[str]] = None) -> tuple[RunConfig, dict]:
    """(RunConfig, front-end options) for a command line; ConfigError names the bad setting."""
    settings, front = merged_settings(argv)
    return config_from_settings(settings), front


def to_settings(config: RunConfig) -> dict[str, dict[str, Any]]:
    """The run's settings by section, as a --config file holds them (flags only, no derived)."""
    from megalite.config.fields import to_dict

    return {name: to_dict(section, cli_only=True) for name, section in config.sections().items()}


def dump_yaml(config: RunConfig) -> str:
    """The resolved settings as YAML that `--config` accepts back."""
    import yaml

    header = "# megalite resolved configuration: megalite-pretrain --config THIS_FILE\n"
    return header + yaml.safe_dump(to_settings(config), sort_keys=False)


def resolved_config(argv: Sequence[str], world_size: int) -> RunConfig:
    """`load_config` then `RunConfig.resolve`: the checked config of a command line."""
    cfg, _ = load_config(argv)
    return cfg.resolve(world_size)
