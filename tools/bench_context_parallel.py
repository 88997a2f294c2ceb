"""Context parallelism measured: attention balance, activation memory per rank, a capped long run.

Three parts, on CPU processes over gloo (every CP rank is a process):

1. **Attention work per CP rank**, max over min across ranks, for the load-balanced split (2 x CP
   chunks, rank r holds r and 2CP-1-r) against the naive contiguous split (rank r holds the r-th
   s/CP tokens). Counted two ways: the causal (query, key) pairs each rank's queries need
   (exact, from positions), and the matmul FLOPs the ring attention really executes on each
   rank (`torch.utils.flop_counter.FlopCounterMode` around forward + backward).
2. **Activation memory per rank** of megalite's GPT at CP = 2, 4 over CP = 1, by an allocation
   tracker (a `TorchDispatchMode` that records every tensor storage allocated and its release,
   not RSS): the bytes saved for backward at the end of the forward (activations proper:
   `saved_tensors_hooks`, parameters excluded, storages counted once), and the peak of tensor
   bytes allocated during forward + backward (activations, transients and gradients).
3. **A sequence CP = 1 cannot hold**: the script sets a cap on tracked tensor bytes per rank
   (`--cap-mib`); at `--long-seq` tokens the CP = 1 step exceeds it (the tracker raises as the
   cap is crossed), while CP = 4 trains `--long-steps` AdamW steps under the same cap. An uncapped
   CP = 1 run of the same steps gives the reference losses and grad norms (`--no-reference`
   skips it).

    .venv/bin/python tools/bench_context_parallel.py            # all three parts (a few minutes)
    .venv/bin/python tools/bench_context_parallel.py --parts work memory
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import traceback
import weakref
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

MIB = 2**20


class MemoryCapExceeded(MemoryError):
    pass


class TensorMemory(TorchDispatchMode):
    """Live bytes of tensor storages allocated under this mode (freed when the storage dies)."""

    def __init__(self, cap: Optional[int] = None):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.cap = cap

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)
        if self.cap is not None and self.current > self.cap:
            raise MemoryCapExceeded(
                f"tracked tensor memory {self.current / MIB:.1f} MiB exceeds the cap "
                f"{self.cap / MIB:.1f} MiB"
            )

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


class SavedActivations:
    """Bytes of distinct non-parameter storages saved for backward while active."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in self.params:
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


# --- processes ----------------------------------------------------------------------------------
def _worker(rank, world, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    from megalite.distributed import init_distributed

    try:
        init_distributed(backend="gloo", timeout_minutes=10)
        results.put((rank, True, fn(*args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def spawn(world: int, fn: Callable, *args) -> list:
    """Run `fn(*args)` on `world` gloo processes; per-rank results in rank order."""
    from megalite.distributed import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, results))
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    out = {}
    for _ in range(world):
        rank, ok, value = results.get(timeout=3600)
        if not ok:
            for p in procs:
                p.kill()
            raise RuntimeError(f"rank {rank} failed:\n{value}")
        out[rank] = value
    for p in procs:
        p.join()
    return [out[r] for r in range(world)]


# --- the model ---------------------------------------------------------------------------------
def _config(args, seq: int, cp: int = 1, comm: str = "p2p"):
    from megalite.model import GPTConfig

    return GPTConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        vocab_size=args.vocab, make_vocab_size_divisible_by=16, seq_length=seq,
        position_embedding_type="rope", swiglu=True, normalization="RMSNorm",
        hidden_dropout=0.0, attention_dropout=0.0, context_parallel_size=cp, cp_comm_type=comm,
    )  # fmt: skip


def _setup(args, seq: int, comm: str = "p2p"):
    """CP = world size; the model, this rank's part of one fixed batch, and the CP group."""
    import torch.distributed as dist

    from megalite import parallel_state as ps
    from megalite.context_parallel import split
    from megalite.model import build_model

    cp = dist.get_world_size()
    ps.initialize_model_parallel(context_parallel_size=cp)
    (model,) = build_model(_config(args, seq, cp, comm), 1234)
    g = torch.Generator().manual_seed(99)
    t = torch.randint(0, args.vocab, (args.batch, seq + 1), generator=g)
    rank = ps.get_context_parallel_rank()
    tokens, labels = split(t[:, :-1], cp, rank), split(t[:, 1:], cp, rank)
    group = ps.get_context_parallel_group() if cp > 1 else None
    return model, tokens, labels, group


# --- 1. attention work ---------------------------------------------------------------------------
def causal_pairs(positions: torch.Tensor) -> int:
    """(query, key) pairs with key <= query for these query positions: sum of (pos + 1)."""
    return int((positions + 1).sum())


def _ring_flops(seq: int, heads: int, dim: int) -> float:
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from megalite.context_parallel import position_ids, ring_attention

    cp, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=g) for _ in range(3))
    pos = position_ids(seq, cp, rank)
    q, k, v = (t[:, :, pos].requires_grad_() for t in (q, k, v))
    with FlopCounterMode(display=False) as counter:
        ring_attention(q, k, v, dist.group.WORLD).sum().backward()
    return float(counter.get_total_flops())


def part_work(args) -> list[str]:
    from megalite.context_parallel import position_ids

    s = args.work_seq
    lines = ["## attention work per CP rank (max / min over ranks)", "",
             f"seq {s}; causal pairs = (query, key) pairs with key <= query; ring FLOPs = "
             "matmul FLOPs executed forward + backward by `ring_attention`", "",
             "| CP | load-balanced: causal pairs | load-balanced: ring FLOPs | contiguous: causal "
             "pairs |", "|---|---|---|---|"]  # fmt: skip
    for cp in args.work_cps:
        balanced = [causal_pairs(position_ids(s, cp, r)) for r in range(cp)]
        contiguous = [causal_pairs(torch.arange(r * s // cp, (r + 1) * s // cp)) for r in range(cp)]
        flops = spawn(cp, _ring_flops, s, 2, 16)
        lines.append(
            f"| {cp} | {max(balanced) / min(balanced):.3f} | {max(flops) / min(flops):.3f} | "
            f"{max(contiguous) / min(contiguous):.3f} |"
        )
    return lines


# --- 2. activation memory ------------------------------------------------------------------------
def _memory(args, seq: int) -> tuple[int, int]:
    model, tokens, labels, _ = _setup(args, seq)
    saved = SavedActivations(model.parameters())
    with TensorMemory() as mem:
        with saved.hooks():
            loss = model(tokens, labels).sum()
        activations = saved.bytes
        loss.backward()
        del loss
    return activations, mem.peak


def part_memory(args) -> list[str]:
    seq = args.mem_seq
    base = spawn(1, _memory, args, seq)[0]
    lines = ["## activation memory per rank, CP = c over CP = 1 (allocation tracker)", "",
             f"GPT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, RoPE, SwiGLU, "
             f"seq {seq}, micro-batch {args.batch}, fp32, ring attention", "",
             "| CP | saved activations / rank (MiB) | ratio to CP 1 | goal 1/c + 10% | "
             "peak fwd+bwd (MiB) | peak ratio |", "|---|---|---|---|---|---|",
             f"| 1 | {base[0] / MIB:.2f} | 1.000 | - | {base[1] / MIB:.2f} | 1.000 |"]  # fmt: skip
    for cp in args.mem_cps:
        per_rank = spawn(cp, _memory, args, seq)
        act, peak = max(r[0] for r in per_rank), max(r[1] for r in per_rank)
        lines.append(
            f"| {cp} | {act / MIB:.2f} | {act / base[0]:.3f} | {1 / cp * 1.1:.3f} | "
            f"{peak / MIB:.2f} | {peak / base[1]:.3f} |"
        )
    return lines


# --- 3. a long sequence under a cap --------------------------------------------------------------
def _train(args, seq: int, steps: int, cap: Optional[int]) -> dict:
    import torch.distributed as dist

    model, tokens, labels, group = _setup(args, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, norms, peak = [], [], 0
    try:
        for _ in range(steps):
            with TensorMemory(cap) as mem:
                loss = model(tokens, labels).sum() / (args.batch * seq)  # mean over all tokens
                loss.backward()
            peak = max(peak, mem.peak)
            total = loss.detach().clone()
            for p in model.parameters():
                if group is not None:
                    dist.all_reduce(p.grad, group=group)  # the DP x CP reduction, here CP only
            if group is not None:
                dist.all_reduce(total, group=group)
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)))
            losses.append(float(total))
            opt.step()
            opt.zero_grad(set_to_none=True)
    except MemoryCapExceeded as e:
        return {"refused": str(e)}
    return {"losses": losses, "norms": norms, "peak": peak}


def part_long(args) -> list[str]:
    seq, cap, steps = args.long_seq, args.cap_mib * MIB, args.long_steps
    lines = ["## a sequence CP = 1 cannot hold under the cap", "",
             f"seq {seq}, micro-batch {args.batch}, cap {args.cap_mib} MiB of tracked tensor "
             f"memory per rank, {steps} AdamW steps", ""]  # fmt: skip
    one = spawn(1, _train, args, seq, 1, cap)[0]
    lines.append(f"- CP 1 under the cap: {one.get('refused') or 'fit (raise --long-seq)'}")
    four = spawn(4, _train, args, seq, steps, cap)
    if "refused" in four[0]:
        lines.append(f"- CP 4 under the cap: {four[0]['refused']}")
        return lines
    peak = max(r["peak"] for r in four)
    lines.append(f"- CP 4 under the cap: trained; peak {peak / MIB:.1f} MiB per rank")
    lines.append(f"  - losses {[round(x, 6) for x in four[0]['losses']]}")
    lines.append(f"  - grad norms {[round(x, 6) for x in four[0]['norms']]}")
    if not args.no_reference:
        ref = spawn(1, _train, args, seq, steps, None)[0]
        dl = max(abs(a - b) for a, b in zip(ref["losses"], four[0]["losses"]))
        dn = max(abs(a - b) / b for a, b in zip(ref["norms"], four[0]["norms"]))
        lines.append(f"- CP 1 uncapped reference: peak {ref['peak'] / MIB:.1f} MiB; max |loss "
                     f"diff| {dl:.2e}, max grad-norm rel. diff {dn:.2e}")  # fmt: skip
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["work", "memory", "long"],
                   choices=["work", "memory", "long"])  # fmt: skip
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--work-seq", type=int, default=4096)
    p.add_argument("--work-cps", type=int, nargs="+", default=[2, 4])
    p.add_argument("--mem-seq", type=int, default=2048)
    p.add_argument("--mem-cps", type=int, nargs="+", default=[2, 4])
    p.add_argument("--long-seq", type=int, default=8192)
    p.add_argument("--long-steps", type=int, default=3)
    p.add_argument("--cap-mib", type=int, default=64)
    p.add_argument("--no-reference", action="store_true")
    args = p.parse_args(argv)
    for name, fn in (("work", part_work), ("memory", part_memory), ("long", part_long)):
        if name in args.parts:
            print("\n".join(fn(args)), "", sep="\n", flush=True)


if __name__ == "__main__":
    main()
