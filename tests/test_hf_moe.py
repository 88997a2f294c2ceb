"""Hugging Face MixtralForCausalLM / Qwen2MoeForCausalLM export and import (single process):
transformers (offline) reproduces megalite's logits for exported MoE models, tiny models made
by transformers import to megalite logits and losses equal to theirs (at any TP/PP/EP), and
what either side cannot express is refused by name."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from megalite.checkpoint import format as ckpt  # noqa: E402
from megalite.checkpoint.hf import HFConversionError  # noqa: E402
from megalite.checkpoint.hf_io import export_hf, import_hf, pretrain_flags  # noqa: E402
from megalite.checkpoint.layout import config_from_meta  # noqa: E402
from megalite.checkpoint.reshard import load_full_model  # noqa: E402
from megalite.checkpoint.reshard_experts import moe_settings  # noqa: E402
from megalite.model import build_model  # noqa: E402
from megalite.training.arguments import resolved_config  # noqa: E402
from tests.test_hf import write_checkpoint  # noqa: E402

VOCAB = 50  # pads to 64
COMMON = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-query-groups 2 "
    f"--seq-length 16 --vocab-size {VOCAB} --make-vocab-size-divisible-by 16 --mock-data "
    "--micro-batch-size 2 --train-iters 1 --lr 1e-3 --hidden-dropout 0 --attention-dropout 0 "
    "--normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear "
    "--untie-embeddings-and-output-weights --ffn-hidden-size 40 --num-experts 4 "
    "--moe-router-topk 2 --moe-ffn-hidden-size 24 --rotary-base 1000000"
)
QWEN2 = "--moe-shared-expert-intermediate-size 16 --moe-shared-expert-gate"
TOKENS = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))


def save_model(root: Path, flags: str) -> Path:
    """A fresh one-process MoE model (all parameters random) saved as a megalite checkpoint."""
    run = resolved_config((COMMON + " " + flags).split(), 1)
    config = run.model_config(VOCAB)
    (model,) = build_model(config, 11, use_parallel_state=False, moe=run.moe)
    with torch.no_grad():  # norms and biases start at 1/0: make them matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                g = torch.Generator().manual_seed(len(name))
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return write_checkpoint(root, run, config, model)


def megalite_model(load: Path):
    """The one-process megalite MoE model holding the checkpoint's joined shards (the true
    vocabulary: padding logits are -inf, as in training)."""
    meta, full = load_full_model(load)
    moe = dataclasses.replace(
        moe_settings(meta), expert_model_parallel_size=1, expert_tensor_parallel_size=None
    )
    (model,) = build_model(config_from_meta(meta, 1, 1, None, VOCAB), 0, use_parallel_state=False,
                           moe=moe)  # fmt: skip
    model.load_state_dict(full, strict=True)
    return model.eval()


def hf_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize(
    "flags,arch",
    [
        ("", "MixtralForCausalLM"),
        # norm_topk_prob True, no qkv biases (exported as zeros), every layer MoE
        (QWEN2, "Qwen2MoeForCausalLM"),
        # norm_topk_prob False (pre-softmax), q/k/v biases, a dense first layer
        (QWEN2 + " --moe-router-pre-softmax --add-qkv-bias --moe-layer-freq [0,1]",
         "Qwen2MoeForCausalLM"),
    ],
    ids=["mixtral", "qwen2moe", "qwen2moe-presoftmax-qkvbias-dense0"],
)  # fmt: skip
def test_export_gives_megalite_logits_in_transformers(tmp_path, flags, arch):
    save_model(tmp_path / "ck", flags)
    config = export_hf(tmp_path / "ck", tmp_path / "hf")
    assert config["architectures"] == [arch] and config["vocab_size"] == VOCAB
    with torch.no_grad():
        ours = megalite_model(tmp_path / "ck")(TOKENS)[..., :VOCAB]
        theirs = hf_model(tmp_path / "hf")(TOKENS).logits
    assert_close(theirs, ours, rtol=0, atol=1e-4)
    # and back: the same weights at TP2 x PP2 x EP2
    import_hf(tmp_path / "hf", tmp_path / "back", 2, 2, divisible=16, ep=2)
    meta = json.loads((tmp_path / "back/iter_0000000/meta.json").read_text())
    assert meta["expert_layout"]["expert_model_parallel_size"] == 2
    _, before = load_full_model(tmp_path / "ck")
    _, after = load_full_model(tmp_path / "back")
    for name, want in before.items():
        rows = VOCAB if name.endswith(("word_embeddings.weight", "output_layer.weight")) else None
        got = after.get(name)
        if got is None:  # only a Qwen2 export of a model without qkv biases adds (zero) ones
            assert "--add-qkv-bias" not in flags, name
            continue
        assert torch.equal(got[:rows], want[:rows]), name


def _randomize(model: torch.nn.Module) -> None:
    """transformers starts some weights at 0 or 1 (router, biases, norms): make all random."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if p.dim() == 1 else 0.0))


def _hf_tiny(kind: str, folder: Path) -> None:
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=32,
                  tie_word_embeddings=False)  # fmt: skip
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **common)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2MoeConfig(
            intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=16,
            num_experts=4, norm_topk_prob=False, mlp_only_layers=[1], **common,
        )  # fmt: skip
        model = transformers.Qwen2MoeForCausalLM(cfg)
    _randomize(model)
    model.save_pretrained(folder)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 1, 2)])
def test_import_of_transformers_model_gives_its_logits_and_loss(tmp_path, kind, tp, pp, ep):
    _hf_tiny(kind, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ck", tp, pp, divisible=16, ep=ep)
    ours = megalite_model(tmp_path / "ck")
    theirs = hf_model(tmp_path / "hf")
    with torch.no_grad():
        assert_close(ours(TOKENS)[..., :VOCAB], theirs(TOKENS).logits, rtol=0, atol=1e-4)
        our_loss = ours(TOKENS, LABELS).mean()
        logits = theirs(TOKENS).logits
        their_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), LABELS.flatten())
    assert_close(our_loss, their_loss, rtol=1e-5, atol=0)
    flags = pretrain_flags(json.loads((tmp_path / "ck/iter_0000000/meta.json").read_text()))
    assert "--num-experts 4" in flags
    assert (f"--expert-model-parallel-size {ep}" in flags) == (ep > 1)
    if kind == "qwen2_moe":
        assert "--moe-shared-expert-gate" in flags and "--add-qkv-bias" in flags
        assert "--moe-layer-freq '[1, 0, 1]'" in flags and "--moe-router-pre-softmax" in flags


def test_what_cannot_be_expressed_is_refused_by_name(tmp_path):
    save_model(tmp_path / "a", "--moe-router-score-function sigmoid")
    with pytest.raises(HFConversionError, match="--moe-router-score-function 'sigmoid'"):
        export_hf(tmp_path / "a", tmp_path / "hf")
    save_model(tmp_path / "b", "--moe-shared-expert-intermediate-size 16")
    with pytest.raises(HFConversionError, match="--moe-shared-expert-gate off"):
        export_hf(tmp_path / "b", tmp_path / "hf")
    save_model(tmp_path / "c", "--moe-layer-freq 2")
    with pytest.raises(HFConversionError, match=r"dense layers \[1\]"):
        export_hf(tmp_path / "c", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
    _hf_tiny("qwen2_moe", tmp_path / "q")
    config = json.loads((tmp_path / "q/config.json").read_text())
    (tmp_path / "q/config.json").write_text(json.dumps(dict(config, use_sliding_window=True)))
    with pytest.raises(ckpt.CheckpointError, match="use_sliding_window"):
        import_hf(tmp_path / "q", tmp_path / "back", 1, 1)
    assert not (tmp_path / "back").exists()


def _pretrain(argv: list[str]) -> int:
    from megalite.pretrain import pretrain

    return pretrain(argv)


@pytest.mark.extended
def test_imported_mixtral_trains_at_tp2_ep2_from_transformers_loss(tmp_path):
    """A transformers Mixtral imported at TP2 x EP2 and fine-tuned on 4 gloo ranks with the
    flags import prints: the first loss (before any update) is transformers' loss on global
    batch 0, so every rank loaded its own experts."""
    from tests.harness import run_distributed
    from tests.reference_loss import first_metrics, mock_batch

    _hf_tiny("mixtral", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ck", 2, 1, divisible=16, ep=2)
    flags = pretrain_flags(json.loads((tmp_path / "ck/iter_0000000/meta.json").read_text()))
    assert "--expert-model-parallel-size 2" in flags
    metrics = tmp_path / "m.jsonl"
    argv = (
        flags.split()
        + (
            f"--seq-length 16 --vocab-size {VOCAB} --mock-data --micro-batch-size 2 "
            "--global-batch-size 8 --lr 1e-3 --train-iters 1 --seed 3 --hidden-dropout 0 "
            f"--attention-dropout 0 --eval-iters 0 --load {tmp_path / 'ck'} --finetune "
            f"--distributed-backend gloo --metrics-file {metrics}"
        ).split()
    )
    assert run_distributed(4, _pretrain, argv, timeout=300) == [0] * 4
    batch = mock_batch(seed=3, seq_length=16, vocab_size=VOCAB, consumed=0, global_batch=8)
    with torch.no_grad():
        logits = hf_model(tmp_path / "hf")(batch["tokens"]).logits.float()
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    assert_close(first_metrics(metrics)["lm_loss"], hf_loss.item(), rtol=1e-5, atol=0)
