"""Settings as typed dataclasses whose fields are the command-line flags (see `fields`)."""

from megalite.config.fields import (
    ConfigError,
    add_arguments,
    cli_fields,
    flag_name,
    option,
    to_dict,
)

__all__ = ["ConfigError", "add_arguments", "cli_fields", "flag_name", "option", "to_dict"]
