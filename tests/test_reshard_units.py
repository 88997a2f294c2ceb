"""Resharding units, single process: split rules against the layers' own attributes, reshards
against shards cut by the model's own `shard_tensor`, vocabulary re-padding, skeleton files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalite.checkpoint import format as ckpt
from megalite.checkpoint import layout as L
from megalite.checkpoint.reshard import load_full_model, reshard
from megalite.checkpoint.streaming import filling, write_skeleton
from megalite.model import GPTConfig, build_model
from megalite.tensor_parallel.utils import shard_tensor

SHAPE = dict(num_layers=4, hidden_size=32, num_attention_heads=8, num_query_groups=4,
             ffn_hidden_size=64, seq_length=8, make_vocab_size_divisible_by=32)  # fmt: skip
STYLES = {
    "llama-tied": dict(normalization="RMSNorm", swiglu=True,
                       position_embedding_type="rope"),
    "gpt2-untied-bias": dict(untie_embeddings_and_output_weights=True),
    "llama-untied-bias": dict(normalization="RMSNorm", swiglu=True,
                              position_embedding_type="rope", disable_bias_linear=False,
                              untie_embeddings_and_output_weights=True),
}  # fmt: skip
RUN_ARGS = {  # what the trainer's flags would store for STYLES (meta.json args)
    "llama-tied": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                       disable_bias_linear=True),
    "gpt2-untied-bias": dict(untie_embeddings_and_output_weights=True),
    "llama-untied-bias": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                              untie_embeddings_and_output_weights=True),
}  # fmt: skip


def one_process_model(style: str, vocab: int) -> torch.nn.Module:
    extra = dict(STYLES[style])
    if style == "llama-tied":
        extra["disable_bias_linear"] = True
    (model,) = build_model(GPTConfig(vocab_size=vocab, **SHAPE, **extra), 5,
                           use_parallel_state=False)  # fmt: skip
    return model


@pytest.mark.parametrize("style", list(STYLES))
def test_split_rules_match_the_layers_attributes(style):
    model = one_process_model(style, 64)
    swiglu = STYLES[style].get("swiglu", False)
    for name, p in model.named_parameters():
        rule = L.split_rule(name, swiglu)
        if getattr(p, "tensor_model_parallel", False):
            assert (rule.dim, rule.stride) == (p.partition_dim, p.partition_stride), name
        else:
            assert rule.dim is None, name


def write_sharded(root: Path, model, style: str, vocab: int, tp: int, pp: int) -> None:
    """Cut a one-process model into a TP x PP checkpoint with the layers' own attributes."""
    args = dict(SHAPE, **RUN_ARGS[style], vocab_size=vocab, mock_data=True,
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                padded_vocab_size=L.vocab_size_with_padding(vocab, 32, tp))  # fmt: skip
    config = L.config_from_meta(ckpt.upgrade_v1_meta({"args": args}))  # a format-1 checkpoint
    folder = ckpt.iteration_dir(root, 3)
    params = dict(model.named_parameters())
    tied = not config.untie_embeddings_and_output_weights
    if tied and pp > 1:
        params[L.OUTPUT_LAYER] = params[L.WORD_EMBEDDING]
    for t in range(tp):
        for p in range(pp):
            state = {}
            for name, w in params.items():
                if L.place(config, name)[0] != p:
                    continue
                w = w.detach()
                if L.split_rule(name, False).vocab:  # pad the vocabulary as a TP run would
                    w = L.resize_vocab(w, args["padded_vocab_size"], vocab)
                attr = params[name] if name != L.OUTPUT_LAYER else params[L.WORD_EMBEDDING]
                if getattr(attr, "tensor_model_parallel", False):
                    w = shard_tensor(w, attr.partition_dim, tp, t, attr.partition_stride)
                state[name] = w.clone()
            shard = ckpt.shard_dir(folder, t, p)
            shard.mkdir(parents=True)
            torch.save({"chunk0": state}, shard / "model.pt")
    meta = {"args": args, "iteration": 3, "consumed_train_samples": 24}
    (folder / "meta.json").write_text(json.dumps(meta))
    (root / ckpt.TRACKER).write_text("3\n")


@pytest.mark.parametrize("style", list(STYLES))
def test_reshard_joins_and_cuts_as_the_layers_do(tmp_path, style):
    vocab = 64  # no padding at TP 1 or 2 with divisible-by 32
    model = one_process_model(style, vocab)
    write_sharded(tmp_path / "tp2pp2", model, style, vocab, 2, 2)
    reshard(tmp_path / "tp2pp2", tmp_path / "tp1", 1, 1)
    _, full = load_full_model(tmp_path / "tp1")
    want = model.state_dict()
    assert full.keys() == want.keys()
    for name in want:
        assert torch.equal(full[name], want[name]), name
    # TP 2 x PP 2 -> TP 4 x PP 1 -> the model's own TP=4 shards (vocab 64 pads to 128 at TP 4).
    reshard(tmp_path / "tp2pp2", tmp_path / "tp4", 4, 1)
    write_sharded(tmp_path / "direct4", model, style, vocab, 4, 1)
    for t in range(4):
        shard = f"iter_0000003/mp_rank_{t:02d}_000/model.pt"
        got = torch.load(tmp_path / "tp4" / shard, weights_only=True)["chunk0"]
        direct = torch.load(tmp_path / "direct4" / shard, weights_only=True)["chunk0"]
        assert got.keys() == direct.keys()
        for name in direct:  # the vocabulary's 64 new rows are zeros on both sides
            assert torch.equal(got[name], direct[name]), name


def test_vocab_padding_changes_with_tp(tmp_path):
    """50 tokens: 64 rows at TP 2, 128 at TP 4; real rows kept, new ones repeat the last pad."""
    model = one_process_model("gpt2-untied-bias", 50)
    write_sharded(tmp_path / "tp2", model, "gpt2-untied-bias", 50, 2, 1)
    reshard(tmp_path / "tp2", tmp_path / "tp4", 4, 2)
    meta, full = load_full_model(tmp_path / "tp4")
    assert meta["padded_vocab_size"] == 128
    for name in L.VOCAB_PARAMS:
        original = model.state_dict()[name]  # 64 rows: 50 real + 14 padding
        got = full[name]
        assert got.shape == (128, 32)
        assert torch.equal(got[:64], original)
        assert torch.equal(got[64:], original[-1:].expand(64, 32))
    reshard(tmp_path / "tp4", tmp_path / "tp1", 1, 1)
    _, back = load_full_model(tmp_path / "tp1")
    for name, want in model.state_dict().items():
        assert torch.equal(back[name], want), name


def test_resize_vocab_rules():
    full = torch.arange(12.0).view(6, 2)
    assert torch.equal(L.resize_vocab(full, 8, 4)[6:], full[-1:].expand(2, 2))
    assert torch.equal(L.resize_vocab(full, 8, 6)[6:], torch.zeros(2, 2))  # no pad row to copy
    assert torch.equal(L.resize_vocab(full, 4, 4), full[:4])
    with pytest.raises(ValueError, match="it has 5 tokens"):
        L.resize_vocab(full, 4, 5)


def test_merge_is_the_inverse_of_shard_tensor():
    full = torch.randn(24, 6)
    for dim, stride in ((0, 1), (0, 2), (1, 1)):
        rule = L.Split(dim, stride)
        for tp in (1, 2, 3):
            shards = [shard_tensor(full, dim, tp, r, stride) for r in range(tp)]
            assert torch.equal(L.merge_shards(shards, rule), full)
            assert all(
                torch.equal(L.split_full(full, rule, tp, r), s) for r, s in enumerate(shards)
            )


def test_skeleton_is_filled_in_place_and_loads_weights_only(tmp_path):
    path = tmp_path / "s.pt"
    tree = {"chunk0": {"a": torch.empty(3, 4), "b": torch.empty(5, dtype=torch.bfloat16)}, "x": 7}
    write_skeleton(tree, path)
    with filling(path) as t:
        t["chunk0"]["a"].copy_(torch.arange(12.0).view(3, 4))
    with filling(path) as t:
        t["chunk0"]["b"].copy_(torch.ones(5))
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["chunk0"]["a"], torch.arange(12.0).view(3, 4))
    assert loaded["chunk0"]["b"].dtype == torch.bfloat16 and loaded["chunk0"]["b"].sum() == 5
    assert loaded["x"] == 7


def _tool(name: str):
    """tools/<name>.py as a module (its `main(argv)` is the CLI)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reshards_and_refuses_with_exit_status_2(tmp_path, capsys):
    model = one_process_model("llama-tied", 64)
    write_sharded(tmp_path / "src", model, "llama-tied", 64, 2, 2)
    cli = _tool("checkpoint_reshard")
    base = ["--load", str(tmp_path / "src"), "--target-pipeline-model-parallel-size", "1"]
    assert (
        cli.main(base + ["--save", str(tmp_path / "ok"), "--target-tensor-parallel-size", "1"]) == 0
    )
    assert ckpt.read_tracker(tmp_path / "ok") == 3
    bad = base + ["--save", str(tmp_path / "bad"), "--target-tensor-parallel-size", "16"]
    assert cli.main(bad) == 2
    assert "--num-attention-heads 8 is not divisible by --tensor-model-parallel-size 16" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "bad").exists()


def test_true_vocab_size_follows_the_trainer():
    """Format-1 checkpoints: mock data: V; NullTokenizer on real data: V + 1 (eod = V); a saved
    value wins; a tokenizer whose files are gone leaves it unknown."""
    base = dict(SHAPE, padded_vocab_size=128, tensor_model_parallel_size=1,
                pipeline_model_parallel_size=1)  # fmt: skip

    def vocab(**args):
        return L.true_vocab_size(ckpt.upgrade_v1_meta({"args": dict(base, **args)}))

    assert vocab(mock_data=True, vocab_size=50) == 50
    assert vocab(tokenizer_type="NullTokenizer", vocab_size=50) == 51
    assert vocab(true_vocab_size=7, vocab_size=50) == 7
    assert vocab(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/nonexistent") is None


@pytest.mark.parametrize("ep,etp,swiglu", [(2, 2, True), (4, 1, False), (1, 2, True)])
def test_expert_layout_matches_the_rank_grid_and_the_experts_module(ep, etp, swiglu):
    """Who holds which expert shard is parallel_state's expert grid; the split of the full
    stacked tensors is the one the experts module draws at each (ep, etp)."""
    from megalite.checkpoint.reshard_experts import ExpertLayout
    from megalite.model.transformer import ParamInit
    from megalite.moe.experts import Experts
    from megalite.parallel_state import expert_rank_grid

    tp, world = 2, 8
    layout = ExpertLayout(num_experts=4, ep=ep, etp=etp, tp=tp, swiglu=swiglu)
    grid = expert_rank_grid(world, tp=tp, ep=ep, etp=etp)  # [pp, edp, ep, etp]
    for j in range(world):
        _, _, e, x = (grid == j).nonzero()[0].tolist()
        assert layout.coords(j) == (e, x)
        assert (e, x) in layout.reachable(j % tp)

    def experts(num_local, first, rank, size):
        return Experts(
            32, 16, swiglu=swiglu, num_local=num_local, first=first, etp_rank=rank,
            etp_size=size, init=ParamInit(3, 0.02, 2), grouped_gemm=False,
            prefix="decoder.layers.0.mlp.experts.", params_dtype=torch.float32,
        )  # fmt: skip

    full = experts(4, 0, 0, 1)
    shards = {}
    for e in range(ep):
        for x in range(etp):
            local = experts(4 // ep, e * 4 // ep, x, etp)
            for part in ("linear_fc1", "linear_fc2"):
                name = f"decoder.layers.0.mlp.experts.{part}.weight"
                want = getattr(local, part).weight
                got = layout.split(name, getattr(full, part).weight.detach(), e, x)
                assert torch.equal(got, want), (name, e, x)
                shape = tuple(want.shape)
                assert layout.local_shape(name, layout.full_shape(name, shape)) == shape
                shards.setdefault(name, {})[(e, x)] = want.detach()
    for name, parts in shards.items():
        part = name.split(".")[-2]
        assert torch.equal(layout.merge(name, parts), getattr(full, part).weight.detach())
