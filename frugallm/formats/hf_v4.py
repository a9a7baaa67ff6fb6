"""Hugging Face DeepSeek-V4 (`deepseek_v4`) <-> frugallm: config.json and the weights' key table
(docs/design/hf-interop.md, docs/design/v4-attention.md).

Keys are the release's own (no `model.` prefix), which transformers' DeepseekV4ForCausalLM converts when it
loads them; most are frugallm's names already. The differences:

    frugallm                                    release
    layers.L.ffn.experts.w1 (E, I, d)           layers.L.ffn.experts.{e}.w1.weight, one (I, d) per expert
    layers.L.attn_conn.phi / alpha              layers.L.hc_attn_fn / hc_attn_scale   (ffn_conn: hc_ffn_*)
    layers.L.attn_conn.b_pre, b_post, b_res     layers.L.hc_attn_base = [b_pre (n) ; b_post (n) ; b_res (n*n)]
    hc_head.phi / b_pre / alpha                 hc_head_fn / hc_head_base / hc_head_scale
    mtp.k.block.X                               mtp.k.X                  (the MTP block, as the release stores it)
    mtp.k.eh_proj.weight (d, 2d)                [mtp.k.e_proj.weight | mtp.k.h_proj.weight], embedding first
    NAME.weight_scale_inv (FP8 block scales)    NAME.scale

Directories that transformers saved carry `model.`-prefixed keys with a few of its own names (embed_tokens,
hc_head.hc_fn, attn.norm for the attention's kv_norm); `canonical` maps them onto the release's, so both read.

transformers does not instantiate the MTP layer (it ignores `mtp.*`); frugallm writes its MTP modules there
and reads them back for self-speculative decoding. frugallm's MTP over mHC collapses the block's streams by
their mean (model/mtp.py); the release's MTP block carries its own hyper head (mtp.k.hc_head_*), which
frugallm does not model, so such MTP weights are left out with a warning.
"""

from __future__ import annotations

import re

import torch

from ..config import HF_LAYER_TYPES, ModelConfig
from ..kernels.fp8 import BLOCK, E4M3, weight_dequant
from ..kernels.quantize import SUFFIX

V4 = "deepseek_v4"
RELEASE_SCALE = ".scale"
KINDS = {v: k for k, v in HF_LAYER_TYPES.items()}  # transformers' layer type -> frugallm's kind
# transformers' DeepseekV4Config defaults (DeepSeek-V4-Flash's sizes), for keys a config.json leaves out
DEFAULTS = dict(vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43,
                num_attention_heads=64, num_key_value_heads=1, head_dim=512, q_lora_rank=1024, num_experts_per_tok=6,
                n_routed_experts=256, n_shared_experts=1, scoring_func="sqrtsoftplus", norm_topk_prob=True,
                routed_scaling_factor=1.5, max_position_embeddings=1048576, rope_theta=10000.0,
                compress_rope_theta=160000.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=10.0,
                sliding_window=128, o_groups=8, o_lora_rank=1024, index_n_heads=64, index_head_dim=128,
                index_topk=512, num_nextn_predict_layers=1, initializer_range=0.02, rms_norm_eps=1e-6,
                num_hash_layers=3)
RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


# --- config.json ----------------------------------------------------------------------------

def config_from_v4(d: dict) -> ModelConfig:
    """A deepseek_v4 config.json, in transformers' form (layer_types, rope_parameters) or the release's
    (compress_ratios, num_hash_layers, rope_scaling, qk_rope_head_dim), as a ModelConfig."""
    get = lambda k: d[k] if d.get(k) is not None else DEFAULTS[k]  # noqa: E731
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("tie_word_embeddings", False),
                      ("num_key_value_heads", 1), ("norm_topk_prob", True)):
        if d.get(key, want) != want:
            raise ValueError(f"config.json has {key}={d[key]!r}; frugallm's DeepSeek-V4 model needs {want!r}")
    n, n_mtp, head_dim = get("num_hidden_layers"), get("num_nextn_predict_layers"), get("head_dim")
    rope_dim = d.get("qk_rope_head_dim") or round(head_dim * (d.get("partial_rotary_factor") or 64 / 512))
    rates = {**RATES, **(d.get("compress_rates") or {})}
    rates.update({t: d[k] for t, k in (("compressed_sparse_attention", "compress_rate_csa"),
                                       ("heavily_compressed_attention", "compress_rate_hca")) if k in d})
    kw = dict(
        vocab_size=get("vocab_size"), dim=get("hidden_size"), n_layers=n, n_dense_layers=0,
        inter_dim=get("moe_intermediate_size"), max_seq_len=get("max_position_embeddings"),
        norm_eps=get("rms_norm_eps"), init_std=get("initializer_range"), n_heads=get("num_attention_heads"),
        q_lora_rank=get("q_lora_rank"), qk_rope_head_dim=rope_dim, qk_nope_head_dim=head_dim - rope_dim,
        v_head_dim=head_dim, kv_lora_rank=head_dim,  # MLA's fields: unused by hybrid attention, kept valid
        n_routed_experts=get("n_routed_experts"), n_shared_experts=get("n_shared_experts"),
        n_activated_experts=get("num_experts_per_tok"), moe_inter_dim=get("moe_intermediate_size"),
        n_expert_groups=1, n_limited_groups=1, score_func=get("scoring_func"), norm_topk_prob=True, gate_bias=True,
        route_scale=float(get("routed_scaling_factor")), n_hash_layers=_hash_layers(d, n),
        swiglu_limit=float(get("swiglu_limit")), n_mtp=n_mtp, rope_theta=float(get("rope_theta")),
        attention="hybrid", layer_types=_layer_types(d, n, n_mtp, rates), head_dim=head_dim,
        sliding_window=get("sliding_window"), csa_rate=rates["compressed_sparse_attention"],
        hca_rate=rates["heavily_compressed_attention"], compress_rope_theta=float(get("compress_rope_theta")),
        o_groups=get("o_groups"), o_lora_rank=get("o_lora_rank"), attn_sink=True, index_topk=get("index_topk"),
        index_n_heads=get("index_n_heads"), index_head_dim=get("index_head_dim"),
        residual="mhc", hc_form="release", hc_streams=get("hc_mult"), hc_sinkhorn_iters=get("hc_sinkhorn_iters"),
        hc_eps=float(get("hc_eps")),
    )
    return ModelConfig(**kw, **_compress_rope(d))


def _layer_types(d: dict, n: int, n_mtp: int, rates: dict) -> tuple[str, ...]:
    """One kind per block, the MTP blocks last: layer_types (transformers' names), else compress_ratios (0 =
    sliding, else the rate of CSA or HCA), else transformers' default (2 HCA, then CSA / HCA alternating).
    The MTP blocks' kinds come from compress_ratios' tail where it has one, else they slide."""
    ratios = d.get("compress_ratios")
    by_rate = {0: "sliding", rates["heavily_compressed_attention"]: "hca", rates["compressed_sparse_attention"]: "csa"}
    if ratios is not None and any(r not in by_rate for r in ratios):
        raise ValueError(f"config.json compress_ratios {ratios} holds a rate that is neither 0 nor a compress rate "
                         f"{sorted(by_rate)}; fix compress_ratios or compress_rates")
    if d.get("layer_types") is not None:
        bad = sorted(set(d["layer_types"]) - set(KINDS))
        if bad:
            raise ValueError(f"config.json layer_types entries {bad} must be one of {sorted(KINDS)}")
        main = [KINDS[t] for t in d["layer_types"][:n]]
    elif ratios is not None:
        main = [by_rate[r] for r in ratios[:n]]
    else:
        main = (["hca"] * 2 + ["csa" if i % 2 else "hca" for i in range(max(n - 2, 0))])[:n]
    mtp = [by_rate[r] for r in ratios[n:n + n_mtp]] if ratios is not None else []
    return tuple(main + mtp + ["sliding"] * (n_mtp - len(mtp)))


def _hash_layers(d: dict, n: int) -> int:
    types = d.get("mlp_layer_types")
    if types is None:
        return min(n, d.get("num_hash_layers", DEFAULTS["num_hash_layers"]))
    k = sum(t == "hash_moe" for t in types)
    if list(types) != ["hash_moe"] * k + ["moe"] * (len(types) - k):
        raise ValueError(f"config.json has mlp_layer_types={types}; frugallm supports hash_moe layers first, "
                         f"then moe")
    return k


def _compress_rope(d: dict) -> dict:
    """The CSA / HCA blocks' YaRN (transformers' rope_parameters['compress'], or the release's top-level
    rope_scaling); sliding blocks rotate unscaled. cos/sin stay unscaled (transformers' attention_factor 1)."""
    rp = d.get("rope_parameters") or {}
    if isinstance(rp.get("main"), dict) and rp["main"].get("rope_type", "default") != "default":
        raise ValueError(f"config.json rope_parameters['main'] is {rp['main'].get('rope_type')!r}; DeepSeek-V4's "
                         f"sliding blocks rotate with the default RoPE")
    rope = rp["compress"] if isinstance(rp.get("compress"), dict) else (d.get("rope_scaling") or rp)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind != "yarn":
        raise ValueError(f"rope type {kind!r} is not supported; frugallm implements 'default' and 'yarn'")
    return dict(rope_scaling="yarn", rope_factor=float(rope["factor"]),
                original_seq_len=rope["original_max_position_embeddings"], beta_fast=float(rope.get("beta_fast", 32)),
                beta_slow=float(rope.get("beta_slow", 1)), mscale=1.0, mscale_all_dim=1.0)


def v4_problem(cfg: ModelConfig) -> str | None:
    """What in a hybrid-attention config deepseek_v4 cannot hold, or None."""
    wants = dict(residual="mhc", hc_form="release", hc_dynamic=True, n_dense_layers=0, n_expert_groups=1,
                 gate_bias=True, norm_topk_prob=True, attn_sink=True)
    wrong = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in wants.items() if getattr(cfg, k) != v]
    if cfg.n_routed_experts == 0:
        wrong.append("n_routed_experts=0 (every DeepSeek-V4 layer is MoE)")
    if cfg.score_func not in ("sqrtsoftplus", "sigmoid"):
        wrong.append(f"score_func={cfg.score_func!r} (needs 'sqrtsoftplus' or 'sigmoid')")
    if not wrong:
        return None
    return (f"attention='hybrid' (DeepSeek-V4's) exports only as deepseek_v4, which cannot hold {', '.join(wrong)}; save it "
            f"in frugallm's own format (the state_dict as safetensors + ModelConfig.to_json)")


def config_to_v4(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    rates = {HF_LAYER_TYPES["csa"]: cfg.csa_rate, HF_LAYER_TYPES["hca"]: cfg.hca_rate}
    rate = {"sliding": 0, "csa": cfg.csa_rate, "hca": cfg.hca_rate}
    main = {"rope_type": "default", "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.qk_rope_head_dim / cfg.head_dim}
    compress = dict(main, rope_theta=cfg.compress_rope_theta)
    if cfg.rope_scaling == "yarn":
        compress.update(rope_type="yarn", factor=cfg.rope_factor, original_max_position_embeddings=cfg.original_seq_len,
                        beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, attention_factor=1.0)
    n = cfg.n_layers
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": V4, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": n,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "partial_rotary_factor": main["partial_rotary_factor"], "num_experts_per_tok": cfg.n_activated_experts,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "scoring_func": cfg.score_func, "norm_topk_prob": True, "routed_scaling_factor": cfg.route_scale,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "compress_rope_theta": cfg.compress_rope_theta, "rope_parameters": {"main": main, "compress": compress},
        "layer_types": [HF_LAYER_TYPES[k] for k in cfg.layer_types[:n]], "compress_rates": rates,
        # the release's per-block rates, MTP blocks included (transformers reads layer_types instead)
        "compress_ratios": [rate[k] for k in cfg.layer_types],
        "mlp_layer_types": ["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(n)],
        "num_hash_layers": cfg.n_hash_layers, "swiglu_limit": cfg.swiglu_limit, "sliding_window": cfg.sliding_window,
        "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank, "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk, "hc_mult": cfg.hc_streams,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps, "num_nextn_predict_layers": cfg.n_mtp,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps, "torch_dtype": str(dtype).removeprefix("torch."),
    }


# --- weights --------------------------------------------------------------------------------

TOP = {"hc_head.phi": "hc_head_fn", "hc_head.b_pre": "hc_head_base", "hc_head.alpha": "hc_head_scale"}
CONN = {"phi": "fn", "alpha": "scale"}  # the other connection tensors are slices of hc_{attn,ffn}_base
SAVED = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight", "hc_head.hc_fn": "hc_head_fn",
         "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}  # transformers' saved names
KEEP_FP32 = ("gate.bias", "indexer.weights_proj.weight")  # float32 whatever the dtype asked (as hf.py)


def canonical(key: str) -> str:
    """A checkpoint key as the release names it: transformers' saved names and V3's scale suffix mapped back."""
    key = key.removeprefix("model.")
    key = SAVED.get(key, key)
    key = re.sub(r"^((?:layers|mtp)\.\d+\.attn)\.norm\.weight$", r"\1.kv_norm.weight", key)
    return key.removesuffix(".weight" + SUFFIX) + RELEASE_SCALE if key.endswith(".weight" + SUFFIX) else key


def _split(name: str) -> tuple[str, str]:
    """'layers.3.attn.wkv.weight' -> ('layers.3.', 'attn.wkv.weight'); 'mtp.0.block.X' -> ('mtp.0.', 'X')."""
    m = re.fullmatch(r"((?:layers|mtp)\.\d+\.)(?:block\.)?(.+)", name)
    return (m[1], m[2]) if m else ("", name)


def release_key(name: str) -> str:
    """frugallm name -> release key ('{e}' left in for stacked experts); a scale -> its NAME.scale. The
    tensors that are slices or joins of release tensors (hc bases, MTP's eh_proj) have none: KeyError."""
    if name.endswith(SUFFIX):
        return release_key(name.removesuffix(SUFFIX)).removesuffix(".weight") + RELEASE_SCALE
    if name in TOP:
        return TOP[name]
    prefix, rest = _split(name)
    if m := re.fullmatch(r"ffn\.experts\.(w[123])", rest):
        return f"{prefix}ffn.experts.{{e}}.{m[1]}.weight"
    if m := re.fullmatch(r"(attn|ffn)_conn\.(phi|alpha)", rest):
        return f"{prefix}hc_{m[1]}_{CONN[m[2]]}"
    if re.fullmatch(r"(attn|ffn)_conn\..+|eh_proj\.weight", rest):
        raise KeyError(name)
    return prefix + rest


def sources(name: str, cfg: ModelConfig):
    """(release keys, how they make the frugallm tensor: 'one' | 'stack' | a function of the tensors)."""
    prefix, rest = _split(name)
    n = cfg.hc_streams
    if m := re.fullmatch(r"(attn|ffn)_conn\.(b_pre|b_post|b_res)", rest):
        cut = {"b_pre": slice(0, n), "b_post": slice(n, 2 * n), "b_res": slice(2 * n, None)}[m[2]]
        return [f"{prefix}hc_{m[1]}_base"], lambda ts: ts[0][cut].reshape((n, n) if m[2] == "b_res" else (n,))
    if rest == "eh_proj.weight":
        return [f"{prefix}e_proj.weight", f"{prefix}h_proj.weight"], lambda ts: torch.cat(ts, dim=1)
    key = release_key(name)
    if "{e}" in key:
        return [key.format(e=e) for e in range(cfg.n_routed_experts)], "stack"
    return [key], "one"


class _Release:
    """The checkpoint's tensors under their release names (`canonical`), FP8 codes dequantized on request."""

    def __init__(self, ckpt, path):
        self.ckpt, self.path = ckpt, path
        self.names = {canonical(k): k for k in ckpt.where}

    def __contains__(self, key: str) -> bool:
        return key in self.names

    def raw(self, key: str) -> torch.Tensor:
        return self.ckpt.raw(self.names[key])

    def is_fp8(self, key: str) -> bool:
        return self.ckpt.is_fp8(self.names[key])

    def scale(self, key: str) -> torch.Tensor:
        sc = key.removesuffix(".weight") + RELEASE_SCALE
        if sc not in self.names:
            raise ValueError(f"{self.path}: FP8 tensor {self.names[key]} has no block scales beside it "
                             f"({sc} or {key + SUFFIX})")
        return self.raw(sc).float()  # fp32 or the release's e8m0 (powers of two): exact in fp32

    def get(self, key: str) -> torch.Tensor:
        t = self.raw(key)
        if t.dtype == torch.int8:
            raise ValueError(f"{self.path}: {self.names[key]} holds packed FP4 codes (the release's routed experts, "
                             f"expert_dtype 'fp4'), which frugallm does not read yet; dequantize them to bf16 first")
        return weight_dequant(t, self.scale(key)) if t.dtype == E4M3 else t


def mtp_present(ckpt, cfg: ModelConfig, path) -> int:
    """How many of the declared MTP modules the checkpoint holds in frugallm's form (warning otherwise)."""
    import warnings

    view = _Release(ckpt, path)
    have = [f"mtp.{k}.e_proj.weight" in view for k in range(cfg.n_mtp)]
    present = have.index(False) if False in have else cfg.n_mtp
    if any(f"mtp.{k}.hc_head_fn" in view for k in range(cfg.n_mtp)):
        warnings.warn(f"{path}: the MTP layer carries its own hyper head (mtp.k.hc_head_*), which frugallm's MTP "
                      f"over mHC does not model (it collapses the streams by their mean); loading without MTP")
        return 0
    if present < cfg.n_mtp:
        warnings.warn(f"config.json declares num_nextn_predict_layers={cfg.n_mtp} but {path} holds {present} MTP "
                      f"layer(s); loading with n_mtp={present}")
    return present


def read_state(ckpt, cfg: ModelConfig, keep: bool, dtype, path, skeleton: dict) -> dict[str, torch.Tensor]:
    """frugallm's state dict from a deepseek_v4 checkpoint: FP8 weights kept as codes + scales (keep) where
    they map one to one or stack, else dequantized into `dtype`; every tensor accounted for."""
    view, used, state = _Release(ckpt, path), set(), {}
    for name, ref in skeleton.items():
        keys, how = sources(name, cfg)
        missing = [k for k in keys if k not in view]
        if missing:
            raise KeyError(f"checkpoint {path} lacks {missing[0]} (for frugallm {name})"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        used.update(keys)
        combine = torch.stack if how == "stack" else (lambda ts: ts[0]) if how == "one" else how
        if keep and isinstance(how, str) and not name.endswith(KEEP_FP32) and all(view.is_fp8(k) for k in keys):
            t = state[name] = combine([view.raw(k) for k in keys])
            state[name + SUFFIX] = combine([view.scale(k) for k in keys])
        else:
            t = combine([view.get(k) for k in keys])
            if t.is_floating_point():
                t = t.float() if name.endswith(KEEP_FP32) else t if dtype is None else t.to(dtype)
            else:
                t = t.long()  # tid2eid: token -> expert ids
            state[name] = t
        if t.shape != ref.shape:
            raise ValueError(f"{keys[0]}: shape {tuple(t.shape)} in the checkpoint, frugallm expects {tuple(ref.shape)}")
    mtp_left = lambda k: (m := re.match(r"mtp\.(\d+)\.", k)) and int(m[1]) >= cfg.n_mtp  # noqa: E731
    unused = [view.names[k] for k in view.names if k not in used and not k.endswith(RELEASE_SCALE) and not mtp_left(k)]
    if unused:
        raise ValueError(f"checkpoint {path} has {len(unused)} tensor(s) frugallm does not map, e.g. {unused[:3]}")
    return state


def release_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype) -> dict[str, torch.Tensor]:
    """frugallm's state dict as the release's tensors: experts one per tensor, connection bases joined, MTP's
    eh_proj split; FP8 codes as they are with NAME.scale. Float tensors in `dtype` (the gate bias, DSA's head
    weights and the scales in fp32)."""
    tensors, bases = {}, {}
    for name, t in state.items():
        prefix, rest = _split(name)
        if m := re.fullmatch(r"(attn|ffn)_conn\.(b_pre|b_post|b_res)", rest):
            bases.setdefault(f"{prefix}hc_{m[1]}_base", {})[m[2]] = t.flatten()
        elif rest.startswith("eh_proj.weight"):
            tensors.update(_split_eh_proj(prefix, state, dtype) if rest == "eh_proj.weight" else {})
        elif "{e}" in (key := release_key(name)):
            tensors.update({key.format(e=e): _cast(name, t[e], dtype).contiguous() for e in range(t.shape[0])})
        else:
            tensors[key] = _cast(name, t, dtype).contiguous()
    for key, parts in bases.items():
        tensors[key] = torch.cat([parts["b_pre"], parts["b_post"], parts["b_res"]]).to(dtype)
    return tensors


def _cast(name: str, t: torch.Tensor, dtype) -> torch.Tensor:
    if t.dtype == E4M3 or not t.is_floating_point():  # FP8 codes, tid2eid
        return t
    return t.float() if name.endswith(KEEP_FP32 + (SUFFIX,)) else t.to(dtype)


def _split_eh_proj(prefix: str, state: dict, dtype) -> dict[str, torch.Tensor]:
    """MTP's eh_proj (d, 2d) = [e_proj | h_proj]. Codes split with their scales where d is a whole number of
    128-wide blocks; otherwise h_proj's blocks would straddle two scales, so both are written dequantized."""
    w, scale = state[prefix + "eh_proj.weight"], state.get(prefix + "eh_proj.weight" + SUFFIX)
    d = w.shape[0]
    if scale is not None and d % BLOCK == 0:
        b = d // BLOCK
        return {prefix + "e_proj.weight": w[:, :d].contiguous(), prefix + "h_proj.weight": w[:, d:].contiguous(),
                prefix + "e_proj.scale": scale[:, :b].float().contiguous(),
                prefix + "h_proj.scale": scale[:, b:].float().contiguous()}
    if scale is not None:
        w = weight_dequant(w, scale.float())
    w = w.to(dtype)
    return {prefix + "e_proj.weight": w[:, :d].contiguous(), prefix + "h_proj.weight": w[:, d:].contiguous()}
