"""GGUF, llama.cpp's one-file format, written in its `deepseek2` layout (docs/design/gguf.md); read back
by gguf_read.py.

The layout is that of llama.cpp's own converter for DeepSeek-V2/V3 (DeepseekV2Model), which frugallm's
weights map onto one to one, except MLA's up-projection:

    frugallm                        GGUF (numpy shape; ggml's ne is its reverse)
    attn.wkv_b (H*(dn+dv), r)       blk.L.attn_k_b (H, r, dn)  k part of each head, transposed
                                    blk.L.attn_v_b (H, dv, r)  v part of each head
    ffn.experts.w1 / w3 (E, I, d)   blk.L.ffn_gate_exps / ffn_up_exps, stacked as frugallm stacks them
    ffn.experts.w2 (E, d, I)        blk.L.ffn_down_exps
    ffn.gate.bias (E,)              blk.L.exp_probs_b.bias   (the aux-loss-free selection bias, f32)

with key_length_mla = dn + dr, value_length_mla = dv, and key_length = r + dr, value_length = r, head_count_kv
= 1 (llama.cpp runs the absorbed form: MQA over the latent). RoPE is interleaved in both (ggml's NORM rope
rotates adjacent pairs, as DeepSeek's reference does), so no weight is permuted.

Precision (--type): f32, f16, bf16, q8_0 or q4_0 for every 2-D weight; norms, 1-D tensors, the router
(ffn_gate_inp) and the bias stay f32, as llama.cpp's converter keeps them. A weight whose rows do not split
into blocks of 32 falls back to f16, as there. The source model's int8 codes (a frugallm quantized export)
are written as they are at q8_0: each 32-block gets the row's scale (rounded to f16), so reading the file
back gives the same codes.

Not written: the MTP modules (llama.cpp's deepseek2 converter drops them too; the file reads back with
n_mtp=0). Refused, with the reason (`check_representable`): what llama.cpp's deepseek2 graph cannot run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import io
from ..config import ModelConfig
from ..kernels.quantize import SUFFIX, dequantize

ARCH = "deepseek2"
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # q8_0 / q4_0 block length, along each row
MAGIC = b"GGUF"
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the GPT-2 regex split that frugallm's ByteLevel BPE uses
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # gguf.TokenType
CONFIG_KEY = "frugallm.config"  # the ModelConfig as JSON: fields llama.cpp has no key for (init_std, ...)

TOP = {"embed.weight": "TOKEN_EMBD", "norm.weight": "OUTPUT_NORM", "head.weight": "OUTPUT"}
LAYER = {  # frugallm name under layers.L. -> gguf MODEL_TENSOR (".weight" unless noted)
    "attn_norm.weight": "ATTN_NORM", "ffn_norm.weight": "FFN_NORM",
    "attn.wq.weight": "ATTN_Q", "attn.wq_a.weight": "ATTN_Q_A", "attn.q_norm.weight": "ATTN_Q_A_NORM",
    "attn.wq_b.weight": "ATTN_Q_B", "attn.wkv_a.weight": "ATTN_KV_A_MQA", "attn.kv_norm.weight": "ATTN_KV_A_NORM",
    "attn.wo.weight": "ATTN_OUT",
    "ffn.w1.weight": "FFN_GATE", "ffn.w2.weight": "FFN_DOWN", "ffn.w3.weight": "FFN_UP",
    "ffn.gate.weight": "FFN_GATE_INP", "ffn.gate.bias": "FFN_EXP_PROBS_B",
    "ffn.shared_experts.w1.weight": "FFN_GATE_SHEXP", "ffn.shared_experts.w2.weight": "FFN_DOWN_SHEXP",
    "ffn.shared_experts.w3.weight": "FFN_UP_SHEXP",
    "ffn.experts.w1": "FFN_GATE_EXP", "ffn.experts.w2": "FFN_DOWN_EXP", "ffn.experts.w3": "FFN_UP_EXP",
}
KV_B = "attn.wkv_b.weight"  # -> ATTN_K_B + ATTN_V_B


def key(template: str) -> str:
    """A gguf.Keys template ('{arch}.block_count') for deepseek2."""
    return template.format(arch=ARCH)


def tensor_name(kind: str, layer: int | None = None) -> str:
    """The GGUF name of a MODEL_TENSOR kind, e.g. ('ATTN_K_B', 3) -> 'blk.3.attn_k_b.weight'."""
    import gguf

    base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]].format(bid=layer)
    return base + (".bias" if kind == "FFN_EXP_PROBS_B" else ".weight")


def gguf_name(name: str) -> str | list[str] | None:
    """frugallm state-dict name -> GGUF name (a pair for wkv_b); None for what is not written (MTP)."""
    if name in TOP:
        return tensor_name(TOP[name])
    if name.startswith("mtp."):
        return None
    head, _, rest = name.partition(".")
    layer, _, suffix = rest.partition(".")
    if head == "layers" and suffix == KV_B:
        return [tensor_name("ATTN_K_B", int(layer)), tensor_name("ATTN_V_B", int(layer))]
    if head == "layers" and suffix in LAYER:
        return tensor_name(LAYER[suffix], int(layer))
    raise KeyError(f"no GGUF deepseek2 tensor for frugallm parameter {name!r}")


# --- what llama.cpp's deepseek2 can run ---------------------------------------------------------

def representable_errors(cfg: ModelConfig) -> list[str]:
    """Why llama.cpp's deepseek2 graph cannot run this configuration, one reason each; [] when it can."""
    why = []
    if cfg.attention != "mla":
        why.append(f"attention={cfg.attention!r}: DeepSeek-V4's hybrid attention (sliding window, compressed "
                   f"CSA/HCA entries, a shared K=V head) is not MLA, which is all the deepseek2 graph runs")
    if cfg.residual != "plain":
        why.append(f"residual={cfg.residual!r}: hyper-connections keep {cfg.hc_streams} residual streams mixed "
                   f"by learned coefficients; the deepseek2 graph has one plain residual stream")
    if cfg.index_topk > 0:
        why.append(f"index_topk={cfg.index_topk}: DSA's lightning indexer has no tensors in deepseek2, which runs "
                   f"dense MLA (llama.cpp reads DSA as its separate deepseek32 architecture)")
    if cfg.n_hash_layers > 0:
        why.append(f"n_hash_layers={cfg.n_hash_layers}: hash routing (a token-id -> experts table) does not "
                   f"exist in deepseek2, which routes every MoE layer by its scores")
    if cfg.swiglu_limit > 0:
        why.append(f"swiglu_limit={cfg.swiglu_limit}: deepseek2's SwiGLU is not clamped")
    if cfg.score_func not in ("sigmoid", "softmax"):
        why.append(f"score_func={cfg.score_func!r}: deepseek2's expert gating functions are sigmoid and softmax")
    if cfg.n_routed_experts and cfg.n_expert_groups > 1 and cfg.group_score != "top2_sum":
        why.append(f"group_score={cfg.group_score!r} with {cfg.n_expert_groups} groups: llama.cpp scores an "
                   f"expert group by the sum of its top-2 scores (V3), not by its max (V2)")
    if cfg.n_routed_experts and cfg.n_shared_experts == 0:
        why.append("n_shared_experts=0: llama.cpp's deepseek2 requires shared experts in every MoE layer")
    if cfg.rope_scaling == "yarn" and (cfg.mscale != cfg.mscale_all_dim or cfg.rope_attn_factor is not None):
        why.append(f"YaRN with mscale={cfg.mscale}, mscale_all_dim={cfg.mscale_all_dim}, rope_attn_factor="
                   f"{cfg.rope_attn_factor}: llama.cpp stores one mscale (yarn_log_multiplier) and assumes "
                   f"mscale == mscale_all_dim, with no separate cos/sin factor")
    if cfg.q_lora_rank and (cfg.n_layers in (26, 27) or (cfg.n_layers == 48 and cfg.vocab_size == 128256)):
        why.append(f"q_lora_rank={cfg.q_lora_rank} with {cfg.n_layers} layers: llama.cpp takes a deepseek2 "
                   f"model of that depth for DeepSeek-V2-Lite and ignores q_lora_rank")
    return why


def check_representable(cfg: ModelConfig) -> None:
    if why := representable_errors(cfg):
        raise ValueError("this model cannot be written as a llama.cpp deepseek2 GGUF: " + "; ".join(why)
                         + ". Export it with --to hf, or keep it in frugallm's own format")


def check_out(out, sources=()) -> Path:
    """The GGUF path to write, refused before any work when it would replace something that is not an
    older GGUF (a directory, another file) or is the source being read."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out} must end in .gguf (frugallm.load recognises a GGUF file by that suffix)")
    for src in sources:
        if Path(src).resolve() == out.resolve():
            raise io.OutputError(f"refusing to write the GGUF over {out}: it is the source being read; choose "
                                 f"another --out")
    if out.is_dir() or out.is_symlink():
        raise io.OutputError(f"refusing to write the GGUF over {out}: it is a directory or a link; choose "
                             f"another --out")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(4) != MAGIC:
                raise io.OutputError(f"refusing to write the GGUF over {out}: it is not a GGUF file; choose "
                                     f"another --out")
    return out


# --- metadata -----------------------------------------------------------------------------------

def write_config(w, cfg: ModelConfig) -> None:
    """The deepseek2 hyper-parameters, as llama.cpp's converter writes them (llama.cpp reads MLA from
    kv_lora_rank + key/value_length_mla, and treats the latent as one shared KV head)."""
    import gguf

    moe = cfg.n_routed_experts > 0
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.inter_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.n_dense_layers if moe else cfg.n_layers)
    w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_expert_feed_forward_length(cfg.moe_inter_dim if moe else cfg.inter_dim)
    w.add_expert_shared_count(cfg.n_shared_experts if moe else 0)
    if moe:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.n_activated_experts)
        w.add_expert_group_count(cfg.n_expert_groups)
        w.add_expert_group_used_count(cfg.n_limited_groups)
        w.add_expert_weights_scale(cfg.route_scale)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType[cfg.score_func.upper()])
    if cfg.rope_scaling == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.rope_factor)
        w.add_rope_scaling_orig_ctx_len(cfg.original_seq_len)
        w.add_rope_scaling_yarn_beta_fast(cfg.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(cfg.beta_slow)
        w.add_rope_scaling_yarn_log_mul(0.1 * cfg.mscale_all_dim)  # the converter's convention: llama.cpp divides by 0.1
    w.add_string(CONFIG_KEY, json.dumps(cfg.replace(n_mtp=0).to_dict()))


def pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for this tokenizer.json's pre-tokenization, or a ValueError saying what differs."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        problems.append(f"model {model.get('type')!r} is not a plain byte-level BPE")
    if spec.get("normalizer") is not None:
        problems.append(f"it has a normalizer ({spec['normalizer'].get('type')})")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        problems.append(f"its pre-tokenizer {json.dumps(pre)[:200]} is not ByteLevel(add_prefix_space=False, "
                        f"use_regex=True), the GPT-2 split llama.cpp applies as pre-tokenizer {PRE_TOKENIZER!r}")
    if problems:
        raise ValueError("this tokenizer has no llama.cpp equivalent frugallm can name: " + "; ".join(problems)
                         + ". Export with --to hf and convert that folder with llama.cpp's convert_hf_to_gguf.py, "
                           "which recognises known Hugging Face tokenizers")
    return PRE_TOKENIZER


def write_tokenizer(w, tok, vocab_size: int) -> None:
    """Tokens (byte-level strings, as in tokenizer.json), their types, the merges, the special ids and
    the chat template. Ids past the tokenizer's vocabulary (a model vocabulary rounded up) are UNUSED."""
    spec = json.loads(tok.to_str())
    pre = pre_tokenizer(spec)
    n = tok.vocab_size
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's vocabulary is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TOKEN_UNUSED] * vocab_size
    for piece, i in spec["model"]["vocab"].items():
        tokens[i], types[i] = piece, TOKEN_NORMAL
    for added in spec.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for add, i in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, tok.eos_id),
                   (w.add_pad_token_id, tok.pad_id if tok.pad_id is not None else tok.eos_id)):
        if i is not None:
            add(i)
    w.add_add_bos_token(tok.bos_id is not None)  # frugallm's prompts and documents start with bos
    w.add_add_eos_token(False)
    template = tok.hf_config(0).get("chat_template")
    if template:
        w.add_chat_template(template)


# --- tensors ------------------------------------------------------------------------------------

def _f32_only(gname: str, t: torch.Tensor) -> bool:
    """Kept f32 whatever the type, as llama.cpp's converter keeps them: 1-D tensors, norms, the router."""
    return t.dim() <= 1 or gname.endswith("_norm.weight") or ".ffn_gate_inp." in gname or not gname.endswith(".weight")


def _q8_0_from_codes(q: torch.Tensor, s: torch.Tensor) -> np.ndarray | None:
    """int8 codes (..., N, K) with per-row (..., N) or per-32-block (..., N, K/32) scales -> q8_0 blocks
    (2-byte f16 scale then 32 int8 codes each), codes unchanged; None when K does not split into 32s."""
    K = q.shape[-1]
    if K % BLOCK or (s.dim() == q.dim() and s.shape[-1] != K // BLOCK):
        return None
    d = s if s.dim() == q.dim() else s[..., None].expand(*s.shape, K // BLOCK)
    d = d.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*q.shape[:-1], K // BLOCK, 2)
    codes = q.contiguous().numpy().view(np.uint8).reshape(*q.shape[:-1], K // BLOCK, BLOCK)
    return np.concatenate([d, codes], axis=-1).reshape(*q.shape[:-1], K // BLOCK * (BLOCK + 2))


def encode(gname: str, t: torch.Tensor, want: str, scale: torch.Tensor | None = None):
    """(array, ggml type) of one tensor at `want`; `t` holds int8 codes when `scale` is given."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype = Q.F32 if _f32_only(gname, t) else Q[want.upper()]
    if scale is not None:
        if qtype == Q.Q8_0 and t.dtype == torch.int8 and (blocks := _q8_0_from_codes(t, scale)) is not None:
            return blocks, qtype
        t = dequantize(t, scale, torch.float32)
    a = t.detach().float().contiguous().numpy()
    if qtype == Q.F32:
        return a, qtype
    if qtype == Q.F16:
        return a.astype(np.float16), qtype
    try:
        return gguf.quants.quantize(a, qtype), qtype
    except gguf.quants.QuantError:  # rows that do not split into blocks: f16, as llama.cpp's converter
        return a.astype(np.float16), Q.F16


def _split_kv_b(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """wkv_b (H*(dn+dv), r) -> k_b (H, r, dn), v_b (H, dv, r): the converter's split, k part transposed."""
    kv = w.view(cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
    k_b, v_b = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
    return k_b.transpose(1, 2).contiguous(), v_b.contiguous()


def tensors(model, want: str):
    """(GGUF name, array, ggml type) of every tensor written, in the state dict's order."""
    cfg = model.config
    state = model.state_dict()
    for name, t in state.items():
        if name.endswith(SUFFIX):
            continue
        gname, scale = gguf_name(name), state.get(name + SUFFIX)
        if gname is None:
            continue
        if isinstance(gname, list):  # wkv_b: dequantized whole, split, then encoded like any weight
            w = t if scale is None else dequantize(t, scale, torch.float32)
            for n, part in zip(gname, _split_kv_b(w.float(), cfg)):
                yield (n, *encode(n, part, want))
            continue
        yield (gname, *encode(gname, t, want, scale))


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def write_gguf(model, tokenizer, out, want: str = "f32", *, name: str | None = None, sources=()) -> Path:
    """Write `model` (a frugallm Transformer; plain or with int8 codes) with `tokenizer` as one
    llama.cpp deepseek2 GGUF at `out` (atomically: io.replace_file); returns out's Path."""
    import gguf

    if want not in TYPES:
        raise ValueError(f"unknown GGUF type {want!r}; choose one of {TYPES}")
    check_representable(model.config)
    pre_tokenizer(json.loads(tokenizer.to_str()))  # refused before any file is opened
    out = check_out(out, sources)
    with io.replace_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_name(name or out.stem)
        w.add_file_type(gguf.LlamaFileType[FILE_TYPES[want]])
        if want.startswith("q"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_config(w, model.config)
        write_tokenizer(w, tokenizer, model.config.vocab_size)
        for gname, array, qtype in tensors(model, want):
            w.add_tensor(gname, array, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
