"""Hugging Face DeepSeek-V2/V3 <-> frugallm: one key table, both directions (docs/design/hf-interop.md).

frugallm stores the routed experts of a layer stacked, `layers.L.ffn.experts.w1` (E, I, d); HF stores
them one tensor per expert, `model.layers.L.mlp.experts.E.gate_proj.weight`. The MTP module k is
HF layer `num_hidden_layers + k` (V3 §2.2; docs/design/mtp.md): its block uses the ordinary layer keys, plus
enorm / hnorm / eh_proj / shared_head.norm, and physical copies of the embedding and head.

FP8 (V3 §3.3; docs/design/hf-interop.md): a quantized weight NAME holds e4m3 codes and NAME_scale_inv its fp32 block
scales, in frugallm's state dict (kernels/quantize.py) as in DeepSeek's checkpoints, so one key
rule maps both. from_hf keeps the codes (quantized=True) or dequantizes them per block.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import io
from ..config import ModelConfig, yarn_mscale
from ..model.transformer import Transformer
from ..kernels.fp8 import E4M3, weight_dequant
from ..kernels.quantize import SUFFIX
from ..tokenizer import TOKENIZER, Tokenizer, load_tokenizer
from ..names import CONFIG, WEIGHTS

TOP_KEYS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "head.weight": "lm_head.weight"}
# frugallm suffix under "layers.L." <-> HF suffix under "model.layers.L."; "{e}" marks stacked experts
LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.indexer.wq_b.weight": "self_attn.indexer.wq_b.weight",  # DSA (deepseek_v32; model/indexer.py)
    "attn.indexer.wk.weight": "self_attn.indexer.wk.weight",
    "attn.indexer.k_norm.weight": "self_attn.indexer.k_norm.weight",
    "attn.indexer.k_norm.bias": "self_attn.indexer.k_norm.bias",
    "attn.indexer.weights_proj.weight": "self_attn.indexer.weights_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.experts.w1": "mlp.experts.{e}.gate_proj.weight",
    "ffn.experts.w2": "mlp.experts.{e}.down_proj.weight",
    "ffn.experts.w3": "mlp.experts.{e}.up_proj.weight",
}
MTP_KEYS = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
            "eh_proj.weight": "eh_proj.weight", "norm.weight": "shared_head.norm.weight"}
MTP_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
SCALE = SUFFIX  # NAME_scale_inv: the dequant multiplier of the codes in NAME, on both sides
MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")  # the Hugging Face model types frugallm's Transformer holds
# kept float32 whatever the dtype asked for: the gate bias (model/moe.py) and DSA's head weights (model/indexer.py)
FP32_NAMES = ("gate.bias", "indexer.weights_proj.weight")
TOKENIZER_CONFIG, README = "tokenizer_config.json", "README.md"
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def hf_key(name: str, n_layers: int) -> str:
    """frugallm state-dict name -> HF key ('{e}' left in for stacked experts)."""
    if name.endswith(SCALE):
        return hf_key(name[: -len(SCALE)], n_layers) + SCALE
    if name in TOP_KEYS:
        return TOP_KEYS[name]
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
        return f"model.layers.{m[1]}.{LAYER_KEYS[m[2]]}"
    if m := re.fullmatch(r"mtp\.(\d+)\.block\.(.+)", name):
        return f"model.layers.{n_layers + int(m[1])}.{LAYER_KEYS[m[2]]}"
    if m := re.fullmatch(r"mtp\.(\d+)\.(.+)", name):
        return f"model.layers.{n_layers + int(m[1])}.{MTP_KEYS[m[2]]}"
    raise KeyError(f"no Hugging Face key for frugallm parameter {name!r}")


# --- config -------------------------------------------------------------------------------

def config_from_hf(d: dict) -> ModelConfig:
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.json has model_type={model_type!r}; frugallm loads 'deepseek_v32', 'deepseek_v3' "
                         f"or 'deepseek_v2'")
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
    """'deepseek_v32', 'deepseek_v3' or 'deepseek_v2', or a ValueError naming what the HF format cannot hold."""
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


# --- weights ------------------------------------------------------------------------------

class _Checkpoint:
    """Lazy view over the *.safetensors of a directory (single file or sharded index). A context
    manager: leaving it closes the files (tensors already read stay valid: they are copies)."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}; frugallm reads safetensors checkpoints only")
        self.where = {}
        self.handles = [safe_open(path / f, framework="pt") for f in files]
        for h in self.handles:
            for k in h.keys():
                self.where[k] = h

    def __enter__(self) -> "_Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self.handles:
            h.__exit__(None, None, None)  # safe_open's only way to unmap and close its file
        self.handles, self.where = [], {}

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def raw(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)

    def is_fp8(self, key: str) -> bool:
        return self.where[key].get_slice(key).get_dtype() == "F8_E4M3"

    def scale(self, key: str) -> torch.Tensor:
        if key + SCALE not in self.where:
            raise ValueError(f"FP8 tensor {key} has no {key + SCALE} beside it")
        return self.raw(key + SCALE)

    def get(self, key: str) -> torch.Tensor:
        t = self.raw(key)
        if t.dtype == E4M3:  # DeepSeek FP8 checkpoint: dequantise 128x128 blocks
            t = weight_dequant(t, self.scale(key))
        return t


def keep_quantized(declared: bool, dtype: torch.dtype | None, quantized: bool | None, path) -> bool:
    """The loaders' rule. quantized=None: keep the codes iff the checkpoint declares a quantization
    and no dtype is asked for (inference as shipped); a dtype asks for a plain model in that dtype.
    True: keep them (an error if there are none). False: dequantize into dtype (fp32 by default)."""
    if quantized and not declared:
        raise ValueError(f"{path} is not a quantized checkpoint (no quantization declared); "
                         f"write one with frugallm.export.quantize_checkpoint / `frugallm quantize`")
    return declared and dtype is None if quantized is None else quantized


def from_hf(path: str | os.PathLike, dtype: torch.dtype | None = None,
            quantized: bool | None = None) -> Transformer:
    """Load a HF DeepSeek-V3/V2 directory (config.json + *.safetensors, sharded or FP8) with MTP.

    A directory frugallm wrote (to_hf) carries a manifest.json, checked first (frugallm/io.py);
    those written by others have none and are read as they are.
    dtype: parameter dtype (default float32); the gate bias always stays float32.
    quantized (see keep_quantized): for a DeepSeek FP8 directory (config.json declares
    quantization_config), keep each FP8 weight as e4m3 codes + block scales in the model
    (kernels/quantize.py QuantLinear / QuantExperts; the other tensors as stored, or in `dtype`),
    never materialising the dequantized model; or dequantize each tensor on its own, per
    128x128 block, into `dtype` (for training). Without a declaration, FP8 tensors that carry
    a weight_scale_inv are dequantized.
    """
    path = Path(path)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"{path} has no config.json; pass a Hugging Face DeepSeek-V2/V3 model directory")
    if io.read_manifest(path) is not None:
        io.verify(path)
    hf_config = json.loads((path / CONFIG).read_text())
    cfg = config_from_hf(hf_config)
    qc = hf_config.get("quantization_config")
    keep = keep_quantized(qc is not None, dtype, quantized, path)
    if keep and {k: qc.get(k) for k in ("quant_method", "fmt", "weight_block_size")} != {
            k: FP8_CONFIG[k] for k in ("quant_method", "fmt", "weight_block_size")}:
        raise ValueError(f"{path}: quantization_config {qc} is not DeepSeek's FP8 layout {FP8_CONFIG}; "
                         f"pass quantized=False to dequantize it")
    if not keep:
        dtype = dtype or torch.float32
    with _Checkpoint(path) as ckpt:
        present = sum(f"model.layers.{cfg.n_layers + k}.eh_proj.weight" in ckpt for k in range(cfg.n_mtp))
        if present < cfg.n_mtp:  # e.g. saved by transformers, which drops the MTP layers
            warnings.warn(f"config.json declares num_nextn_predict_layers={cfg.n_mtp} but {path} holds "
                          f"{present} MTP layer(s); loading with n_mtp={present}")
            cfg = cfg.replace(n_mtp=present)
        with torch.device("meta"):
            skeleton = Transformer(cfg)  # names and shapes only
        used, state = set(), {}
        for name, ref in skeleton.state_dict().items():
            key = hf_key(name, cfg.n_layers)
            keys = [key.format(e=e) for e in range(ref.shape[0])] if "{e}" in key else [key]
            missing = [k for k in keys if k not in ckpt]
            if missing:
                raise KeyError(f"checkpoint {path} lacks {missing[0]} (for frugallm {name})"
                               + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
            used.update(keys)
            stack = torch.stack if "{e}" in key else lambda ts: ts[0]
            if keep and not name.endswith(FP32_NAMES) and all(ckpt.is_fp8(k) for k in keys):  # codes and scales as stored
                t = state[name] = stack([ckpt.raw(k) for k in keys])
                state[name + SCALE] = stack([ckpt.scale(k) for k in keys]).float()
            else:
                t = stack([ckpt.get(k) for k in keys])
                state[name] = t.float() if name.endswith(FP32_NAMES) else t if dtype is None else t.to(dtype)
            if t.shape != ref.shape:
                raise ValueError(f"{key}: shape {tuple(t.shape)} in the checkpoint, "
                                 f"frugallm expects {tuple(ref.shape)}")
        for k in range(cfg.n_mtp):  # MTP's physical copies of the embedding and head
            for hf_suffix, ours in MTP_COPIES.items():
                key = f"model.layers.{cfg.n_layers + k}.{hf_suffix}"
                if key in ckpt:
                    used.add(key)
                    if not torch.equal(ckpt.get(key).float(), ckpt.get(TOP_KEYS[ours]).float()):
                        warnings.warn(f"{key} differs from the main {ours}; frugallm shares the main one")
        unused = [k for k in ckpt.where if k not in used and not k.endswith(SCALE)]
        if unused:
            raise ValueError(f"checkpoint {path} has {len(unused)} tensor(s) frugallm does not map, e.g. {unused[:3]}")
    if keep:
        from ..kernels.quantize import from_quantized_state_dict  # noqa: E402

        model = from_quantized_state_dict(cfg, state)
        return model if dtype is None else model.to(dtype)
    return Transformer.from_state_dict(cfg, state)


def to_hf(model: Transformer, path: str | os.PathLike, dtype: torch.dtype | None = None,
          files: tuple[str | os.PathLike, ...] = (), *, tokenizer: Tokenizer | None = None, kind: str = "hf",
          sources=(), suggest: str | None = None) -> Path:
    """Write `model` as a HF DeepSeek directory that transformers.AutoModelForCausalLM loads.

    Refuses configurations the format cannot represent. A model quantized to fp8 by
    kernels/quantize.py is written in DeepSeek's FP8 layout (e4m3 weight + fp32
    weight_scale_inv, and quantization_config in config.json); int8 has no HF DeepSeek layout
    and is refused. `tokenizer` (or a tokenizer.json among `files`, which are copied in) is written
    as AutoTokenizer loads it, adding bos as frugallm does (Tokenizer.hf_files), unless `files` bring
    their own tokenizer_config.json. A README.md says how to load the folder and why transformers
    lists the MTP layer's weights as UNEXPECTED. Written through frugallm/io.py: atomically, with a
    manifest of `kind` ("quantized" from quantize_checkpoint), and never over `sources` (the model's
    origin) or a directory that is not an earlier output of that kind.
    """
    cfg = model.config
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size:,} tokens but the model only {cfg.vocab_size:,} "
                         f"rows of embedding: pass the tokenizer the model was trained with")
    dtype = dtype or next(model.parameters()).dtype
    hf_config = config_to_hf(cfg, dtype)
    state = model.state_dict()
    if any(t.dtype == torch.int8 for t in state.values()):
        raise ValueError("an int8-quantized model has no Hugging Face DeepSeek layout; save it in frugallm's "
                         "(formats/quantized.py quantize_checkpoint, layout='frugallm')")
    if any(t.dtype == E4M3 for t in state.values()):
        hf_config["quantization_config"] = dict(FP8_CONFIG)
    tensors = {}
    for name, t in state.items():
        key = hf_key(name, cfg.n_layers)
        if name.endswith(FP32_NAMES) or name.endswith(SCALE):
            t = t.float()
        elif t.dtype != E4M3:
            t = t.to(dtype)
        if "{e}" in key:
            tensors.update({key.format(e=e): t[e].contiguous() for e in range(t.shape[0])})
        else:
            tensors[key] = t.contiguous()
    for k in range(cfg.n_mtp):
        for hf_suffix, ours in MTP_COPIES.items():
            for suffix in ("", SCALE):  # a quantized head is copied with its scales
                if TOP_KEYS[ours] + suffix in tensors:
                    tensors[f"model.layers.{cfg.n_layers + k}.{hf_suffix}{suffix}"] = tensors[TOP_KEYS[ours] + suffix].clone()
    path = Path(path)
    with io.write_directory(path, kind, sources=sources, suggest=suggest) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        for f in files:
            shutil.copyfile(f, tmp / Path(f).name)
        if tokenizer is None and (tmp / TOKENIZER).exists():
            tokenizer = load_tokenizer(tmp)
        if tokenizer is not None and not (tmp / TOKENIZER_CONFIG).exists():
            # what AutoTokenizer needs beyond tokenizer.json: bos added as frugallm adds it, the special
            # tokens and the chat template
            for name, text in tokenizer.hf_files(cfg.max_seq_len).items():
                (tmp / name).write_text(text)
        if not (tmp / README).exists():
            (tmp / README).write_text(model_card(cfg, hf_config, path.name, tokenizer is not None))
    return path


def mtp_note(cfg: ModelConfig) -> str | None:
    """What a user loading an export with transformers should know about the MTP layer, or None."""
    if not cfg.n_mtp:
        return None
    layers = ", ".join(f"model.layers.{cfg.n_layers + k}" for k in range(cfg.n_mtp))
    return (f"transformers does not run the multi-token-prediction (MTP) layer ({layers}): loading the folder "
            f"lists its weights as UNEXPECTED, which is harmless. They are kept, as in DeepSeek-V3's own "
            f"checkpoint, because frugallm.from_hf reads them back for MTP self-speculative decoding "
            f"(`--speculative`) and servers with DeepSeek MTP support draft tokens with them.")


def model_card(cfg: ModelConfig, hf_config: dict, name: str, has_tokenizer: bool) -> str:
    """README.md of an export: what it is, how to load it, and the MTP note."""
    from ..model.count import count_params, in_words

    lines = [f"# {name}", "", f"A {hf_config['architectures'][0]} model written by frugallm: "
             f"{in_words(count_params(cfg))}.", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{name}")']
    if has_tokenizer:
        lines += [f'tok = AutoTokenizer.from_pretrained("{name}")  # adds the bos token, as frugallm does', "```"]
    else:
        lines += ["```", "", "This folder holds no tokenizer: write it with `frugallm.to_hf(model, path, "
                  "tokenizer=RUN)` for one that AutoTokenizer loads."]
    return "\n".join(lines + ([""] + [mtp_note(cfg)] if cfg.n_mtp else [])) + "\n"
