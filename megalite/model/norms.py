"""LayerNorm / RMSNorm: NVIDIA apex's fused kernels when importable, torch's modules otherwise.

One switch, `use_fused`: ``None`` (auto) takes apex when ``apex.normalization`` imports and CUDA
is available (its kernels are CUDA-only), ``True`` insists on apex, ``False`` takes torch. Both
paths compute the same function with the same parameters (``weight``, and ``bias`` for
LayerNorm), so checkpoints move freely between them. apex is built from NVIDIA's source; the
unrelated PyPI package named ``apex`` has no ``apex.normalization`` and counts as absent.

Norm parameters are replicated across TP ranks. Under sequence parallelism each rank normalizes
only its ``[s/tp, b, h]`` slice, so their gradients are partial sums: `build_norm` marks them
``sequence_parallel=True`` for the data-parallel code to all-reduce over TP (docs/CONTRACTS.md).
"""

from __future__ import annotations

import importlib
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

NORMALIZATIONS = ("LayerNorm", "RMSNorm")  # Megatron's --normalization values


def _apex_normalization():
    """The ``apex.normalization`` module, or None when apex (NVIDIA's) is not usable here."""
    try:
        return importlib.import_module("apex.normalization")
    except Exception:  # noqa: BLE001 - a broken apex build (missing CUDA extension) = no apex
        return None


def fused_norms_available() -> bool:
    """True when the auto setting (``use_fused=None``) would pick apex's fused kernels."""
    return _apex_normalization() is not None and torch.cuda.is_available()


class _TorchRMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` for torch < 2.4, which has no ``nn.RMSNorm``."""

    def __init__(self, hidden_size: int, eps: float, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 (like the fused kernels), result in the input's dtype.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class _ZeroCenteredNorm(nn.Module):
    """LayerNorm / RMSNorm whose weight is stored as ``gamma - 1`` (Megatron's
    ``--apply-layernorm-1p``): initialised to zero, so weight decay pulls gamma towards 1."""

    def __init__(self, kind: str, hidden_size: int, eps: float, dtype=None, device=None) -> None:
        super().__init__()
        self.kind, self.eps, self.shape = kind, eps, (hidden_size,)
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))
        if kind == "LayerNorm":
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.weight + 1
        if self.kind == "LayerNorm":
            return F.layer_norm(x, self.shape, gamma, self.bias, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * gamma


def build_norm(
    normalization: str,
    hidden_size: int,
    eps: float = 1e-5,
    *,
    zero_centered_gamma: bool = False,
    sequence_parallel: bool = False,
    use_fused: Optional[bool] = None,
    params_dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """A ``"LayerNorm"`` or ``"RMSNorm"`` over the last dim: ``[.., h] -> [.., h]``.

    `use_fused`: None = apex when available (see module docstring), True = apex or ImportError,
    False = torch. `zero_centered_gamma` stores the weight as gamma - 1 (torch path only).
    Parameters get ``sequence_parallel`` and ``tensor_model_parallel=False``.
    """
    kinds = {k.lower(): k for k in NORMALIZATIONS}
    kind = kinds.get(normalization.lower())
    if kind is None:
        raise ValueError(
            f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}"
        )
    apex_norm = _apex_normalization() if use_fused is not False else None
    # Older apex builds have FusedLayerNorm but no FusedRMSNorm.
    fused_cls = getattr(apex_norm, f"Fused{kind}", None)
    if use_fused and fused_cls is None:
        raise ImportError(
            f"use_fused=True needs NVIDIA apex with apex.normalization.Fused{kind} (apex "
            f"{'lacks it' if apex_norm is not None else 'did not import'}); use use_fused=None "
            "or False for torch's norms"
        )
    if zero_centered_gamma:
        norm = _ZeroCenteredNorm(kind, hidden_size, eps, dtype=params_dtype, device=device)
    elif fused_cls is not None and (use_fused or torch.cuda.is_available()):
        norm = fused_cls(hidden_size, eps=eps).to(device=device, dtype=params_dtype)
    elif kind == "LayerNorm":
        norm = nn.LayerNorm(hidden_size, eps=eps, dtype=params_dtype, device=device)
    elif hasattr(nn, "RMSNorm"):
        norm = nn.RMSNorm(hidden_size, eps=eps, dtype=params_dtype, device=device)
    else:
        norm = _TorchRMSNorm(hidden_size, eps, dtype=params_dtype, device=device)
    for p in norm.parameters():
        p.sequence_parallel = sequence_parallel
        p.tensor_model_parallel = False
    return norm
