"""Single-process units of the training front end: flags, LR schedule, checkpoint IO."""

import errno
import json
import math
import pickle
import random

import numpy as np
import pytest
import torch

from megalite.checkpoint import format as ckpt
from megalite.training.arguments import ArgumentError, load_config, resolved_config
from megalite.training.lr_schedule import LRSchedule

BASE = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --train-iters 10 --lr 1e-3 --mock-data --vocab-size 128"
).split()


def _args(extra="", world=8):
    return resolved_config(BASE + extra.split(), world)


def test_defaults_and_derived_sizes():
    a = _args(
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --global-batch-size 16"
    )
    assert (a.data_parallel_size, a.training.global_batch_size) == (2, 16)
    assert a.model.ffn_hidden_size == 256 and a.model.max_position_embeddings == 32
    assert a.optimizer.zero_stage == 0 and a.lr_schedules()[0].decay_iters == 10
    assert _args("--use-distributed-optimizer").optimizer.zero_stage == 1


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (
            "--global-batch-size 10",
            2,
            "--global-batch-size 10 must equal --micro-batch-size 2 x data-parallel size 2",
        ),
        ("--tensor-model-parallel-size 3", 8, "world size 8 is not divisible"),
        (
            "--pipeline-model-parallel-size 8",
            8,
            "--num-layers 4 is not divisible by --pipeline-model-parallel-size 8",
        ),
        (
            "--tensor-model-parallel-size 8",
            8,
            "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 8",
        ),
        (
            "--num-attention-heads 3",
            1,
            "--hidden-size 64 is not divisible by --num-attention-heads 3",
        ),
        (
            "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 "
            "--global-batch-size 6",
            2,
            "multiple of --pipeline-model-parallel-size 2",
        ),
        (
            "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 3",
            2,
            "are not divisible by --num-layers-per-virtual-pipeline-stage 3",
        ),
        ("--bf16 --fp16", 1, "mutually exclusive"),
        (
            "--tensor-model-parallel-size 2 --sequence-parallel --seq-length 31",
            2,
            "--seq-length 31 divisible",
        ),
        ("--save-interval 5", 1, "--save-interval needs --save"),
        ("--exit-duration-in-mins 0", 1, "--exit-duration-in-mins must be > 0 minutes, got 0"),
    ],
)
def test_inconsistent_flags_are_named(extra, world, message):
    with pytest.raises(ArgumentError) as e:
        _args(extra, world)
    assert message in str(e.value)


def test_unknown_flag_is_named(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(BASE + ["--hiden-size", "3"])
    assert e.value.code == 2
    assert "unknown flag(s): --hiden-size 3" in capsys.readouterr().err


def test_no_data_is_refused():
    argv = [a for a in BASE if a != "--mock-data"]
    with pytest.raises(ArgumentError, match="give --data-path"):
        resolved_config(argv, 1)


def test_lr_schedules():
    s = LRSchedule(1.0, 0.1, warmup_iters=10, decay_iters=110, decay_style="cosine")
    assert s.lr(0) == pytest.approx(0.1) and s.lr(9) == pytest.approx(1.0)
    assert s.lr(10) == pytest.approx(1.0)
    assert s.lr(60) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.5) + 1))
    assert s.lr(110) == pytest.approx(0.1) and s.lr(1000) == pytest.approx(0.1)
    lin = LRSchedule(1.0, 0.0, 0, 100, "linear")
    assert lin.lr(25) == pytest.approx(0.75)
    assert LRSchedule(1.0, 0.0, 0, 100, "constant").lr(99) == 1.0
    with pytest.raises(ValueError, match="--min-lr"):
        LRSchedule(0.1, 1.0, 0, 10)


def test_rng_state_round_trip_is_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ckpt.get_rng_state({"tp": torch.get_rng_state()})
    torch.save(state, tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert "tp" in ckpt.set_rng_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def _save(root, iteration, value, **kw):
    return ckpt.save_checkpoint(
        root,
        iteration,
        coords={"tp": 0, "pp": 0, "dp": 0},
        model_state=lambda: {"chunk0": {"w": torch.full((2,), float(value))}},
        optimizer_state=lambda: {"step": iteration},
        optimizer_sharded=False,
        rng_state=ckpt.get_rng_state(),
        meta={"settings": {"hidden_size": 64}, **kw},
    )


def test_save_load_round_trip_and_tracker(tmp_path):
    _save(tmp_path, 5, 1.0)
    _save(tmp_path, 10, 2.0)
    assert ckpt.read_tracker(tmp_path) == 10
    folder, meta = ckpt.load_meta(tmp_path)
    assert folder.name == "iter_0000010" and meta["iteration"] == 10
    files = ckpt.load_shard_files(
        folder, {"tp": 0, "pp": 0, "dp": 0}, optim=True, optimizer_sharded=False, rng=True
    )
    assert files["model"]["chunk0"]["w"].tolist() == [2.0, 2.0]
    assert files["optimizer"] == {"step": 10}
    assert not list(tmp_path.glob("*.tmp"))


def test_disk_full_during_save_keeps_previous(tmp_path, monkeypatch):
    _save(tmp_path, 5, 1.0)
    real = ckpt._save
    calls = []

    def failing(obj, path):
        calls.append(path.name)
        if path.name.startswith("optim"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    monkeypatch.setattr(ckpt, "_save", failing)
    with pytest.raises(ckpt.CheckpointError) as e:
        _save(tmp_path, 10, 2.0)
    assert "No space left on device" in str(e.value) and "iteration 5 is intact" in str(e.value)
    assert ckpt.read_tracker(tmp_path) == 5
    assert not (tmp_path / "iter_0000010").exists()
    assert not (tmp_path / "iter_0000010.tmp").exists()
    folder, _ = ckpt.load_meta(tmp_path)
    files = ckpt.load_shard_files(
        folder, {"tp": 0, "pp": 0, "dp": 0}, optim=False, optimizer_sharded=False, rng=False
    )
    assert files["model"]["chunk0"]["w"].tolist() == [1.0, 1.0]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_object_is_refused_never_executed(tmp_path, capsys):
    folder = _save(tmp_path, 5, 1.0)
    target = folder / "mp_rank_00_000" / "model.pt"
    with open(target, "wb") as f:
        pickle.dump({"chunk0": _Evil()}, f)
    with pytest.raises(ckpt.CheckpointError, match="refusing to load .*model.pt"):
        ckpt.load_shard_files(
            folder, {"tp": 0, "pp": 0, "dp": 0}, optim=False, optimizer_sharded=False, rng=False
        )
    assert "pwned" not in capsys.readouterr().out


def test_shape_mismatch_is_named_with_reshard_hint(tmp_path):
    model = _args("--tensor-model-parallel-size 2", world=2).model_config(vocab_size=128)
    meta = {"model": {"hidden_size": 32, "tensor_model_parallel_size": 1}}
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_compatible(meta, model, tmp_path)
    text = str(e.value)
    assert "--hidden-size: checkpoint 32, this run 64" in text
    assert "--tensor-model-parallel-size: checkpoint 1, this run 2" in text
    assert "tools/checkpoint_reshard.py" in text


def test_sentencepiece_vocabulary_change_is_explained(tmp_path):
    """A checkpoint trained with last round's SentencePieceTokenizer (800 pieces + <CLS> <SEP>
    <EOD> <MASK> <PAD>) against today's (the 800 pieces): the error names both sizes, the ids
    and what reads them; --tokenizer-sentencepiece-legacy gives the old vocabulary back."""
    from megalite.config.fields import to_dict
    from megalite.training.trainer import tokenizer_vocab_size
    from tests.test_data_common import train_sentencepiece

    model_file = train_sentencepiece(str(tmp_path / "sp.model"))
    base = [a for a in BASE if a not in ("--mock-data", "--vocab-size", "128")]
    flags = base + ["--data-path", str(tmp_path / "data"), "--tokenizer-type"]
    flags += ["SentencePieceTokenizer", "--tokenizer-model", model_file]
    cfg = resolved_config(flags, 8)
    model = cfg.model_config(tokenizer_vocab_size(cfg))
    assert model.vocab_size == 800
    # last round's meta.json: its settings predate the flag
    saved = {k: v for k, v in to_dict(cfg.data).items() if k != "tokenizer_sentencepiece_legacy"}
    meta = {"model": {"vocab_size": 805}, "settings": saved}
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_compatible(meta, model, tmp_path, to_dict(cfg.data))
    text = str(e.value)
    assert (
        "vocabulary size (of the tokenizer, or --vocab-size): checkpoint 805, this run 800" in text
    )
    assert "ids 800..804" in text
    assert "<CLS> 800, <SEP> 801, <EOD> 802, <MASK> 803, <PAD> 804" in text
    assert "every document ended in <EOD> 802" in text and "eod </s> 2" in text
    assert "add --tokenizer-sentencepiece-legacy" in text

    legacy = resolved_config(flags + ["--tokenizer-sentencepiece-legacy"], 8)
    old_model = legacy.model_config(tokenizer_vocab_size(legacy))
    assert old_model.vocab_size == 805
    ckpt.check_compatible(meta, old_model, tmp_path, to_dict(legacy.data))  # loads

    # the other way round: a checkpoint made with the flag, a run without it
    meta = {"model": {"vocab_size": 805}, "settings": to_dict(legacy.data)}
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_compatible(meta, model, tmp_path, to_dict(cfg.data))
    assert "--tokenizer-sentencepiece-legacy`, this run's is `--tokenizer-type" in str(e.value)


def test_data_of_the_old_sentencepiece_rule_names_the_legacy_flag():
    """Data preprocessed with last round's SentencePieceTokenizer (eod <EOD> = 32002 past the
    32000 pieces), trained with today's: the error says which flag reads it."""
    from megalite.training.data import DataError, collate

    sample = {"tokens": np.array([5, 32002]), "labels": np.array([32002, 7])}
    with pytest.raises(DataError) as e:
        collate([sample], [0], vocab_size=32000)
    text = str(e.value)
    assert "holds token id 32002, outside the vocabulary of 32000" in text
    assert "train on it with --tokenizer-sentencepiece-legacy" in text


def test_corrupt_tracker_and_meta(tmp_path):
    (tmp_path / ckpt.TRACKER).write_text("banana")
    with pytest.raises(ckpt.CheckpointError, match="expected an iteration number"):
        ckpt.load_meta(tmp_path)
    (tmp_path / ckpt.TRACKER).write_text("7")
    with pytest.raises(ckpt.CheckpointError, match="meta.json is missing"):
        ckpt.load_meta(tmp_path)
    (tmp_path / "iter_0000007").mkdir()
    (tmp_path / "iter_0000007" / "meta.json").write_text(json.dumps({"x": 1})[:-2])
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        ckpt.load_meta(tmp_path)


def test_reporter_writes_metrics_and_mfu(tmp_path, capsys):
    from megalite.training.metrics import Reporter, device_peak_tflops

    assert device_peak_tflops(2.0) == 2.0
    rep = Reporter(True, str(tmp_path / "m.jsonl"), None, train_iters=10)
    rep.train(
        {
            "iteration": 3,
            "consumed_samples": 24,
            "lm_loss": 2.5,
            "lr": 1e-3,
            "grad_norm": float("nan"),
            "skipped_iterations": 0,
            "step_time_s": 0.5,
            "tokens_per_sec": 256.0,
            "tflops_per_device": 0.5,
            "mfu": 0.25,
            "loss_scale": 1024.0,
        }
    )
    rep.valid(3, 2.0)
    rep.close()
    line = capsys.readouterr().out
    assert "iteration      3/10" in line and "MFU 25.0%" in line and "loss scale 1024.0" in line
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows[0]["grad_norm"] is None  # NaN is written as null: the file stays valid JSON
    assert rows[1] == {
        "iteration": 3,
        "split": "valid",
        "lm_loss": 2.0,
        "lm_ppl": pytest.approx(math.exp(2.0)),
    }
    Reporter(False, str(tmp_path / "none.jsonl")).train({"iteration": 1})
    assert not (tmp_path / "none.jsonl").exists()
