"""The one source of truth for settings: config files, precedence, saved configs, legacy
checkpoints, Megatron-LM command lines, and the import layering that keeps it so."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import yaml

from megalite.config import ConfigError
from megalite.training.arguments import load_config, resolved_config
from megalite.training.config import SECTIONS, section_of_field
from tests.harness import run_distributed

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "legacy_v1"

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
    "--global-batch-size 4 --lr 1e-3 --mock-data --vocab-size 60 --train-iters 3 "
    "--hidden-dropout 0 --attention-dropout 0 --log-interval 1 --eval-iters 0"
).split()


def _without(argv: list[str], flag: str) -> list[str]:
    """`argv` less `flag` and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


def _pretrain(argv):
    from megalite.pretrain import pretrain

    return pretrain(argv)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _curve(path: Path) -> list[tuple[float, float]]:
    return [(r["lm_loss"], r["grad_norm"]) for r in _records(path) if "grad_norm" in r]


def test_field_names_are_unique_and_every_section_is_a_dataclass():
    fields = section_of_field()  # raises on a duplicate
    assert fields["tensor_model_parallel_size"] == "parallel"
    assert fields["num_layers"] == "model" and fields["lr"] == "optimizer"
    assert set(SECTIONS) == {"model", "moe", "parallel", "optimizer", "schedule", "training",
                             "data", "checkpoint", "logging", "exit", "megatron"}  # fmt: skip


def test_config_file_sits_under_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  num-layers: 4\n  hidden_size: 64\nsequence-parallel: true\nlr: 5e-4\n"
    )
    cfg, _ = load_config(["--config", str(path), *TINY])  # TINY's flags win over the file
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 32
    assert cfg.optimizer.lr == 1e-3
    argv = _without(TINY, "--num-layers")
    cfg, _ = load_config(["--config", str(path), *argv])
    assert cfg.model.num_layers == 4  # from the file: not on the command line
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"num_layers": 3}))
    assert load_config(["--config", str(json_path), *argv])[0].model.num_layers == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("num_layer: 4\n", "unknown setting 'num_layer' (did you mean 'num_layers'?)"),
        ("hidden_size: big\n", "hidden_size = 'big' is not a valid int"),
        ("- 1\n- 2\n", "expected a mapping of settings"),
    ],
)
def test_bad_config_file_names_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(path), *TINY])
    assert message in str(e.value) and str(path) in str(e.value)


def test_required_settings_name_the_flags():
    with pytest.raises(ConfigError, match="required .*--num-layers"):
        load_config(_without(TINY, "--num-layers"))


def test_derived_defaults_are_computed_once_in_the_model_config():
    from megalite.model.config import GPTConfig

    direct = GPTConfig(
        num_layers=2, hidden_size=96, num_attention_heads=4, seq_length=8, swiglu=True
    )
    cli = resolved_config(
        [*TINY, "--hidden-size", "96", "--swiglu", "--num-attention-heads", "4"], 1
    )
    assert direct.ffn_hidden_size == cli.model.ffn_hidden_size == 256  # 8h/3 down to 64s
    assert direct.max_position_embeddings == 8


@pytest.mark.slow
def test_config_file_run_equals_flag_run_and_saved_config_reproduces(tmp_path):
    flags, from_file, replay = (tmp_path / n for n in ("flags.jsonl", "file.jsonl", "replay.jsonl"))
    # in a worker process: pretrain in pytest's own process would leave MASTER_PORT & co. in
    # its environment for later tests' subprocesses (sbatch inherits it)
    argv = [*TINY, "--metrics-file", str(flags), "--save", str(tmp_path / "ck")]
    assert run_distributed(1, _pretrain, argv) == [0]
    settings = yaml.safe_load((tmp_path / "ck/iter_0000003/config.yaml").read_text())
    assert settings["model"]["num_layers"] == 2
    # the same run from a file holding the flags
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({k.lstrip("-"): v for k, v in _pairs(TINY)}))
    assert run_distributed(
        1, _pretrain, ["--config", str(path), "--metrics-file", str(from_file)]
    ) == [0]
    assert _curve(flags) == _curve(from_file)
    # the saved resolved config reproduces the run (its --save/--metrics-file overridden)
    saved = tmp_path / "ck/iter_0000003/config.yaml"
    argv = ["--config", str(saved), "--metrics-file", str(replay), "--save", str(tmp_path / "c2")]
    assert run_distributed(1, _pretrain, argv) == [0]
    assert _curve(flags) == _curve(replay)


# scripts/quickstart.sh's flags before it moved them into examples/configs/quickstart.yaml
QUICKSTART_FLAGS = """
--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --zero-stage 1
--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64
--micro-batch-size 4 --global-batch-size 32 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine
--lr-warmup-iters 20 --clip-grad 1.0 --hidden-dropout 0 --attention-dropout 0 --split 98,2,0
--tokenizer-type GPTSentencePieceTokenizer --save-interval 100000 --log-interval 20
--eval-interval 100 --eval-iters 2 --distributed-timeout-minutes 3
""".split()


@pytest.mark.slow
def test_quickstart_config_file_gives_the_flag_runs_losses(tmp_path):
    """world size 8: examples/configs/quickstart.yaml and the flags it replaced, same overrides
    (mock data, 3 iterations), give the same losses and grad norms bit for bit; a flag after
    the file wins (--log-interval 1 over the file's 20)."""
    rest = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
            "--train-iters", "3", "--log-interval", "1", "--eval-iters", "0"]  # fmt: skip
    by_file, by_flags = tmp_path / "file.jsonl", tmp_path / "flags.jsonl"
    config = str(ROOT / "examples" / "configs" / "quickstart.yaml")
    argv = [
        "--config",
        config,
        *rest,
        "--metrics-file",
        str(by_file),
        "--save",
        str(tmp_path / "a"),
    ]
    assert run_distributed(8, _pretrain, argv) == [0] * 8
    argv = [
        *QUICKSTART_FLAGS,
        *rest,
        "--metrics-file",
        str(by_flags),
        "--save",
        str(tmp_path / "b"),
    ]
    assert run_distributed(8, _pretrain, argv) == [0] * 8
    assert len(_curve(by_file)) == 3 and _curve(by_file) == _curve(by_flags)


def _pairs(argv):
    out, i = [], 0
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            try:
                value = int(value)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    pass
            out.append((argv[i], value))
            i += 2
        else:
            out.append((argv[i], True))
            i += 1
    return out


LEGACY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
    "--global-batch-size 8 --lr 1e-3 --lr-warmup-iters 1 --mock-data --vocab-size 60 "
    "--make-vocab-size-divisible-by 16 --hidden-dropout 0 --attention-dropout 0 --log-interval 1 "
    "--eval-iters 0 --tensor-model-parallel-size 2 --use-distributed-optimizer --swiglu "
    "--position-embedding-type rope --normalization RMSNorm --seed 7 --train-iters 4"
).split()


@pytest.mark.slow
def test_checkpoint_of_the_previous_format_resumes_to_the_same_losses(tmp_path):
    """world size 4: the fixture (format 1, TP2 x DP2 ZeRO-1) resumes at iteration 2 and gives
    the losses and grad norms the old code gave."""
    ck = tmp_path / "ck"
    shutil.copytree(FIXTURE / "ckpt", ck)
    out = tmp_path / "resumed.jsonl"
    assert run_distributed(4, _pretrain, [*LEGACY, "--load", str(ck), "--metrics-file", str(out)])
    want = _curve(FIXTURE / "resumed_losses.jsonl")
    assert [r["iteration"] for r in _records(out)] == [3, 4]
    assert _curve(out) == want


def test_checkpoint_of_the_previous_format_reshards(tmp_path):
    from megalite.checkpoint.reshard import load_full_model, reshard

    reshard(FIXTURE / "ckpt", tmp_path / "tp1", 1, 1)
    meta, full = load_full_model(tmp_path / "tp1")
    _, before = load_full_model(FIXTURE / "ckpt")
    assert meta["model"]["tensor_model_parallel_size"] == 1
    assert meta["format_version"] == 2 and meta["model"]["vocab_size"] == 60
    for name, value in before.items():
        assert full[name].equal(value), name


# Megatron-LM's own example command lines, sizes scaled to a CPU box, fp8 lines removed, and the
# Llama one's --ckpt-format torch_dist (refused: megalite-reshard converts layouts offline).
GPT3_175B = """
--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 32
--max-position-embeddings 32 --attention-backend auto
--micro-batch-size 1 --global-batch-size 8 --rampup-batch-size 4 2 16 --train-iters 6
--weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006 --clip-grad 1.0
--fp16 --lr 6.0e-5 --lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001
--lr-decay-iters 5 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
--split 949,50,1 --log-interval 1 --save-interval 3 --eval-interval 3 --eval-iters 1
"""
LLAMA3_8B = """
--use-mcore-models --num-layers 2 --hidden-size 32 --ffn-hidden-size 112 --num-attention-heads 4
--group-query-attention --num-query-groups 2 --kv-channels 8 --seq-length 32
--max-position-embeddings 32 --position-embedding-type rope --rotary-base 1000000
--rotary-percent 1.0 --attention-dropout 0.0 --hidden-dropout 0.0 --swiglu
--init-method-std 0.0134 --attention-backend fused --apply-layernorm-1p
--untie-embeddings-and-output-weights --disable-bias-linear
--micro-batch-size 1 --global-batch-size 4 --train-samples 24 --lr-decay-samples 20
--lr-warmup-samples 8 --lr 0.00015 --min-lr 0.00001 --decoupled-lr 5.0e-4
--decoupled-min-lr 4.5e-5 --lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1
--adam-beta1 0.9 --adam-beta2 0.95 --bf16 --grad-reduce-in-bf16 --cross-entropy-loss-fusion
--calculate-per-token-loss --manual-gc --empty-unused-memory-level 1
--tensor-model-parallel-size 2 --context-parallel-size 1 --sequence-parallel
--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
--mock-data --tokenizer-type NullTokenizer --vocab-size 256 --tiktoken-pattern v2
--split '99,1,0' --no-create-attention-mask-in-dataloader --no-mmap-bin-files --num-workers 1
--log-interval 1 --eval-iters 1 --eval-interval 3 --save-interval 3 --log-throughput
--profile --profile-step-start 2 --profile-step-end 3
--distributed-timeout-minutes 60
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt3_175b", "llama3_8b"])
def test_megatron_example_command_lines_run_unchanged(tmp_path, name):
    """world size 4 (175B: TP2 x PP2; Llama: TP2 x DP2). The 175B line names a GPT-2 BPE vocab
    and merges; here a NullTokenizer dataset stands in (the flags are otherwise unchanged)."""
    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    if name == "gpt3_175b":
        argv = GPT3_175B.split() + ["--mock-data", "--vocab-size", "128"]
    else:
        argv = LLAMA3_8B.split() + ["--tensorboard-dir", str(tmp_path / "tb")]
    argv += ["--save", str(ck), "--load", str(ck), "--metrics-file", str(metrics)]
    assert run_distributed(4, _pretrain, argv) == [0] * 4
    train = [r for r in _records(metrics) if "grad_norm" in r]
    assert train and all(r["lm_loss"] > 0 for r in train)
    if name == "gpt3_175b":  # ramp-up 4 -> 8 by 2 over 16 samples: +2 every 8 samples
        assert [r["global_batch_size"] for r in train] == [4, 4, 6, 6, 8, 8]
        assert train[-1]["consumed_samples"] == 4 + 4 + 6 + 6 + 8 + 8
    else:  # 24 samples of 4: 6 iterations; the profiler wrote a trace
        assert train[-1]["iteration"] == 6
        assert list((tmp_path / "tb").glob("profile_rank0_iter2.json"))


def test_fp8_and_transformer_engine_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="Transformer Engine"):
        load_config([*TINY, "--fp8-format", "hybrid"])
    with pytest.raises(ConfigError, match="Transformer Engine"):
        load_config([*TINY, "--transformer-impl", "transformer_engine"])


def test_rampup_and_sample_schedules_follow_megatron():
    cfg = resolved_config(
        [*TINY, "--global-batch-size", "8", "--micro-batch-size", "1", "--rampup-batch-size",
         "4", "2", "16"], 2,
    )  # fmt: skip
    assert [cfg.batch_size_at(c) for c in (0, 7, 8, 15, 16, 100)] == [4, 4, 6, 6, 8, 8]
    cfg = resolved_config(
        _without(TINY, "--train-iters")
        + ["--train-samples", "40", "--lr-warmup-samples", "8", "--lr-decay-samples", "40"],
        1,
    )
    main, _ = cfg.lr_schedules()
    assert cfg.train_iters == 10 and main.warmup_iters == 8 and main.decay_iters == 40
    assert main.lr(0, 4) == pytest.approx(0.5e-3) and main.lr(4, 4) == pytest.approx(1e-3)


# --- layering -------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("megalite")}


def _package_imports(package: str) -> dict[str, set[str]]:
    base = ROOT / "megalite" / package
    files = [base.with_suffix(".py")] if base.with_suffix(".py").exists() else base.rglob("*.py")
    return {str(f.relative_to(ROOT)): _imports(f) for f in files}


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("tensor_parallel", ("megalite.training", "megalite.model")),
        ("pipeline_parallel", ("megalite.training", "megalite.model")),
        ("data_parallel", ("megalite.training", "megalite.model")),
        ("data", ("megalite.training", "megalite.model")),
        ("model", ("megalite.training",)),
        ("checkpoint", ("megalite.training",)),
        ("config", ("megalite.training", "megalite.model", "megalite.data")),
    ],
)
def test_layering(package, forbidden):
    for file, modules in _package_imports(package).items():
        bad = sorted(m for m in modules if m.startswith(forbidden))
        assert not bad, f"{file} imports {bad}"


def test_parallel_state_imports_only_distributed_and_errors():
    allowed = {"megalite.distributed", "megalite.errors", "megalite.errors.UserError"}
    modules = _imports(ROOT / "megalite" / "parallel_state.py")
    assert modules <= allowed | {m for m in modules if m.startswith("megalite.distributed.")}


def test_no_import_cycles_between_modules():
    """Top-level imports only (lazy imports inside functions are how cycles are avoided)."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "megalite").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("megalite")
            ):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("megalite"))
        graph[name] = deps
    modules = set(graph)
    # a module importing its own package (whose __init__ imports it back) is how packages work
    edges = {
        m: {d for d in deps if d in modules and d != m and not m.startswith(d + ".")}
        for m, deps in graph.items()
    }
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in edges[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, m, d]))
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [])


def test_flag_table_page_is_the_generated_one():
    import subprocess
    import sys

    table = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "flag_table.py")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    page = (ROOT / "docs" / "megatron-flags.md").read_text()
    inside = page.split("<!-- flag-table:start -->\n")[1].split("<!-- flag-table:end -->")[0]
    assert inside == table, "docs/megatron-flags.md's flag table is stale: run tools/flag_table.py"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(apply_layernorm_1p=True), "apply_layernorm_1p=True"),
        (dict(kv_channels=16), "kv_channels=16"),
        (dict(rotary_percent=0.5), "rotary_percent=0.5"),
    ],
)
def test_hf_export_refuses_what_hugging_face_cannot_hold(change, message):
    from megalite.checkpoint.hf import HFConversionError, hf_kind
    from megalite.model.config import GPTConfig

    llama = dict(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=8, swiglu=True,
                 normalization="RMSNorm", position_embedding_type="rope")  # fmt: skip
    assert hf_kind(GPTConfig(**llama)) == "llama"
    with pytest.raises(HFConversionError, match=message):
        hf_kind(GPTConfig(**llama, **change))
