"""megalite <-> Hugging Face ``LlamaForCausalLM`` / ``GPT2LMHeadModel``: configs and tensor maps.

Which class a megalite model maps to (anything else is refused, naming what does not fit):

- **Llama**: RMSNorm, SwiGLU, RoPE; any query groups (``num_key_value_heads``); biases on all
  linears or none (``attention_bias`` = ``mlp_bias``); tied or untied output layer.
- **GPT-2**: LayerNorm, GeLU, learned positions, one key/value head per query head; GPT-2 always
  has biases (a bias-free megalite model exports zeros, which computes the same function); tied
  or untied output layer. megalite's GeLU is the exact erf form, HF's ``"gelu"``, not GPT-2's
  default ``"gelu_new"`` (tanh approximation): the exported config says ``"gelu"``.

Conventions checked against transformers' code: RoPE is rotate-half on both sides (no
permutation of q/k rows, unlike Meta's original Llama files); inv_freq ``1 / theta^(2i/d)``;
norms use megalite's epsilon (1e-5); attention scale ``1/sqrt(head_dim)``; query head j reads
key/value head ``j // (n/g)`` on both sides. megalite's fused QKV is per query group
``[q(g,0..n/g-1), k(g), v(g)]`` (see megalite/model/transformer.py); HF keeps q, k, v apart
(Llama) or as ``[Q | K | V]`` columns of a transposed Conv1D (GPT-2). SwiGLU's ``[gate; up]``
is HF's ``gate_proj`` / ``up_proj``. Vocabulary padding rows are dropped on export and added as
zeros on import.
"""

from __future__ import annotations

from typing import Optional

import torch

from megalite.checkpoint.layout import OUTPUT_LAYER, POSITION_EMBEDDING, WORD_EMBEDDING
from megalite.model import GPTConfig

_WTE = {"llama": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight"}
EPS = 1e-5  # megalite's norm epsilon (GPTConfig.norm_epsilon)


class HFConversionError(ValueError):
    """The model cannot be represented on the other side; the message says why."""


def hf_kind(c: GPTConfig) -> str:
    """ "llama" or "gpt2" for a megalite config, or HFConversionError listing the mismatches."""
    wants = {
        "llama": {
            "normalization": "RMSNorm",
            "activation": "swiglu",
            "position_embedding_type": "rope",
        },
        "gpt2": {
            "normalization": "LayerNorm",
            "activation": "gelu",
            "position_embedding_type": "learned_absolute",
        },
    }
    misses = {}
    for kind, want in wants.items():
        miss = [
            f"{k}={getattr(c, k)!r} (needs {v!r})" for k, v in want.items() if getattr(c, k) != v
        ]
        if c.apply_layernorm_1p:
            miss.append("apply_layernorm_1p=True (HF norms store gamma itself)")
        if c.head_dim * c.num_attention_heads != c.hidden_size:
            miss.append(f"kv_channels={c.kv_channels} (heads x head dim must equal hidden_size)")
        if c.rotary_percent != 1.0:
            miss.append(f"rotary_percent={c.rotary_percent} (HF rotates the whole head)")
        if c.add_qkv_bias and not c.add_bias_linear:
            miss.append("add_qkv_bias=True (biases on q, k, v only)")
        if kind == "gpt2" and c.no_position_embedding:
            miss.append("no_position_embedding=True (GPT-2 has a learned position table)")
        if kind == "gpt2" and c.num_query_groups != c.num_attention_heads:
            miss.append(
                f"num_query_groups={c.num_query_groups} (GPT-2 has no grouped-query attention)"
            )
        if not miss:
            return kind
        misses[kind] = miss
    raise HFConversionError(
        "this model matches neither Hugging Face class: LlamaForCausalLM needs "
        + ", ".join(misses["llama"])
        + "; GPT2LMHeadModel needs "
        + ", ".join(misses["gpt2"])
    )


def hf_config(c: GPTConfig, vocab: int, dtype: torch.dtype, tokens: dict) -> dict:
    """config.json for megalite config `c` with `vocab` real tokens (padding dropped)."""
    kind = hf_kind(c)
    tied = not c.untie_embeddings_and_output_weights
    common = {
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "initializer_range": c.init_method_std,
        "use_cache": True,
        **tokens,
    }
    if kind == "llama":
        theta = float(c.rotary_base)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": c.hidden_size,
            "intermediate_size": c.ffn_hidden_size,
            "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_query_groups,
            "head_dim": c.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.norm_epsilon,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "rope_theta": theta,  # transformers < 5 reads this key
            "attention_bias": c.add_bias_linear,
            "mlp_bias": c.add_bias_linear,
            "attention_dropout": 0.0,
            "pretraining_tp": 1,
            **common,
        }
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": c.hidden_size,
        "n_inner": c.ffn_hidden_size,
        "n_layer": c.num_layers,
        "n_head": c.num_attention_heads,
        "n_positions": c.max_position_embeddings,
        "n_ctx": c.max_position_embeddings,
        "activation_function": "gelu",
        "layer_norm_epsilon": c.norm_epsilon,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        **common,
    }


def megalite_args_from_hf(hf: dict) -> dict:
    """megalite's model flags (as ``meta.json`` args) for an HF config.json, or refuse."""
    kind = hf.get("model_type")
    bad = []
    if kind == "llama":
        heads, h = hf["num_attention_heads"], hf["hidden_size"]
        if hf.get("head_dim", h // heads) * heads != h:
            bad.append(f"head_dim {hf['head_dim']} x heads {heads} != hidden_size {h}")
        if hf.get("hidden_act", "silu") != "silu":
            bad.append(f"hidden_act {hf['hidden_act']!r} (megalite's SwiGLU is silu)")
        if bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
            bad.append("attention_bias != mlp_bias (megalite has one bias switch)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            bad.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
        eps = hf.get("rms_norm_eps", 1e-6)
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        groups = hf.get("num_key_value_heads") or heads
        args = {
            "normalization": "RMSNorm",
            "swiglu": True,
            "position_embedding_type": "rope",
            "rotary_base": float(theta),
            "num_layers": hf["num_hidden_layers"],
            "hidden_size": h,
            "num_attention_heads": heads,
            "num_query_groups": groups if groups != heads else None,
            "ffn_hidden_size": hf["intermediate_size"],
            "max_position_embeddings": hf["max_position_embeddings"],
            "disable_bias_linear": not hf.get("attention_bias", False),
        }
    elif kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act != "gelu":
            bad.append(
                f"activation_function {act!r}: megalite's GeLU is the exact erf form ('gelu'); "
                "GPT-2's 'gelu_new' is the tanh approximation"
            )
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            bad.append("non-standard attention scaling")
        eps = hf.get("layer_norm_epsilon", 1e-5)
        h = hf["n_embd"]
        args = {
            "normalization": "LayerNorm",
            "swiglu": False,
            "position_embedding_type": "learned_absolute",
            "num_layers": hf["n_layer"],
            "hidden_size": h,
            "num_attention_heads": hf["n_head"],
            "num_query_groups": None,
            "ffn_hidden_size": hf.get("n_inner") or 4 * h,
            "max_position_embeddings": hf["n_positions"],
            "disable_bias_linear": False,
        }
    else:
        raise HFConversionError(f"model_type {kind!r}: only 'llama' and 'gpt2' are supported")
    if abs(eps - EPS) > 1e-12:
        bad.append(f"norm epsilon {eps} (megalite's norms use {EPS})")
    if bad:
        raise HFConversionError(f"cannot import this {kind} model into megalite: " + "; ".join(bad))
    args["untie_embeddings_and_output_weights"] = not hf.get("tie_word_embeddings", True)
    args["vocab_size"] = hf["vocab_size"]
    return args


# --- tensors, one unit at a time ---------------------------------------------------------------
def _qkv_parts(w: torch.Tensor, c: GPTConfig) -> tuple[torch.Tensor, ...]:
    """megalite's per-group fused QKV rows -> (q, k, v) rows in head order."""
    g, d, per = c.num_query_groups, c.head_dim, c.num_attention_heads // c.num_query_groups
    x = w.reshape(g, per + 2, d, *w.shape[1:])
    q = x[:, :per].reshape(g * per * d, *w.shape[1:])
    return q, x[:, per].reshape(g * d, *w.shape[1:]), x[:, per + 1].reshape(g * d, *w.shape[1:])


def _qkv_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: GPTConfig) -> torch.Tensor:
    """(q, k, v) rows in head order -> megalite's per-group fused rows."""
    g, d, per = c.num_query_groups, c.head_dim, c.num_attention_heads // c.num_query_groups
    rest = q.shape[1:]
    q = q.reshape(g, per, d, *rest)
    x = torch.cat([q, k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)], dim=1)
    return x.reshape(-1, *rest)


def _layer_names(i: int, c: GPTConfig, kind: str) -> dict[str, str]:
    """megalite name -> HF name for layer i (weights that map one-to-one)."""
    m = f"decoder.layers.{i}."
    if kind == "llama":
        h = f"model.layers.{i}."
        out = {
            m + "input_layernorm.weight": h + "input_layernorm.weight",
            m + "pre_mlp_layernorm.weight": h + "post_attention_layernorm.weight",
            m + "self_attention.linear_proj.weight": h + "self_attn.o_proj.weight",
            m + "mlp.linear_fc2.weight": h + "mlp.down_proj.weight",
        }
        if c.add_bias_linear:
            out[m + "self_attention.linear_proj.bias"] = h + "self_attn.o_proj.bias"
            out[m + "mlp.linear_fc2.bias"] = h + "mlp.down_proj.bias"
        return out
    h = f"transformer.h.{i}."
    return {
        m + f"{a}.{p}": h + f"{b}.{p}"
        for a, b in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2"))
        for p in ("weight", "bias")
    }


def to_hf(full: dict[str, torch.Tensor], c: GPTConfig, vocab: int) -> dict[str, torch.Tensor]:
    """One unit of megalite full tensors (embedding / a layer / final) -> HF tensors."""
    kind = hf_kind(c)
    llama = kind == "llama"
    out: dict[str, torch.Tensor] = {}
    if WORD_EMBEDDING in full:
        out["model.embed_tokens.weight" if llama else "transformer.wte.weight"] = full[
            WORD_EMBEDDING
        ][:vocab]
    if POSITION_EMBEDDING in full:
        out["transformer.wpe.weight"] = full[POSITION_EMBEDDING]
    if OUTPUT_LAYER in full and c.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = full[OUTPUT_LAYER][:vocab]
    final = "model.norm." if llama else "transformer.ln_f."
    for p in ("weight", "bias"):
        if f"decoder.final_layernorm.{p}" in full:
            out[final + p] = full[f"decoder.final_layernorm.{p}"]
    layers = {int(n.split(".")[2]) for n in full if n.startswith("decoder.layers.")}
    for i in sorted(layers):
        m = f"decoder.layers.{i}."
        for src, dst in _layer_names(i, c, kind).items():
            out[dst] = full[src]
        if llama:
            _llama_layer_to_hf(full, m, f"model.layers.{i}.", c, out)
        else:
            _gpt2_layer_to_hf(full, m, f"transformer.h.{i}.", c, out)
    return {k: v.contiguous() for k, v in out.items()}


def _llama_layer_to_hf(full: dict, m: str, h: str, c: GPTConfig, out: dict) -> None:
    f = c.ffn_hidden_size
    for p in ("weight", "bias") if c.add_bias_linear else ("weight",):
        q, k, v = _qkv_parts(full[m + f"self_attention.linear_qkv.{p}"], c)
        out.update({h + f"self_attn.{n}_proj.{p}": t for n, t in zip("qkv", (q, k, v))})
        fc1 = full[m + f"mlp.linear_fc1.{p}"]
        out[h + f"mlp.gate_proj.{p}"], out[h + f"mlp.up_proj.{p}"] = fc1[:f], fc1[f:]


def _gpt2_layer_to_hf(full: dict, m: str, h: str, c: GPTConfig, out: dict) -> None:
    """GPT-2's Conv1D keeps weights as [in, out] (transposed) and always has biases."""
    qkv = full[m + "self_attention.linear_qkv.weight"]
    out[h + "attn.c_attn.weight"] = torch.cat(_qkv_parts(qkv, c), dim=0).t()
    out[h + "attn.c_proj.weight"] = full[m + "self_attention.linear_proj.weight"].t()
    out[h + "mlp.c_fc.weight"] = full[m + "mlp.linear_fc1.weight"].t()
    out[h + "mlp.c_proj.weight"] = full[m + "mlp.linear_fc2.weight"].t()
    for mine, theirs in (
        ("self_attention.linear_qkv", "attn.c_attn"),
        ("self_attention.linear_proj", "attn.c_proj"),
        ("mlp.linear_fc1", "mlp.c_fc"),
        ("mlp.linear_fc2", "mlp.c_proj"),
    ):
        bias = full.get(m + mine + ".bias")
        if bias is None:  # bias-free megalite model: zeros compute the same function
            bias = qkv.new_zeros(out[h + theirs + ".weight"].shape[1])
        elif mine.endswith("linear_qkv"):
            bias = torch.cat(_qkv_parts(bias, c), dim=0)
        out[h + theirs + ".bias"] = bias


def from_hf(get, unit: str, c: GPTConfig, kind: str, rows: int) -> dict[str, torch.Tensor]:
    """One unit of megalite full tensors from HF tensors (`get(name)` reads one lazily).

    Vocabulary tensors get ``rows - V`` zero padding rows.
    """

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > len(t) else t

    llama = kind == "llama"
    out: dict[str, torch.Tensor] = {}
    if unit == "embedding":
        out[WORD_EMBEDDING] = pad(
            get("model.embed_tokens.weight" if llama else "transformer.wte.weight")
        )
        if not llama:
            out[POSITION_EMBEDDING] = get("transformer.wpe.weight")
        return out
    if unit == "final":
        final = "model.norm." if llama else "transformer.ln_f."
        out["decoder.final_layernorm.weight"] = get(final + "weight")
        if not llama:
            out["decoder.final_layernorm.bias"] = get(final + "bias")
        if c.untie_embeddings_and_output_weights:
            out[OUTPUT_LAYER] = pad(get("lm_head.weight"))
        return out
    i = int(unit.split(".")[1])
    m = f"decoder.layers.{i}."
    for mine, theirs in _layer_names(i, c, kind).items():
        out[mine] = get(theirs)
    if llama:
        h = f"model.layers.{i}."
        for p in ("weight", "bias") if c.add_bias_linear else ("weight",):
            q, k, v = (get(h + f"self_attn.{n}_proj.{p}") for n in "qkv")
            out[m + f"self_attention.linear_qkv.{p}"] = _qkv_fused(q, k, v, c)
            gate, up = get(h + f"mlp.gate_proj.{p}"), get(h + f"mlp.up_proj.{p}")
            out[m + f"mlp.linear_fc1.{p}"] = torch.cat([gate, up], dim=0)
        return out
    h = f"transformer.h.{i}."
    w = get(h + "attn.c_attn.weight").t()
    b = get(h + "attn.c_attn.bias")
    hid = c.hidden_size
    out[m + "self_attention.linear_qkv.weight"] = _qkv_fused(*w.split(hid, dim=0), c)
    out[m + "self_attention.linear_qkv.bias"] = _qkv_fused(*b.split(hid, dim=0), c)
    out[m + "self_attention.linear_proj.weight"] = get(h + "attn.c_proj.weight").t()
    out[m + "self_attention.linear_proj.bias"] = get(h + "attn.c_proj.bias")
    out[m + "mlp.linear_fc1.weight"] = get(h + "mlp.c_fc.weight").t()
    out[m + "mlp.linear_fc1.bias"] = get(h + "mlp.c_fc.bias")
    out[m + "mlp.linear_fc2.weight"] = get(h + "mlp.c_proj.weight").t()
    out[m + "mlp.linear_fc2.bias"] = get(h + "mlp.c_proj.bias")
    return {k: v.contiguous() for k, v in out.items()}


def tokens_from_ids(bos: Optional[int], eos: Optional[int]) -> dict:
    """Special token ids for config.json (only those that are known)."""
    return {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}
