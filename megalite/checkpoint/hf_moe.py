"""megalite MoE <-> Hugging Face ``MixtralForCausalLM`` / ``Qwen2MoeForCausalLM``.

Both are Llama-style (RMSNorm, SwiGLU, rotate-half RoPE, grouped-query attention; the attention
and embedding maps are `megalite.checkpoint.hf`'s) with an MoE block per layer. What each
expresses, checked against transformers' modeling_mixtral.py / modeling_qwen2_moe.py:

- **Mixtral**: every layer MoE; router ``block_sparse_moe.gate`` = megalite ``mlp.router``; the
  weights are softmax over all E, top-k, renormalized over the k: the softmax over the top-k
  logits, megalite's default (``--moe-router-score-function softmax`` without
  ``--moe-router-pre-softmax``). Experts ``w1`` (gate), ``w3`` (up), ``w2`` (down); no biases,
  no shared expert.
- **Qwen2-MoE**: a shared expert every token goes through, scaled per token by
  ``sigmoid(shared_expert_gate(x))`` (megalite ``--moe-shared-expert-intermediate-size`` with
  ``--moe-shared-expert-gate``: ``mlp.shared_experts.gate_weight [1, h]``); biases on q, k, v
  only (``--disable-bias-linear --add-qkv-bias``; a bias-free megalite model exports zero
  biases, which compute the same function); ``norm_topk_prob`` True is megalite's default
  router, False is ``--moe-router-pre-softmax`` (softmax over all E, no renormalization);
  dense layers (``mlp_only_layers`` / ``decoder_sparse_step``) are a ``--moe-layer-freq`` list
  with ``--ffn-hidden-size`` = ``intermediate_size``, experts ``--moe-ffn-hidden-size`` =
  ``moe_intermediate_size``.

Files are written in the per-expert layout transformers saves (``experts.{e}.w1.weight`` /
``experts.{e}.gate_proj.weight``); import also reads the stacked one (``experts.gate_up_proj``,
``experts.down_proj``). Anything either side cannot express is refused, naming the field.
"""

from __future__ import annotations

from typing import Optional

import torch

from megalite.checkpoint.hf import HFConversionError, _qkv_fused, _qkv_parts
from megalite.checkpoint.layout import OUTPUT_LAYER, WORD_EMBEDDING
from megalite.model import GPTConfig

MOE_KINDS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def moe_kind(c: GPTConfig, moe) -> str:
    """ "mixtral" or "qwen2_moe" for a megalite MoE model, or HFConversionError listing what
    does not fit (the class is chosen by the shared expert: Qwen2-MoE has one, Mixtral not)."""
    miss = []
    for field, want in (("normalization", "RMSNorm"), ("swiglu", True),
                        ("position_embedding_type", "rope"), ("disable_bias_linear", True),
                        ("apply_layernorm_1p", False), ("rotary_percent", 1.0)):  # fmt: skip
        if getattr(c, field) != want:
            miss.append(f"--{field.replace('_', '-')} {getattr(c, field)!r} (needs {want!r})")
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        miss.append(f"--kv-channels {c.kv_channels} (heads x head dim must equal hidden size)")
    for field, want in (("moe_router_score_function", "softmax"),
                        ("moe_router_enable_expert_bias", False),
                        ("moe_router_topk_scaling_factor", None),
                        ("moe_expert_capacity_factor", None)):  # fmt: skip
        if getattr(moe, field) != want:
            miss.append(f"--{field.replace('_', '-')} {getattr(moe, field)!r} (needs {want!r})")
    shared = moe.moe_shared_expert_intermediate_size
    kind = "qwen2_moe" if shared else "mixtral"
    if kind == "mixtral":
        if c.add_qkv_bias:
            miss.append("--add-qkv-bias (Mixtral has no biases)")
        if moe.moe_router_pre_softmax:
            miss.append("--moe-router-pre-softmax (Mixtral renormalizes the top-k weights)")
        dense = [i for i in range(c.num_layers) if not moe.is_moe_layer(i, c.num_layers)]
        if dense:
            miss.append(f"--moe-layer-freq {moe.moe_layer_freq!r}: dense layers {dense} "
                        "(every Mixtral layer is MoE)")  # fmt: skip
    elif not moe.moe_shared_expert_gate:
        miss.append("--moe-shared-expert-gate off (Qwen2-MoE always gates its shared expert)")
    if miss:
        raise HFConversionError(f"this MoE model is not a {MOE_KINDS[kind]}: " + "; ".join(miss))
    return kind


def hf_moe_config(c: GPTConfig, moe, vocab: int, dtype: torch.dtype, tokens: dict) -> dict:
    """config.json of the MoE model (see `moe_kind`)."""
    kind = moe_kind(c, moe)
    theta = float(c.rotary_base)
    out = {
        "architectures": [MOE_KINDS[kind]],
        "model_type": kind,
        "vocab_size": vocab,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_query_groups,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.norm_epsilon,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_theta": theta,
        "num_experts_per_tok": moe.moe_router_topk,
        "router_aux_loss_coef": moe.moe_aux_loss_coeff,
        "output_router_logits": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": not c.untie_embeddings_and_output_weights,
        "initializer_range": c.init_method_std,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
        **tokens,
    }
    ffn = moe.moe_ffn_hidden_size or c.ffn_hidden_size
    if kind == "mixtral":
        out.update(intermediate_size=ffn, num_local_experts=moe.num_experts,
                   head_dim=c.head_dim, router_jitter_noise=0.0, sliding_window=None)  # fmt: skip
        return out
    dense = [i for i in range(c.num_layers) if not moe.is_moe_layer(i, c.num_layers)]
    out.update(
        intermediate_size=c.ffn_hidden_size, moe_intermediate_size=ffn,
        shared_expert_intermediate_size=moe.moe_shared_expert_intermediate_size,
        num_experts=moe.num_experts, norm_topk_prob=not moe.moe_router_pre_softmax,
        decoder_sparse_step=1, mlp_only_layers=dense, qkv_bias=True,
        use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers,
    )  # fmt: skip
    return out


def moe_args_from_hf(hf: dict) -> tuple[dict, dict]:
    """(megalite model flags, MoE flags) for a Mixtral / Qwen2-MoE config.json, or refuse."""
    kind = hf["model_type"]
    bad = []
    heads, h = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or h // heads
    if head_dim * heads != h:
        bad.append(f"head_dim {head_dim} x num_attention_heads {heads} != hidden_size {h}")
    if hf.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act {hf['hidden_act']!r} (megalite's SwiGLU is silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        bad.append(f"rope_scaling {rope.get('rope_type', rope.get('type'))!r}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 1e6 if kind == "mixtral" else 1e4))
    groups = hf.get("num_key_value_heads") or heads
    args = {
        "normalization": "RMSNorm", "swiglu": True, "position_embedding_type": "rope",
        "rotary_base": int(theta), "num_layers": hf["num_hidden_layers"], "hidden_size": h,
        "num_attention_heads": heads, "num_query_groups": groups if groups != heads else None,
        "group_query_attention": groups != heads,
        "max_position_embeddings": hf["max_position_embeddings"], "disable_bias_linear": True,
        "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", False),
        "vocab_size": hf["vocab_size"],
    }  # fmt: skip
    moe = {"moe_router_topk": hf["num_experts_per_tok"], "moe_router_score_function": "softmax",
           "moe_aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.0))}  # fmt: skip
    if kind == "mixtral":
        if hf.get("sliding_window") is not None:
            bad.append(f"sliding_window {hf['sliding_window']} (megalite attends to the whole "
                       "sequence)")  # fmt: skip
        if hf.get("router_jitter_noise"):
            bad.append(f"router_jitter_noise {hf['router_jitter_noise']} (megalite has none)")
        args["ffn_hidden_size"] = hf["intermediate_size"]
        moe.update(num_experts=hf["num_local_experts"], moe_ffn_hidden_size=hf["intermediate_size"])
    else:
        if hf.get("use_sliding_window"):
            bad.append("use_sliding_window true (megalite attends to the whole sequence)")
        if not hf.get("shared_expert_intermediate_size"):
            bad.append("shared_expert_intermediate_size 0 (Qwen2-MoE without a shared expert)")
        n, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
        only = set(hf.get("mlp_only_layers") or [])
        pattern = [int(i not in only and (i + 1) % step == 0) for i in range(n)]
        args.update(ffn_hidden_size=hf["intermediate_size"], add_qkv_bias=hf.get("qkv_bias", True))
        moe.update(
            num_experts=hf["num_experts"], moe_ffn_hidden_size=hf["moe_intermediate_size"],
            moe_shared_expert_intermediate_size=hf["shared_expert_intermediate_size"],
            moe_shared_expert_gate=True, moe_router_pre_softmax=not hf.get("norm_topk_prob"),
            moe_layer_freq=1 if all(pattern) else str(pattern),
        )  # fmt: skip
    if bad:
        raise HFConversionError(f"cannot import this {kind} model into megalite: " + "; ".join(bad))
    return args, moe


# --- tensors, one unit at a time ---------------------------------------------------------------
def _mlp_names(kind: str, i: int) -> tuple[str, str]:
    """(HF prefix of layer i's MoE block, its router name)."""
    block = f"model.layers.{i}." + ("block_sparse_moe." if kind == "mixtral" else "mlp.")
    return block, block + "gate.weight"


def _expert_names(kind: str) -> tuple[str, str, str]:
    return ("w1", "w3", "w2") if kind == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def moe_to_hf(full: dict[str, torch.Tensor], c: GPTConfig, moe, vocab: int) -> dict:
    """One unit of megalite full tensors -> HF tensors (Mixtral / Qwen2-MoE names)."""
    kind = moe_kind(c, moe)
    out: dict[str, torch.Tensor] = {}
    if WORD_EMBEDDING in full:
        out["model.embed_tokens.weight"] = full[WORD_EMBEDDING][:vocab]
    if OUTPUT_LAYER in full and c.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = full[OUTPUT_LAYER][:vocab]
    if "decoder.final_layernorm.weight" in full:
        out["model.norm.weight"] = full["decoder.final_layernorm.weight"]
    for i in sorted({int(n.split(".")[2]) for n in full if n.startswith("decoder.layers.")}):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = full[m + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = full[m + "pre_mlp_layernorm.weight"]
        out[h + "self_attn.o_proj.weight"] = full[m + "self_attention.linear_proj.weight"]
        q, k, v = _qkv_parts(full[m + "self_attention.linear_qkv.weight"], c)
        out.update({h + f"self_attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v))})
        if kind == "qwen2_moe":  # Qwen2 always has q/k/v biases: zeros compute the same
            bias = full.get(m + "self_attention.linear_qkv.bias")
            if bias is None:
                bias = q.new_zeros((c.num_attention_heads + 2 * c.num_query_groups) * c.head_dim)
            parts = _qkv_parts(bias, c)
            out.update({h + f"self_attn.{n}_proj.bias": t for n, t in zip("qkv", parts)})
        if not moe.is_moe_layer(i, c.num_layers):  # a Qwen2 dense layer: Llama's MLP
            fc1, f = full[m + "mlp.linear_fc1.weight"], c.ffn_hidden_size
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = fc1[:f], fc1[f:]
            out[h + "mlp.down_proj.weight"] = full[m + "mlp.linear_fc2.weight"]
            continue
        block, router = _mlp_names(kind, i)
        out[router] = full[m + "mlp.router.weight"]
        gate, up, down = _expert_names(kind)
        fc1 = full[m + "mlp.experts.linear_fc1.weight"]
        fc2 = full[m + "mlp.experts.linear_fc2.weight"]
        f = fc1.shape[1] // 2
        for e in range(moe.num_experts):
            out[block + f"experts.{e}.{gate}.weight"] = fc1[e, :f]
            out[block + f"experts.{e}.{up}.weight"] = fc1[e, f:]
            out[block + f"experts.{e}.{down}.weight"] = fc2[e]
        if kind == "qwen2_moe":
            s, fs = m + "mlp.shared_experts.", moe.moe_shared_expert_intermediate_size
            shared_fc1 = full[s + "linear_fc1.weight"]
            out[block + "shared_expert.gate_proj.weight"] = shared_fc1[:fs]
            out[block + "shared_expert.up_proj.weight"] = shared_fc1[fs:]
            out[block + "shared_expert.down_proj.weight"] = full[s + "linear_fc2.weight"]
            out[block + "shared_expert_gate.weight"] = full[s + "gate_weight"]
    return {k: v.contiguous() for k, v in out.items()}


def moe_from_hf(get, has, unit: str, c: GPTConfig, moe, kind: str, rows: int) -> dict:
    """One unit of megalite full tensors from HF tensors (`get(name)` reads one lazily,
    `has(name)` says whether it exists). Vocabulary tensors get ``rows - V`` zero rows."""

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > len(t) else t

    out: dict[str, torch.Tensor] = {}
    if unit == "embedding":
        return {WORD_EMBEDDING: pad(get("model.embed_tokens.weight"))}
    if unit == "final":
        out["decoder.final_layernorm.weight"] = get("model.norm.weight")
        if c.untie_embeddings_and_output_weights:
            out[OUTPUT_LAYER] = pad(get("lm_head.weight"))
        return out
    i = int(unit.split(".")[1])
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    out[m + "input_layernorm.weight"] = get(h + "input_layernorm.weight")
    out[m + "pre_mlp_layernorm.weight"] = get(h + "post_attention_layernorm.weight")
    out[m + "self_attention.linear_proj.weight"] = get(h + "self_attn.o_proj.weight")
    q, k, v = (get(h + f"self_attn.{n}_proj.weight") for n in "qkv")
    out[m + "self_attention.linear_qkv.weight"] = _qkv_fused(q, k, v, c)
    if c.add_qkv_bias:
        q, k, v = (get(h + f"self_attn.{n}_proj.bias") for n in "qkv")
        out[m + "self_attention.linear_qkv.bias"] = _qkv_fused(q, k, v, c)
    if not moe.is_moe_layer(i, c.num_layers):
        gate, up = get(h + "mlp.gate_proj.weight"), get(h + "mlp.up_proj.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        out[m + "mlp.linear_fc2.weight"] = get(h + "mlp.down_proj.weight")
        return out
    block, router = _mlp_names(kind, i)
    out[m + "mlp.router.weight"] = get(router if has(router) else h + "mlp.gate.weight")
    out[m + "mlp.experts.linear_fc1.weight"], out[m + "mlp.experts.linear_fc2.weight"] = (
        _experts_from_hf(get, has, block, h + "mlp.", kind, moe.num_experts)
    )
    if kind == "qwen2_moe":
        s = m + "mlp.shared_experts."
        gate, up = (
            get(block + "shared_expert.gate_proj.weight"),
            get(block + "shared_expert.up_proj.weight"),
        )
        out[s + "linear_fc1.weight"] = torch.cat([gate, up], dim=0)
        out[s + "linear_fc2.weight"] = get(block + "shared_expert.down_proj.weight")
        out[s + "gate_weight"] = get(block + "shared_expert_gate.weight")
    return {k: t.contiguous() for k, t in out.items()}


def _experts_from_hf(get, has, block: str, stacked: str, kind: str, num: int):
    """(fc1 ``[E, 2F, h]`` = [gate; up] per expert, fc2 ``[E, h, F]``) from per-expert tensors,
    or from transformers' stacked ``experts.gate_up_proj`` / ``experts.down_proj``."""
    for prefix in (block, stacked):
        if has(prefix + "experts.gate_up_proj"):
            return get(prefix + "experts.gate_up_proj"), get(prefix + "experts.down_proj")
    gate, up, down = _expert_names(kind)
    fc1 = torch.stack([
        torch.cat([get(block + f"experts.{e}.{gate}.weight"),
                   get(block + f"experts.{e}.{up}.weight")], dim=0)
        for e in range(num)
    ])  # fmt: skip
    fc2 = torch.stack([get(block + f"experts.{e}.{down}.weight") for e in range(num)])
    return fc1, fc2


def is_moe_hf(hf: dict) -> bool:
    return hf.get("model_type") in MOE_KINDS


def moe_of_meta(meta: dict) -> Optional[object]:
    from megalite.checkpoint.reshard_experts import moe_settings

    return moe_settings(meta)
