"""The docs cannot rot silently: README.md and docs/*.md checked against the repository.

Single process, no world size. What is checked:
- README.md stays short (the manual lives in docs/), shows the command .ci/run calls, and its
  index links to every docs/ page;
- every relative link (and its #anchor) between README and the pages resolves;
- every repository path the text names (``tests/test_x.py[::test_name]``, ``tools/*.py``,
  ``megalite/...``, ``examples/``, ``scripts/``, ``slurm/``, ``docs/``) exists, and so does
  every test named alone (``test_x``);
- every dotted ``megalite.x.y`` name the text shows imports;
- every ``--flag`` the text shows is one a megalite command or script accepts (the argparse
  parsers the code builds), or one of the few launcher / Slurm flags of the allowlist below.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
TEXTS = [README, *PAGES]

# Files of other projects the text names (Megatron-LM's scripts the docs compare with).
FOREIGN_PATHS = {
    "examples/gpt3/train_gpt3_175b_distributed.sh",
    "examples/llama/train_llama3_8b_h100_fp8.sh",
    "examples/mixtral/README.md",
    "tools/preprocess_data_fast.py",
}

# Flags of the other commands the docs show (torchrun, deepspeed, sbatch, scancel, ruff, ...).
LAUNCHER_FLAGS = {
    "--standalone", "--nproc-per-node", "--nnodes", "--node-rank", "--master-addr",
    "--master-port", "--num_gpus", "--num_nodes", "--module", "--master_port", "--nodes",
    "--ntasks-per-node", "--signal", "--time", "--array", "--dependency", "--requeue", "--batch",
    "--check", "--logdir",
}  # fmt: skip


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_readme_is_short():
    lines = _text(README).count("\n")
    assert lines <= 300, f"README.md has {lines} lines: move the detail into a docs/ page"


def test_readme_test_command_is_what_ci_runs():
    ci = [ln for ln in _text(ROOT / ".ci" / "run").splitlines() if ln and not ln.startswith("#")]
    command = ci[-1].strip()  # the last line runs the suite; those above only set up the shell
    blocks = re.findall(r"```bash\n(.*?)```", _text(README), flags=re.S)
    assert any(ln.split("#")[0].strip() == command for b in blocks for ln in b.splitlines()), (
        f"README's commands do not show what .ci/run calls: {command!r}"
    )


def test_readme_indexes_every_docs_page():
    links = set(re.findall(r"\]\((docs/[^)#\s]+\.md)", _text(README)))
    missing = [p for p in links if not (ROOT / p).is_file()]
    assert not missing, f"README links to pages that do not exist: {missing}"
    unindexed = [_rel(p) for p in PAGES if _rel(p) not in links]
    assert not unindexed, f"docs pages missing from README's index: {unindexed}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", _text(path), flags=re.S)  # no headings inside code blocks
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("path", TEXTS, ids=_rel)
def test_relative_links_resolve(path):
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _text(path)):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no such heading)")
    assert not bad, f"{_rel(path)}: broken links: {bad}"


PATH_RE = re.compile(
    r"(?<![\w/.$-])((?:tests|tools|megalite|examples|scripts|slurm|docs)/[\w./*{},$-]*[\w*}/])"
    r"(::\w+)?"
)


def _expand(path: str) -> list[str]:
    """`ds_zero{1,2,3}.json` -> the three names; other names as they are."""
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return [path[: m.start()] + part + path[m.end() :] for part in m.group(1).split(",")]


@pytest.mark.parametrize("path", TEXTS, ids=_rel)
def test_every_repository_path_named_exists(path):
    missing = []
    for name, test in PATH_RE.findall(_text(path)):
        if name in FOREIGN_PATHS or "$" in name:
            continue
        if "." not in name.rsplit("/", 1)[-1] and not name.endswith("/"):
            continue  # not a file name ("docs/s" in a rate); folders are named with a final /
        for one in _expand(name):
            if "*" in one:
                if not glob.glob(str(ROOT / one)):
                    missing.append(one)
            elif not (ROOT / one).exists():
                missing.append(one)
            elif test and not re.search(rf"^def {test[2:]}\(", _text(ROOT / one), flags=re.M):
                missing.append(one + test)
    assert not missing, f"{_rel(path)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("path", TEXTS, ids=_rel)
def test_every_test_named_alone_exists(path):
    """A test named without its file (`test_x`) is a test function somewhere in tests/."""
    defined = set()
    for test_file in ROOT.glob("tests/test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)\(", _text(test_file), flags=re.M))
    named = set(re.findall(r"`(test_\w+)`", _text(path)))
    assert not named - defined, f"{_rel(path)} names tests that do not exist: {named - defined}"


@pytest.mark.parametrize("path", TEXTS, ids=_rel)
def test_every_dotted_megalite_name_imports(path):
    missing = []
    for name in set(re.findall(r"`(megalite(?:\.\w+)+)", _text(path))):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert not missing, f"{_rel(path)} names what megalite does not have: {missing}"


def _help_flags(main, *args) -> set[str]:
    """The flags a CLI whose parser is built inside its main() prints for --help."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*args, "--help"])
    return set(re.findall(r"--[A-Za-z][\w-]*", out.getvalue()))


def _parser_flags(parser) -> set[str]:
    return {s for s in parser._option_string_actions if s.startswith("--")}


@pytest.fixture(scope="module")
def accepted_flags() -> set[str]:
    from megalite import check
    from megalite.checkpoint import cli as ckpt_cli
    from megalite.data import preprocess
    from megalite.planner import cli as plan_cli
    from megalite.training import arguments

    flags = set(LAUNCHER_FLAGS)
    flags |= _parser_flags(arguments.build_parser())  # megalite-pretrain
    flags |= _parser_flags(plan_cli.build_parser())  # megalite-plan
    flags |= _parser_flags(check.build_parser())  # megalite-check
    flags |= _help_flags(preprocess.get_args)  # megalite-preprocess
    flags |= _help_flags(ckpt_cli.reshard_main)
    flags |= _help_flags(ckpt_cli.export_hf_main)
    flags |= _help_flags(ckpt_cli.import_hf_main)
    # The tools' and examples' own scripts (benchmarks, corpus, tokenizer training) and the
    # DeepSpeed launcher test module: their option strings, read from the source.
    scripts = [*ROOT.glob("tools/*.py"), *ROOT.glob("examples/*.py")]
    scripts.append(ROOT / "tests" / "test_deepspeed_launcher.py")
    for script in scripts:
        flags |= set(re.findall(r"[\"'](--[A-Za-z][\w-]*)[\"']", _text(script)))
    table = _text(ROOT / "docs" / "megatron-flags.md").split("<!-- flag-table:start -->")[1]
    flags |= set(re.findall(r"^\| `(--[\w-]+)`", table, flags=re.M))
    return flags


@pytest.mark.parametrize("path", TEXTS, ids=_rel)
def test_every_flag_shown_is_accepted(path, accepted_flags):
    unknown = set()
    for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*\*?", _text(path)):
        if flag.endswith("*"):  # `--moe-*`: some accepted flag has that prefix
            if not any(f.startswith(flag[:-1]) for f in accepted_flags):
                unknown.add(flag)
        elif flag not in accepted_flags:
            unknown.add(flag)
    assert not unknown, f"{_rel(path)} shows flags no megalite command accepts: {sorted(unknown)}"
