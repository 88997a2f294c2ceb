"""`--no-position-embedding` (Megatron's flag, used by its Mixtral script): no learned position
table with learned_absolute positions; a no-op with RoPE (Megatron adds no table there)."""

import torch
from torch.testing import assert_close

from megalite.model import GPTConfig, build_model
from megalite.training.arguments import load_config

SHAPE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=64,
             hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip


def _model(**kw):
    (model,) = build_model(GPTConfig(**SHAPE, **kw), 3, use_parallel_state=False)
    return model.eval()


def test_learned_positions_off_removes_the_table_and_its_term():
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    without = _model(no_position_embedding=True)
    names = dict(without.named_parameters())
    assert "embedding.position_embeddings.weight" not in names
    base = _model()
    assert "embedding.position_embeddings.weight" in dict(base.named_parameters())
    # The same model with its position table zeroed computes the same logits.
    with torch.no_grad():
        base.embedding.position_embeddings.weight.zero_()
        assert_close(without(tokens), base(tokens))
        # ...and a real table changes them (control).
        base.embedding.position_embeddings.weight.normal_()
        assert not torch.allclose(without(tokens), base(tokens))


def test_with_rope_the_flag_changes_nothing():
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    a = _model(position_embedding_type="rope", no_position_embedding=True)
    b = _model(position_embedding_type="rope")
    assert a.state_dict().keys() == b.state_dict().keys()
    with torch.no_grad():
        assert_close(a(tokens), b(tokens), rtol=0, atol=0)


def test_flag_parses_into_the_model_config():
    argv = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 8 "
            "--micro-batch-size 1 --train-iters 1 --lr 1e-3 --mock-data --vocab-size 64 "
            "--no-position-embedding").split()  # fmt: skip
    cfg, _ = load_config(argv)
    assert cfg.model.no_position_embedding is True
