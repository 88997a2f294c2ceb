"""megalite's optimizer and DDP flags under --deepspeed: honoured (--decoupled-lr) or refused.

World size 2 (DP 2, DeepSpeed ZeRO-1 and ZeRO-3 on gloo with DS_ACCELERATOR=cpu) for the runs;
the refusals are checked by --dry-run (world size 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from tests.harness import run_distributed
from tests.test_long_runs import _ds_flags

pytest.importorskip("deepspeed")

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--micro-batch-size 2 --global-batch-size 8 --mock-data --vocab-size 128 "
    "--log-interval 1 --eval-iters 0 --distributed-timeout-minutes 2 --seed 7 "
    "--hidden-dropout 0 --attention-dropout 0 --train-iters 3 --lr-decay-style linear "
    "--lr 1e-3 --min-lr 0 --decoupled-lr 5e-2 --decoupled-min-lr 1e-2"
).split()
MAIN_LRS = [1e-3, 1e-3 * 2 / 3, 1e-3 / 3]  # linear decay over 3 iterations, no warm-up
DECOUPLED_LRS = [5e-2, 1e-2 + 4e-2 * 2 / 3, 1e-2 + 4e-2 / 3]


def _run_recording_lrs(argv: list[str]) -> tuple[int, list]:
    """Run `argv`; returns (status, per step the (decoupled?, lr) of each DeepSpeed group)."""
    from megalite.pretrain import pretrain
    from megalite.training import engine

    seen: list = []
    step = engine.DeepSpeedEngine.train_step

    def train_step(self, micro, num_microbatches):
        groups = self.engine.optimizer.param_groups
        seen.append(sorted({(bool(g.get("decoupled_lr")), g["lr"]) for g in groups}))
        return step(self, micro, num_microbatches)

    engine.DeepSpeedEngine.train_step = train_step
    try:
        return pretrain(argv), seen
    finally:
        engine.DeepSpeedEngine.train_step = step


def _pretrain(argv: list[str]) -> int:
    from megalite.pretrain import pretrain

    return pretrain(argv)


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["lm_loss"] for line in path.read_text().splitlines()]


def _decoupled_names() -> tuple[list[str], int, int]:
    from megalite import parallel_state as ps
    from megalite.data_parallel.deepspeed_bridge import deepspeed_param_groups
    from megalite.model import GPTConfig, build_model

    ps.initialize_model_parallel()
    config = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128,
                       seq_length=16, untie_embeddings_and_output_weights=True)  # fmt: skip
    (model,) = build_model(config, 7)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = deepspeed_param_groups(model, 0.1, decoupled_lr=True)
    decoupled = sorted(names[id(p)] for g in groups if g["decoupled_lr"] for p in g["params"])
    return decoupled, sum(len(g["params"]) for g in groups), len(names)


def test_decoupled_lr_groups_under_deepspeed_hold_only_embedding_and_output():
    """World size 1: the groups marked decoupled hold exactly Megatron's --decoupled-lr
    parameters, and every parameter is in one group."""
    [(decoupled, grouped, total)] = run_distributed(1, _decoupled_names)
    assert decoupled == ["embedding.word_embeddings.weight", "output_layer.weight"]
    assert grouped == total


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_decoupled_lr_reaches_the_embedding_and_output_groups_under_deepspeed(tmp_path, stage):
    """World size 2: every step the DeepSpeed groups of the embedding / output layer carry the
    --decoupled-lr schedule and the others the --lr one, and the loss curve is megalite's own
    engine's (ZeRO-1, which honours --decoupled-lr) to fp32 round-off."""
    ds_metrics, own_metrics = tmp_path / "ds.jsonl", tmp_path / "own.jsonl"
    argv = TINY + _ds_flags(tmp_path, stage) + ["--metrics-file", str(ds_metrics)]
    results = run_distributed(2, _run_recording_lrs, argv, timeout=300)
    assert [status for status, _ in results] == [0, 0]
    for _, seen in results:
        assert len(seen) == 3
        for i, groups in enumerate(seen):
            assert {flag for flag, _ in groups} == {False, True}, groups
            for flag, lr in groups:
                assert lr == pytest.approx(DECOUPLED_LRS[i] if flag else MAIN_LRS[i])
    argv = TINY + ["--zero-stage", "1", "--metrics-file", str(own_metrics)]
    assert run_distributed(2, _pretrain, argv, timeout=300) == [0, 0]
    assert_close(torch.tensor(_losses(ds_metrics)), torch.tensor(_losses(own_metrics)))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--grad-reduce-in-bf16"], '--grad-reduce-in-bf16 (DeepSpeed: "communication_data_type"'),
        (["--overlap-grad-reduce"], '--overlap-grad-reduce (DeepSpeed: "zero_optimization": '
                                    '{"overlap_comm": true})'),
        (["--ddp-bucket-size", "4096"], '--ddp-bucket-size 4096 (DeepSpeed: "zero_optimization"'
                                        ': {"reduce_bucket_size": 4096})'),
    ],
)  # fmt: skip
def test_ddp_flags_are_refused_under_deepspeed(tmp_path, capsys, flags, message):
    from megalite.pretrain import pretrain

    argv = TINY + _ds_flags(tmp_path, 1) + flags + ["--dry-run"]
    assert pretrain(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "with --deepspeed" in err, err
    assert pretrain(TINY + flags + ["--dry-run"]) == 0  # megalite's own DDP honours them
