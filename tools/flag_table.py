"""Print the table of every flag megalite-pretrain knows, by what megalite does with it.

    python tools/flag_table.py          # markdown, as docs/megatron-flags.md holds it
    python tools/flag_table.py --write  # rewrite that table in docs/megatron-flags.md

A flag is *implemented* (Megatron's meaning), a *no-op* (accepted: it only picks a kernel or a
mechanism megalite does not have, with the same result), or *refused* (the run stops with the
reason). tests/test_config.py checks that docs/megatron-flags.md holds exactly this table.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalite.config.fields import cli_fields, flag_name  # noqa: E402
from megalite.training.config import SECTIONS  # noqa: E402

MEGALITE_ONLY = {"zero_stage", "metrics_file", "peak_tflops", "mock_data"}


def kind(field) -> str:
    text = field.metadata["help"]
    if text.startswith("refused"):
        return "refused"
    if text.startswith("accepted"):
        return "no-op"
    if field.name == "transformer_impl":
        return "local; transformer_engine refused"
    return "implemented"


def table() -> str:
    rows = ["| flag | section | megalite | what it does |", "|---|---|---|---|"]
    for section, cls in SECTIONS.items():
        for f in cli_fields(cls):
            help_text = f.metadata["help"].replace("|", "/")
            if help_text == "==SUPPRESS==":
                continue
            what = kind(f) + (" (megalite's own)" if f.name in MEGALITE_ONLY else "")
            rows.append(f"| `{flag_name(f.name)}` | {section} | {what} | {help_text} |")
    return "\n".join(rows) + "\n"


PAGE = Path(__file__).resolve().parent.parent / "docs" / "megatron-flags.md"
START, END = "<!-- flag-table:start -->\n", "<!-- flag-table:end -->"


def write_page(path: Path = PAGE) -> None:
    """Replace the generated block of `path` (between the START and END markers) by `table()`."""
    text = path.read_text()
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    path.write_text(before + START + table() + END + after)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_page()
    else:
        sys.stdout.write(table())
