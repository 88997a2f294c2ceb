"""megalite-plan on one GPU: predicted peak vs ``torch.cuda.max_memory_allocated``.

Trains a handful of layouts that fit one device (bf16 GPTs of 0.35B-1.3B parameters, one rank:
recompute none / selective / full, 1 and 4 micro-batches, ZeRO 0 and 1, SwiGLU + RoPE + GQA)
for three steps each with megalite's real model, DDP, optimizer and schedule, and prints the
planner's prediction (CUDA kernels: flash attention, foreach AdamW) beside the measured peak of
the steady-state steps. A few minutes on one H100/H200.

    PYTHONPATH=. python tools/plan_gpu_check.py            # on a GPU machine
    PYTHONPATH=. python tools/plan_gpu_check.py --smoke    # tiny models on CPU (script check)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalite.planner.measure import MeasureSpec  # noqa: E402

GPT_350M = dict(num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=2048,
                vocab_size=50257, bf16=True)  # fmt: skip
GPT_1B3 = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048,
               vocab_size=50257, bf16=True)  # fmt: skip
LAYOUTS = [
    MeasureSpec(**GPT_350M, micro_batch_size=4, num_microbatches=1),
    MeasureSpec(**GPT_350M, micro_batch_size=4, num_microbatches=4, recompute="full"),
    MeasureSpec(**GPT_1B3, micro_batch_size=2, num_microbatches=2),
    MeasureSpec(**GPT_1B3, micro_batch_size=4, num_microbatches=1, recompute="selective"),
    MeasureSpec(**GPT_1B3, micro_batch_size=8, num_microbatches=1, recompute="full"),
    MeasureSpec(
        **(
            GPT_1B3
            | dict(
                swiglu=True,
                rope=True,
                num_query_groups=4,
                ffn_hidden_size=5504,
                rmsnorm=True,
                untie=True,
            )
        ),
        micro_batch_size=2,
    ),  # fmt: skip
    MeasureSpec(**GPT_1B3, micro_batch_size=2, num_microbatches=2, zero_stage=1),
    # MoE on one GPU (EP 1): 8 experts of the 350M's MLP, top-2, shared expert every layer
    MeasureSpec(**GPT_350M, micro_batch_size=2, num_experts=8, topk=2, shared_expert_size=1024),
]
SMOKE = [
    MeasureSpec(num_microbatches=2),
    MeasureSpec(recompute="full", zero_stage=1, bf16=True),
    MeasureSpec(num_experts=4, num_microbatches=2),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU (checks the script)")
    a = ap.parse_args(argv)
    import torch
    import torch.distributed as dist

    from megalite.planner import Runtime, plan_memory
    from megalite.planner.layout import DEFAULT_BUCKET_SIZE, Layout, apply_moe
    from megalite.planner.measure import measure_layout

    if not a.smoke and not torch.cuda.is_available():
        print("no CUDA device here; use --smoke to check the script on CPU", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29513")
    backend = "gloo" if a.smoke else "nccl"
    if a.smoke and torch.cuda.is_available():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    dist.init_process_group(backend, rank=0, world_size=1)
    if backend == "nccl":
        torch.cuda.set_device(0)
    kind = "cpu" if a.smoke else "cuda"
    print(f"{'layout':52} {'predicted':>12} {'measured':>12} {'error':>7}")
    worst = 0.0
    for spec in SMOKE if a.smoke else LAYOUTS:
        from megalite import parallel_state as ps

        measured = measure_layout(spec)["peak_bytes"]
        ps.destroy_model_parallel()
        config = spec.model_config()
        layout = Layout(micro_batch_size=spec.micro_batch_size,
                        num_microbatches=spec.num_microbatches, zero_stage=spec.zero_stage,
                        recompute=spec.recompute)  # fmt: skip
        runtime = Runtime(config.params_dtype, kind, spec.bucket_size or DEFAULT_BUCKET_SIZE)
        moe = apply_moe(spec.moe_config(), layout)
        predicted = plan_memory(config, layout, runtime, moe=moe)[0].peak_bytes
        err = (predicted - measured) / measured
        worst = max(worst, abs(err))
        print(f"{spec.name + '-h' + str(spec.hidden_size):52} {predicted:>12,} {measured:>12,} "
              f"{100 * err:>6.1f}%", flush=True)  # fmt: skip
        if torch.cuda.is_available() and not a.smoke:
            torch.cuda.empty_cache()
    print(f"max |error| {100 * worst:.1f}%")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
