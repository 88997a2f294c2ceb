"""`megalite-pretrain` with MoE on gloo: 8 iterations at EP x TP (SP) / EP x PP with ZeRO equal
the one-process run on losses, grad norms and aux losses; the metrics file carries the MoE
metrics; a Megatron Mixtral-style command line (scaled down) runs as is; bad MoE flags are
refused by name."""

import json

import pytest
import torch
from torch.testing import assert_close

from megalite.config import ConfigError
from megalite.training.arguments import load_config
from tests.harness import run_distributed

pytestmark = pytest.mark.extended

BASE = (
    "--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --lr-warmup-iters 2 --mock-data "
    "--vocab-size 128 --log-interval 1 --eval-iters 0 --hidden-dropout 0 --attention-dropout 0 "
    "--train-iters 8 --distributed-timeout-minutes 2 --swiglu --disable-bias-linear "
    "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 32 --moe-aux-loss-coeff 1e-2 "
    "--moe-z-loss-coeff 1e-3 --moe-grouped-gemm --moe-shared-expert-intermediate-size 32"
).split()
KEYS = ("lm_loss", "grad_norm", "moe_load_balancing_loss", "moe_z_loss")


def _pretrain(argv):
    from megalite.pretrain import pretrain

    return pretrain(argv)


def _run(world, extra, path, tb=None):
    argv = BASE + extra.split() + ["--metrics-file", str(path)]
    argv += ["--tensorboard-dir", str(tb)] if tb else []
    assert run_distributed(world, _pretrain, argv, timeout=300) == [0] * world
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if "split" not in r]


@pytest.mark.slow
def test_moe_pretrain_layouts_match_one_process(tmp_path):
    ref = _run(1, "", tmp_path / "ref.jsonl", tb=tmp_path / "tb")
    assert len(ref) == 8 and {f"moe_z_loss_layer{i}" for i in range(4)} <= set(ref[0])
    assert ref[0]["moe_load_max_over_mean"] >= 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/moe_load_balancing_loss", "train/moe_load_max_over_mean_layer3"} <= tags
    values = [e.value for e in acc.Scalars("train/moe_z_loss")]
    assert_close(torch.tensor(values), torch.tensor([r["moe_z_loss"] for r in ref]))
    layouts = [
        "--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2 "
        "--zero-stage 1 --moe-token-dispatcher-type alltoall",
        "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2 --zero-stage 2",
        "--tensor-model-parallel-size 2 --expert-model-parallel-size 2 "
        "--expert-tensor-parallel-size 1 --moe-token-dispatcher-type alltoall",
    ]
    for i, layout in enumerate(layouts):
        assert_metrics_equal(ref, _run(4, layout, tmp_path / f"l{i}.jsonl"), layout)


def assert_metrics_equal(ref: list, got: list, layout: str) -> None:
    """Per-iteration lm_loss, grad norm, aux and z-loss of a layout equal the reference run's."""
    for key in KEYS:
        want = torch.tensor([r[key] for r in ref])
        got_k = torch.tensor([r[key] for r in got])
        assert_close(got_k, want, rtol=1e-5, atol=1e-7, msg=f"{layout}: {key}")


MIXTRAL = (
    "--use-mcore-models --disable-bias-linear --seq-length 32 --max-position-embeddings 64 "
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 112 --num-attention-heads 4 "
    "--init-method-std 0.01 --attention-dropout 0.0 --hidden-dropout 0.0 --normalization "
    "RMSNorm --position-embedding-type rope --no-position-embedding --swiglu "
    "--untie-embeddings-and-output-weights "
    "--group-query-attention --num-query-groups 2 --no-masked-softmax-fusion --rotary-base "
    "1000000 --num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss "
    "--moe-aux-loss-coeff 1e-2 --moe-grouped-gemm --moe-token-dispatcher-type alltoall "
    "--overlap-param-gather --overlap-grad-reduce --use-distributed-optimizer "
    "--expert-model-parallel-size 2 --micro-batch-size 1 --global-batch-size 8 --lr 1e-4 "
    "--train-iters 2 --mock-data --vocab-size 256 --moe-router-dtype fp32"
).split()


def test_mixtral_style_command_line_parses():
    mixtral = MIXTRAL
    cfg, _ = load_config(mixtral)
    cfg.resolve(4)
    assert cfg.moe.num_experts == 8 and cfg.moe.expert_model_parallel_size == 2
    with pytest.raises(ConfigError, match="--deepspeed: use megalite's own ZeRO"):
        load_config(BASE + ["--deepspeed", "--deepspeed_config", "x.json"])[0].resolve(2)
    with pytest.raises(ConfigError, match=r"num-experts \(4\) is not divisible by .* \(8\)"):
        load_config(BASE + ["--expert-model-parallel-size", "8"])


def test_check_layouts_with_experts():
    from pathlib import Path

    from megalite.check import LayoutSyntaxError, ModelSpec, parse_layout, pretrain_argv

    layout = parse_layout("tp2dp2ep2spa2a")
    assert (layout.tp, layout.dp, layout.ep, layout.sp, layout.a2a) == (2, 2, 2, True, True)
    assert layout.world_size == 4 and layout.reference().name == "ep1"
    argv = pretrain_argv(layout, ModelSpec(), Path("."))
    assert "--expert-model-parallel-size=2" in argv and "--num-experts=4" in argv
    assert "--moe-token-dispatcher-type=alltoall" in argv
    with pytest.raises(LayoutSyntaxError, match="a2a needs ep"):
        parse_layout("dp2a2a")


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["0", "1"])
def test_moe_resume_is_bit_identical_tp2_ep2(tmp_path, zero):
    """8 iterations straight == 4 + save + resume + 4 at TP2 x EP2 x ETP2 (experts differ by
    DP rank: each DP rank saves its own experts and optimizer state), dropout on."""
    extra = (f"--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2 "
             f"--zero-stage {zero} --hidden-dropout 0.1 "
             "--moe-router-enable-expert-bias --moe-router-score-function sigmoid")  # fmt: skip
    straight = _run(4, extra, tmp_path / "straight.jsonl")
    ck = tmp_path / "ck"
    legs = f"{extra} --save {ck} --load {ck}"
    _run(4, legs + " --exit-interval 4", tmp_path / "a.jsonl")
    assert sorted(p.name for p in (ck / "iter_0000004" / "mp_rank_00_000").glob("experts_*")) == [
        "experts_dp000.pt", "experts_dp001.pt"
    ]  # fmt: skip
    resumed = _run(4, legs, tmp_path / "b.jsonl")
    assert [r["iteration"] for r in resumed] == [5, 6, 7, 8]
    for key in ("lm_loss", "grad_norm", "moe_load_balancing_loss"):
        assert [r[key] for r in resumed] == [r[key] for r in straight[4:]], key
    # another expert layout is refused (a UserError: exit status 2 on every rank)
    other = extra.replace("--expert-model-parallel-size 2", "") + f" --load {ck}"
    assert run_distributed(4, _pretrain, BASE + other.split(), timeout=300) == [2] * 4


@pytest.mark.slow
def test_mixtral_style_command_line_trains_at_tp2_ep2():
    argv = MIXTRAL + "--tensor-model-parallel-size 2 --sequence-parallel --eval-iters 0".split()
    assert run_distributed(4, _pretrain, argv, timeout=300) == [0] * 4
