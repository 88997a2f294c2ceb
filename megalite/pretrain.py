"""`python -m megalite.pretrain` / `megalite-pretrain`: the training entry point.

Works unchanged under torchrun, the deepspeed launcher, srun and mpiexec (see
`megalite.distributed`). Every failure ends this rank with a message and a non-zero exit status,
decided by the error's type (`megalite.errors`): 2 for bad flags, config files, layouts,
checkpoints or data (`UserError`: the same on every rank, so rank 0 alone prints it), 1 for
anything else (each rank prints its own, prefixed with its rank, with the traceback).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from typing import Optional


def pretrain(argv: Optional[Sequence[str]] = None) -> int:
    """Run training; returns the process exit status."""
    from megalite.errors import UserError
    from megalite.training.arguments import load_config

    try:
        cfg, front = load_config(argv)  # argparse exits 2 itself on an unknown flag, naming it
    except UserError as e:
        print(f"megalite-pretrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    if front.get("dry_run"):
        return dry_run(cfg)
    import torch.distributed as dist

    from megalite import parallel_state as ps
    from megalite.distributed import init_distributed
    from megalite.training.trainer import Trainer

    owns_process_group = not dist.is_initialized()  # tests may call us inside a live group
    p = cfg.parallel
    init_distributed(p.distributed_backend, p.distributed_timeout_minutes)
    rank = dist.get_rank()
    status = 0
    try:
        cfg.resolve(dist.get_world_size())
        Trainer(cfg).train()
    except UserError as e:
        status = 2
        print(f"megalite-pretrain: error (rank {rank}): {e}", file=sys.stderr, flush=True)
    except BaseException as e:  # noqa: BLE001 - a peer died, a collective timed out, a bug
        status = 1
        print(
            f"megalite-pretrain: rank {rank} failed: {type(e).__name__}: {e}",
            file=sys.stderr,
            flush=True,
        )
        if not isinstance(e, KeyboardInterrupt):
            traceback.print_exc()
    if status == 0 or not owns_process_group:
        ps.destroy_model_parallel()
    if status == 0 and owns_process_group:
        dist.destroy_process_group()
    return status


def dry_run(cfg) -> int:
    """--dry-run: check the config at the launcher's world size, print it, touch nothing."""
    import os

    from megalite.errors import UserError
    from megalite.training.arguments import dump_yaml

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg.resolve(world)
    except UserError as e:
        print(f"megalite-pretrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(dump_yaml(cfg))
    print(
        f"# world size {world}: TP {cfg.parallel.tensor_model_parallel_size} x PP "
        f"{cfg.parallel.pipeline_model_parallel_size} x DP {cfg.data_parallel_size}, "
        f"{cfg.train_iters} iterations"
    )
    # The memory plan of this layout (megalite-plan), as YAML comments so the output stays a
    # config file that --config reads back.
    from megalite.planner.cli import plan_text_for_run

    try:
        text = plan_text_for_run(cfg, world)
    except (UserError, ValueError) as e:
        text = f"no memory plan: {e}"
    print("\n".join("# " + line if line else "#" for line in text.splitlines()))
    return 0


def main() -> None:
    status = pretrain()
    # On failure skip interpreter teardown: process-group destructors may block on dead peers.
    sys.stdout.flush()
    sys.stderr.flush()
    if status:
        import os

        os._exit(status)
    sys.exit(0)


if __name__ == "__main__":
    main()
