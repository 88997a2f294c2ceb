"""`python -m megalite.pretrain` / `megalite-pretrain`: the training entry point.

Works unchanged under torchrun, the deepspeed launcher, srun and mpiexec (see
`megalite.distributed`). Every failure ends this rank with a message and a non-zero exit status:
2 for bad flags, checkpoints or data (the same on every rank, so rank 0 alone prints it), 1 for
anything else (each rank prints its own, prefixed with its rank).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from typing import Optional


def _user_errors() -> tuple:
    from megalite.data_parallel.deepspeed_bridge import DeepSpeedLayoutError
    from megalite.parallel_state import LayoutError
    from megalite.training.arguments import ArgumentError
    from megalite.training.checkpointing import CheckpointError
    from megalite.training.trainer import TrainingError

    return (ArgumentError, CheckpointError, LayoutError, DeepSpeedLayoutError, TrainingError,
            FileNotFoundError, ValueError)  # fmt: skip


def pretrain(argv: Optional[Sequence[str]] = None) -> int:
    """Run training; returns the process exit status."""
    from megalite.training.arguments import parse_args

    args = parse_args(argv)  # argparse exits 2 itself on an unknown flag, naming it
    import torch.distributed as dist

    from megalite import parallel_state as ps
    from megalite.distributed import init_distributed
    from megalite.training.arguments import validate_args
    from megalite.training.trainer import Trainer

    owns_process_group = not dist.is_initialized()  # tests may call us inside a live group
    init_distributed(args.distributed_backend, args.distributed_timeout_minutes)
    rank = dist.get_rank()
    status = 0
    try:
        validate_args(args, dist.get_world_size())
        Trainer(args).train()
    except _user_errors() as e:
        status = 2
        if isinstance(e, (ValueError, FileNotFoundError)) and not _ours(e):
            status = 1
        print(f"megalite-pretrain: error (rank {rank}): {e}", file=sys.stderr, flush=True)
        if status == 1:
            traceback.print_exc()
    except BaseException as e:  # noqa: BLE001 - a peer died, a collective timed out, ...
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


def _ours(e: BaseException) -> bool:
    """A ValueError raised by megalite's own checks (configs, data) rather than a bug."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}megalite{os.sep}" in tb.tb_frame.f_code.co_filename


def main() -> None:
    status = pretrain()
    # On failure skip interpreter teardown: process-group destructors may block on dead peers.
    sys.stdout.flush()
    sys.stderr.flush()
    if status:
        os._exit(status)
    sys.exit(0)


if __name__ == "__main__":
    main()
