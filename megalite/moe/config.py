"""MoEConfig: every mixture-of-experts setting, one field per Megatron-LM flag.

``num_experts=None`` means a dense model (every other field is then ignored). The expert MLPs
use the model's activation (GeLU or SwiGLU, as Megatron's ``--swiglu``) and have no biases (as
Megatron's grouped-GEMM experts).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Optional, Union

from megalite.config import ConfigError, option

SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")
DISPATCHERS = ("allgather", "alltoall")
DROP_POLICIES = ("probs", "position")


def _layer_pattern(text: str) -> list[int]:
    """Evaluate a Megatron ``--moe-layer-freq`` list such as ``([0]*1+[1]*3)`` or ``[1,0,1]``.

    Only list literals of 0/1, ``+`` and ``* int`` are accepted (no other Python)."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ConfigError(f"--moe-layer-freq {text!r}: only lists of 0/1 with + and * are allowed")

    try:
        value = ev(ast.parse(text.strip(), mode="eval"))
    except SyntaxError as e:
        raise ConfigError(f"--moe-layer-freq {text!r} is not an integer or a list: {e}") from None
    if not isinstance(value, list) or any(v not in (0, 1) for v in value):
        raise ConfigError(f"--moe-layer-freq {text!r} must give a list of 0 and 1, got {value}")
    return value


@dataclass
class MoEConfig:
    """Mixture of experts: router, experts, dispatch and expert parallelism."""

    num_experts: Optional[int] = option(None, "experts per MoE layer (None: dense model)")
    moe_router_topk: int = option(2, "experts each token is routed to (k)")
    moe_router_score_function: str = option(
        "softmax", "router score: softmax or sigmoid (DeepSeek-V3)", choices=SCORE_FUNCTIONS
    )
    moe_router_pre_softmax: bool = option(
        False, "softmax over all experts before top-k (default: softmax over the top-k logits)"
    )
    moe_router_topk_scaling_factor: Optional[float] = option(
        None, "multiply the top-k routing weights by this factor"
    )
    moe_router_enable_expert_bias: bool = option(
        False, "per-expert bias added to scores for top-k selection only (aux-loss-free balancing)"
    )
    moe_router_bias_update_rate: float = option(
        1e-3, "step of the expert-bias update: bias += rate * sign(mean load - load) per step"
    )
    moe_ffn_hidden_size: Optional[int] = option(None, "expert MLP width (None: ffn_hidden_size)")
    moe_shared_expert_intermediate_size: Optional[int] = option(
        None, "width of the shared experts' MLP seen by every token (None: no shared expert)"
    )
    moe_shared_expert_gate: bool = option(
        False, "scale the shared expert's output by sigmoid(x . w_gate), per token (Qwen2-MoE)"
    )
    moe_layer_freq: Union[int, str] = option(
        1, "MoE every N layers (int), or a 0/1 list per layer such as '([0]*1+[1]*3)'"
    )
    moe_router_load_balancing_type: str = option(
        "aux_loss", "load-balancing loss: aux_loss, seq_aux_loss or none", choices=LOAD_BALANCING
    )
    moe_aux_loss_coeff: float = option(0.0, "weight of the load-balancing loss")
    moe_z_loss_coeff: Optional[float] = option(None, "weight of the router z-loss (None: off)")
    moe_expert_capacity_factor: Optional[float] = option(
        None, "tokens an expert takes, as a factor of the even share (None: dropless)"
    )
    moe_token_drop_policy: str = option(
        "probs", "over capacity, drop each expert's tokens of lowest applied routing weight "
        "(probs) or its last ones (position)",
        choices=DROP_POLICIES,
    )  # fmt: skip
    moe_token_dispatcher_type: str = option(
        "allgather", "token dispatch: allgather or alltoall", choices=DISPATCHERS
    )
    moe_grouped_gemm: bool = option(
        False, "one grouped GEMM for all local experts (torch.nn.functional.grouped_mm)"
    )
    moe_per_layer_logging: bool = option(
        False, "accepted; per-layer aux loss, z-loss and load are always in the metrics file"
    )
    moe_router_dtype: Optional[str] = option(
        None, "dtype of the router's logits and scores (default fp32)", choices=("fp32", "fp64")
    )
    moe_permute_fusion: bool = option(
        False, "accepted for Megatron-LM compatibility; selects a kernel megalite does not have"
    )
    expert_model_parallel_size: int = option(1, "ranks the experts are split across (EP)")
    expert_tensor_parallel_size: Optional[int] = option(
        None, "ranks each expert's weights are split across (ETP; None: the TP size)"
    )

    def __post_init__(self) -> None:
        if isinstance(self.moe_layer_freq, (list, tuple)):  # a YAML/JSON list in a config file
            self.moe_layer_freq = str([int(v) for v in self.moe_layer_freq])
        if isinstance(self.moe_layer_freq, str):
            text = self.moe_layer_freq.strip()
            self.moe_layer_freq = int(text) if text.isdigit() else text
            if isinstance(self.moe_layer_freq, str):
                _layer_pattern(self.moe_layer_freq)
        if self.num_experts is None:
            return
        e, k = self.num_experts, self.moe_router_topk
        if not isinstance(e, int) or e < 1:
            raise ConfigError(f"--num-experts must be an integer >= 1, got {e!r}")
        if not isinstance(k, int) or not 1 <= k <= e:
            raise ConfigError(f"--moe-router-topk ({k}) must be in [1, --num-experts ({e})]")
        for name in ("expert_model_parallel_size", "expert_tensor_parallel_size",
                     "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1: {value!r}")
        if self.moe_shared_expert_gate and not self.moe_shared_expert_intermediate_size:
            raise ConfigError(
                "--moe-shared-expert-gate needs a shared expert "
                "(--moe-shared-expert-intermediate-size)"
            )
        ep = self.expert_model_parallel_size
        if e % ep != 0:
            raise ConfigError(
                f"--num-experts ({e}) is not divisible by --expert-model-parallel-size ({ep})"
            )
        if isinstance(self.moe_layer_freq, int) and self.moe_layer_freq < 1:
            raise ConfigError(f"--moe-layer-freq must be >= 1, got {self.moe_layer_freq}")
        cf = self.moe_expert_capacity_factor
        if cf is not None and cf <= 0:
            raise ConfigError(f"--moe-expert-capacity-factor must be > 0, got {cf}")
        if self.moe_aux_loss_coeff < 0 or (self.moe_z_loss_coeff or 0.0) < 0:
            raise ConfigError("--moe-aux-loss-coeff and --moe-z-loss-coeff must be >= 0")
        if self.moe_router_bias_update_rate < 0:
            raise ConfigError("--moe-router-bias-update-rate must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.num_experts is not None

    def is_moe_layer(self, layer: int, num_layers: int) -> bool:
        """Whether global layer `layer` (0-based) of `num_layers` is an MoE layer."""
        if not self.enabled:
            return False
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            return layer % freq == 0
        pattern = _layer_pattern(freq)
        if len(pattern) != num_layers:
            raise ConfigError(
                f"--moe-layer-freq {freq!r} has {len(pattern)} entries for {num_layers} layers"
            )
        return bool(pattern[layer])

    def expert_tensor_parallel(self, tensor_model_parallel_size: int) -> int:
        """ETP, defaulting to TP as in Megatron."""
        etp = self.expert_tensor_parallel_size
        return tensor_model_parallel_size if etp is None else etp
