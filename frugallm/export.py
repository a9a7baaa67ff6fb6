"""Exports of a trained model for use elsewhere: a Hugging Face folder, a llama.cpp GGUF file, and a
weight-only quantized copy (int8 / fp8).

The orchestration only: open the source (plan.load) and its tokenizer (formats/checkpoint.py), quantize
its weights (kernels/quantize.py), and write them in a layout (formats/hf.py, formats/quantized.py).
Each of those steps lives in its own room.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .formats import hf
from .formats.gguf import TYPES as GGUF_TYPES
from .formats.gguf import check_out, check_representable, pre_tokenizer, write_gguf
from .formats.checkpoint import load_tokenizer
from .formats.quantized import check_layout, check_request, write_quantized
from .kernels.fp8 import DEFAULT_SKIP
from .kernels.quantize import quantize_model
from .plan import load


def quantize_checkpoint(src, to: str, out, *, layout: str | None = None, skip=DEFAULT_SKIP,
                        dtype: torch.dtype = torch.bfloat16):
    """Write a weight-only quantized copy of `src` to `out` for inference; returns out's Path.

    src: a frugallm run dir (its last good checkpoint), a checkpoint dir, or a Hugging Face
        DeepSeek dir (FP8 or quantized sources are dequantized first), read with frugallm.load.
    to: "int8" (per output channel), "int4" (GGUF q4_0 codes, groups of 32) or "fp8" (e4m3, 128x128 blocks).
    layout: "deepseek" (a Hugging Face directory, FP8 only; the default for fp8) or "frugallm"
        (the default for int8; any model): see formats/quantized.py.
    skip: name patterns kept high precision (quantize_model); dtype: of the tensors kept so.
    The tokenizer files of src are copied, so frugallm.load_tokenizer(out) works.
    """
    layout, guard = check_request(src, to, out, layout)
    model = load(src, dtype=torch.float32, quantized=False)
    check_layout(model, layout)
    quantize_model(model, to, skip)
    model.to(dtype)  # the tensors kept high precision are stored in dtype (codes and scales stay as they are)
    return write_quantized(model, out, to, layout, src, guard, skip, dtype)


def to_hf(model, path: str | os.PathLike, dtype: torch.dtype | None = None, files=(), *, tokenizer=None,
          log=None) -> Path:
    """Write `model` as a complete Hugging Face folder: config.json, model.safetensors, the tokenizer
    (AutoTokenizer loads it; it adds bos in front of a text as frugallm does) and a README.md.

    model: a Transformer, or the path of a run (or of any model frugallm.load opens), whose weights
        are read and whose tokenizer is written unless `tokenizer` names another.

    tokenizer: a frugallm Tokenizer, or the path of a run (its verified checkpoint's tokenizer), a
        checkpoint, a Hugging Face folder or a tokenizer.json; for a model from frugallm.load(RUN),
        pass RUN. Without one (and no tokenizer.json among `files`), the folder has none: a warning.
    log(line): told the MTP note (formats/hf.py mtp_note) when the model has MTP modules.
    dtype, files: formats/hf.py to_hf's."""
    if isinstance(model, (str, os.PathLike)):  # a run (or any model path): its weights, and its tokenizer
        tokenizer = model if tokenizer is None else tokenizer
        model = load(model, quantized=False)
    if tokenizer is not None and not hasattr(tokenizer, "hf_files"):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer is None and not any(Path(f).name == hf.TOKENIZER for f in files):
        warnings.warn(f"{path} gets no tokenizer, so AutoTokenizer.from_pretrained cannot load it; pass "
                      f"tokenizer= (the run directory the model was loaded from, or its Tokenizer)")
    out = hf.to_hf(model, path, dtype, files, tokenizer=tokenizer)
    if log is not None and (note := hf.mtp_note(model.config)):
        log(note)
    return out


HF_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_GGUF_TYPE = "f16"  # llama.cpp's converter's default for a float model


def export(src, to: str, out=None, type: str | None = None, log=None) -> Path:
    """`frugallm export`: the model at `src` (a run, checkpoint, quantized export, Hugging Face folder
    or GGUF) with its tokenizer and chat template, as a Hugging Face folder (to="hf"; type f32, f16 or
    bf16, default: as stored) or as one llama.cpp deepseek2 GGUF file (to="gguf"; type f32, f16,
    bf16, q8_0 or q4_0, default f16). out: default beside src, SRC-hf or SRC-TYPE.gguf. log(line):
    told what the export leaves out. Everything that can be refused is refused before the weights
    are read."""
    log = log or (lambda line: None)
    src = Path(src)
    base = src.with_suffix("") if src.suffix == ".gguf" else src
    if to == "hf":
        if type is not None and type not in HF_TYPES:
            raise ValueError(f"--type {type} is not a Hugging Face weight type; choose one of {tuple(HF_TYPES)} "
                             f"(quantized types are for --to gguf)")
        out = out or f"{base}-hf"
        return to_hf(str(src), out, HF_TYPES.get(type), log=log)
    if to != "gguf":
        raise ValueError(f"unknown export target {to!r}; choose hf or gguf")
    type = type or DEFAULT_GGUF_TYPE
    if type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {type!r}; choose one of {GGUF_TYPES}")
    out = check_out(out or f"{base}-{type}.gguf", sources=[src])
    from .formats.open import open as open_model

    check_representable(open_model(src).config)
    tokenizer = load_tokenizer(src)
    pre_tokenizer(json.loads(tokenizer.to_str()))  # a tokenizer llama.cpp cannot apply: refused before the weights
    model = load(src)
    if model.config.n_mtp:
        log(f"the model's {model.config.n_mtp} MTP module(s) are not written: llama.cpp's deepseek2 layout has "
            f"none (its own converter drops them too), so the GGUF decodes without self-speculation")
    return write_gguf(model, tokenizer, out, type, name=base.name, sources=[src])
