"""--manual-gc and --empty-unused-memory-level: where a short run collects and empties the cache.

World size 1 (one gloo rank in the harness), mock data, a 2-layer model."""

from __future__ import annotations

import gc

from tests.harness import run_distributed

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--micro-batch-size 2 --global-batch-size 4 --lr 1e-3 --mock-data --vocab-size 128 "
    "--log-interval 1 --distributed-timeout-minutes 2 --seed 7"
).split()


def _collections(argv: list[str]) -> tuple[int, list[int], bool, bool]:
    """Run `argv`; returns (status, the generation of every collection during the training
    loop, whether the collector was automatic at the first train step, and whether it is after
    the loop)."""
    from megalite.pretrain import pretrain
    from megalite.training import engine, trainer

    generations: list[int] = []
    seen: dict = {"loop": False}

    def record(phase, info):
        if phase == "start" and seen["loop"]:
            generations.append(info["generation"])

    step, train = engine.MegaliteEngine.train_step, trainer.Trainer.train

    def train_step(self, *args):
        seen.setdefault("enabled", gc.isenabled())
        return step(self, *args)

    def loop(self):
        seen["loop"] = True
        try:
            return train(self)
        finally:
            seen["loop"] = False
            seen["after"] = gc.isenabled()

    gc.callbacks.append(record)
    engine.MegaliteEngine.train_step, trainer.Trainer.train = train_step, loop
    try:
        status = pretrain(argv)
    finally:
        gc.callbacks.remove(record)
        engine.MegaliteEngine.train_step, trainer.Trainer.train = step, train
    return status, generations, seen["enabled"], seen["after"]


def test_manual_gc_collects_at_start_eval_save_and_interval(tmp_path):
    """4 iterations, eval every 2, save every 3 (and at the end), collect every 2: a full
    collection at the start, before each eval (iterations 2, 4), after each save (3, 4) and at
    iterations 2 and 4; a young-generation one after each eval. Nothing else: automatic
    collection is off during the run and back on after it."""
    argv = TINY + ["--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1",
                   "--save", str(tmp_path / "ck"), "--save-interval", "3",
                   "--manual-gc", "--manual-gc-interval", "2"]  # fmt: skip
    [(status, generations, enabled, after)] = run_distributed(1, _collections, argv)
    assert status == 0
    assert not enabled, "--manual-gc left automatic collection on during training"
    assert after, "the collector stayed off after the run"
    # start | it 2: interval, eval (full, young) | it 3: save | it 4: interval, eval, save
    assert generations == [2, 2, 2, 0, 2, 2, 2, 0, 2]


def test_manual_gc_without_interval_still_collects_at_eval_and_save(tmp_path):
    argv = TINY + ["--train-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
                   "--save", str(tmp_path / "ck"), "--manual-gc"]  # fmt: skip
    [(status, generations, enabled, _)] = run_distributed(1, _collections, argv)
    assert status == 0 and not enabled
    assert generations == [2, 2, 0, 2]  # start, before and after eval, the final save


def _cache_releases(argv: list[str]) -> tuple[int, list[str]]:
    """Run `argv`; returns (status, where the engine emptied the device cache, in order)."""
    from megalite.pretrain import pretrain
    from megalite.training import engine, memory

    where: list[str] = []
    phase = {"now": "train"}
    release, eval_step = memory.release_cached_memory, engine.MegaliteEngine.eval_step

    def fake_release(device):
        where.append(phase["now"])

    def eval_wrapped(self, *args):
        phase["now"] = "eval"
        try:
            return eval_step(self, *args)
        finally:
            phase["now"] = "train"

    memory.release_cached_memory, engine.MegaliteEngine.eval_step = fake_release, eval_wrapped
    try:
        status = pretrain(argv)
    finally:
        memory.release_cached_memory, engine.MegaliteEngine.eval_step = release, eval_step
    return status, where


def test_empty_unused_memory_levels_differ_as_in_megatron():
    """3 iterations, eval of 2 iterations at iteration 3: level 1 empties the cache after each
    forward-backward (3) and each eval iteration (2); level 2 also after each optimizer step."""
    argv = TINY + ["--train-iters", "3", "--eval-interval", "3", "--eval-iters", "2"]
    results = {}
    for level in (0, 1, 2):
        flags = argv + ["--empty-unused-memory-level", str(level)]
        [(status, where)] = run_distributed(1, _cache_releases, flags)
        assert status == 0
        results[level] = where
    assert results[0] == []
    assert results[1] == ["train"] * 3 + ["eval"] * 2
    assert results[2] == ["train"] * 6 + ["eval"] * 2
