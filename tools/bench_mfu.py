"""GPU throughput of megalite's training step: tokens/s, TFLOP/s and MFU on one device.

The default model is GPT ~1.3B (24 layers, hidden 2048, 16 heads, seq 2048, vocab 50257 padded
to 50304, learned positions, GeLU, tied embeddings), bf16 with fp32 main params and grads, TP=1,
one GPU, flash attention through `scaled_dot_product_attention`. A step is `Trainer.train_step`:
the schedule (gradient accumulation over micro-batches), the DDP grad buckets, clipping, AdamW.
After `--warmup` steps, `--steps` steps are timed between CUDA synchronizations; FLOPs are
Megatron's model FLOPs (`megalite.model.num_floating_point_operations`), MFU is TFLOP/s over the
device's dense bf16 peak (H100/H200: 989; `--peak-tflops` overrides)::

    .venv/bin/python tools/bench_mfu.py                 # one GPU, the 1.3B model
    .venv/bin/python tools/bench_mfu.py --tiny          # CPU-sized model (CI runs this)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GPT_1_3B = dict(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048,
                vocab_size=50257, micro_batch_size=4, global_batch_size=8)  # fmt: skip
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
            vocab_size=512, micro_batch_size=2, global_batch_size=4)  # fmt: skip


def train_step(trainer, lr: float):
    """One training step of `trainer` at learning rate `lr` on the batch at its position."""
    n = trainer._num_microbatches(trainer.cfg.training.global_batch_size)
    trainer.engine.set_lr(lr, lr)
    return trainer.engine.train_step(trainer._micro(trainer.train_ds, trainer.consumed, n), n)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a CPU-sized model (2 layers, hidden 64)")
    for key in GPT_1_3B:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; tiny 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny 3)")
    p.add_argument("--fp32", action="store_true", help="fp32 instead of bf16")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: from device name")
    p.add_argument("--recompute", choices=["full", "selective"], default=None)
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark, print the table; returns its numbers."""
    from megalite.distributed import init_distributed
    from megalite.model import num_floating_point_operations
    from megalite.training.arguments import resolved_config
    from megalite.training.metrics import device_peak_tflops
    from megalite.training.trainer import Trainer

    a = build_parser().parse_args(argv)
    shape = {k: getattr(a, k) or v for k, v in (TINY if a.tiny else GPT_1_3B).items()}
    warmup = a.warmup if a.warmup is not None else (2 if a.tiny else 5)
    steps = a.steps if a.steps is not None else (3 if a.tiny else 20)
    init_distributed()  # one process: nccl with a GPU, else gloo (a no-op inside a live group)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
    flags += ["--mock-data", f"--train-iters={warmup + steps}", "--lr=1e-4", "--eval-iters=0",
              "--hidden-dropout=0", "--attention-dropout=0", "--clip-grad=1.0"]  # fmt: skip
    flags += [] if a.fp32 else ["--bf16"]
    flags += [f"--recompute-granularity={a.recompute}"] if a.recompute else []
    cfg = resolved_config(flags, 1)
    trainer = Trainer(cfg)
    model, gbs = trainer.config, cfg.training.global_batch_size
    flops_per_step = num_floating_point_operations(model, gbs)
    params = sum(p.numel() for c in trainer.engine.chunks for p in c.parameters())
    times = []
    for i in range(warmup + steps):
        _sync()
        start = time.perf_counter()
        loss, _, _ = train_step(trainer, 1e-4)
        _sync()
        times.append(time.perf_counter() - start)
        trainer.consumed += gbs  # fresh mock samples every step
        if i == 0:
            first_loss = loss
    timed = times[warmup:]
    step = sum(timed) / len(timed)
    tokens = gbs * model.seq_length
    tflops = flops_per_step / step / 1e12
    peak = device_peak_tflops(a.peak_tflops)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    out = {
        "device": device, "parameters": params, "step_s": step,
        "step_s_median": statistics.median(timed), "tokens_per_s": tokens / step,
        "tflops": tflops, "mfu": tflops / peak if peak else None, "peak_tflops": peak,
        "first_loss": first_loss, "last_loss": loss, "flops_per_step": flops_per_step,
    }  # fmt: skip
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
    print(
        f"GPT {size} ({model.num_layers} layers, hidden {model.hidden_size}, "
        f"{model.num_attention_heads} heads, seq {model.seq_length}, vocab "
        f"{model.padded_vocab_size}), {'fp32' if a.fp32 else 'bf16'}, micro-batch "
        f"{cfg.training.micro_batch_size} x {trainer._num_microbatches(gbs)} = global batch "
        f"{gbs}; {device}; {warmup} warm-up + {steps} timed steps"
    )
    rows = [
        ("step time (mean / median)", f"{step * 1e3:.1f} / {out['step_s_median'] * 1e3:.1f} ms"),
        ("tokens/s", f"{out['tokens_per_s']:,.0f}"),
        ("model TFLOP/s", f"{tflops:.4g}"),
        ("peak bf16 TFLOP/s", f"{peak:g}" if peak else "n/a (no entry for this device)"),
        ("MFU", f"{out['mfu']:.1%}" if peak else "n/a"),
        ("loss first -> last step", f"{first_loss:.4f} -> {loss:.4f}"),
    ]
    rows += [("peak memory allocated", f"{mem:.1f} GiB")] if mem is not None else []
    for name, value in rows:
        print(f"  {name:<26} {value}")
    return out


if __name__ == "__main__":
    main()
