"""Issue #14's demo, end to end on 8 gloo processes (examples/moe_demo.sh does the same with the
full quickstart corpus): a 4-layer MoE (8 experts, top-2; examples/configs/moe_demo.yaml) trains
on quickstart-style data (real text from this machine, a SentencePiece tokenizer, Megatron
.bin/.idx, built as scripts/quickstart.sh builds them, smaller) at TP2 x PP2 x EP2, saves,
resumes bit-exactly (2N straight iterations == N + save + resume + N, losses and grad norms),
reshards to TP1 x PP1 x EP1 and exports to a transformers MixtralForCausalLM whose logits equal
megalite's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from tests.harness import run_distributed

pytestmark = pytest.mark.extended
ROOT = Path(__file__).resolve().parents[1]
N = 4  # iterations per leg


def _pretrain(argv: list[str]) -> int:
    from megalite.pretrain import pretrain

    return pretrain(argv)


def _tool(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Corpus -> tokenizer -> .bin/.idx, the steps of scripts/quickstart.sh (0.3 MB here)."""
    qs = tmp_path_factory.mktemp("moe_demo")
    _tool("tools/make_corpus.py", "--out", str(qs / "corpus.jsonl"), "--target-mb", "0.3")
    _tool("tools/train_tokenizer.py", "--input", str(qs / "corpus.jsonl"), "--output-prefix",
          str(qs / "tok"), "--vocab-size", "500")  # fmt: skip
    _tool("tools/preprocess_data.py", "--input", str(qs / "corpus.jsonl"), "--output-prefix",
          str(qs / "corpus"), "--json-keys", "text", "--tokenizer-type",
          "GPTSentencePieceTokenizer", "--tokenizer-model", str(qs / "tok.model"),
          "--append-eod", "--workers", "1")  # fmt: skip
    return {"root": qs, "prefix": qs / "corpus_text_document", "tok": qs / "tok.model"}


def train(data: dict, flags: list[str], metrics: Path) -> list[dict]:
    argv = ["--config", str(ROOT / "examples/configs/moe_demo.yaml"), "--train-iters", str(2 * N),
            "--data-path", str(data["prefix"]), "--data-cache-path", str(data["root"] / "cache"),
            "--tokenizer-model", str(data["tok"]), "--distributed-backend", "gloo",
            "--metrics-file", str(metrics), *flags]  # fmt: skip
    assert run_distributed(8, _pretrain, argv, timeout=600) == [0] * 8
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_moe_demo_trains_resumes_reshards_and_exports(data):
    from megalite.checkpoint.hf_io import export_hf
    from megalite.checkpoint.layout import config_from_meta
    from megalite.checkpoint.reshard import load_full_model, reshard
    from megalite.checkpoint.reshard_experts import moe_settings
    from megalite.model import build_model

    root = data["root"]
    straight = train(data, [], root / "straight.jsonl")
    assert [r["iteration"] for r in straight] == list(range(1, 2 * N + 1))
    assert straight[-1]["lm_loss"] < straight[0]["lm_loss"]  # it learns
    assert "moe_load_balancing_loss_layer3" in straight[0]
    ck = ["--save", str(root / "ck"), "--load", str(root / "ck")]
    train(data, ck + ["--exit-interval", str(N)], root / "legs.jsonl")
    legs = train(data, ck, root / "legs.jsonl")
    assert [r["iteration"] for r in legs] == list(range(1, 2 * N + 1))
    for key in ("lm_loss", "grad_norm", "moe_load_balancing_loss"):  # bit-exact
        assert [r[key] for r in legs] == [r[key] for r in straight], key

    reshard(root / "ck", root / "ep1", 1, 1, ep=1)
    meta = json.loads((root / "ep1/iter_0000008/meta.json").read_text())
    assert meta["expert_layout"]["expert_model_parallel_size"] == 1
    config = export_hf(root / "ep1", root / "hf")
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 8

    transformers = pytest.importorskip("transformers")
    vocab = config["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    meta, full = load_full_model(root / "ep1")
    _, source = load_full_model(root / "ck")  # the TP2 x PP2 x EP2 shards, joined
    for name, tensor in source.items():
        assert torch.equal(full[name], tensor), name
    moe = moe_settings(meta)
    (model,) = build_model(config_from_meta(meta, 1, 1, None, vocab), 0,
                           use_parallel_state=False, moe=moe)  # fmt: skip
    model.load_state_dict(full)
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    with torch.no_grad():
        ours = model.eval()(tokens)[..., :vocab]
        theirs = hf(tokens).logits
    assert_close(theirs, ours, rtol=0, atol=1e-4)
    print(f"\nmoe demo: losses {[round(r['lm_loss'], 4) for r in straight]}, max |logit "
          f"difference| vs transformers {(theirs - ours).abs().max().item():.2e}")  # fmt: skip
