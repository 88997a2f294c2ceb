"""Framework overhead: megalite's full training step vs a plain PyTorch loop, same model math.

One process, one rank. megalite's step is `Trainer.train_step` (the pipeline schedule's
no-pipelining path, the DDP wrapper with its fp32 grad buckets, the optimizer with global-norm
clipping and AdamW, the DP-mean loss). The plain loop is what a user would write: the same GPT
as ordinary `nn.Module`s (`nn.Linear`, `nn.LayerNorm`, `F.scaled_dot_product_attention`), loaded
with megalite's initial weights, `clip_grad_norm_`, `torch.optim.AdamW` over the same weight-decay
groups, the same batch from the same dataset. Both first check they compute the same loss; then
blocks of steps alternate between the two so that load from other processes hits both alike,
and the ratio of the median step times is printed::

    .venv/bin/python tools/bench_overhead.py            # goal: ratio <= 1.05
    .venv/bin/python tools/bench_overhead.py --hidden-size 64 --seq-length 64 --profile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class PlainLayer(nn.Module):
    """Pre-norm block on ``[b, s, h]``; attribute names as megalite's so its weights load."""

    def __init__(self, h: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.input_layernorm = nn.LayerNorm(h)
        self.self_attention = nn.Module()
        self.self_attention.linear_qkv = nn.Linear(h, 3 * h)
        self.self_attention.linear_proj = nn.Linear(h, h)
        self.pre_mlp_layernorm = nn.LayerNorm(h)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = nn.Linear(h, ffn)
        self.mlp.linear_fc2 = nn.Linear(ffn, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        # fused QKV laid out per head as [q, k, v] (megalite's per-query-group layout, g = n)
        qkv = self.self_attention.linear_qkv(self.input_layernorm(x))
        q, k, v = qkv.view(b, s, self.heads, 3, h // self.heads).permute(3, 0, 2, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.self_attention.linear_proj(att.transpose(1, 2).reshape(b, s, h))
        y = self.mlp.linear_fc2(F.gelu(self.mlp.linear_fc1(self.pre_mlp_layernorm(x))))
        return x + y


class PlainGPT(nn.Module):
    """Learned positions, tied output weights, mean token cross-entropy."""

    def __init__(self, vocab: int, seq: int, h: int, heads: int, ffn: int, layers: int):
        super().__init__()
        self.embedding = nn.Module()
        self.embedding.word_embeddings = nn.Embedding(vocab, h)
        self.embedding.position_embeddings = nn.Embedding(seq, h)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleDict(
            {str(i): PlainLayer(h, heads, ffn) for i in range(layers)}
        )
        self.decoder.final_layernorm = nn.LayerNorm(h)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.embedding
        x = emb.word_embeddings(tokens) + emb.position_embeddings.weight[: tokens.shape[1]]
        for layer in self.decoder.layers.values():
            x = layer(x)
        logits = self.decoder.final_layernorm(x) @ emb.word_embeddings.weight.t()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def train_step(trainer, lr: float):
    """One training step of `trainer` at learning rate `lr` on the batch at its position."""
    n = trainer._num_microbatches(trainer.cfg.training.global_batch_size)
    trainer.engine.set_lr(lr, lr)
    return trainer.engine.train_step(trainer._micro(trainer.train_ds, trainer.consumed, n), n)


def megalite_trainer(a: argparse.Namespace):
    from megalite.distributed import init_distributed
    from megalite.training.arguments import resolved_config
    from megalite.training.trainer import Trainer

    init_distributed(backend="gloo")
    argv = [
        f"--num-layers={a.num_layers}", f"--hidden-size={a.hidden_size}",
        f"--num-attention-heads={a.num_attention_heads}", f"--seq-length={a.seq_length}",
        f"--micro-batch-size={a.batch}", f"--global-batch-size={a.batch}",
        f"--vocab-size={a.vocab_size}", "--mock-data", "--train-iters=1000000", "--lr=1e-4",
        "--hidden-dropout=0", "--attention-dropout=0", "--eval-iters=0", "--clip-grad=1.0",
    ]  # fmt: skip
    return Trainer(resolved_config(argv, 1))


def plain_setup(trainer, a: argparse.Namespace):
    """The plain model with megalite's initial weights, its optimizer, and one step function."""
    from megalite.data_parallel.optimizer import get_param_groups
    from megalite.training.data import collate, microbatch_indices

    cfg = trainer.config
    assert cfg.padded_vocab_size == cfg.vocab_size, "use a vocabulary divisible by 128"
    model = PlainGPT(cfg.vocab_size, cfg.seq_length, cfg.hidden_size, cfg.num_attention_heads,
                     cfg.ffn_hidden_size, cfg.num_layers)  # fmt: skip
    source = trainer.engine.chunks[0].module.state_dict()
    missing = model.load_state_dict(source, strict=False)
    assert not missing.missing_keys, missing.missing_keys
    args = trainer.cfg.optimizer
    groups = get_param_groups([model], args.weight_decay)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                            eps=args.adam_eps)  # fmt: skip
    (indices,) = microbatch_indices(0, a.batch, 1, 0, 1)

    def step() -> float:
        batch = collate(trainer.train_ds, indices)
        opt.zero_grad(set_to_none=True)
        loss = model(batch["tokens"], batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        return loss.item()

    return step


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20, help="alternating blocks per side")
    p.add_argument("--steps", type=int, default=5, help="steps per block")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--profile", action="store_true", help="top ops of one megalite step")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    trainer = megalite_trainer(a)
    plain_step = plain_setup(trainer, a)

    def megalite_step() -> float:
        loss, _, _ = train_step(trainer, 1e-4)  # trainer.consumed stays 0: the same batch
        return loss

    first = (megalite_step(), plain_step())
    if abs(first[0] - first[1]) > 1e-5 * abs(first[1]):
        raise SystemExit(f"the two loops disagree on the first loss: {first}")
    for _ in range(3):  # warm-up: allocator, AdamW state, lazy inits
        megalite_step(), plain_step()
    ours, plain = [], []
    for _ in range(a.rounds):
        ours += timed(megalite_step, a.steps)
        plain += timed(plain_step, a.steps)
    m, q = statistics.median(ours), statistics.median(plain)
    print(
        f"{a.num_layers}-layer GPT, hidden {a.hidden_size}, {a.num_attention_heads} heads, "
        f"seq {a.seq_length}, vocab {a.vocab_size}, batch {a.batch}; {torch.get_num_threads()} "
        f"thread(s); first loss {first[0]:.6f} (both); {len(ours)} steps each, alternating"
    )
    print(f"megalite step (median): {m * 1e3:8.2f} ms")
    print(f"plain PyTorch (median): {q * 1e3:8.2f} ms")
    print(f"ratio megalite / plain: {m / q:8.3f}")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                megalite_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return m / q


if __name__ == "__main__":
    main()
