"""`megalite-pretrain --context-parallel-size` end to end on gloo, against CP = 1.

Every layout trains the same 8 iterations (same seed, same global batches) and must log the
losses and gradient norms of the one-process run; a checkpoint saved at CP 2 resumes at CP 1 and
at CP 4 and continues the one-process curve. Sequence lengths the split cannot take, head counts
all-to-all cannot split, and DeepSpeed with CP are refused at flag validation, naming the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from megalite.config import ConfigError
from megalite.training.arguments import resolved_config
from tests.harness import run_distributed

pytestmark = pytest.mark.extended

ITERS = 8
BASE = (
    "--num-layers 4 --hidden-size 32 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --swiglu --normalization RMSNorm --position-embedding-type rope "
    "--seq-length 32 --micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --lr-warmup-iters 2 "
    "--clip-grad 0.5 --mock-data --vocab-size 128 --log-interval 1 --eval-iters 0 "
    "--hidden-dropout 0 --attention-dropout 0 --distributed-timeout-minutes 2 "
    f"--train-iters {ITERS}"
).split()


def _pretrain(argv):
    from megalite.pretrain import pretrain

    return pretrain(argv)


def _run(world: int, metrics: Path, *flags: str, split=None) -> dict[int, tuple[float, ...]]:
    """Train; {iteration: (lm_loss, grad_norm)} (``split="valid"``: {iteration: (lm_loss,)})."""
    argv = BASE + [f for f in " ".join(flags).split() if f] + ["--metrics-file", str(metrics)]
    assert run_distributed(world, _pretrain, argv, timeout=300) == [0] * world
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    if split is not None:
        return {r["iteration"]: (r["lm_loss"],) for r in rows if r.get("split") == split}
    return {r["iteration"]: (r["lm_loss"], r["grad_norm"]) for r in rows if "split" not in r}


def _assert_same(got: dict, want: dict, what: str) -> None:
    its = sorted(got)
    assert its and set(its) <= set(want), (what, its)
    assert_close(torch.tensor([got[i] for i in its], dtype=torch.float64),
                 torch.tensor([want[i] for i in its], dtype=torch.float64),
                 rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """CP = 1 in one process: losses and grad norms of iterations 1..8."""
    ref = _run(1, tmp_path_factory.mktemp("cp1") / "m.jsonl")
    assert sorted(ref) == list(range(1, ITERS + 1))
    return ref


def test_cp2_ring_and_all_to_all_match_cp1(reference, tmp_path):
    _assert_same(_run(2, tmp_path / "p2p.jsonl", "--context-parallel-size 2"), reference, "cp2")
    got = _run(2, tmp_path / "a2a.jsonl", "--context-parallel-size 2 --cp-comm-type a2a")
    _assert_same(got, reference, "cp2 a2a")
    # Evaluation splits its batches too: the validation loss is CP 1's.
    evals = "--eval-iters 2 --eval-interval 4"
    want = _run(1, tmp_path / "e1.jsonl", evals, split="valid")
    got = _run(2, tmp_path / "e2.jsonl", evals, "--context-parallel-size 2", split="valid")
    assert sorted(want) == [4, 8]
    _assert_same(got, want, "cp2 validation loss")


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        "--context-parallel-size 4",
        "--context-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel",
        "--context-parallel-size 2 --pipeline-model-parallel-size 2",
        "--context-parallel-size 2 --use-distributed-optimizer",  # DP2, ZeRO-1 over DP x CP
        "--context-parallel-size 2 --recompute-granularity full --cp-comm-type a2a "
        "--num-query-groups 4",
    ],
    ids=["cp4", "cp2-tp2-sp", "cp2-pp2", "cp2-dp2-zero1", "cp2-dp2-a2a-recompute"],
)
def test_cp_layouts_on_world4_match_cp1(reference, tmp_path, flags):
    ref = reference
    if "--num-query-groups 4" in flags:  # another model: its own one-process run
        ref = _run(1, tmp_path / "ref.jsonl", "--num-query-groups 4")
    _assert_same(_run(4, tmp_path / "m.jsonl", flags), ref, flags)


@pytest.mark.slow
def test_checkpoint_at_cp2_resumes_at_cp1_and_cp4(reference, tmp_path):
    ck = tmp_path / "ck"
    first = _run(
        2, tmp_path / "a.jsonl", f"--context-parallel-size 2 --save {ck} --exit-interval 4"
    )
    _assert_same(first, reference, "cp2 to iteration 4")
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    for world in (1, 4):
        got = _run(
            world, tmp_path / f"r{world}.jsonl", f"--context-parallel-size {world} --load {ck}"
        )
        assert sorted(got) == list(range(5, ITERS + 1))
        _assert_same(got, reference, f"resumed at CP {world}")


@pytest.mark.parametrize(
    "flags, world, message",
    [
        ("--context-parallel-size 4 --seq-length 20", 4,
         r"--context-parallel-size 4: seq_length \(20\) must be divisible by 2 x context-parallel "
         r"size \(4\) = 8"),
        ("--context-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel "
         "--seq-length 36", 4, r"seq_length \(36\) must be divisible by 2 x context-parallel size "
         r"\(2\) x tensor-model-parallel size \(2, sequence parallel\) = 8"),
        ("--context-parallel-size 4 --cp-comm-type a2a", 4,
         r"num_query_groups \(2\) divisible by tensor-model-parallel size \(1\) x "
         r"context-parallel size \(4\) = 4"),
        ("--context-parallel-size 2 --deepspeed --deepspeed_config ds.json", 2,
         r"--deepspeed with --context-parallel-size 2"),
        ("--context-parallel-size 3", 4, r"world size 4 is not divisible .* context-parallel "
         r"size \(3\)"),
    ],
)  # fmt: skip
def test_bad_cp_flags_are_refused_with_the_numbers(flags, world, message):
    with pytest.raises(ConfigError, match=message):
        resolved_config(BASE + flags.split(), world)


def test_megalite_check_runs_cp_layouts(tmp_path):
    from megalite.check import (
        STANDARD_MATRIX,
        LayoutSyntaxError,
        ModelSpec,
        parse_layout,
        preflight,
        pretrain_argv,
    )

    cp_layouts = [parse_layout(n) for n in STANDARD_MATRIX if "cp" in n]
    assert {lay.name for lay in cp_layouts} >= {"cp2", "cp2ulysses", "tp2cp2sp", "pp2cp2"}
    lay = parse_layout("tp2cp2spulysses")
    assert (lay.world_size, lay.name) == (4, "tp2cp2ulyssessp")
    argv = pretrain_argv(lay, ModelSpec(), tmp_path)
    assert "--context-parallel-size=2" in argv and "--cp-comm-type=a2a" in argv
    assert preflight(cp_layouts, ModelSpec(), tmp_path) == []
    with pytest.raises(LayoutSyntaxError, match="ulysses needs cp > 1"):
        parse_layout("tp2ulysses")


@pytest.mark.slow
def test_cp2_with_dropout_resumes_bit_identically(tmp_path):
    """Dropout on (ring attention dropout and hidden dropout, streams per CP rank): 8 iterations
    straight == 4 + save + resume + 4, the RNG states coming back from the checkpoint."""
    flags = "--context-parallel-size 2 --attention-dropout 0.1 --hidden-dropout 0.1"
    straight = _run(2, tmp_path / "s.jsonl", flags)
    ck = tmp_path / "ck"
    first = _run(2, tmp_path / "a.jsonl", flags, f"--save {ck} --exit-interval 4")
    second = _run(2, tmp_path / "b.jsonl", flags, f"--load {ck}")
    assert {**first, **second} == straight
    assert straight[ITERS][0] < straight[1][0]
