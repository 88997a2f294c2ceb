"""Bring up a TP x PP x DP layout under any launcher and print who is where.

    torchrun --nproc-per-node 8 examples/show_layout.py --tp 2 --pp 2
    mpiexec -n 4 python examples/show_layout.py --tp 2 --pp 2
    srun -n 8 python examples/show_layout.py --tp 2 --pp 2

Rank 0 prints one line per rank (launcher, host, coordinates, groups); with `--json FILE` it also
writes them as JSON (the launcher tests compare that with the rank grid).
"""

import argparse
import json
import socket

import torch.distributed as dist

from megalite import parallel_state as ps
from megalite.distributed import init_distributed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1, help="tensor-model-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-model-parallel size")
    p.add_argument("--backend", default=None, help="gloo | nccl (default: nccl with CUDA)")
    p.add_argument("--json", default=None, help="rank 0 writes every rank's groups here")
    args = p.parse_args()

    info = init_distributed(backend=args.backend, timeout_minutes=2)
    state = ps.initialize_model_parallel(args.tp, args.pp)
    mine = {
        "rank": state.rank,
        "world_size": state.world_size,
        "launcher": info.launcher,
        "host": socket.gethostname(),
        "local_rank": info.local_rank,
        "coords": state.coords,
        "groups": {k: state.ranks[k] for k in ("tp", "pp", "dp", "mp", "embedding")},
    }
    everyone = [None] * state.world_size
    dist.all_gather_object(everyone, mine)
    if state.rank == 0:
        print(f"world {state.world_size} = TP {state.tp} x PP {state.pp} x DP {state.dp}")
        for r in everyone:
            c = r["coords"]
            print(
                f"rank {r['rank']:>3} [{r['launcher']} {r['host']} local {r['local_rank']}] "
                f"tp={c['tp']} pp={c['pp']} dp={c['dp']}  tp group {r['groups']['tp']}  "
                f"pp group {r['groups']['pp']}  dp group {r['groups']['dp']}"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(everyone, f)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
