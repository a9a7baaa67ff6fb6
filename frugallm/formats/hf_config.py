"""Hugging Face DeepSeek config.json <-> frugallm's ModelConfig (docs/design/hf-interop.md).

The model types frugallm's Transformer holds are deepseek_v2 (softmax router, no bias), deepseek_v3
(sigmoid router with the aux-loss-free bias, V3 §2.1.2) and deepseek_v32 (V3 plus DSA's indexer,
DeepSeek-V3.2 §2.1). `hf_format` names the type a ModelConfig exports as, or refuses one that none of
them can hold (hyper-connections, a dense model, DSA with a V2 router). deepseek_v4 (hybrid attention, release
mHC, hash-routed MoE) is mapped by hf_v4.py, with its key table. The other types' key table is in hf.py.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, yarn_mscale
from .hf_v4 import V4, config_from_v4, config_to_v4, v4_problem

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", V4)  # the Hugging Face model types frugallm's Transformer holds


def config_from_hf(d: dict) -> ModelConfig:
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.json has model_type={model_type!r}; frugallm loads 'deepseek_v4', 'deepseek_v32', "
                         f"'deepseek_v3' or 'deepseek_v2'")
    if model_type == V4:
        return config_from_v4(d)
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("tie_word_embeddings", False)):
        if d.get(key, want) != want:
            raise ValueError(f"config.json has {key}={d[key]!r}; frugallm's DeepSeek model needs {want!r}")
    if d.get("num_key_value_heads", d["num_attention_heads"]) != d["num_attention_heads"]:
        raise ValueError("config.json has num_key_value_heads != num_attention_heads, which MLA does not use")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"rope type {rope_type!r} is not supported; frugallm implements 'default' and 'yarn'")
    kw = dict(
        vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
        n_dense_layers=d.get("first_k_dense_replace", 0), inter_dim=d["intermediate_size"],
        max_seq_len=d["max_position_embeddings"], norm_eps=d.get("rms_norm_eps", 1e-6),
        init_std=d.get("initializer_range", 0.006),
        n_heads=d["num_attention_heads"], q_lora_rank=d.get("q_lora_rank") or 0, kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"],
        n_routed_experts=d["n_routed_experts"] or 0, n_shared_experts=d.get("n_shared_experts") or 0,
        n_activated_experts=d["num_experts_per_tok"], moe_inter_dim=d["moe_intermediate_size"],
        route_scale=d.get("routed_scaling_factor", 1.0), n_mtp=d.get("num_nextn_predict_layers", 0) or 0,
        rope_theta=theta,
    )
    if model_type == "deepseek_v32":  # V3 plus DSA, with transformers' defaults for absent keys
        kw.update(index_topk=d.get("index_topk", 2048), index_n_heads=d.get("index_n_heads", 64),
                  index_head_dim=d.get("index_head_dim", 128), n_dense_layers=_dense_layers(d))
    if model_type in ("deepseek_v3", "deepseek_v32"):
        # HF's V3 router is hard-coded: sigmoid, bias, top-2-sum group scores
        kw.update(score_func="sigmoid", group_score="top2_sum", gate_bias=True,
                  norm_topk_prob=d.get("norm_topk_prob", True),
                  n_expert_groups=d.get("n_group") or 1, n_limited_groups=d.get("topk_group") or 1)
    else:
        method = d.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"DeepSeek-V2 topk_method={method!r} is not supported ('greedy', 'group_limited_greedy')")
        grouped = method == "group_limited_greedy"
        kw.update(score_func="softmax", group_score="max", gate_bias=False, norm_topk_prob=False,
                  n_expert_groups=d.get("n_group") or 1 if grouped else 1,
                  n_limited_groups=d.get("topk_group") or 1 if grouped else 1)
    if rope_type == "yarn":
        factor = rope.get("factor") or d["max_position_embeddings"] / rope["original_max_position_embeddings"]
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if rope.get("truncate", True) is not True:
            raise ValueError("yarn rope with truncate=false is not supported")
        attn_factor = rope.get("attention_factor")
        if attn_factor is None and not (mscale and mscale_all_dim):
            attn_factor = yarn_mscale(factor, 1.0)  # HF's fallback when either mscale key is missing
        kw.update(rope_scaling="yarn", rope_factor=float(factor),
                  original_seq_len=rope["original_max_position_embeddings"],
                  beta_fast=float(rope.get("beta_fast", 32)), beta_slow=float(rope.get("beta_slow", 1)),
                  mscale=float(mscale or 1.0), mscale_all_dim=float(mscale_all_dim or 0.0),
                  rope_attn_factor=attn_factor)
    return ModelConfig(**kw)


def _dense_layers(d: dict) -> int:
    """deepseek_v32's dense MLP layers: first_k_dense_replace (transformers' default 3), which an
    mlp_layer_types list, where present, must agree with (frugallm's dense layers come first)."""
    k = d.get("first_k_dense_replace", 3)
    types = d.get("mlp_layer_types")
    n = d["num_hidden_layers"]
    if types is not None and list(types) != ["dense"] * min(k, n) + ["sparse"] * (n - min(k, n)):
        raise ValueError(f"config.json has mlp_layer_types={types}; frugallm supports only the first "
                         f"first_k_dense_replace={k} layers dense and the rest MoE")
    return k


def hf_format(cfg: ModelConfig) -> str:
    """'deepseek_v4', 'deepseek_v32', 'deepseek_v3' or 'deepseek_v2', or a ValueError naming what the HF
    format cannot hold."""
    if cfg.attention == "hybrid":
        problem = v4_problem(cfg)
        if problem:
            raise ValueError(problem)
        return V4
    if cfg.residual != "plain":
        raise ValueError(
            f"residual={cfg.residual!r}: hyper-connection streams and their coefficients have no Hugging Face "
            f"DeepSeek-V2/V3 representation, so this model cannot be exported; save it in frugallm's own format "
            f"(the state_dict as safetensors + ModelConfig.to_json)")
    if cfg.n_routed_experts == 0:
        raise ValueError("a dense model (n_routed_experts=0) has no Hugging Face DeepSeek representation")
    if cfg.score_func == "sigmoid" and cfg.group_score == "top2_sum" and cfg.gate_bias:
        return "deepseek_v32" if cfg.index_topk > 0 else "deepseek_v3"
    if cfg.index_topk > 0:
        raise ValueError(f"index_topk={cfg.index_topk} (DSA) exists in Hugging Face only as deepseek_v32, whose "
                         f"router is V3's (score_func='sigmoid', group_score='top2_sum', gate_bias=True); this "
                         f"model's is not, so it cannot be exported")
    if cfg.score_func == "softmax" and not cfg.gate_bias and not cfg.norm_topk_prob and (
            cfg.group_score == "max" or cfg.n_expert_groups == 1):
        return "deepseek_v2"
    raise ValueError(
        f"score_func={cfg.score_func!r}, group_score={cfg.group_score!r}, gate_bias={cfg.gate_bias}, "
        f"norm_topk_prob={cfg.norm_topk_prob} matches neither HF DeepSeek-V3 (sigmoid, top2_sum, gate_bias=True) "
        f"nor DeepSeek-V2 (softmax, max, gate_bias=False, norm_topk_prob=False); it cannot be exported")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    fmt = hf_format(cfg)
    if fmt == V4:
        return config_to_v4(cfg, dtype)
    arch = {"deepseek_v32": "DeepseekV32ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
    d = {
        "architectures": [arch.get(fmt, "DeepseekV2ForCausalLM")],
        "model_type": fmt, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim, "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layers, "first_k_dense_replace": cfg.n_dense_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts, "n_group": cfg.n_expert_groups,
        "topk_group": cfg.n_limited_groups, "routed_scaling_factor": cfg.route_scale,
        "norm_topk_prob": cfg.norm_topk_prob, "scoring_func": cfg.score_func,
        "topk_method": "noaux_tc" if fmt != "deepseek_v2" else (
            "group_limited_greedy" if cfg.n_expert_groups > 1 else "greedy"),
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std, "rope_theta": cfg.rope_theta,
        "rope_interleave": True, "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
        "num_nextn_predict_layers": cfg.n_mtp, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if fmt == "deepseek_v32":
        d.update(index_topk=cfg.index_topk, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim)
    if cfg.rope_scaling == "yarn":
        d["rope_scaling"] = {"type": "yarn", "factor": cfg.rope_factor, "beta_fast": cfg.beta_fast,
                             "beta_slow": cfg.beta_slow, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale_all_dim,
                             "original_max_position_embeddings": cfg.original_seq_len}
        if cfg.rope_attn_factor is not None:
            d["rope_scaling"]["attention_factor"] = cfg.rope_attn_factor
    return d
