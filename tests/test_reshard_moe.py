"""Resharding an MoE checkpoint across EP / ETP / TP / PP and resuming there (gloo).

A tiny MoE GPT (4 experts, top-2, SwiGLU experts, a shared expert, the DeepSeek-V3 expert bias)
trains 4 iterations at TP2 x EP2 (ETP = TP) with ZeRO-1 on 4 ranks and saves; the checkpoint is
resharded offline to other expert layouts, and the runs resumed there must give iterations 5-8
of the uninterrupted 8-iteration run (losses and grad norms). The weights are moved, never
changed, and a round trip through EP4 gives back the same tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalite.checkpoint import format as ckpt
from megalite.checkpoint.reshard import ReshardError, load_full_model, reshard
from megalite.checkpoint.reshard_experts import ExpertReshardError
from tests.harness import run_distributed

MODEL = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --swiglu "
    "--normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
    "--vocab-size 64 --make-vocab-size-divisible-by 16 --num-experts 4 --moe-router-topk 2 "
    "--moe-ffn-hidden-size 32 --moe-shared-expert-intermediate-size 32 "
    "--moe-aux-loss-coeff 1e-2 --moe-router-enable-expert-bias --moe-grouped-gemm"
).split()
RUN = (
    "--micro-batch-size 2 --global-batch-size 8 --lr 1e-2 --train-iters 8 --mock-data "
    "--hidden-dropout 0 --attention-dropout 0 --log-interval 1 --eval-iters 0 "
    "--distributed-backend gloo --seed 11 --distributed-timeout-minutes 2"
).split()
SOURCE = "--tensor-model-parallel-size 2 --expert-model-parallel-size 2 --zero-stage 1"


def _pretrain(argv: list[str]) -> int:
    from megalite.pretrain import pretrain

    return pretrain(argv)


def train(world: int, flags: str, metrics: Path) -> list[dict]:
    argv = MODEL + RUN + flags.split() + ["--metrics-file", str(metrics)]
    status = run_distributed(world, _pretrain, argv, timeout=300)
    assert status == [0] * world, status
    return [json.loads(line) for line in metrics.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, the uninterrupted 8 iterations at the source layout, 4-iteration checkpoint)."""
    root = tmp_path_factory.mktemp("reshard_moe")
    reference = train(4, SOURCE, root / "reference.jsonl")
    first = train(4, f"{SOURCE} --save {root / 'orig'} --exit-interval 4", root / "first.jsonl")
    assert [r["lm_loss"] for r in first] == [r["lm_loss"] for r in reference[:4]]
    assert ckpt.read_tracker(root / "orig") == 4
    return root, reference


TARGETS = {  # name: (world, tp, pp, ep, etp, the flags of the resumed run)
    "ep1-tp1-dp2": (2, 1, 1, 1, None, "--zero-stage 0"),
    "ep4-tp1-dp4-zero2": (4, 1, 1, 4, None, "--expert-model-parallel-size 4 --zero-stage 2"),
    "ep2-etp1-tp2-pp2": (
        4,
        2,
        2,
        2,
        1,
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 "
        "--expert-model-parallel-size 2 --expert-tensor-parallel-size 1 --zero-stage 1",
    ),  # fmt: skip
}


@pytest.mark.extended
@pytest.mark.parametrize("name", list(TARGETS))
def test_resume_after_expert_reshard_matches_uninterrupted_run(trained, name):
    root, reference = trained
    world, tp, pp, ep, etp, flags = TARGETS[name]
    target = root / name
    reshard(root / "orig", target, tp, pp, ep=ep, etp=etp)
    meta = json.loads((target / "iter_0000004" / "meta.json").read_text())
    want_etp = tp if etp is None else etp
    assert meta["expert_layout"] == {"num_experts": 4, "expert_model_parallel_size": ep,
                                     "expert_tensor_parallel_size": want_etp}  # fmt: skip
    assert meta["resharded_from"]["expert_layout"]["expert_model_parallel_size"] == 2
    _, before = load_full_model(root / "orig")
    _, after = load_full_model(target)
    assert before.keys() == after.keys()
    assert before["decoder.layers.0.mlp.experts.linear_fc1.weight"].shape == (4, 64, 32)
    for key in before:
        assert torch.equal(before[key], after[key]), key

    resumed = train(world, f"{flags} --load {target}", target / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [5, 6, 7, 8]
    for got, want in zip(resumed, reference[4:]):
        # fp32: only the order of the TP / DP / EP reductions differs.
        assert got["lm_loss"] == pytest.approx(want["lm_loss"], rel=1e-5, abs=1e-6), got
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4, abs=1e-6), got
        assert got["moe_load_balancing_loss"] == pytest.approx(
            want["moe_load_balancing_loss"], rel=1e-4
        )


@pytest.mark.extended
def test_trainer_checkpoint_refuses_another_dp_size_and_a_resharded_one_resumes(trained):
    """The trainer's per-DP-rank expert files fit their DP size only (refused at DP4); the same
    layout resharded keeps experts per (ep, etp) and resumes at DP4 on 8 ranks."""
    root, reference = trained
    # weights only: the ZeRO optimizer files would refuse another DP size by themselves
    flags = f"{SOURCE} --load {root / 'orig'} --no-load-optim --exit-interval 5"
    argv = MODEL + RUN + flags.split()
    assert run_distributed(8, _pretrain, argv, timeout=300) == [2] * 8
    target = root / "same-layout"
    reshard(root / "orig", target, 2, 1)
    resumed = train(8, f"{SOURCE} --load {target}", target / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == [5, 6, 7, 8]
    for got, want in zip(resumed, reference[4:]):
        assert got["lm_loss"] == pytest.approx(want["lm_loss"], rel=1e-5, abs=1e-6), got
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4, abs=1e-6), got


@pytest.mark.extended
def test_loaded_expert_weights_give_the_source_loss(trained):
    """Weights only (no optimizer state to lay the parameters over): iteration 5's loss is
    computed with the loaded weights before any update, so it is the source's; iteration 6
    then drifts without the Adam moments (control)."""
    root, reference = trained
    target = root / "weights-only"
    reshard(root / "orig", target, 1, 1, ep=4)
    flags = f"--expert-model-parallel-size 4 --load {target} --no-load-optim --exit-interval 6"
    resumed = train(4, flags, target / "metrics.jsonl")
    assert resumed[0]["lm_loss"] == pytest.approx(reference[4]["lm_loss"], rel=1e-5, abs=1e-6)
    assert abs(resumed[1]["lm_loss"] - reference[5]["lm_loss"]) > 1e-4


@pytest.mark.extended
def test_expert_reshard_round_trip_and_refusals(trained, tmp_path):
    root, _ = trained
    reshard(root / "orig", tmp_path / "ep4", 1, 2, ep=4)
    names = sorted(p.name for p in (tmp_path / "ep4/iter_0000004/mp_rank_00_001").iterdir())
    assert [n for n in names if n.startswith("experts_")] == [
        f"experts_ep{e:03d}_etp000.pt" for e in range(4)
    ]
    reshard(tmp_path / "ep4", tmp_path / "back", 2, 1, ep=2)
    _, a = load_full_model(root / "orig")
    _, b = load_full_model(tmp_path / "back")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The optimizer state survives the round trip too (per parameter, every expert rank).
    for e in range(2):
        files = [tmp_path / d / "iter_0000004/mp_rank_01_000" / f"optim_params_ep{e:03d}_etp001.pt"
                 for d in ("back",)]  # fmt: skip
        state = torch.load(files[0], weights_only=True)["params"]
        assert all(v["exp_avg_sq"].abs().sum() > 0 for v in state.values())
    with pytest.raises(ExpertReshardError, match=r"--num-experts \(4\) is not divisible .* \(3\)"):
        reshard(root / "orig", tmp_path / "bad", 1, 1, ep=3)
    with pytest.raises(ExpertReshardError, match=r"--moe-ffn-hidden-size \(32\) .* \(64\)"):
        reshard(root / "orig", tmp_path / "bad", 1, 1, etp=64)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ReshardError, match="is --load itself"):
        reshard(root / "orig", root / "orig", 1, 1)


def _one_process_moe_checkpoint(root: Path) -> Path:
    """A fresh one-process MoE model (EP1) saved through megalite's checkpoint writer."""
    from megalite.model import build_model
    from megalite.training.arguments import resolved_config
    from tests.test_hf import write_checkpoint

    flags = "--mock-data --micro-batch-size 2 --train-iters 1 --lr 1e-3"
    run = resolved_config(MODEL + flags.split(), 1)
    config = run.model_config(64)
    (model,) = build_model(config, 5, use_parallel_state=False, moe=run.moe)
    return write_checkpoint(root, run, config, model)


def test_reshard_cli_splits_experts_and_refuses_what_does_not_fit(tmp_path, capsys):
    """megalite-reshard's EP / ETP flags, one process: a weights-only MoE checkpoint to
    TP2 x PP2 x EP4 x ETP1 and back keeps every tensor; EP 3 is refused naming the numbers."""
    from tests.test_reshard_units import _tool

    src = _one_process_moe_checkpoint(tmp_path / "ck")
    cli = _tool("checkpoint_reshard").main
    argv = ["--load", str(src), "--target-tensor-parallel-size", "2",
            "--target-pipeline-model-parallel-size", "2"]  # fmt: skip
    assert cli(argv + ["--save", str(tmp_path / "ep4"), "--target-expert-model-parallel-size",
                       "4", "--target-expert-tensor-parallel-size", "1"]) == 0  # fmt: skip
    shard = tmp_path / "ep4/iter_0000001/mp_rank_01_001"
    assert sorted(p.name for p in shard.glob("experts_*")) == [
        "experts_ep001_etp000.pt", "experts_ep003_etp000.pt"
    ]  # fmt: skip
    assert cli(["--load", str(tmp_path / "ep4"), "--save", str(tmp_path / "back"),
                "--target-tensor-parallel-size", "1", "--target-pipeline-model-parallel-size",
                "1", "--target-expert-model-parallel-size", "1"]) == 0  # fmt: skip
    _, before = load_full_model(src)
    _, after = load_full_model(tmp_path / "back")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    capsys.readouterr()
    assert cli(argv + ["--save", str(tmp_path / "bad"), "--target-expert-model-parallel-size",
                       "3"]) == 2  # fmt: skip
    assert "--num-experts (4) is not divisible by the target expert-model-parallel size (3)" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "bad").exists()
