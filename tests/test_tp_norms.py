"""build_norm: torch path against the formulas, the apex switch with a stand-in apex module."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from megalite.model import norms
from megalite.model.norms import build_norm


@pytest.fixture
def no_apex(monkeypatch):
    monkeypatch.setattr(norms, "_apex_normalization", lambda: None)


@pytest.fixture
def fake_apex(monkeypatch):
    """A stand-in ``apex.normalization`` whose modules are recognisable subclasses."""

    class FusedLayerNorm(nn.LayerNorm):
        pass

    class FusedRMSNorm(nn.LayerNorm):
        pass

    module = types.ModuleType("apex.normalization")
    module.FusedLayerNorm, module.FusedRMSNorm = FusedLayerNorm, FusedRMSNorm
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.normalization", module)
    return module


def test_torch_layernorm_and_rmsnorm_match_formulas(no_apex):
    x = torch.randn(4, 2, 8)
    ln = build_norm("LayerNorm", 8, eps=1e-5)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    assert_close(ln(x), F.layer_norm(x, (8,), ln.weight, ln.bias, 1e-5))
    rms = build_norm("rmsnorm", 8, eps=1e-6)
    with torch.no_grad():
        rms.weight.uniform_(0.5, 1.5)
    assert [n for n, _ in rms.named_parameters()] == ["weight"]
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight
    assert_close(rms(x), expected)
    fallback = norms._TorchRMSNorm(8, 1e-6)
    fallback.load_state_dict(rms.state_dict())
    assert_close(fallback(x), expected)


def test_parameter_attributes_and_dtype(no_apex):
    norm = build_norm("LayerNorm", 8, sequence_parallel=True, params_dtype=torch.bfloat16)
    for p in norm.parameters():
        assert p.sequence_parallel is True and p.tensor_model_parallel is False
        assert p.dtype == torch.bfloat16
    assert all(not p.sequence_parallel for p in build_norm("RMSNorm", 8).parameters())


def test_switch_without_apex(no_apex):
    assert type(build_norm("LayerNorm", 8)) is nn.LayerNorm  # auto falls back to torch
    assert not norms.fused_norms_available()
    with pytest.raises(ImportError, match="needs NVIDIA apex.*did not import"):
        build_norm("RMSNorm", 8, use_fused=True)
    with pytest.raises(ValueError, match="unknown normalization 'BatchNorm'"):
        build_norm("BatchNorm", 8)


def test_switch_with_apex(fake_apex, monkeypatch):
    assert isinstance(build_norm("LayerNorm", 8, use_fused=True), fake_apex.FusedLayerNorm)
    assert isinstance(build_norm("RMSNorm", 8, use_fused=True), fake_apex.FusedRMSNorm)
    assert type(build_norm("LayerNorm", 8, use_fused=False)) is nn.LayerNorm
    # Auto: apex's kernels are CUDA-only, so it is chosen only where CUDA is.
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        fused = isinstance(build_norm("LayerNorm", 8), fake_apex.FusedLayerNorm)
        assert fused == cuda == norms.fused_norms_available()
    p = next(build_norm("RMSNorm", 8, use_fused=True, sequence_parallel=True).parameters())
    assert p.sequence_parallel
    # An older apex without FusedRMSNorm: auto falls back to torch, use_fused=True refuses.
    monkeypatch.delattr(fake_apex, "FusedRMSNorm")
    assert torch.cuda.is_available()  # still patched: auto would pick apex if it could
    assert type(build_norm("RMSNorm", 8)) is nn.RMSNorm
    with pytest.raises(ImportError, match="apex.normalization.FusedRMSNorm \\(apex lacks it\\)"):
        build_norm("RMSNorm", 8, use_fused=True)
