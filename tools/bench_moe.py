"""MoE benchmark: (a) one-rank step time of an MoE GPT over a dense GPT of the same active FLOPs,
(b) bytes the all-to-all dispatcher moves per step at EP 2 and 4, against the formula.

(a) Both models have the same attention; the dense MLP width is chosen so that its FLOPs per
token equal the MoE layer's active ones (router + top-k experts), and the FLOPs of both steps
(megalite.model.flops) are printed next to the times. A step is forward + backward + AdamW,
one process; steps alternate between the two models so that load from other processes hits
both alike; the ratio of the median step times is printed (goal: <= 1.5 on CPU).

(b) EP gloo processes (DP = EP, TP = 1) train one step of the MoE GPT with the all-to-all
dispatcher; ``torch.distributed.all_to_all_single`` is wrapped to count the bytes each rank
sends to the others. Formula, per MoE layer and rank, from the routing the router made: with
R_out the (token, expert) pairs whose expert lives on another EP rank and R_in the pairs other
ranks sent here, forward sends (R_out + R_in) x h x element size (dispatch, then the outputs
back), backward the same again, plus the per-expert counts ((EP - 1) x E / EP int64) once
forward. Printed: measured, formula, their ratio (must be 1.00), and the expectation under
uniform routing, 4 x T k (EP - 1) / EP x h x element size per layer and rank::

    .venv/bin/python tools/bench_moe.py
    .venv/bin/python tools/bench_moe.py --steps 10 --hidden-size 128 --skip-bytes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalite.model import GPTConfig, build_model, num_floating_point_operations  # noqa: E402
from megalite.moe import MoEConfig, Router, set_aux_loss_scale  # noqa: E402


def configs(args, tp_ep: int = 1):
    gpt = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=4,
        vocab_size=1024, seq_length=args.seq_length, swiglu=True, disable_bias_linear=True,
        normalization="RMSNorm", position_embedding_type="rope", hidden_dropout=0.0,
        attention_dropout=0.0, make_vocab_size_divisible_by=128,
    )  # fmt: skip
    moe = MoEConfig(
        num_experts=args.num_experts, moe_router_topk=args.topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size, moe_aux_loss_coeff=1e-2,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=args.grouped_gemm,
        expert_model_parallel_size=tp_ep,
    )  # fmt: skip
    # Dense width with the MoE layer's active FLOPs per token: 6 h f = 2 h E + k 6 h f_e.
    dense_ffn = round(args.topk * args.moe_ffn_hidden_size + args.num_experts / 3)
    return GPTConfig(**gpt, ffn_hidden_size=dense_ffn), GPTConfig(**gpt), moe


def step_time(args) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dense_cfg, moe_cfg, moe = configs(args)
    (dense,) = build_model(dense_cfg, 1, use_parallel_state=False)
    (sparse,) = build_model(moe_cfg, 1, use_parallel_state=False, moe=moe)
    set_aux_loss_scale([sparse], 1.0)
    models = {"dense": dense, "moe": sparse}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    tokens = torch.randint(0, 1024, (args.micro_batch_size, args.seq_length + 1))
    times = {k: [] for k in models}

    def one(name):
        t0 = time.perf_counter()
        models[name](tokens[:, :-1], tokens[:, 1:]).mean().backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in models:  # warm-up
        one(name)
    for _ in range(args.steps):
        for name in models:
            times[name].append(one(name))
    flops = {
        "dense": num_floating_point_operations(dense_cfg, args.micro_batch_size),
        "moe": num_floating_point_operations(moe_cfg, args.micro_batch_size, moe=moe),
    }
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"(a) one rank, {args.steps} steps each, alternating; grouped GEMM {args.grouped_gemm}")
    for k in models:
        print(f"    {k:5s} params {n_params[k]:>10,d}  FLOPs/step {flops[k]:.4g}  "
              f"median step {med[k] * 1e3:8.1f} ms")  # fmt: skip
    ratio = med["moe"] / med["dense"]
    fr = flops["moe"] / flops["dense"]
    print(f"    MoE / dense step time: {ratio:.2f}x (FLOPs ratio {fr:.4f})  goal <= 1.5x")


def _bytes_worker(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    import torch.distributed as dist

    from megalite import parallel_state as ps
    from megalite.data_parallel import DistributedDataParallel, finalize_model_grads

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps.initialize_model_parallel(1, expert_model_parallel_size=world)
    _, moe_cfg, moe = configs(args, world)
    (model,) = build_model(moe_cfg, 1, moe=moe)
    ddp = DistributedDataParallel(
        model, ps.get_data_parallel_group(),
        expert_data_parallel_group=ps.get_expert_data_parallel_group(),
    )  # fmt: skip
    routes = []
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda mod, inp, res: routes.append(res[0].detach()))
    sent = [0]
    real = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        row = input[0].numel() * input.element_size() if input.dim() > 1 else input.element_size()
        splits = input_split_sizes or [input.shape[0] // world] * world
        sent[0] += sum(n for j, n in enumerate(splits) if j != rank) * row
        return real(output, input, output_split_sizes, input_split_sizes, **kw)

    dist.all_to_all_single = counting
    g = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, 1024, (args.micro_batch_size, args.seq_length + 1), generator=g)
    ddp(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    finalize_model_grads([ddp])
    dist.all_to_all_single = real
    # The formula from the routing: pairs to other EP ranks (R_out), pairs from them (R_in).
    e_local = moe.num_experts // world
    formula = 0
    h, elem = moe_cfg.hidden_size, 4
    for experts in routes:
        owner = experts.reshape(-1) // e_local
        per_dest = torch.bincount(owner, minlength=world)
        recv = torch.empty_like(per_dest)
        dist.all_to_all_single(recv, per_dest)
        r_out = int(per_dest.sum() - per_dest[rank])
        r_in = int(recv.sum() - recv[rank])
        formula += 2 * (r_out + r_in) * h * elem + (world - 1) * e_local * 8
    t = args.micro_batch_size * args.seq_length
    uniform = len(routes) * 4 * t * args.topk * (world - 1) / world * h * elem
    out.put((rank, sent[0], formula, uniform))
    dist.barrier()
    dist.destroy_process_group()


def bytes_moved(args) -> None:
    import torch.multiprocessing as mp

    from megalite.distributed import free_port

    print(
        "(b) all-to-all dispatcher, one step (forward + backward), bytes sent by all ranks together"
    )
    for ep in (2, 4):
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_bytes_worker, args=(r, ep, port, args, q)) for r in range(ep)]
        for p in procs:
            p.start()
        rows = sorted(q.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(60)
        sent = sum(r[1] for r in rows)
        formula = sum(r[2] for r in rows)
        uniform = sum(r[3] for r in rows)
        print(f"    EP {ep}: measured {sent:>12,d} B  formula {formula:>12,d} B  "
              f"ratio {sent / formula:.2f}   (uniform-routing expectation {uniform:,.0f} B, "
              f"ratio {sent / uniform:.2f})")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-grouped-gemm", dest="grouped_gemm", action="store_false")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--skip-bytes", action="store_true")
    args = p.parse_args()
    if not args.skip_time:
        step_time(args)
    if not args.skip_bytes:
        bytes_moved(args)


if __name__ == "__main__":
    main()
