"""This rank's experts, computed together: ``rows [M, h]`` sorted by local expert -> ``[M, h]``.

Weights are stacked per layer, ``linear_fc1.weight [E_local, F1/etp, h]`` and
``linear_fc2.weight [E_local, h, F/etp]`` (F1 = 2F for SwiGLU, the fused ``[gate; up]`` split
with stride 2 as the dense MLP's fc1), so one grouped GEMM can run all local experts. Expert e's
full weights are drawn from the init stream of its *global* name (``...linear_fc1.weight{e}``)
and then sliced to this rank's ETP shard: the model is the same at every EP/ETP layout.

Under ETP each rank computes a partial sum of the output (its slice of the inner dim), which the
dispatcher reduces over the expert-TP group. Parameters carry ``allreduce = False`` and
``expert = True`` (reduced over expert-DP, not DP), and ``expert_tensor_parallel`` with
``partition_dim`` (the dim split over ETP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def grouped_gemm_usable(rows: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch's grouped GEMM wants every row stride to be a multiple of 16 bytes."""
    if not _HAS_GROUPED_MM:
        return False
    size = rows.element_size()
    dims = [rows.shape[-1]] + [w.shape[-2] for w in weights] + [w.shape[-1] for w in weights]
    return all((d * size) % 16 == 0 for d in dims)


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, counts: list, grouped: bool):
    """Rows of expert i (``counts[i]`` consecutive rows) times ``weight[i].T`` -> ``[M, out]``."""
    if grouped and grouped_gemm_usable(rows, weight):
        offs = torch.tensor(counts, device=rows.device).cumsum(0).to(torch.int32)
        return F.grouped_mm(rows, weight.transpose(-2, -1), offs=offs)
    # Batched fallback: one GEMM per expert, empty experts included (keeps the graph whole).
    return torch.cat([F.linear(r, w) for r, w in zip(rows.split(counts), weight.unbind(0))])


class Experts(nn.Module):
    """Experts ``[first, first + num_local)`` of `num_experts`, each sharded `etp_size` ways."""

    def __init__(
        self, hidden_size: int, ffn_hidden_size: int, *, swiglu: bool, num_local: int, first: int,
        etp_rank: int, etp_size: int, init, prefix: str, grouped_gemm: bool, params_dtype,
        device=None,
    ):  # fmt: skip
        super().__init__()
        if ffn_hidden_size % etp_size != 0:
            raise ValueError(
                f"moe_ffn_hidden_size ({ffn_hidden_size}) is not divisible by "
                f"expert-tensor-parallel size ({etp_size})"
            )
        self.swiglu, self.grouped_gemm = swiglu, grouped_gemm
        part = ffn_hidden_size // etp_size
        fc1, fc2 = [], []
        for e in range(first, first + num_local):
            w1 = torch.empty(ffn_hidden_size * (2 if swiglu else 1), hidden_size)
            init.normal(f"{prefix}linear_fc1.weight{e}")(w1)
            halves = w1.chunk(2) if swiglu else (w1,)
            fc1.append(torch.cat([h[etp_rank * part : (etp_rank + 1) * part] for h in halves]))
            w2 = torch.empty(hidden_size, ffn_hidden_size)
            init.normal(f"{prefix}linear_fc2.weight{e}", scaled=True)(w2)
            fc2.append(w2[:, etp_rank * part : (etp_rank + 1) * part])
        self.linear_fc1 = nn.Module()
        self.linear_fc2 = nn.Module()
        self.linear_fc1.weight = nn.Parameter(
            torch.stack(fc1).to(device=device, dtype=params_dtype)
        )
        self.linear_fc2.weight = nn.Parameter(
            torch.stack(fc2).to(device=device, dtype=params_dtype)
        )
        for p, dim in ((self.linear_fc1.weight, 1), (self.linear_fc2.weight, 2)):
            p.allreduce, p.expert = False, True
            p.expert_tensor_parallel, p.partition_dim = etp_size > 1, dim
            p.partition_stride = 2 if swiglu and dim == 1 else 1

    def forward(self, rows: torch.Tensor, counts: list) -> torch.Tensor:
        """`counts[i]` rows for local expert i, in expert order -> partial outputs ``[M, h]``."""
        y = grouped_linear(rows, self.linear_fc1.weight, counts, self.grouped_gemm)
        if self.swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y)
        return grouped_linear(y, self.linear_fc2.weight, counts, self.grouped_gemm)
