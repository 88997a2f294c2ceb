"""Hugging Face export/import: transformers (offline) reproduces megalite's logits, and an
exported folder imports back to the same weights at another TP/PP.

Trained checkpoints come from the real trainer on 8 gloo ranks (TP=2 x PP=2 x DP=2, ZeRO-1);
the other variants are single-process models saved through megalite's checkpoint writer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from megalite.checkpoint import format as ckpt  # noqa: E402
from megalite.checkpoint.hf import HFConversionError  # noqa: E402
from megalite.checkpoint.hf_io import export_hf, import_hf  # noqa: E402
from megalite.checkpoint.layout import config_from_meta  # noqa: E402
from megalite.checkpoint.reshard import load_full_model  # noqa: E402
from megalite.config.fields import to_dict  # noqa: E402
from megalite.model import build_model  # noqa: E402
from megalite.training.arguments import resolved_config  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.reference_loss import first_metrics, mock_batch  # noqa: E402

WORLD = 8
VOCAB = 50  # pads to 64: export drops 14 padding rows, import adds them back as zeros
COMMON = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
    f"--seq-length 16 --vocab-size {VOCAB} --make-vocab-size-divisible-by 16 --mock-data "
    "--micro-batch-size 2 --global-batch-size 8 --lr 1e-2 --train-iters 3 --seed 3 "
    "--hidden-dropout 0 --attention-dropout 0 --eval-iters 0 --log-interval 1"
).split()
LLAMA = "--normalization RMSNorm --swiglu --position-embedding-type rope --num-query-groups 2"
GPT2 = "--normalization LayerNorm --untie-embeddings-and-output-weights"
STYLES = {"llama": LLAMA.split(), "gpt2": GPT2.split()}


def _pretrain(argv: list[str]) -> int:
    from megalite.pretrain import pretrain

    return pretrain(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A Llama-style (GQA, biases, tied) and a GPT-2-style (untied) model after 3 iterations."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for style, flags in STYLES.items():
        argv = COMMON + flags + ["--tensor-model-parallel-size", "2"]
        argv += ["--pipeline-model-parallel-size", "2", "--zero-stage", "1"]
        argv += ["--save", str(root / style), "--distributed-backend", "gloo"]
        assert run_distributed(WORLD, _pretrain, argv) == [0] * WORLD
        out[style] = root / style
    return out


def megalite_logits(load: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the one-process megalite model holding the checkpoint's joined shards."""
    meta, full = load_full_model(load)
    (model,) = build_model(config_from_meta(meta, 1, 1, None), 0, use_parallel_state=False)
    model.load_state_dict(full, strict=True)
    with torch.no_grad():
        return model.eval()(tokens)


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_export_of_trained_model_gives_megalite_logits(trained, tmp_path, style):
    config = export_hf(trained[style], tmp_path / "hf")
    assert config["architectures"] == [
        "LlamaForCausalLM" if style == "llama" else "GPT2LMHeadModel"
    ]
    assert config["vocab_size"] == VOCAB
    ours = megalite_logits(trained[style], TOKENS)
    theirs = hf_logits(tmp_path / "hf", TOKENS)
    assert ours.shape[-1] == 64 and theirs.shape[-1] == VOCAB
    torch.testing.assert_close(theirs, ours[..., :VOCAB], rtol=0, atol=1e-4)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1)])
def test_import_of_export_gives_the_same_weights_at_any_layout(trained, tmp_path, style, tp, pp):
    export_hf(trained[style], tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back", tp, pp, divisible=16)
    meta = json.loads((tmp_path / "back/iter_0000000/meta.json").read_text())
    assert meta["optimizer_format"] is None and meta["iteration"] == 0
    assert (
        meta["model"]["tensor_model_parallel_size"],
        meta["model"]["pipeline_model_parallel_size"],
    ) == (tp, pp)
    _, before = load_full_model(trained[style])
    _, after = load_full_model(tmp_path / "back")
    assert before.keys() == after.keys()
    for name, want in before.items():
        got = after[name]
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            assert got.shape == want.shape == (64, 32)
            assert torch.equal(got[VOCAB:], torch.zeros_like(got[VOCAB:])), name
            got, want = got[:VOCAB], want[:VOCAB]
        assert torch.equal(got, want), name


def test_imported_checkpoint_trains_with_finetune_only(trained, tmp_path):
    """No optimizer state: --finetune (or --no-load-optim) trains; a plain --load says so."""
    export_hf(trained["llama"], tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "imported", 1, 2, divisible=16)
    base = COMMON + LLAMA.split() + ["--pipeline-model-parallel-size", "2"]
    base += ["--load", str(tmp_path / "imported"), "--distributed-backend", "gloo"]
    metrics = tmp_path / "m.jsonl"
    assert (
        run_distributed(WORLD, _pretrain, base + ["--finetune", "--metrics-file", str(metrics)])
        == [0] * WORLD
    )
    first = first_metrics(metrics)
    assert first["iteration"] == 1
    # the imported weights are those of the Hugging Face model: the first loss (before any
    # update) equals that model's loss on global batch 0, computed by transformers
    batch = mock_batch(seed=3, seq_length=16, vocab_size=VOCAB, consumed=0, global_batch=8)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = hf(batch["tokens"]).logits.float()
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    torch.testing.assert_close(first["lm_loss"], hf_loss.item(), rtol=1e-5, atol=0)
    # and differs from the loss of the model before training (what a skipped load would give)
    fresh = tmp_path / "fresh.jsonl"
    argv = COMMON + LLAMA.split() + ["--pipeline-model-parallel-size", "2", "--train-iters", "1"]
    assert run_distributed(WORLD, _pretrain, argv + ["--metrics-file", str(fresh)]) == [0] * WORLD
    assert abs(first_metrics(fresh)["lm_loss"] - hf_loss.item()) > 1e-3
    assert run_distributed(WORLD, _pretrain, base) == [2] * WORLD
    shard = ckpt.shard_dir(tmp_path / "imported/iter_0000000", 0, 0)
    with pytest.raises(ckpt.CheckpointError, match="--finetune or --no-load-optim"):
        ckpt.optimizer_file(shard, 0, False)


def write_checkpoint(root: Path, run, config, model) -> Path:
    """`model` (one process, TP=PP=1, EP=1) saved through megalite's checkpoint writer as
    iteration 1 of a run with settings `run`."""
    settings = {}
    for section in run.sections().values():
        settings.update(to_dict(section, cli_only=True))
    meta = {"settings": settings, "model": to_dict(config), "optimizer_sharded": False,
            "padded_vocab_size": config.padded_vocab_size, "consumed_train_samples": 0}  # fmt: skip
    if run.moe.num_experts:
        meta["expert_layout"] = {"num_experts": run.moe.num_experts,
                                 "expert_model_parallel_size": 1,
                                 "expert_tensor_parallel_size": 1}  # fmt: skip
    ckpt.save_checkpoint(
        root, 1, coords={"tp": 0, "pp": 0, "dp": 0},
        model_state=lambda: {"chunk0": model.state_dict()}, optimizer_state=None,
        optimizer_sharded=False, rng_state={}, meta=meta,
    )  # fmt: skip
    return root


# --- single-process variants ----------------------------------------------------------------
def save_model(root: Path, flags: str, tokenizer: list[str] = ()) -> Path:
    """A fresh one-process model saved as a megalite checkpoint (TP=1, PP=1)."""
    argv = COMMON + flags.split() + list(tokenizer)
    run = resolved_config(argv, 1)
    config = run.model_config(VOCAB)
    (model,) = build_model(config, 11, use_parallel_state=False)
    with torch.no_grad():  # biases and norms start at 0/1: make them matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return write_checkpoint(root, run, config, model)


@pytest.mark.parametrize(
    "flags",
    [
        "--normalization LayerNorm --disable-bias-linear",  # GPT-2 with zero biases
        "--normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear "
        "--untie-embeddings-and-output-weights",  # Llama, MHA, untied, no biases
    ],
    ids=["gpt2-no-bias", "llama-untied"],
)
def test_variants_export_exactly(tmp_path, flags):
    save_model(tmp_path / "ck", flags)
    export_hf(tmp_path / "ck", tmp_path / "hf")
    ours = megalite_logits(tmp_path / "ck", TOKENS)[..., :VOCAB]
    torch.testing.assert_close(hf_logits(tmp_path / "hf", TOKENS), ours, rtol=0, atol=1e-4)


def test_model_neither_class_represents_is_refused(tmp_path):
    save_model(tmp_path / "ck", "--normalization LayerNorm --position-embedding-type rope")
    with pytest.raises(
        HFConversionError, match="position_embedding_type='rope' \\(needs 'learned_absolute'"
    ):
        export_hf(tmp_path / "ck", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_gpt2_with_tanh_gelu_is_refused_on_import(trained, tmp_path):
    export_hf(trained["gpt2"], tmp_path / "hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    config["activation_function"] = "gelu_new"
    (tmp_path / "hf/config.json").write_text(json.dumps(config))
    with pytest.raises(ckpt.CheckpointError, match="'gelu_new': megalite's GeLU is the exact"):
        import_hf(tmp_path / "hf", tmp_path / "back", 1, 1)
    assert not (tmp_path / "back").exists()


def test_tokenizers_are_exported_for_auto_tokenizer(tmp_path):
    """SentencePiece (.model) and Hugging Face (tokenizer.json): same ids as megalite's."""
    import sentencepiece as spm

    from megalite.data.tokenizers import build_tokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "corpus.txt").write_text("\n".join(text.split(". ")))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=40,
        model_type="bpe", byte_fallback=False, minloglevel=2,
    )  # fmt: skip
    model = str(tmp_path / "sp.model")
    save_model(tmp_path / "ck", LLAMA, ["--tokenizer-type", "SentencePieceTokenizer",
                                        "--tokenizer-model", model])  # fmt: skip
    export_hf(tmp_path / "ck", tmp_path / "hf", true_vocab=VOCAB)
    ours = build_tokenizer("SentencePieceTokenizer", model)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sample = "the lazy fox jumps over the quick dog"
    assert theirs(sample, add_special_tokens=False)["input_ids"] == ours.tokenize(sample)


def test_cli_export_then_import_prints_matching_flags(tmp_path, capsys):
    from tests.test_reshard_units import _tool

    save_model(tmp_path / "ck", LLAMA)
    assert (
        _tool("export_hf").main(["--load", str(tmp_path / "ck"), "--output", str(tmp_path / "hf")])
        == 0
    )
    argv = ["--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")]
    argv += ["--pipeline-model-parallel-size", "2", "--make-vocab-size-divisible-by", "16"]
    assert _tool("import_hf").main(argv) == 0
    out = capsys.readouterr().out
    assert "--finetune" in out and "--num-query-groups 2" in out and "--swiglu" in out
    assert (
        _tool("export_hf").main(["--load", str(tmp_path / "ck"), "--output", str(tmp_path / "hf")])
        == 2
    )
    assert "is not empty" in capsys.readouterr().err


def test_sharded_safetensors_export_loads_and_imports(tmp_path):
    """Past max_shard_bytes: numbered shards + model.safetensors.index.json, both directions."""
    save_model(tmp_path / "ck", LLAMA)
    export_hf(tmp_path / "ck", tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ours = megalite_logits(tmp_path / "ck", TOKENS)[..., :VOCAB]
    torch.testing.assert_close(hf_logits(tmp_path / "hf", TOKENS), ours, rtol=0, atol=1e-4)
    import_hf(tmp_path / "hf", tmp_path / "back", 2, 2, divisible=16)
    _, before = load_full_model(tmp_path / "ck")
    _, after = load_full_model(tmp_path / "back")
    for name, want in before.items():
        rows = VOCAB if name.endswith(("word_embeddings.weight", "output_layer.weight")) else None
        assert torch.equal(after[name][:rows], want[:rows]), name
