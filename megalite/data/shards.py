"""Preprocessing across nodes: a corpus of shards cut into task sets, one dataset per task, merged.

    python -m megalite.data.shards task --work-dir W --task-index I --task-count N \\
        --input data/shards --output-prefix data/corpus --json-keys text ... (preprocess flags)
    python -m megalite.data.shards merge --work-dir W --output-prefix data/corpus

``slurm/preprocess.sbatch`` runs ``task`` as a Slurm job array (one task per index) and then
``merge``. The plan (``W/plan.json``): the inputs expanded in their stable order (see readers.py)
and cut into N consecutive shard sets of about equal bytes; the first task to start writes it,
later ones (and reruns) read it, so it never moves under a rerun. Task I preprocesses set I into
``W/taskIIIII_{key}_document`` and then writes ``W/taskIIIII.done``; a task whose marker exists
is not redone, and a failed one is rerun alone (``sbatch --array=I``). ``merge`` concatenates
the task datasets in index order, copying the .bin files block by block: the result is byte-
identical to one preprocess run over the same ordered shards.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Optional

from megalite.data.merge import merge_datasets
from megalite.data.preprocess import get_args, run
from megalite.data.readers import expand_inputs


def plan_sets(paths: list[str], count: int) -> list[list[str]]:
    """``count`` consecutive, non-empty sets of ``paths`` with about equal byte totals."""
    if not 1 <= count <= len(paths):
        raise ValueError(f"--task-count {count}: must be between 1 and the {len(paths)} shards")
    sizes = [max(os.path.getsize(p), 1) for p in paths]
    total, sets, at, acc = sum(sizes), [], 0, 0
    for k in range(1, count):
        end = at + 1  # every set takes one shard at least, and leaves one for each set after it
        acc += sizes[at]
        while end < len(paths) - (count - k) and acc + sizes[end] / 2 <= total * k / count:
            acc += sizes[end]
            end += 1
        sets.append(paths[at:end])
        at = end
    return sets + [paths[at:]]


def load_plan(work_dir: str, inputs: list[str], count: int) -> list[list[str]]:
    """The plan in ``work_dir``, written now if there is none yet (atomically: every task
    computes the same one, whichever rename lands last is identical)."""
    path = os.path.join(work_dir, "plan.json")
    if not os.path.exists(path):
        plan = {"inputs": inputs, "sets": plan_sets(expand_inputs(inputs), count)}
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(plan, f, indent=1)
        os.replace(tmp, path)
    with open(path) as f:
        plan = json.load(f)
    if plan["inputs"] != inputs or len(plan["sets"]) != count:
        raise ValueError(
            f"{path} was made for --input {' '.join(plan['inputs'])} in {len(plan['sets'])} "
            f"tasks, not --input {' '.join(inputs)} in {count}: use a new --work-dir"
        )
    return plan["sets"]


def task_prefix(work_dir: str, index: int) -> str:
    return os.path.join(work_dir, f"task{index:05d}")


def run_task(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shards task", add_help=False)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--task-index", type=int, required=True)
    p.add_argument("--task-count", type=int, required=True)
    ours, rest = p.parse_known_args(argv)
    args = get_args(rest)  # every preprocess flag, checked as preprocess checks them
    os.makedirs(ours.work_dir, exist_ok=True)
    sets = load_plan(ours.work_dir, args.input, ours.task_count)
    if not 0 <= ours.task_index < len(sets):
        raise ValueError(f"--task-index {ours.task_index}: the plan has tasks 0..{len(sets) - 1}")
    prefix = task_prefix(ours.work_dir, ours.task_index)
    done = prefix + ".done"
    if os.path.exists(done):
        print(f"task {ours.task_index}: already done ({done}), nothing to do", file=sys.stderr)
        return 0
    for stale in glob.glob(glob.escape(prefix) + "_*.tmp*"):  # left by a killed attempt
        os.remove(stale)
    shards = sets[ours.task_index]
    print(
        f"task {ours.task_index}/{len(sets)}: {len(shards)} shards, {shards[0]} ...",
        file=sys.stderr,
    )
    args.input, args.output_prefix = shards, prefix
    rc = run(args)
    if rc == 0:
        with open(done + ".tmp", "w") as f:
            level = "sentence" if args.split_sentences else "document"
            json.dump({"shards": shards, "json_keys": args.json_keys, "level": level}, f)
        os.replace(done + ".tmp", done)
    return rc


def run_merge(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shards merge")
    p.add_argument("--work-dir", required=True)
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    with open(os.path.join(args.work_dir, "plan.json")) as f:
        count = len(json.load(f)["sets"])
    missing = [
        i for i in range(count) if not os.path.exists(task_prefix(args.work_dir, i) + ".done")
    ]
    if missing:
        print(
            f"error: tasks {', '.join(map(str, missing))} of {count} are not done; rerun them "
            f"(sbatch --array={','.join(map(str, missing))} ...) and merge again",
            file=sys.stderr,
        )
        return 1
    with open(task_prefix(args.work_dir, 0) + ".done") as f:
        done = json.load(f)
    level = done.get("level", "document")  # _sentence with --split-sentences
    for key in done["json_keys"]:
        parts = [f"{task_prefix(args.work_dir, i)}_{key}_{level}" for i in range(count)]
        out = f"{args.output_prefix}_{key}_{level}"
        merged = merge_datasets(parts, out)
        print(f"merged {count} task datasets: {len(merged)} documents -> {out}", file=sys.stderr)
        merged.close()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("task", "merge"):
        print("usage: python -m megalite.data.shards {task,merge} ...", file=sys.stderr)
        return 2
    try:
        return (run_task if argv[0] == "task" else run_merge)(argv[1:])
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
