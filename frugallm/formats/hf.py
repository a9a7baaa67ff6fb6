"""Hugging Face DeepSeek-V2/V3/V3.2 <-> frugallm: one key table, both directions (docs/design/hf-interop.md);
config.json is mapped by hf_config.py.

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
from ..config import ModelConfig
from ..model.transformer import Transformer
from ..kernels.fp8 import E4M3, weight_dequant
from ..kernels.quantize import SUFFIX
from ..tokenizer import TOKENIZER, Tokenizer, load_tokenizer
from ..names import CONFIG, WEIGHTS
from . import hf_v4
from .hf_config import MODEL_TYPES, config_from_hf, config_to_hf, hf_format  # noqa: F401 (re-exported)

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
    """Load a HF DeepSeek-V2/V3/V3.2/V4 directory (config.json + *.safetensors, sharded or FP8) with MTP.

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
        raise FileNotFoundError(f"{path} has no config.json; pass a Hugging Face DeepSeek-V2/V3/V4 model directory")
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
        cfg, state = (_read_v4 if cfg.attention == "hybrid" else _read)(ckpt, cfg, keep, dtype, path)
    if keep:
        from ..kernels.quantize import from_quantized_state_dict  # noqa: E402

        model = from_quantized_state_dict(cfg, state)
        return model if dtype is None else model.to(dtype)
    return Transformer.from_state_dict(cfg, state)


def _read(ckpt: _Checkpoint, cfg: ModelConfig, keep: bool, dtype, path) -> tuple[ModelConfig, dict]:
    """The state dict of a V2/V3/V3.2 checkpoint (the key table above), and its config with the MTP
    layers it holds."""
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
    return cfg, state


def _read_v4(ckpt: _Checkpoint, cfg: ModelConfig, keep: bool, dtype, path) -> tuple[ModelConfig, dict]:
    """A deepseek_v4 checkpoint's state dict (hf_v4.py's key table) and its config with the MTP layers it holds."""
    present = hf_v4.mtp_present(ckpt, cfg, path)
    if present < cfg.n_mtp:
        cfg = cfg.replace(n_mtp=present, layer_types=cfg.layer_types[:cfg.n_layers + present])
    with torch.device("meta"):
        skeleton = Transformer(cfg).state_dict()  # names and shapes only
    return cfg, hf_v4.read_state(ckpt, cfg, keep, dtype, path, skeleton)


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
    tensors = (hf_v4.release_tensors if cfg.attention == "hybrid" else _hf_tensors)(state, cfg, dtype)
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


def _hf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype) -> dict[str, torch.Tensor]:
    """frugallm's state dict under the V2/V3/V3.2 keys, MTP's copies of the embedding and head included."""
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
    return tensors


def mtp_note(cfg: ModelConfig) -> str | None:
    """What a user loading an export with transformers should know about the MTP layer, or None."""
    if not cfg.n_mtp:
        return None
    v4 = cfg.attention == "hybrid"  # the release's mtp.k prefix (hf_v4.py), else V3's extra layers
    layers = ", ".join(f"mtp.{k}" if v4 else f"model.layers.{cfg.n_layers + k}" for k in range(cfg.n_mtp))
    return (f"transformers does not run the multi-token-prediction (MTP) layer ({layers}): loading the folder "
            f"{'ignores' if v4 else 'lists'} its weights{'' if v4 else ' as UNEXPECTED'}, which is harmless. They are "
            f"kept, as in DeepSeek-{'V4' if v4 else 'V3'}'s own "
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
