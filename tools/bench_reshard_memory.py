"""Peak memory of tools/checkpoint_reshard.py against the size of the model it moves.

    python tools/bench_reshard_memory.py [--layers 8 32 64] [--hidden 256] [--vocab 4096]

For each depth: writes a synthetic TP=2 x PP=2 x DP=2 ZeRO-1 checkpoint (random weights and
Adam moments in the trainer's per-DP-rank optimizer format) of a Llama-style GPT into a temporary
folder, then reshards it to TP=1 x PP=4 in a fresh process and prints that process's peak RSS
(VmHWM, Linux) beside a process that only imports the same modules. Memory bounded by a layer
shows as a flat "above baseline" column while the model grows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalite.checkpoint import format as ckpt  # noqa: E402
from megalite.checkpoint import layout as L  # noqa: E402
from megalite.data_parallel.optimizer import STATE_FORMAT  # noqa: E402
from megalite.model import build_model  # noqa: E402
from megalite.model.config import GPTConfig  # noqa: E402

# VmHWM is the high-water mark of this process's own address space. (ru_maxrss is not: a child
# started by vfork/posix_spawn inherits its parent's peak across exec, and this parent holds the
# synthetic model while writing it.) Linux only.
PEAK = (
    "print(next(int(line.split()[1]) for line in open('/proc/self/status') "
    "if line.startswith('VmHWM')))"
)


def make_checkpoint(root: Path, layers: int, hidden: int, vocab: int) -> int:
    """A synthetic ZeRO-1 checkpoint at TP=2 x PP=2 x DP=2; returns the parameter count."""
    tp, pp, dp = 2, 2, 2
    args = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=8, num_query_groups=4,
                ffn_hidden_size=4 * hidden, seq_length=64, normalization="RMSNorm", swiglu=True,
                position_embedding_type="rope", disable_bias_linear=True, vocab_size=vocab,
                mock_data=True, make_vocab_size_divisible_by=128, padded_vocab_size=vocab,
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)  # fmt: skip
    meta = {"model": {k: v for k, v in args.items() if k in GPTConfig.__dataclass_fields__},
            "padded_vocab_size": vocab}  # fmt: skip
    config = L.config_from_meta(meta)
    one = L.config_from_meta(dict(meta, model=dict(meta["model"], num_layers=1)), 1, 1)
    (model,) = build_model(one, 0, use_parallel_state=False)
    shapes = {}
    for name, p in model.named_parameters():
        for i in range(layers) if name.startswith("decoder.layers.0.") else [0]:
            shapes[name.replace("layers.0.", f"layers.{i}.")] = p.shape
    shapes[L.OUTPUT_LAYER] = shapes[L.WORD_EMBEDDING]  # tied, PP > 1: the last stage's copy
    g = torch.Generator().manual_seed(0)
    folder, total = ckpt.iteration_dir(root, 10), 0
    for p in range(pp):
        for t in range(tp):
            state = {
                n: L.split_full(torch.randn(s, generator=g) * 0.02, L.split_rule(n, True), tp, t)
                for n, s in shapes.items()
                if L.place(config, n)[0] == p
            }
            shard = ckpt.shard_dir(folder, t, p)
            shard.mkdir(parents=True)
            torch.save({"chunk0": state}, shard / "model.pt")
            total += sum(v.numel() for v in state.values())
            for d in range(dp):  # each DP rank owns half of every parameter (ZeRO-1)
                pieces, adam = [], {}
                for i, (n, w) in enumerate(state.items()):
                    lo, hi = (0, w.numel() // 2) if d == 0 else (w.numel() // 2, w.numel())
                    pieces.append([0, n, lo, hi])
                    adam[i] = {"step": torch.tensor(10.0), "exp_avg": torch.randn(hi - lo),
                               "exp_avg_sq": torch.rand(hi - lo)}  # fmt: skip
                group = {"weight_decay": 0.1, "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                         "params": list(range(len(pieces)))}  # fmt: skip
                torch.save(
                    {"format": STATE_FORMAT, "zero_stage": 1, "dp_rank": d, "dp_size": dp,
                     "pieces": pieces, "main_params": [None] * len(pieces),
                     "optimizer": {"state": adam, "param_groups": [group]},
                     "state_index": list(range(len(pieces))), "grad_scaler": None},
                    shard / f"optim_dp{d:03d}.pt",
                )  # fmt: skip
    meta = {"args": args, "iteration": 10, "consumed_train_samples": 80}
    (folder / "meta.json").write_text(json.dumps(meta))
    (root / ckpt.TRACKER).write_text("10\n")
    return total


def peak_kib(code: str) -> int:
    out = subprocess.run([sys.executable, "-c", code + "\n" + PEAK], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return int(out.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    a = p.parse_args()
    repo = str(Path(__file__).resolve().parent.parent)
    header = f"import sys; sys.path.insert(0, {repo!r})\nimport torch, megalite.checkpoint.reshard"
    base = peak_kib(header)
    print(f"baseline (python + torch + megalite.checkpoint imported): {base / 1024:.0f} MiB")
    print(f"{'layers':>6} {'params':>12} {'weights+Adam MiB':>17} {'peak RSS MiB':>13} "
          f"{'above baseline':>15} {'wall s':>7}")  # fmt: skip
    for layers in a.layers:
        with tempfile.TemporaryDirectory() as tmp:
            n = make_checkpoint(Path(tmp) / "src", layers, a.hidden, a.vocab)
            code = (f"{header}\nmegalite.checkpoint.reshard.reshard({tmp + '/src'!r}, "
                    f"{tmp + '/dst'!r}, 1, 4)")  # fmt: skip
            start = time.perf_counter()
            peak = peak_kib(code)
            wall = time.perf_counter() - start
        print(f"{layers:>6} {n:>12,} {n * 16 / 2**20:>17.0f} {peak / 1024:>13.0f} "
              f"{(peak - base) / 1024:>15.0f} {wall:>7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
