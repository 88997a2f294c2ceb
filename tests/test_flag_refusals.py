"""Flag combinations the run cannot honour are refused at flag validation (exit 2, naming the
flags and numbers), never by a crash after the model is built: checked with --dry-run at the
launcher's world size (WORLD_SIZE), one process."""

from __future__ import annotations

import pytest

BASE = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 8 --micro-batch-size 1 "
    "--train-iters 2 --lr 1e-3 --mock-data --vocab-size 128 --dry-run"
).split()


def _dry_run(monkeypatch, capsys, world: int, flags: str) -> tuple[int, str]:
    from megalite.pretrain import pretrain

    monkeypatch.setenv("WORLD_SIZE", str(world))
    status = pretrain(BASE + flags.split())
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    "world, flags, message",
    [
        # The MoE layer splits each CP rank's seq / cp tokens over TP (issue #22: accepted, then
        # the first forward crashed at 20 / 2 = 10 tokens over TP 4).
        (8, "--seq-length 20 --context-parallel-size 2 --tensor-model-parallel-size 4 "
            "--num-experts 4",
         "--seq-length (20) / --context-parallel-size (2) = 10 tokens over TP: they must be "
         "divisible by 4 (--seq-length a multiple of 2 x 4 = 8)"),
        # The experts' width is split over ETP: built, then a ValueError (exit 1).
        (4, "--seq-length 16 --num-experts 4 --moe-ffn-hidden-size 30 "
            "--expert-tensor-parallel-size 4",
         "--moe-ffn-hidden-size (30) of each expert is not divisible by the "
         "expert-tensor-parallel size (4"),
        # The shared expert is a dense TP MLP: ColumnParallelLinear refused it at build.
        (4, "--seq-length 16 --tensor-model-parallel-size 4 --sequence-parallel "
            "--num-experts 4 --moe-shared-expert-intermediate-size 30",
         "--moe-shared-expert-intermediate-size (30) is not divisible by "
         "--tensor-model-parallel-size (4)"),
        # A per-layer pattern of the wrong length was only noticed while building the model.
        (1, "--seq-length 16 --num-experts 4 --moe-layer-freq [1,0,1]",
         "--moe-layer-freq '[1,0,1]' has 3 entries for 2 layers"),
    ],
)  # fmt: skip
def test_moe_layouts_that_crashed_later_are_refused(monkeypatch, capsys, world, flags, message):
    status, err = _dry_run(monkeypatch, capsys, world, flags)
    assert status == 2 and message in err, err


@pytest.mark.parametrize(
    "world, flags",
    [
        (8, "--seq-length 16 --context-parallel-size 2 --tensor-model-parallel-size 4 "
            "--num-experts 4"),
        (4, "--seq-length 16 --num-experts 4 --moe-ffn-hidden-size 32 "
            "--expert-tensor-parallel-size 4"),
        (1, "--seq-length 16 --num-experts 4 --moe-layer-freq [1,0]"),
    ],
)  # fmt: skip
def test_the_nearby_moe_layouts_are_accepted(monkeypatch, capsys, world, flags):
    status, err = _dry_run(monkeypatch, capsys, world, flags)
    assert status == 0, err


@pytest.mark.parametrize(
    "world, flags, message",
    [
        (2, "--seq-length 18 --context-parallel-size 2",
         "--context-parallel-size 2: seq_length (18) must be divisible by 2 x context-parallel "
         "size (2) = 4"),
        (8, "--seq-length 24 --context-parallel-size 2 --tensor-model-parallel-size 4 "
            "--sequence-parallel",
         "seq_length (24) must be divisible by 2 x context-parallel size (2) x "
         "tensor-model-parallel size (4, sequence parallel) = 16"),
        (8, "--seq-length 16 --context-parallel-size 4 --tensor-model-parallel-size 2 "
            "--cp-comm-type a2a --num-attention-heads 4",
         "cp_comm_type 'a2a' needs num_attention_heads (4) divisible by tensor-model-parallel "
         "size (2) x context-parallel size (4) = 8"),
        (4, "--seq-length 18 --tensor-model-parallel-size 4 --sequence-parallel",
         "--sequence-parallel needs --seq-length 18 divisible by --tensor-model-parallel-size 4"),
    ],
)  # fmt: skip
def test_cp_and_sp_splits_are_refused_at_validation(monkeypatch, capsys, world, flags, message):
    status, err = _dry_run(monkeypatch, capsys, world, flags)
    assert status == 2 and message in err, err


def test_ckpt_format_torch_dist_is_refused_and_torch_accepted(monkeypatch, capsys):
    """Megatron's torch_dist reloads at another layout; megalite's files do not: refused with the
    offline converter named, instead of accepted and ignored."""
    status, err = _dry_run(monkeypatch, capsys, 1, "--seq-length 16 --ckpt-format torch_dist")
    assert status == 2, err
    assert "--ckpt-format torch_dist" in err and "megalite-reshard" in err, err
    status, err = _dry_run(monkeypatch, capsys, 1, "--seq-length 16 --ckpt-format torch")
    assert status == 0, err


def test_async_save_help_names_the_default_writer():
    """--async-save's writer (the trainer's `AsyncCheckpointSaver()`) is a thread; the help once
    promised a forked process per rank."""
    from megalite.checkpoint.async_save import AsyncCheckpointSaver
    from megalite.training.arguments import build_parser

    assert AsyncCheckpointSaver().mode == "thread"
    [action] = [a for a in build_parser()._actions if "--async-save" in a.option_strings]
    assert "writer thread per rank" in action.help and "fork" not in action.help


def test_exit_duration_help_says_where_the_clock_starts():
    """The budget of --exit-duration-in-mins counts from the ExitWatch the trainer builds first
    thing (not from the start of the process, as the help said)."""
    import time

    from megalite.training.arguments import build_parser
    from megalite.training.exit_signals import ExitConfig, ExitWatch

    before = time.monotonic()
    watch = ExitWatch(ExitConfig(exit_duration_in_mins=1.0))
    assert before <= watch.start_time <= time.monotonic()
    [action] = [a for a in build_parser()._actions if "--exit-duration-in-mins" in a.option_strings]
    assert "start of the trainer" in action.help and "process" not in action.help
