"""Checks of examples/moe_demo.sh: bit-exact resume and transformers' logits.

    python examples/moe_demo_check.py --demo runs/moe_demo

Prints the losses and grad norms of the straight and the resumed run (they must be identical),
then the largest difference between the exported MixtralForCausalLM's logits (transformers) and
megalite's, on random token ids; exits 1 when either check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def rows(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "split" not in r]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="DEMO_DIR of examples/moe_demo.sh")
    demo = Path(p.parse_args().demo)
    straight, resumed = rows(demo / "straight.jsonl"), rows(demo / "resumed.jsonl")
    keys = ("lm_loss", "grad_norm")
    same = [[r[k] for k in keys] for r in straight] == [[r[k] for k in keys] for r in resumed]
    print("iteration  lm_loss (straight / resumed)  grad_norm (straight / resumed)")
    for a, b in zip(straight, resumed):
        print(f"{a['iteration']:9d}  {a['lm_loss']:.6f} / {b['lm_loss']:.6f}"
              f"        {a['grad_norm']:.6f} / {b['grad_norm']:.6f}")  # fmt: skip
    print(f"bit-exact resume: {same} ({len(straight)} iterations)")

    from transformers import AutoModelForCausalLM

    from megalite.checkpoint.layout import config_from_meta
    from megalite.checkpoint.reshard import load_full_model
    from megalite.checkpoint.reshard_experts import moe_settings
    from megalite.model import build_model

    hf = AutoModelForCausalLM.from_pretrained(demo / "hf").eval()
    vocab = hf.config.vocab_size
    meta, full = load_full_model(demo / "ep1")
    config = config_from_meta(meta, 1, 1, None, vocab)
    (model,) = build_model(config, 0, use_parallel_state=False, moe=moe_settings(meta))
    model.load_state_dict(full)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (4, config.seq_length), generator=g)
    with torch.no_grad():
        ours = model.eval()(tokens)[..., :vocab]
        theirs = hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{type(hf).__name__}: {sum(t.numel() for t in hf.parameters()):,} parameters; "
          f"max |logit difference| vs megalite {diff:.2e} (logits up to "
          f"{ours.abs().max().item():.2f})")  # fmt: skip
    ok = same and diff < 1e-4
    print("MoE demo:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
