"""Quantized checkpoints on disk: write one from a trained model, load one keeping its codes.

Two layouts, both holding kernels/quantize.py's state dict (codes under the weight's own name,
fp32 NAME_scale_inv beside it):

layout="deepseek" (fp8 only; the default for fp8): a Hugging Face DeepSeek-V2/V3 directory as
    DeepSeek ships V3 (docs/design/quantization.md), written by convert.to_hf: e4m3 `X.weight`, fp32
    `X.weight_scale_inv` (ceil(out/128), ceil(in/128)), quantization_config in config.json, the
    other tensors in `dtype`. HC/mHC models have no HF form: use layout="frugallm" for them.
layout="frugallm" (the default for int8 and int4; any model): a frugallm checkpoint directory,
    config.json        ModelConfig, as in formats/checkpoint.py
    quantization.json  {"format": "int8" | "int4" | "fp8", "layout": "frugallm", "scale_suffix": "_scale_inv", ...}
                       (int4: uint8 codes (N, K/2), two a byte, and fp16 scales (N, K/32): kernels/int4.py)
    model.safetensors  the quantized model's state dict
    tokenizer files, and manifest.json (frugallm/io.py: kind "quantized", sha256 of every file, last)
Both load with frugallm.load(dir): codes kept when no dtype is asked for, else dequantized
(convert.keep_quantized). Both are written through frugallm/io.py, as kind "quantized": atomic, and
never over the source or a directory that is not an earlier quantized export.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import io
from ..config import ModelConfig
from ..model.transformer import Transformer
from ..tokenizer import TOKENIZER
from .checkpoint import latest
from ..names import CHECKPOINTS, CONFIG, QUANTIZATION, WEIGHTS
from .hf import hf_format, keep_quantized, to_hf
from ..kernels.fp8 import DEFAULT_SKIP
from ..kernels.quantize import FORMATS, SUFFIX, dequantize_state_dict, from_quantized_state_dict, quantize_model

LAYOUTS = ("deepseek", "frugallm")
META = QUANTIZATION  # frugallm layout: {"format", "layout", "scale_suffix", ...}
TOKENIZER_FILES = (TOKENIZER, "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def check_request(src, to: str, out, layout: str | None) -> tuple[str, dict]:
    """The layout a quantized export of `src` to `to` gets, and the output guard, checked before the
    minutes of loading and quantizing: an unknown format or layout, or a bad --out (the run itself,
    `.`, ...) is refused first."""
    if to not in FORMATS:
        raise ValueError(f"unknown quantization format {to!r}; choose one of {FORMATS}")
    layout = layout or ("deepseek" if to == "fp8" else "frugallm")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if layout == "deepseek" and to != "fp8":
        raise ValueError("the DeepSeek (Hugging Face) layout holds FP8 only; use layout='frugallm' for int8 / int4")
    guard = dict(sources=[src], suggest=f"{Path(src)}-{to}" if Path(src).name else None)
    io.check_output(out, "quantized", **guard)
    return layout, guard


def check_layout(model, layout: str) -> None:
    """The DeepSeek layout is a Hugging Face directory: refuse a model it cannot represent."""
    if layout == "deepseek":
        try:
            hf_format(model.config)
        except ValueError as e:
            raise ValueError(f"{e}. Pass layout='frugallm' to write it in frugallm's own quantized layout") from None


def write_quantized(model, out, to: str, layout: str, src, guard: dict, skip=DEFAULT_SKIP,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a model already quantized to `to` (kernels/quantize.py quantize_model) and cast to
    `dtype` in `layout`, with the tokenizer files of `src`; returns out's Path."""
    files = _tokenizer_files(Path(src))
    if not files:
        warnings.warn(f"{src} holds no tokenizer files; {out} will have none")
    if layout == "deepseek":
        return to_hf(model, out, dtype=dtype, files=files, kind="quantized", **guard)
    out = Path(out)
    with io.write_directory(out, "quantized", **guard) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHTS,
                  metadata={"format": "pt"})
        model.config.to_json(tmp / CONFIG)
        granularity = {"int8": "per output channel", "int4": "groups of 32 inputs (GGUF q4_0)"}.get(to, "128x128 blocks")
        (tmp / META).write_text(json.dumps(
            {"format": to, "layout": "frugallm", "scale_suffix": SUFFIX, "granularity": granularity,
             "skip": list(skip), "dtype": str(dtype).removeprefix("torch.")}, indent=2) + "\n")
        for f in files:
            shutil.copyfile(f, tmp / f.name)
    return out


def _tokenizer_files(src) -> list:
    """Tokenizer files of a run (its last checkpoint first, then the run dir) or of a model dir."""
    dirs = [latest(src), src] if (src / CHECKPOINTS).exists() else [src]
    found = {}
    for d in filter(None, dirs):
        for name in TOKENIZER_FILES:
            if name not in found and (d / name).exists():
                found[name] = d / name
    return list(found.values())


def load_quantized(ckpt, dtype: torch.dtype | None = None, quantized: bool | None = None):
    """A model from frugallm's quantized layout (frugallm.load calls this when quantization.json
    is there): codes kept, or dequantized into dtype, by convert.keep_quantized's rule."""
    io.verify(ckpt, "quantized")
    meta = json.loads((ckpt / META).read_text())
    if meta.get("format") not in FORMATS or meta.get("scale_suffix") != SUFFIX:
        raise ValueError(f"{ckpt}/quantization.json: {meta} is not a layout this frugallm reads "
                         f"(format in {FORMATS}, scale_suffix {SUFFIX!r})")
    cfg = ModelConfig.from_json(ckpt / CONFIG)
    state = load_file(ckpt / WEIGHTS)
    if keep_quantized(True, dtype, quantized, ckpt):
        model = from_quantized_state_dict(cfg, state)
        return model if dtype is None else model.to(dtype)
    return Transformer.from_state_dict(cfg, dequantize_state_dict(state, dtype or torch.float32))
