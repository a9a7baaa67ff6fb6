"""GGUF files in llama.cpp's deepseek2 layout, read: config, weights, tokenizer (docs/design/gguf.md).

The layout is gguf.py's (its header has the table). What each ggml type becomes:

    F32, F16, BF16   plain tensors, in the dtype asked for (f32 when none; BF16 is read bit for bit)
    Q8_0             kept as codes when the loader keeps codes (formats/hf.py keep_quantized: no dtype
                     asked for): frugallm's int8 weight-only form, the 32-value blocks' codes as they
                     are and their f16 scales as fp32 (kernels/quantize.py): one scale per row where all
                     of a row's blocks share it (as gguf.py writes frugallm's own int8 codes), else one
                     per block. Read straight from the file's memory map: no float copy of the weight
                     is made, on disk or in memory. Otherwise dequantized into the dtype.
    Q4_0             likewise kept as codes: frugallm's int4 form (kernels/int4.py), which is q4_0's own
                     byte order, so each 18-byte block gives its f16 scale and its 16 packed bytes as they
                     are. A file holding both q8_0 and q4_0 keeps the q4_0 weights (a model runs one
                     code format) and dequantizes the q8_0 ones.
    anything else    (k-quants) dequantized by the gguf package into the dtype (f32 when none)

Weights frugallm cannot hold as codes are dequantized whatever the file holds: the embedding (a lookup),
MLA's kv_b (stored split as k_b / v_b, whose k part is transposed: its 32-blocks run across frugallm's
columns), and routed experts unless w1, w2 and w3 are all kept (q8_0, or q4_0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..kernels.quantize import SUFFIX, from_quantized_state_dict
from ..model.transformer import Transformer
from ..tokenizer import CHAT_TEMPLATE, Tokenizer
from .gguf import ARCH, BLOCK, CONFIG_KEY, MAGIC, TOKEN_CONTROL, TOKEN_UNUSED, gguf_name, key

KEEP_FIELDS = ("init_std", "balance_loss_alpha", "mtp_lambda")  # not architecture: no llama.cpp key holds them


def reader(path):
    """The gguf package's reader over `path` (memory-mapped), checked to be a deepseek2 GGUF."""
    import gguf

    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    r = gguf.GGUFReader(path)
    arch = field(r, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"{path} holds a llama.cpp {arch!r} model; frugallm reads the {ARCH!r} architecture "
                         f"(DeepSeek-V2/V3 with MLA) only")
    return r


def field(r, name: str, default=None):
    f = r.fields.get(name)
    return default if f is None else f.contents()


def config_from_gguf(r) -> ModelConfig:
    """The ModelConfig of a deepseek2 GGUF, from llama.cpp's keys (what llama.cpp itself runs); a file
    frugallm wrote adds the fields llama.cpp has no key for."""
    import gguf

    K, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    get = lambda template, default=None: field(r, key(template), default)
    n_layers, rope_dim = get(K.BLOCK_COUNT), get(R.DIMENSION_COUNT)
    k_len = get(A.KEY_LENGTH_MLA) or get(A.KEY_LENGTH)  # an old GGUF without the MLA keys: plain MHA sizes
    v_len = get(A.VALUE_LENGTH_MLA) or get(A.VALUE_LENGTH)
    experts = get(K.EXPERT_COUNT, 0) or 0
    vocab = get(K.VOCAB_SIZE) or len(r.fields["tokenizer.ggml.tokens"].data)
    gating = {1: "softmax", 2: "sigmoid"}.get(get(K.EXPERT_GATING_FUNC, 1))  # absent: softmax (llama.cpp's default)
    if gating is None:
        raise ValueError(f"expert_gating_func={get(K.EXPERT_GATING_FUNC)} is neither softmax (1) nor sigmoid (2)")
    groups = get(K.EXPERT_GROUP_COUNT, 1) or 1
    dense = get(K.LEADING_DENSE_BLOCK_COUNT, 0) if experts else n_layers
    kw = dict(
        vocab_size=vocab, dim=get(K.EMBEDDING_LENGTH), n_layers=n_layers, n_dense_layers=dense,
        inter_dim=get(K.FEED_FORWARD_LENGTH), max_seq_len=get(K.CONTEXT_LENGTH),
        norm_eps=get(A.LAYERNORM_RMS_EPS, 1e-6), n_heads=get(A.HEAD_COUNT), q_lora_rank=get(A.Q_LORA_RANK, 0) or 0,
        kv_lora_rank=get(A.KV_LORA_RANK), qk_nope_head_dim=k_len - rope_dim, qk_rope_head_dim=rope_dim,
        v_head_dim=v_len, n_routed_experts=experts, n_shared_experts=get(K.EXPERT_SHARED_COUNT, 0) if experts else 0,
        n_activated_experts=get(K.EXPERT_USED_COUNT, 1) if experts else 1,
        moe_inter_dim=get(K.EXPERT_FEED_FORWARD_LENGTH, 0) if experts else 128,
        n_expert_groups=groups, n_limited_groups=get(K.EXPERT_GROUP_USED_COUNT, 1) or 1 if groups > 1 else 1,
        score_func=gating, group_score="top2_sum", norm_topk_prob=bool(get(K.EXPERT_WEIGHTS_NORM, False)),
        route_scale=float(get(K.EXPERT_WEIGHTS_SCALE, 0.0) or 1.0),
        gate_bias=experts > 0 and f"blk.{dense}.exp_probs_b.bias" in {t.name for t in r.tensors},
        n_mtp=0, rope_theta=float(get(R.FREQ_BASE, 10000.0)),
    )
    if get(R.SCALING_TYPE) == "yarn":
        log_mul = get(R.SCALING_YARN_LOG_MUL)  # 0.1 * mscale_all_dim (gguf.py); absent: no attention scaling
        m = float(log_mul) / 0.1 if log_mul else 0.0
        kw.update(rope_scaling="yarn", rope_factor=float(get(R.SCALING_FACTOR)),
                  original_seq_len=get(R.SCALING_ORIG_CTX_LEN), beta_fast=float(get(R.SCALING_YARN_BETA_FAST, 32.0)),
                  beta_slow=float(get(R.SCALING_YARN_BETA_SLOW, 1.0)), mscale=m if m else 1.0, mscale_all_dim=m)
    # GGUF floats are f32: 1e-6 reads as 9.99999997e-07; take the shortest decimal those bits round to
    kw.update({k: float(str(np.float32(v))) for k, v in kw.items() if isinstance(v, float)})
    ours = field(r, CONFIG_KEY)
    if ours:
        saved = json.loads(ours)
        kw.update({k: saved[k] for k in KEEP_FIELDS if k in saved})
        # where the saved value is the one those f32 bits round, take it whole
        kw.update({k: saved[k] for k, v in kw.items() if isinstance(v, float) and isinstance(saved.get(k), float)
                   and abs(saved[k] - v) <= 1e-6 * max(1.0, abs(v))})
        if groups == 1 and "group_score" in saved:  # no effect with one group; kept so the config compares equal
            kw["group_score"] = saved["group_score"]
    return ModelConfig(**kw)


def quantization(path) -> dict | None:
    """{"format": "int4" | "int8", ...} when the file holds q4_0 | q8_0 weights (kept as codes), else None."""
    import gguf

    types = {t.tensor_type.name for t in reader(path).tensors}
    if gguf.GGMLQuantizationType.Q4_0.name in types:
        return {"format": "int4", "source": "gguf q4_0", "granularity": "per 32-block"}
    if gguf.GGMLQuantizationType.Q8_0.name in types:
        return {"format": "int8", "source": "gguf q8_0", "granularity": "per 32-block or per row"}
    return None


# --- weights ----------------------------------------------------------------------------------------

def _shape(t) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape))  # ggml's ne is numpy's shape reversed


def _codes(t) -> tuple[torch.Tensor, torch.Tensor]:
    """A q8_0 tensor's int8 codes (..., N, K) and fp32 scales: (..., N) where each row's blocks share one
    scale, else (..., N, K/32)."""
    shape = _shape(t)
    blocks = np.asarray(t.data).reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK + 2)
    d = torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]).float()
    q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8)).reshape(shape)
    return q, (d[..., 0].contiguous() if bool((d == d[..., :1]).all()) else d)


def _codes4(t) -> tuple[torch.Tensor, torch.Tensor]:
    """A q4_0 tensor's packed codes uint8 (..., N, K/2) and fp16 scales (..., N, K/32): bytes as they are."""
    shape = _shape(t)
    blocks = np.asarray(t.data).reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK // 2 + 2)
    d = torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0])
    return torch.from_numpy(np.ascontiguousarray(blocks[..., 2:])).reshape(*shape[:-1], shape[-1] // 2), d


def _float(t, dtype: torch.dtype) -> torch.Tensor:
    import gguf

    Q, shape = gguf.GGMLQuantizationType, _shape(t)
    if t.tensor_type in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(t.data)).reshape(shape).to(dtype)
    if t.tensor_type == Q.BF16:  # bit for bit, whatever numpy calls the bytes
        bits = np.array(t.data).view(np.int16)  # a copy: the memory map is read-only
        return torch.from_numpy(bits).reshape(shape).view(torch.bfloat16).to(dtype)
    if t.tensor_type == Q.Q8_0:
        q, s = _codes(t)
        return (q.float().unflatten(-1, (-1, BLOCK)) * (s[..., None, None] if s.dim() < q.dim() else s[..., None])
                ).flatten(-2).to(dtype)
    return torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)).reshape(shape).to(dtype)


def _kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """k_b (H, r, dn), v_b (H, dv, r) -> frugallm's wkv_b (H*(dn+dv), r): gguf.py's split undone."""
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).flatten(0, 1).contiguous()


def state_dict(r, cfg: ModelConfig, dtype: torch.dtype, keep: bool) -> dict[str, torch.Tensor]:
    """frugallm's state dict from the file; with `keep`, q4_0 (else q8_0) weights of nn.Linear modules and of
    whole expert triples as int4 (int8) codes + NAME_scale_inv."""
    import gguf

    by_name = {t.name: t for t in r.tensors}
    with torch.device("meta"):
        names = list(Transformer(cfg).state_dict())
    Q = gguf.GGMLQuantizationType
    kept = Q.Q4_0 if any(t.tensor_type == Q.Q4_0 for t in r.tensors) else Q.Q8_0  # one code format a model
    is_kept = lambda n: by_name[n].tensor_type == kept
    state, used = {}, set()
    for name in names:
        gname = gguf_name(name)
        if isinstance(gname, list):  # wkv_b from k_b / v_b, or a legacy file's unsplit kv_b
            legacy = gname[0].replace("attn_k_b", "attn_kv_b")
            if legacy in by_name:
                gname = [legacy]
            elif missing := [n for n in gname if n not in by_name]:
                raise KeyError(f"the GGUF lacks {missing[0]} (for frugallm {name})")
            used.update(gname)
            parts = [_float(by_name[n], torch.float32) for n in gname]
            state[name] = (parts[0] if len(parts) == 1 else _kv_b(*parts)).to(dtype)
            continue
        if gname not in by_name:
            raise KeyError(f"the GGUF lacks {gname} (for frugallm {name})")
        used.add(gname)
        t = by_name[gname]
        experts = name.rsplit(".", 1)[0].endswith("ffn.experts")
        codes = keep and is_kept(gname) and name != "embed.weight" and (
            not experts or all(is_kept(gguf_name(name[:-2] + w)) for w in ("w1", "w2", "w3")))
        if codes:
            state[name], state[name + SUFFIX] = _codes4(t) if kept == Q.Q4_0 else _codes(t)
        else:
            state[name] = _float(t, torch.float32 if name.endswith("gate.bias") else dtype)
    if extra := sorted(set(by_name) - used):
        raise ValueError(f"the GGUF holds tensors frugallm's deepseek2 reading does not know: {extra[:4]}"
                         + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
                         + " (MTP / nextn layers, or another architecture's tensors)")
    return state


def load_gguf(path, dtype: torch.dtype | None = None, quantized: bool | None = None) -> Transformer:
    """The Transformer of a deepseek2 GGUF: q8_0 weights kept as int8 codes by formats/hf.py
    keep_quantized's rule (no dtype asked for), everything else in `dtype` (fp32 when None)."""
    from .hf import keep_quantized

    r = reader(path)
    cfg = config_from_gguf(r)
    keep = keep_quantized(quantization(path) is not None, dtype, quantized, path)
    state = state_dict(r, cfg, dtype or torch.float32, keep)
    if any(k.endswith(SUFFIX) for k in state):
        model = from_quantized_state_dict(cfg, state)
        return model if dtype is None else model.to(dtype)
    return Transformer.from_state_dict(cfg, state)


def load_tokenizer(path) -> Tokenizer:
    """frugallm's Tokenizer from the GGUF's vocabulary: a byte-level BPE with llama.cpp's 'gpt-2' split
    (what gguf.py writes), its control tokens special, and the chat template."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    r = reader(path)
    model, pre = field(r, "tokenizer.ggml.model"), field(r, "tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in ("gpt-2", "default"):
        raise ValueError(f"{path}: tokenizer model {model!r} with pre-tokenizer {pre!r}; frugallm reads byte-level "
                         f"BPE ('gpt2') with the GPT-2 split ('gpt-2'), which is what frugallm export writes")
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind != TOKEN_UNUSED}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, kind in enumerate(types) if kind == TOKEN_CONTROL])
    name = lambda k: None if (i := field(r, k)) is None else tokens[i]
    template = field(r, "tokenizer.chat_template")
    return Tokenizer(tok, bos=name("tokenizer.ggml.bos_token_id"), eos=name("tokenizer.ggml.eos_token_id"),
                     chat_template=None if template == CHAT_TEMPLATE else template)
