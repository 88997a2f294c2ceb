"""Resharding a trained checkpoint and resuming at another layout (world size 8, gloo).

A Llama-style tiny GPT (RMSNorm, SwiGLU, RoPE, GQA, tied embeddings) trains 5 iterations at
TP=2 x PP=2 x DP=2 with ZeRO-1 through the real trainer, is resharded offline, and resumes at
TP=1 x PP=4 (ZeRO-2), TP=4 x PP=1 (ZeRO-0) and TP=1 x PP=2 x DP=4 (ZeRO-1): iterations 6-10
must give the losses of the uninterrupted 10-iteration run at the original layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalite.checkpoint import format as ckpt
from megalite.checkpoint.reshard import ReshardError, load_full_model, reshard
from megalite.data_parallel.optimizer import PARAMS_FORMAT
from tests.harness import run_distributed

WORLD = 8
# vocab 64 pads to 64 at TP 1, 2 and 4 (divisible by 16 x TP): the padding rows, which enter
# the softmax, do not change, so the losses can match to round-off.
MODEL = (
    "--num-layers 4 --hidden-size 32 --num-attention-heads 8 --num-query-groups 4 "
    "--ffn-hidden-size 64 --seq-length 16 --normalization RMSNorm --swiglu "
    "--position-embedding-type rope --disable-bias-linear --vocab-size 64 "
    "--make-vocab-size-divisible-by 16"
).split()
RUN = (
    "--micro-batch-size 2 --global-batch-size 8 --lr 1e-2 --train-iters 10 --mock-data "
    "--hidden-dropout 0 --attention-dropout 0 --log-interval 1 --eval-iters 0 "
    "--distributed-backend gloo --seed 7"
).split()


def _pretrain(argv: list[str]) -> int:
    from megalite.pretrain import pretrain

    return pretrain(argv)


def train(argv: list[str], metrics: Path) -> list[dict]:
    """Run the trainer on 8 gloo ranks; the metrics lines it logged."""
    status = run_distributed(
        WORLD, _pretrain, MODEL + RUN + argv + ["--metrics-file", str(metrics)]
    )
    assert status == [0] * WORLD, status
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def layout(tp: int, pp: int, zero: int) -> list[str]:
    flags = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    return flags + ["--zero-stage", str(zero)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, reference metrics of the uninterrupted 10 iterations, 5-iteration checkpoint)."""
    root = tmp_path_factory.mktemp("reshard")
    reference = train(layout(2, 2, 1), root / "reference.jsonl")
    assert [r["iteration"] for r in reference] == list(range(1, 11))
    first = train(layout(2, 2, 1) + ["--save", str(root / "orig"), "--exit-interval", "5"],
                  root / "first.jsonl")  # fmt: skip
    assert [r["lm_loss"] for r in first] == [r["lm_loss"] for r in reference[:5]]
    assert ckpt.read_tracker(root / "orig") == 5
    return root, reference


@pytest.mark.parametrize(
    "tp,pp,zero", [(1, 4, 2), (4, 1, 0), (1, 2, 1)], ids=["tp1pp4-zero2", "tp4pp1-zero0", "dp4"]
)
def test_resume_after_reshard_matches_uninterrupted_run(trained, tp, pp, zero):
    root, reference = trained
    target = root / f"tp{tp}pp{pp}"
    reshard(root / "orig", target, tp, pp)
    meta = json.loads((target / "iter_0000005" / "meta.json").read_text())
    assert meta["model"]["tensor_model_parallel_size"] == tp
    assert meta["model"]["pipeline_model_parallel_size"] == pp
    assert meta["consumed_train_samples"] == 40 and meta["iteration"] == 5
    # Weights are moved, never changed.
    _, before = load_full_model(root / "orig")
    _, after = load_full_model(target)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name

    resumed = train(layout(tp, pp, zero) + ["--load", str(target)], target / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == list(range(6, 11))
    assert [r["consumed_samples"] for r in resumed] == [48, 56, 64, 72, 80]
    expected = reference[5:]
    for got, want in zip(resumed, expected):
        # fp32: only the order of the TP / DP reductions differs.
        assert got["lm_loss"] == pytest.approx(want["lm_loss"], rel=1e-5, abs=1e-6), got
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4, abs=1e-6), got
        assert got["lr"] == pytest.approx(want["lr"])


def test_resume_needs_the_optimizer_state(trained):
    """Control: the same resume without the Adam moments drifts off the reference at once."""
    root, reference = trained
    target = root / "control"
    reshard(root / "orig", target, 1, 4)
    flags = ["--load", str(target), "--no-load-optim", "--exit-interval", "7"]
    resumed = train(layout(1, 4, 1) + flags, target / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [6, 7]
    assert abs(resumed[1]["lm_loss"] - reference[6]["lm_loss"]) > 1e-4


@pytest.mark.parametrize(
    "tp,pp,virtual,message",
    [
        (3, 1, None, "--num-attention-heads 8 is not divisible by --tensor-model-parallel-size 3"),
        (8, 1, None, "--num-query-groups 4 is not divisible by --tensor-model-parallel-size 8"),
        (1, 3, None, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
        (2, 2, 3, "not divisible by --num-layers-per-virtual-pipeline-stage 3"),
    ],
)
def test_layout_that_cannot_hold_the_model_is_refused_before_writing(
    trained, tp, pp, virtual, message
):
    root, _ = trained
    target = root / f"refused_{tp}_{pp}_{virtual}"
    with pytest.raises(ReshardError, match=message.replace("(", r"\(").replace(")", r"\)")):
        reshard(root / "orig", target, tp, pp, virtual)
    assert not target.exists()


def test_interleaved_round_trip_keeps_every_tensor(trained, tmp_path):
    """To PP=2 with 2 virtual chunks and back: model and optimizer files are unchanged."""
    root, _ = trained
    reshard(root / "orig", tmp_path / "vp", 2, 2, 1)
    model = torch.load(tmp_path / "vp/iter_0000005/mp_rank_00_000/model.pt", weights_only=True)
    assert sorted(model) == ["chunk0", "chunk1"]
    assert "decoder.layers.2.input_layernorm.weight" in model["chunk1"]
    reshard(tmp_path / "vp", tmp_path / "back", 2, 2)
    reshard(root / "orig", tmp_path / "direct", 2, 2)
    for t in range(2):
        for p in range(2):
            shard = f"iter_0000005/mp_rank_{t:02d}_{p:03d}"
            for name in ("model.pt", ckpt.PARAMS_OPTIM_FILE):
                a = torch.load(tmp_path / "back" / shard / name, weights_only=True)
                b = torch.load(tmp_path / "direct" / shard / name, weights_only=True)
                if name != "model.pt":
                    assert a.pop("format") == b.pop("format") == PARAMS_FORMAT
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_optimizer_files_without_state_index_regather_the_same(trained, tmp_path):
    """Files saved before ``state_index`` existed: the piece order is rebuilt from the groups."""
    import shutil

    root, _ = trained
    old = tmp_path / "old"
    shutil.copytree(root / "orig", old)
    for path in old.glob("iter_*/mp_rank_*/optim_dp*.pt"):
        state = torch.load(path, weights_only=True)
        assert state.pop("state_index")
        torch.save(state, path)
    reshard(old, tmp_path / "a", 1, 1)
    reshard(root / "orig", tmp_path / "b", 1, 1)
    files = [f"iter_0000005/mp_rank_00_000/{n}" for n in ("model.pt", ckpt.PARAMS_OPTIM_FILE)]
    for name in files:
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / name, weights_only=True)
        torch.testing.assert_close(a.get("params", a), b.get("params", b), rtol=0, atol=0)


def test_missing_zero_shard_fails_and_leaves_no_partial_output(trained, tmp_path):
    import shutil

    root, _ = trained
    shutil.copytree(root / "orig", tmp_path / "broken")
    (tmp_path / "broken/iter_0000005/mp_rank_01_001/optim_dp001.pt").unlink()
    with pytest.raises(ReshardError, match="a DP rank's file is missing"):
        reshard(tmp_path / "broken", tmp_path / "out", 1, 1)
    assert list((tmp_path / "out").iterdir()) == []


def _load_per_parameter_state(zero_stage: int, bf16: bool) -> None:
    """Every DP rank slices its own pieces out of one per-parameter optimizer state."""
    from torch import nn

    from megalite import parallel_state as ps
    from megalite.data_parallel import DistributedDataParallel, OptimizerConfig, build_optimizer

    ps.initialize_model_parallel(1, 1)
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 5)).to(dtype)
    ddp = DistributedDataParallel(model, ps.get_data_parallel_group(), 50, False, zero_stage)
    config = OptimizerConfig(lr=1e-2, weight_decay=0.1, zero_stage=zero_stage, bf16=bf16)
    opt = build_optimizer(config, [ddp], ps.get_model_parallel_groups())
    g = torch.Generator().manual_seed(1)  # the same on every rank
    params = {
        name: {
            "main": torch.randn(p.shape, generator=g),
            "exp_avg": torch.randn(p.shape, generator=g),
            "exp_avg_sq": torch.rand(p.shape, generator=g),
            "step": torch.tensor(4.0),
        }
        for name, p in model.named_parameters()
    }
    for name, p in model.named_parameters():  # the model file holds the rounded main params
        p.data.copy_(params[name]["main"])
    opt.load_state_dict({"format": PARAMS_FORMAT, "params": params, "grad_scaler": None})
    total = sum(p.numel() for p in model.parameters())
    owned = sum(pc.end - pc.start for pc in opt.pieces)
    assert owned == total if zero_stage == 0 else 0 < owned < total  # ZeRO: a DP shard only
    for piece in opt.pieces:
        want = params[piece.name]
        cut = slice(piece.start, piece.end)
        assert torch.equal(piece.main, want["main"].view(-1)[cut])  # fp32, not the bf16 weight
        adam = opt.optimizer.state[piece.main]
        assert torch.equal(adam["exp_avg"], want["exp_avg"].view(-1)[cut])
        assert torch.equal(adam["exp_avg_sq"], want["exp_avg_sq"].view(-1)[cut])
        assert float(adam["step"]) == 4.0
    decays = {group["weight_decay"] for group in opt.param_groups}  # this run's, not the file's
    assert decays == {0.0, 0.1} if zero_stage == 0 else decays <= {0.0, 0.1}


@pytest.mark.parametrize("zero_stage,bf16", [(0, False), (1, True), (2, True)])
def test_optimizer_loads_per_parameter_state_at_any_zero_stage(zero_stage, bf16):
    run_distributed(WORLD, _load_per_parameter_state, zero_stage, bf16)
